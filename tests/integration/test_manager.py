"""CheckpointManager against real stores: listing, latest, retention, gc and verify."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import pytest
import torch
from backends import Backend
from cases import assert_bitwise_equal

import cloudckpt
from cloudckpt import CheckpointerConfig, RetryConfig, StorageConfig, UploadConfig
from cloudckpt.manager import CheckpointManager, parse_step, verify_checkpoint
from cloudckpt.manifest import MANIFEST_NAME, Manifest, rank_object_name
from cloudckpt.storage import Storage, get_storage, join_url

FAST_RETRY = RetryConfig(max_attempts=3, initial_backoff_secs=0.01, max_backoff_secs=0.05)
PART_BYTES = 5 << 20  # the S3 minimum part size


def storage_config(backend: Backend) -> StorageConfig:
    return StorageConfig(
        storage_options=backend.storage_options,
        retry=FAST_RETRY,
        upload=UploadConfig(part_size_bytes=PART_BYTES, max_concurrency=2),
    )


@pytest.fixture
def ckpt(backend: Backend) -> Iterator[cloudckpt.SyncCheckpointer]:
    checkpointer = cloudckpt.make_sync_checkpointer(
        CheckpointerConfig(storage_options=backend.storage_options, retry_config=FAST_RETRY)
    )
    yield checkpointer
    checkpointer.close()


@pytest.fixture
def storage(backend: Backend) -> Iterator[Storage]:
    store = get_storage(backend.base_url, storage_config(backend))
    yield store
    store.close()


def state(step: int) -> dict[str, object]:
    return {"w": torch.full((64,), float(step)), "b": torch.arange(8) + step, "step": step}


def save(ckpt: cloudckpt.SyncCheckpointer, url: str, step: int) -> None:
    ckpt.save(url, state(step), metadata={"step": step})


def write_rank_object_only(storage: Storage, ckpt_url: str) -> None:
    """What a crashed save leaves: a rank object and no manifest."""
    storage.put_bytes(join_url(ckpt_url, rank_object_name(0)), b"partial rank object")


def urls_under(storage: Storage, url: str) -> list[str]:
    return [o.url for o in storage.list(url)]


@pytest.mark.parametrize(
    ("name", "step"),
    [
        ("step-100", 100),
        ("step_100", 100),
        ("step100", 100),
        ("100", 100),
        ("ckpt-000100", 100),
        ("global_step=7", 7),
        ("epoch3.step-12", 12),
        ("ckpt-v2", None),
        ("final", None),
    ],
)
def test_step_is_parsed_from_the_name(name: str, step: int | None) -> None:
    assert parse_step(name) == step


@pytest.mark.parametrize("backend", ["local", "moto"], indirect=True)
def test_list_and_latest_across_committed_and_uncommitted(
    backend: Backend, ckpt: cloudckpt.SyncCheckpointer, storage: Storage
) -> None:
    run = backend.url("run")
    for step in (1, 2, 10):
        save(ckpt, join_url(run, f"step-{step}"), step)
    save(ckpt, join_url(run, "step-11"), 11)
    storage.delete([join_url(run, "step-11", MANIFEST_NAME)])  # manifest lost: uncommitted
    write_rank_object_only(storage, join_url(run, "step-12"))  # crashed before any record
    save(ckpt, join_url(run, "final"), 99)  # committed, no step
    storage.put_bytes(join_url(run, "notes", "readme.txt"), b"not a checkpoint")
    storage.put_bytes(join_url(run, "top-level.txt"), b"not a checkpoint either")

    manager = CheckpointManager(run, storage_options=storage_config(backend))
    listed = manager.list()
    assert [(c.name, c.step, c.committed) for c in listed] == [
        ("final", None, True),
        ("step-1", 1, True),
        ("step-2", 2, True),
        ("step-10", 10, True),
        ("step-11", 11, False),
        ("step-12", 12, False),
    ]
    by_name = {c.name: c for c in listed}
    for c in listed:
        assert c.url == join_url(manager.prefix_url, c.name)
        assert c.size_bytes == sum(o.size_bytes for o in storage.list(c.url))
        assert c.ranks == 1
        assert c.time_secs is not None
    step10 = by_name["step-10"]
    assert step10.problem is None and step10.manifest is not None
    assert step10.time_secs == step10.manifest.created_secs
    assert step10.manifest.user_metadata == {"step": 10}
    assert by_name["step-11"].problem == "no manifest"
    assert by_name["step-12"].problem == "no manifest"
    assert by_name["step-12"].size_bytes == len(b"partial rank object")

    latest = manager.latest()
    assert latest is not None and latest.name == "step-10"  # the uncommitted 11 and 12 are not
    loaded = manager.load_latest(ckpt)
    assert loaded is not None and loaded[0].name == "step-10"
    assert_bitwise_equal(loaded[1], state(10))
    reader = cloudckpt.CheckpointReader(storage_config=storage_config(backend))
    via_reader = manager.load_latest(reader, {"w": None})
    assert via_reader is not None
    assert_bitwise_equal(via_reader[1]["w"], state(10)["w"])
    reader.close()
    manager.close()


@pytest.mark.parametrize("backend", ["local", "moto"], indirect=True)
def test_damaged_manifest_or_missing_object_is_not_committed(
    backend: Backend, ckpt: cloudckpt.SyncCheckpointer, storage: Storage
) -> None:
    run = backend.url("run")
    for step in (1, 2, 3):
        save(ckpt, join_url(run, f"step-{step}"), step)
    storage.put_bytes(join_url(run, "step-3", MANIFEST_NAME), b'{"format": "something else"}')
    storage.delete([join_url(run, "step-2", rank_object_name(0))])
    manager = CheckpointManager(run, storage_options=storage_config(backend))
    listed = {c.name: c for c in manager.list()}
    assert not listed["step-3"].committed
    assert listed["step-3"].problem is not None
    assert listed["step-3"].problem.startswith("invalid manifest")
    assert not listed["step-2"].committed
    assert listed["step-2"].problem == "rank 0 object checkpoint_0.pt is missing"
    assert manager.latest().name == "step-1"  # type: ignore[union-attr]


@pytest.mark.parametrize("backend", ["local", "moto"], indirect=True)
def test_just_committed_step_shows_at_once(
    backend: Backend, ckpt: cloudckpt.SyncCheckpointer, storage: Storage
) -> None:
    manager = CheckpointManager(backend.url("run"), storage_options=storage_config(backend))
    assert manager.list() == [] and manager.latest() is None
    assert manager.load_latest(ckpt) is None
    for step in (1, 2, 3):
        save(ckpt, manager.path_for(step), step)
        latest = manager.latest()  # the same manager: nothing it listed before may stick
        assert latest is not None and latest.step == step
    storage.delete([join_url(manager.path_for(3), MANIFEST_NAME)])
    assert manager.latest().step == 2  # type: ignore[union-attr]
    save(ckpt, manager.path_for(4), 4)
    assert [c.step for c in manager.list() if c.committed] == [1, 2, 4]


def test_path_for_names_steps_with_optional_padding() -> None:
    manager = CheckpointManager("s3://bucket/run/")
    assert manager.path_for(100) == "s3://bucket/run/step-100"
    padded = CheckpointManager("s3://bucket/run", step_digits=8)
    assert padded.path_for(100) == "s3://bucket/run/step-00000100"
    assert parse_step("step-00000100") == 100
    with pytest.raises(ValueError, match="step must be"):
        manager.path_for(-1)
    with pytest.raises(ValueError, match="step_digits"):
        CheckpointManager("s3://bucket/run", step_digits=0)


@pytest.mark.parametrize("backend", ["local", "moto"], indirect=True)
def test_retention_keep_last_two_across_five_saves(
    backend: Backend, ckpt: cloudckpt.SyncCheckpointer, storage: Storage
) -> None:
    run = backend.url("run-a")
    # neighbours that share the prefix's spelling, and a save in progress
    save(ckpt, backend.url("run-ab", "step-1"), 1)
    save(ckpt, backend.url("run-a-old", "step-1"), 1)
    storage.put_bytes(backend.url("run-a.txt"), b"next to the prefix")
    write_rank_object_only(storage, join_url(run, "step-0"))
    outside_before = {
        url: urls_under(storage, url) for url in (backend.url("run-ab"), backend.url("run-a-old"))
    }

    manager = CheckpointManager(run, storage_options=storage_config(backend))
    deleted_per_save = []
    for step in range(1, 6):
        save(ckpt, manager.path_for(step), step)
        deleted_per_save.append([c.name for c in manager.apply_retention(keep_last=2)])
    assert deleted_per_save == [[], [], ["step-1"], ["step-2"], ["step-3"]]

    listed = manager.list()
    assert [(c.name, c.committed) for c in listed] == [
        ("step-0", False),
        ("step-4", True),
        ("step-5", True),
    ]
    for gone in ("step-1", "step-2", "step-3"):
        assert urls_under(storage, join_url(run, gone)) == []
        if backend.name == "local":
            assert not os.path.exists(join_url(run, gone))
    for url, before in outside_before.items():
        assert urls_under(storage, url) == before
    assert storage.exists(backend.url("run-a.txt"))
    assert_bitwise_equal(ckpt.load(manager.path_for(5)), state(5))


@pytest.mark.parametrize("backend", ["moto"], indirect=True)
def test_retention_keeps_protected_and_every_kth_and_dry_run_deletes_nothing(
    backend: Backend, ckpt: cloudckpt.SyncCheckpointer
) -> None:
    manager = CheckpointManager(backend.url("run"), storage_options=storage_config(backend))
    for step in range(1, 8):
        save(ckpt, manager.path_for(step), step)
    resumed_from = manager.path_for(1)
    would = manager.apply_retention(2, keep_every=3, protect=[resumed_from], dry_run=True)
    assert [c.name for c in would] == ["step-2", "step-4", "step-5"]
    assert [c.step for c in manager.list()] == [1, 2, 3, 4, 5, 6, 7]
    deleted = manager.apply_retention(2, keep_every=3, protect=[resumed_from])
    assert deleted == would
    assert [c.step for c in manager.list()] == [1, 3, 6, 7]
    # protect takes bare names too
    deleted = manager.apply_retention(1, protect=["step-1", "step-3"])
    assert [c.name for c in deleted] == ["step-6"]
    with pytest.raises(ValueError, match="keep_last"):
        manager.apply_retention(0)
    with pytest.raises(ValueError, match="keep_every"):
        manager.apply_retention(1, keep_every=0)
    with pytest.raises(TypeError, match="protect"):
        manager.apply_retention(1, protect="step-1")
    before = [c.name for c in manager.list()]
    with pytest.raises(ValueError, match=r"protect names \['stpe-3'\], which are not checkpoints"):
        manager.apply_retention(1, protect=["stpe-3"])  # a typo must not delete step-3
    assert [c.name for c in manager.list()] == before
    with pytest.raises(TypeError, match=r"older_than_secs must be a number of seconds.*'2h'"):
        manager.gc("2h")  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["local", "moto"], indirect=True)
def test_retention_deletes_the_manifest_first(
    backend: Backend, ckpt: cloudckpt.SyncCheckpointer, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = CheckpointManager(backend.url("run"), storage_options=storage_config(backend))
    for step in (1, 2):
        save(ckpt, manager.path_for(step), step)
    calls: list[list[str]] = []
    real_delete = manager.storage.delete

    def delete_then_crash(urls: object) -> None:
        batch = list(urls)  # type: ignore[call-overload]
        calls.append(batch)
        if len(calls) == 2:
            raise cloudckpt.StorageError("the network went away", url=batch[0])
        real_delete(batch)

    monkeypatch.setattr(manager.storage, "delete", delete_then_crash)
    with pytest.raises(cloudckpt.StorageError, match="network went away"):
        manager.apply_retention(1)
    assert calls[0] == [join_url(manager.path_for(1), MANIFEST_NAME)]
    monkeypatch.undo()
    # half-deleted: listed, but never as committed; gc can finish the job
    half = next(c for c in manager.list() if c.name == "step-1")
    assert not half.committed and half.problem == "no manifest"
    assert manager.latest().name == "step-2"  # type: ignore[union-attr]
    report = manager.gc(older_than_secs=0)
    assert [c.name for c in report.deleted_checkpoints] == ["step-1"]
    assert [c.name for c in manager.list()] == ["step-2"]


@pytest.mark.parametrize("backend", ["moto", "seaweedfs"], indirect=True)
def test_gc_aborts_stale_uploads_and_deletes_old_uncommitted_checkpoints(
    backend: Backend, ckpt: cloudckpt.SyncCheckpointer, storage: Storage
) -> None:
    run = backend.url("run-a")
    manager = CheckpointManager(run, storage_options=storage_config(backend))
    save(ckpt, manager.path_for(1), 1)
    save(ckpt, manager.path_for(2), 2)
    storage.delete([join_url(manager.path_for(2), MANIFEST_NAME)])  # a save that never committed
    crashed = storage.open_upload(join_url(manager.path_for(3), rank_object_name(0)))
    crashed.write(os.urandom(PART_BYTES + 1))  # one part sent: a pending multipart upload
    sibling = storage.open_upload(backend.url("run-ab", "step-1", rank_object_name(0)))
    sibling.write(os.urandom(PART_BYTES + 1))
    try:
        pending = storage.list_pending_uploads(run)
        assert [p.url for p in pending] == [crashed.url]

        young = manager.gc(older_than_secs=10**9)
        assert young.aborted_uploads == [] and young.deleted_checkpoints == []

        dry = manager.gc(older_than_secs=0, dry_run=True)
        assert dry.dry_run
        assert dry.aborted_uploads == pending
        assert [c.name for c in dry.deleted_checkpoints] == ["step-2"]
        assert dry.deleted_objects == len(storage.list(manager.path_for(2)))
        assert dry.freed_bytes == sum(o.size_bytes for o in storage.list(manager.path_for(2)))
        assert storage.list_pending_uploads(run) == pending
        assert [c.name for c in manager.list()] == ["step-1", "step-2"]

        done = manager.gc(older_than_secs=0)
        assert done.aborted_uploads == pending
        assert [c.name for c in done.deleted_checkpoints] == ["step-2"]
        assert storage.list_pending_uploads(run) == []
        assert storage.list(manager.path_for(2)) == []
        assert [(c.name, c.committed) for c in manager.list()] == [("step-1", True)]
        # outside the prefix: untouched
        assert [p.url for p in storage.list_pending_uploads(backend.url("run-ab"))] == [sibling.url]
    finally:
        crashed.abort()  # already gone: logged, not raised
        sibling.abort()


def replace_object(storage: Storage, url: str, data: bytes) -> None:
    up = storage.open_upload(url)
    up.write(data)
    up.commit()


def make_two_rank_checkpoint(
    ckpt: cloudckpt.SyncCheckpointer, storage: Storage, url: str
) -> tuple[dict[str, object], dict[str, object]]:
    """A committed 2-rank checkpoint built from two single-rank saves (no process group)."""
    rank0 = {"layer.weight": torch.randn(256), "bias": torch.randn(8), "step": 5}
    rank1 = {"layer.weight": torch.randn(256) + 10, "bias": torch.randn(8), "step": 5}
    ckpt.save(url, rank0)
    other = url + "-rank1-source"
    ckpt.save(other, rank1)
    data = storage.get_bytes(join_url(other, rank_object_name(0)))
    replace_object(storage, join_url(url, rank_object_name(1)), data)
    m0 = Manifest.from_json(storage.get_bytes(join_url(url, MANIFEST_NAME)), url=url)
    m1 = Manifest.from_json(storage.get_bytes(join_url(other, MANIFEST_NAME)), url=other)
    entry1 = dataclasses.replace(m1.ranks[0], rank=1, object_name=rank_object_name(1), version=None)
    two = dataclasses.replace(m0, world_size=2, ranks=(m0.ranks[0], entry1))
    storage.put_bytes(join_url(url, MANIFEST_NAME), two.to_json())
    storage.delete([o.url for o in storage.list(other)])
    return rank0, rank1


@pytest.mark.parametrize("backend", ["local", "moto"], indirect=True)
def test_verify_reports_every_problem(
    backend: Backend, ckpt: cloudckpt.SyncCheckpointer, storage: Storage
) -> None:
    url = backend.url("run", "step-5")
    config = StorageConfig(storage_options=backend.storage_options, retry=FAST_RETRY)
    make_two_rank_checkpoint(ckpt, storage, url)
    good = verify_checkpoint(url, config)
    assert good.ok and good.world_size == 2 and good.objects_checked == 2
    assert good.bytes_checked == sum(
        o.size_bytes for o in storage.list(url) if o.url.endswith(".pt")
    )

    manifest = Manifest.from_json(storage.get_bytes(join_url(url, MANIFEST_NAME)), url=url)
    layout = manifest.rank(1).layout
    span = next(layout.storage(t.storage_key) for t in layout.tensors if t.name == "layer.weight")
    obj1 = join_url(url, rank_object_name(1))
    data = bytearray(storage.get_bytes(obj1))
    data[span.offset + 5] ^= 0xFF
    data[layout.pickle.offset + 3] ^= 0x01
    replace_object(storage, obj1, bytes(data))
    manager = CheckpointManager(backend.url("run"), storage_options=config)
    flipped = manager.verify("step-5")  # a name under the prefix, or a full URL
    assert not flipped.ok
    assert sorted((p.rank, p.kind, p.key) for p in flipped.problems) == [
        (1, "checksum", "layer.weight"),
        (1, "object_checksum", None),
        (1, "pickle_checksum", None),
    ]
    message = next(p.message for p in flipped.problems if p.kind == "checksum")
    assert "layer.weight" in message and "rank 1" in message and obj1 in message

    storage.delete([obj1])
    replace_object(storage, join_url(url, rank_object_name(0)), b"short")
    missing = manager.verify(url)
    assert [(p.rank, p.kind) for p in missing.problems] == [(0, "size"), (1, "missing")]
    assert "missing" in missing.problems[1].message and obj1 in missing.problems[1].message
    with pytest.raises(cloudckpt.CheckpointNotFoundError, match="no committed checkpoint"):
        manager.verify("never-saved")
    manager.close()


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_gc_keeps_a_damaged_committed_checkpoint(backend: Backend) -> None:
    ckpt = cloudckpt.make_sync_checkpointer(
        cloudckpt.CheckpointerConfig(storage_options=backend.storage_options)
    )
    ckpt.save(backend.url("run", "step-1"), {"w": torch.ones(4)})
    ckpt.save(backend.url("run", "step-2"), {"w": torch.ones(4)})
    storage = ckpt._writer.storage(backend.base_url)
    storage.delete([backend.url("run", "step-2", "checkpoint_0.pt")])  # damaged after commit
    manager = cloudckpt.CheckpointManager(backend.url("run"))
    report = manager.gc(older_than_secs=0)
    assert report.deleted_checkpoints == []
    assert storage.exists(backend.url("run", "step-2", "cloudckpt.manifest.json"))
