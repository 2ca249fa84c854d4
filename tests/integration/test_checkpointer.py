"""The checkpointer contract on every backend: round trips, partial loads, commit, bad input."""

from __future__ import annotations

import io
import logging

import pytest
import torch
from backends import ALL_BACKENDS, Backend
from cases import all_cases_state_dict, assert_bitwise_equal, shares_storage

import cloudckpt
from cloudckpt import (
    CheckpointerConfig,
    CheckpointNotFoundError,
    CheckpointWriterConfig,
    CommitConflictError,
    RetryConfig,
    StateDictMismatchError,
    UnsupportedURLError,
)
from cloudckpt.manifest import MANIFEST_NAME

FAST_RETRY = RetryConfig(max_attempts=3, initial_backoff_secs=0.01, max_backoff_secs=0.05)


def config_for(backend: Backend, **kwargs: object) -> CheckpointerConfig:
    return CheckpointerConfig(
        storage_options=backend.storage_options,
        retry_config=FAST_RETRY,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture
def sync_ckpt(backend: Backend) -> cloudckpt.SyncCheckpointer:
    ckpt = cloudckpt.make_sync_checkpointer(config_for(backend))
    yield ckpt
    ckpt.close()


@pytest.mark.parametrize("backend", ALL_BACKENDS, indirect=True)
def test_sync_round_trip_is_bitwise(
    backend: Backend, sync_ckpt: cloudckpt.SyncCheckpointer
) -> None:
    sd = all_cases_state_dict()
    path = backend.url("step-1")
    assert sync_ckpt.save(path, sd) is None
    loaded = sync_ckpt.load(path)
    assert_bitwise_equal(loaded, sd)
    assert shares_storage(loaded["shared_a"], loaded["shared_b"])
    metrics = sync_ckpt.last_metrics
    assert metrics is not None and metrics.committed and metrics.bytes > 0


ASYNC_BACKENDS = [b for b in ALL_BACKENDS if b != "memory"]


@pytest.mark.parametrize("backend", ASYNC_BACKENDS, indirect=True)
def test_async_round_trip_and_snapshot_isolation(backend: Backend) -> None:
    sd = all_cases_state_dict()
    expected = all_cases_state_dict()
    ckpt = cloudckpt.make_async_checkpointer(config_for(backend))
    try:
        stage_future, write_future = ckpt.save(backend.url("step-2"), sd)
        stage_future.result()
        sd["shared_a"].add_(1.0)  # training mutates right after staging
        sd["tensors"]["int64"].zero_()
        metrics = write_future.result()
        assert metrics.committed and metrics.bytes > 0
        assert metrics.blocked_secs is not None and metrics.commit_secs is not None
        loaded = ckpt.load(backend.url("step-2"))
        assert_bitwise_equal(loaded, expected)
    finally:
        ckpt.close()


def test_async_save_to_memory_is_refused_with_a_reason() -> None:
    # Explicit gap in the conformance matrix: memory:// cannot be shared with the subprocess.
    ckpt = cloudckpt.make_async_checkpointer()
    try:
        with pytest.raises(UnsupportedURLError, match="memory:// lives inside one process"):
            ckpt.save("memory://bucket/run/step-1", {"a": torch.ones(1)})
    finally:
        ckpt.close()


@pytest.mark.parametrize("backend", ALL_BACKENDS, indirect=True)
def test_partial_load_fills_only_given_keys(
    backend: Backend, sync_ckpt: cloudckpt.SyncCheckpointer
) -> None:
    sd = all_cases_state_dict()
    path = backend.url("step-3")
    sync_ckpt.save(path, sd)
    target = {
        "shared_b": torch.zeros(3, 6),
        "tensors": {"bfloat16": torch.zeros(5, 3, dtype=torch.bfloat16), "not_saved": None},
        "int": None,
    }
    dest = target["shared_b"]
    loaded = sync_ckpt.load(path, target)
    assert loaded["shared_b"] is dest  # filled in place
    assert_bitwise_equal(loaded["shared_b"], sd["shared_b"].contiguous())
    assert_bitwise_equal(loaded["tensors"]["bfloat16"], sd["tensors"]["bfloat16"])
    assert loaded["int"] == 42
    assert set(loaded) == {"shared_b", "tensors", "int"}
    with pytest.raises(StateDictMismatchError, match=r"tensors\.not_saved"):
        sync_ckpt.load(path, {"tensors": {"not_saved": None}}, strict=True)


@pytest.mark.parametrize("backend", ALL_BACKENDS, indirect=True)
def test_partial_load_rejects_shape_and_dtype_mismatch(
    backend: Backend, sync_ckpt: cloudckpt.SyncCheckpointer
) -> None:
    path = backend.url("step-4")
    sync_ckpt.save(path, {"w": torch.ones(4, 4), "b": torch.ones(4)})
    with pytest.raises(StateDictMismatchError, match=r"key w: .*shape \(4, 5\)"):
        sync_ckpt.load(path, {"w": torch.zeros(4, 5)})
    with pytest.raises(StateDictMismatchError, match=r"key b: .*float16"):
        sync_ckpt.load(path, {"b": torch.zeros(4, dtype=torch.float16)})


@pytest.mark.parametrize("backend", ALL_BACKENDS, indirect=True)
def test_map_location_cpu_and_meta(backend: Backend, sync_ckpt: cloudckpt.SyncCheckpointer) -> None:
    sd = {"w": torch.randn(64, 64), "n": 3}
    path = backend.url("step-5")
    sync_ckpt.save(path, sd)
    cpu = sync_ckpt.load(path, default_map_location="cpu")
    assert_bitwise_equal(cpu, sd)
    meta = sync_ckpt.load(path, default_map_location="meta")
    assert meta["w"].device.type == "meta" and meta["w"].shape == (64, 64) and meta["n"] == 3
    assert sync_ckpt._reader.last_bytes_fetched < 64 * 64 * 4  # no tensor bytes
    partial_meta = sync_ckpt.load(path, {"w": None}, default_map_location="meta")
    assert partial_meta["w"].device.type == "meta"


@pytest.mark.parametrize("backend", ALL_BACKENDS, indirect=True)
def test_losing_a_commit_race_names_the_other_save(backend: Backend) -> None:
    """Another job commits the same path after this save's object is durable but before its
    manifest: the conditional manifest put fails clearly, and the winner's checkpoint stands."""
    path = backend.url("step-race")
    other = cloudckpt.make_sync_checkpointer(config_for(backend))

    class OtherJobCommitsNow(cloudckpt.WriterHook):
        def pre_commit(self, path: str, **kwargs: object) -> None:
            other.save(path, {"v": torch.tensor([2])})

        def post_commit(self, path: str, **kwargs: object) -> None:
            raise AssertionError("the losing save must not reach post_commit")

    loser = cloudckpt.make_sync_checkpointer(config_for(backend), commit_hook=OtherJobCommitsNow())
    with pytest.raises(CommitConflictError, match=r"another save committed .* first") as err:
        loser.save(path, {"v": torch.tensor([1])})
    assert err.value.url == backend.url("step-race").rstrip("/")
    assert "own run prefix" in str(err.value) and "cloudckpt verify" in str(err.value)
    assert other.load(path)["v"].item() == 2


@pytest.mark.parametrize("backend", ALL_BACKENDS, indirect=True)
def test_second_commit_to_same_path_is_refused_unless_overwrite(backend: Backend) -> None:
    path = backend.url("step-6")
    first = cloudckpt.make_sync_checkpointer(config_for(backend))
    first.save(path, {"v": torch.tensor([1])})
    with pytest.raises(CommitConflictError, match="already exists"):
        first.save(path, {"v": torch.tensor([2])})
    assert first.load(path)["v"].item() == 1
    over = cloudckpt.make_sync_checkpointer(
        config_for(backend, writer_config=CheckpointWriterConfig(overwrite=True))
    )
    over.save(path, {"v": torch.tensor([3])})
    assert first.load(path)["v"].item() == 3


@pytest.mark.parametrize("backend", ALL_BACKENDS, indirect=True)
def test_path_without_manifest_is_not_a_checkpoint(
    backend: Backend, sync_ckpt: cloudckpt.SyncCheckpointer
) -> None:
    with pytest.raises(CheckpointNotFoundError, match="no committed checkpoint") as info:
        sync_ckpt.load(backend.url("never-saved"))
    assert isinstance(info.value, FileNotFoundError)
    assert backend.url("never-saved").rstrip("/") in str(info.value) or backend.name == "local"


@pytest.mark.parametrize("backend", ALL_BACKENDS, indirect=True)
def test_failure_midway_through_serialization_commits_nothing(
    backend: Backend, sync_ckpt: cloudckpt.SyncCheckpointer, monkeypatch: pytest.MonkeyPatch
) -> None:
    older = backend.url("step-7")
    sync_ckpt.save(older, {"w": torch.full((16,), 7.0)})
    real_serialize = cloudckpt.writer.serialize
    fail_after_bytes = 12 << 20

    def serialize_then_fail(obj: object, out: cloudckpt.storage.Upload, **kw: object) -> object:
        class Tripwire:
            def write(self, data: memoryview) -> None:
                if out.bytes_written + data.nbytes > fail_after_bytes:
                    raise RuntimeError("serializer failed halfway")
                out.write(data)

        return real_serialize(obj, Tripwire(), **kw)

    monkeypatch.setattr(cloudckpt.writer, "serialize", serialize_then_fail)
    path = backend.url("step-8")
    with pytest.raises(RuntimeError, match="serializer failed halfway"):
        sync_ckpt.save(path, {"a": torch.randn(2 << 20), "b": torch.randn(2 << 20)})
    storage = sync_ckpt._writer.storage(path)
    assert [o.url for o in storage.list(path)] == []
    assert storage.list_pending_uploads(backend.base_url) == []
    with pytest.raises(CheckpointNotFoundError):
        sync_ckpt.load(path)
    assert sync_ckpt.load(older)["w"][0].item() == 7.0


def test_unsupported_scheme_is_a_clear_error() -> None:
    ckpt = cloudckpt.make_sync_checkpointer()
    with pytest.raises(UnsupportedURLError, match="unsupported URL scheme 'ftp'"):
        ckpt.save("ftp://host/run/step-1", {"a": torch.ones(1)})
    with pytest.raises(UnsupportedURLError, match="unsupported URL scheme 'hdfs'"):
        ckpt.load("hdfs://nn/run/step-1")


# memory:// and local directories have no buckets (a missing directory is created).
@pytest.mark.parametrize("backend", ["moto", "seaweedfs", "gcs"], indirect=True)
def test_missing_bucket_is_named(backend: Backend) -> None:
    scheme = backend.base_url.split("://")[0]
    path = f"{scheme}://no-such-bucket-cloudckpt/run/step-1"
    ckpt = cloudckpt.make_sync_checkpointer(config_for(backend))
    with pytest.raises(cloudckpt.BucketNotFoundError, match="no-such-bucket-cloudckpt") as info:
        ckpt.save(path, {"a": torch.ones(1)})
    assert isinstance(info.value, FileNotFoundError)
    assert info.value.rank == 0 and "(rank 0)" in str(info.value)  # the saving rank is named
    with pytest.raises(FileNotFoundError, match="no-such-bucket-cloudckpt"):
        ckpt.load(path)


# Only SeaweedFS checks signatures here: moto and fake-gcs-server accept any credentials,
# and memory/local have none, so the guarantee can be proven on SeaweedFS alone.
@pytest.mark.parametrize("backend", ["seaweedfs"], indirect=True)
def test_wrong_credentials_fail_once_without_retry(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    options = {**backend.storage_options, "secret": "definitely-wrong"}
    ckpt = cloudckpt.make_sync_checkpointer(
        CheckpointerConfig(storage_options=options, retry_config=FAST_RETRY)
    )
    with caplog.at_level(logging.WARNING), pytest.raises(cloudckpt.PermissionDeniedError) as info:
        ckpt.save(backend.url("step-1"), {"a": torch.ones(1)})
    assert backend.base_url.split("/")[2] in str(info.value)
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]


@pytest.mark.parametrize("backend", ["moto"], indirect=True)
def test_upstream_checkpointer_with_cloudckpt_writer_and_reader(backend: Backend) -> None:
    from torch.distributed.checkpoint._experimental import RankInfo, SyncCheckpointer

    from cloudckpt.config import StorageConfig

    storage_config = StorageConfig(storage_options=backend.storage_options)
    rank = RankInfo(global_rank=0, global_world_size=1)
    upstream = SyncCheckpointer(
        writer=cloudckpt.CheckpointWriter(rank_info=rank, storage_config=storage_config),
        reader=cloudckpt.CheckpointReader(rank, storage_config=storage_config),
    )
    sd = all_cases_state_dict()
    upstream.save(backend.url("step-9"), sd)
    assert_bitwise_equal(upstream.load(backend.url("step-9")), sd)
    # the rank object is a plain torch.save file
    raw = upstream._reader.storage(backend.base_url).get_bytes(
        backend.url("step-9", "checkpoint_0.pt")
    )
    assert_bitwise_equal(torch.load(io.BytesIO(raw), weights_only=True), sd)


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_local_checkpoint_loads_with_upstream_reader(
    backend: Backend, sync_ckpt: cloudckpt.SyncCheckpointer
) -> None:
    from torch.distributed.checkpoint._experimental import CheckpointReader, RankInfo

    sd = all_cases_state_dict()
    path = backend.url("step-10")
    sync_ckpt.save(path, sd)
    loaded, missing = CheckpointReader(RankInfo(global_rank=0, global_world_size=1)).read(path)
    assert missing == []
    assert_bitwise_equal(loaded, sd)


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_upstream_written_checkpoint_needs_the_explicit_option(backend: Backend) -> None:
    from torch.distributed.checkpoint._experimental import make_sync_checkpointer as upstream_make

    sd = {"w": torch.randn(3, 3), "step": 5}
    path = backend.url("upstream-step")
    upstream_make().save(path, sd)
    plain = cloudckpt.make_sync_checkpointer()
    with pytest.raises(CheckpointNotFoundError, match="allow_unmanifested"):
        plain.load(path)
    lenient = cloudckpt.make_sync_checkpointer(
        CheckpointerConfig(reader_config=cloudckpt.CheckpointReaderConfig(allow_unmanifested=True))
    )
    assert_bitwise_equal(lenient.load(path), sd)
    target = {"w": torch.zeros(3, 3)}
    assert_bitwise_equal(lenient.load(path, target)["w"], sd["w"])


@pytest.mark.parametrize("backend", ALL_BACKENDS, indirect=True)
def test_flipped_byte_is_a_checksum_error_naming_the_key(
    backend: Backend, sync_ckpt: cloudckpt.SyncCheckpointer
) -> None:
    path = backend.url("step-11")
    sync_ckpt.save(path, {"layer.weight": torch.randn(256), "bias": torch.randn(8)})
    storage = sync_ckpt._writer.storage(path)
    obj = backend.url("step-11", "checkpoint_0.pt")
    manifest = sync_ckpt._reader.read_manifest(path)
    span = next(
        manifest.rank(0).layout.storage(t.storage_key)
        for t in manifest.rank(0).layout.tensors
        if t.name == "layer.weight"
    )
    data = bytearray(storage.get_bytes(obj))
    data[span.offset + 10] ^= 0xFF
    _replace_object(storage, obj, bytes(data))
    with pytest.raises(cloudckpt.ChecksumMismatchError, match=r"layer\.weight.*rank 0"):
        sync_ckpt.load(path)
    # a partial load of the untouched key still works
    assert sync_ckpt.load(path, {"bias": None})["bias"].shape == (8,)


@pytest.mark.parametrize("backend", ALL_BACKENDS, indirect=True)
def test_truncated_object_is_refused_before_any_tensor(
    backend: Backend, sync_ckpt: cloudckpt.SyncCheckpointer
) -> None:
    path = backend.url("step-12")
    sync_ckpt.save(path, {"w": torch.randn(1024)})
    storage = sync_ckpt._writer.storage(path)
    obj = backend.url("step-12", "checkpoint_0.pt")
    _replace_object(storage, obj, storage.get_bytes(obj)[:-100])
    with pytest.raises(cloudckpt.CorruptCheckpointError, match="truncated"):
        sync_ckpt.load(path)
    storage.delete([obj])
    with pytest.raises(cloudckpt.CorruptCheckpointError, match="missing"):
        sync_ckpt.load(path)


def _replace_object(storage: cloudckpt.storage.Storage, url: str, data: bytes) -> None:
    up = storage.open_upload(url)
    up.write(data)
    up.commit()


def test_manifest_name_is_stable() -> None:
    # Users and the example script look for this name; changing it breaks old checkpoints.
    assert MANIFEST_NAME == "cloudckpt.manifest.json"


@pytest.mark.parametrize("backend", ["local", "moto"], indirect=True)
def test_commit_hooks_and_metadata(backend: Backend) -> None:
    calls: list[tuple[str, str, bool]] = []
    manifest_url = backend.url("step-13", MANIFEST_NAME)

    class Hook(cloudckpt.WriterHook):
        def pre_commit(self, path: str, **kwargs: object) -> None:
            calls.append(("pre", path, storage.exists(manifest_url)))

        def post_commit(self, path: str, **kwargs: object) -> None:
            calls.append(("post", path, storage.exists(manifest_url)))
            assert kwargs["metadata"] == {"step": 13, "loss": 0.5}

    ckpt = cloudckpt.make_sync_checkpointer(config_for(backend), commit_hook=Hook())
    storage = ckpt._writer.storage(backend.base_url)
    ckpt.save(backend.url("step-13"), {"w": torch.ones(2)}, metadata={"step": 13, "loss": 0.5})
    path = backend.url("step-13").rstrip("/")
    assert calls == [("pre", path, False), ("post", path, True)]
    assert ckpt._reader.read_manifest(path).user_metadata == {"step": 13, "loss": 0.5}
