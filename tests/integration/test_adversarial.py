"""Adversarial tests: bad input, damaged checkpoints, faults and misuse, written from a user's
point of view. Each test asserts what a user would expect (a clear cloudckpt error naming the
URL/key, nothing lost, nothing half-written that looks valid, no hang).

Tests that fail here show bugs; they are deliberately not marked xfail.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import resource
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from backends import Backend
from cases import assert_bitwise_equal
from torch import nn

import cloudckpt
import cloudckpt.reader as reader_mod
import cloudckpt.storage.local as local_mod
import cloudckpt.storage.s3 as s3_mod
import cloudckpt.writer as writer_mod
from cloudckpt import (
    BucketNotFoundError,
    CheckpointerConfig,
    CheckpointError,
    CheckpointManager,
    CheckpointNotFoundError,
    CheckpointWriterConfig,
    ChecksumMismatchError,
    CloudCkptError,
    CommitConflictError,
    CorruptCheckpointError,
    DownloadConfig,
    PermissionDeniedError,
    RetriesExhaustedError,
    RetryConfig,
    StateDictMismatchError,
    StorageConfig,
    UnsupportedURLError,
    UploadConfig,
    make_async_checkpointer,
    make_sync_checkpointer,
)
from cloudckpt.cli import main as cli_main
from cloudckpt.errors import ManifestError, ObjectChangedError
from cloudckpt.manager import copy_checkpoint, verify_checkpoint
from cloudckpt.manifest import MANIFEST_NAME
from cloudckpt.storage import get_storage

FAST_RETRY = RetryConfig(
    max_attempts=2, initial_backoff_secs=0.01, max_backoff_secs=0.05, deadline_secs=10
)
PART = 5 << 20


# --- helpers ----------------------------------------------------------------------------------


def sync(storage_options: dict[str, Any] | None = None, **kw: Any) -> cloudckpt.SyncCheckpointer:
    return make_sync_checkpointer(CheckpointerConfig(storage_options=storage_options or {}, **kw))


def closed_port() -> int:
    """A port nothing listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flip_byte(path: Path, offset: int, mask: int = 0xFF) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def manifest_of(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / MANIFEST_NAME).read_text())


def storage_span(ckpt: Path, index: int = 0) -> tuple[int, int]:
    """(offset, nbytes) of storage record ``index`` of rank 0, from the manifest."""
    _key, _dtype, offset, nbytes, _crc = manifest_of(ckpt)["ranks"][0]["storages"][index]
    return offset, nbytes


def same(a: Any, b: Any) -> bool:
    try:
        assert_bitwise_equal(a, b)
    except AssertionError:
        return False
    return True


def list_names(url: str, opts: dict[str, Any]) -> list[str]:
    storage = get_storage(url, StorageConfig(storage_options=opts))
    try:
        return sorted(o.url.removeprefix(url.rstrip("/") + "/") for o in storage.list(url))
    finally:
        storage.close()


def run_cli(argv: list[str]) -> int:
    """``cloudckpt ARGV`` in this process. cli.main() replaces the "cloudckpt" logger's handlers
    (bound to the current, pytest-captured, stderr) and turns propagation off for the rest of
    the process: put them back so later tests do not log into a closed stream."""
    package_logger = logging.getLogger("cloudckpt")
    saved = (package_logger.handlers[:], package_logger.propagate, package_logger.level)
    try:
        return cli_main(argv)
    finally:
        package_logger.handlers[:], package_logger.propagate = saved[0], saved[1]
        package_logger.setLevel(saved[2])


# --- 1. URL shapes --------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["s3://", "gs://"])
def test_bare_scheme_is_refused_with_a_message_about_that_url(url: str) -> None:
    opts = {"endpoint_url": f"http://127.0.0.1:{closed_port()}"}
    opts.update({"key": "k", "secret": "s"} if url.startswith("s3") else {"token": "anon"})
    ckpt = sync(opts, retry_config=FAST_RETRY)
    with pytest.raises(UnsupportedURLError) as err:
        ckpt.save(url, {"a": torch.ones(2)})
    # The user typed "s3://": the message must be about that URL (no bucket), not about an
    # internal object path such as 's3:/cloudckpt.manifest.json'.
    assert "no bucket" in str(err.value), str(err.value)
    assert "cloudckpt.manifest.json" not in str(err.value), str(err.value)


def test_single_slash_scheme_typo_is_refused_not_saved_to_local_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    ckpt = sync()
    with pytest.raises(UnsupportedURLError):
        ckpt.save("s3:/my-bucket/run-7/step-1", {"a": torch.ones(2)})
    # A typo in the scheme must never turn a cloud save into a local directory named "s3:".
    assert not (tmp_path / "s3:").exists(), os.listdir(tmp_path)


def test_cli_ls_with_single_slash_scheme_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    code = run_cli(["ls", "s3:/my-bucket/run-7"])
    out = capsys.readouterr()
    assert code == 2, (code, out.out, out.err)
    assert "s3:/my-bucket/run-7" in out.err


@pytest.mark.parametrize("backend", ["moto"], indirect=True)
def test_trailing_slash_and_scheme_case_name_the_same_checkpoint(backend: Backend) -> None:
    ckpt = sync(backend.storage_options)
    ckpt.save(backend.url("step-1") + "/", {"a": torch.arange(3.0)})
    assert torch.equal(ckpt.load(backend.url("step-1"))["a"], torch.arange(3.0))
    upper = "S3" + backend.url("step-1")[2:]
    with pytest.raises(CommitConflictError, match="already exists"):
        ckpt.save(upper, {"a": torch.zeros(3)})
    infos = CheckpointManager(
        backend.base_url + "/", storage_options=backend.storage_options
    ).list()
    assert [(i.name, i.committed) for i in infos] == [("step-1", True)]


@pytest.mark.parametrize("backend", ["local", "seaweedfs", "gcs"], indirect=True)
def test_spaces_unicode_and_url_metacharacters_in_keys_roundtrip(backend: Backend) -> None:
    ckpt = sync(backend.storage_options)
    name = "stép ü 1?x=1#frag%2F"
    url = backend.url("run 7", name)
    sd = {"a": torch.arange(5.0)}
    ckpt.save(url, sd)
    assert same(ckpt.load(url), sd)
    infos = CheckpointManager(backend.url("run 7"), storage_options=backend.storage_options).list()
    assert [(i.name, i.committed) for i in infos] == [(name, True)]


@pytest.mark.parametrize("backend", ["local", "seaweedfs", "gcs"], indirect=True)
def test_dotdot_segment_is_refused_or_resolved_like_a_path(backend: Backend) -> None:
    """``run/../step-1`` must mean the same thing on every store: refused up front with an
    UnsupportedURLError naming '..', or resolved to ``step-1`` (as local paths are)."""
    ckpt = sync(backend.storage_options, retry_config=FAST_RETRY)
    sd = {"a": torch.arange(4.0)}
    try:
        ckpt.save(backend.url("run", "..", "step-1"), sd)
    except UnsupportedURLError as e:
        assert ".." in str(e)
        return
    assert same(ckpt.load(backend.url("step-1")), sd)


# --- 2. missing bucket, credentials, unreachable endpoints ----------------------------------


@pytest.mark.parametrize("backend", ["moto", "seaweedfs", "gcs"], indirect=True)
def test_missing_bucket_is_bucket_not_found_everywhere(backend: Backend) -> None:
    scheme = backend.base_url.split("://")[0]
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    url = f"{scheme}://{bucket}/run-7/step-1"
    ckpt = sync(backend.storage_options, retry_config=FAST_RETRY)
    with pytest.raises(BucketNotFoundError, match=bucket):
        ckpt.save(url, {"a": torch.ones(2)})
    # The failed save must not have created the bucket (SeaweedFS creates one on PutObject).
    with pytest.raises(BucketNotFoundError, match=bucket):
        ckpt.load(url)
    with pytest.raises(BucketNotFoundError, match=bucket):
        CheckpointManager(
            f"{scheme}://{bucket}/run-7", storage_options=backend.storage_options
        ).list()


def test_wrong_secret_fails_fast_with_permission_error(seaweed_server: Any) -> None:
    opts = dict(seaweed_server.storage_options, secret="definitely-wrong")
    url = f"s3://cloudckpt-tests/adversarial-{uuid.uuid4().hex[:8]}/step-1"
    ckpt = sync(opts)  # default RetryConfig: a 403 must not be retried
    started = time.monotonic()
    with pytest.raises(PermissionDeniedError) as err:
        ckpt.save(url, {"a": torch.ones(2)})
    assert "key/secret" in str(err.value)
    with pytest.raises(PermissionDeniedError):
        ckpt.load(url)
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_closed_port_fails_within_seconds_with_default_retry_policy(scheme: str) -> None:
    """Default RetryConfig (6 attempts, jittered backoff 0.2 s..10 s, 300 s deadline):
    connection refused is retried, then RetriesExhaustedError naming the endpoint. Measured
    here: 2-5 s. The bound is only 'does not hang for minutes'."""
    port = closed_port()
    opts: dict[str, Any] = {"endpoint_url": f"http://127.0.0.1:{port}"}
    opts.update({"key": "k", "secret": "s"} if scheme == "s3" else {"token": "anon"})
    ckpt = sync(opts)
    started = time.monotonic()
    with pytest.raises(RetriesExhaustedError) as err:
        ckpt.save(f"{scheme}://bucket/run/step-1", {"a": torch.ones(2)})
    assert f"127.0.0.1:{port}" in str(err.value)
    with pytest.raises(RetriesExhaustedError):
        ckpt.load(f"{scheme}://bucket/run/step-1")
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_silent_endpoint_honours_request_timeout(scheme: str) -> None:
    """A server that accepts connections and never answers: with the defaults (60 s read
    timeout x 6 attempts, 300 s deadline) a request takes minutes to fail; a tuned
    RetryConfig must bound it."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(64)
        port = srv.getsockname()[1]
        opts: dict[str, Any] = {"endpoint_url": f"http://127.0.0.1:{port}"}
        opts.update({"key": "k", "secret": "s"} if scheme == "s3" else {"token": "anon"})
        retry = RetryConfig(
            max_attempts=2, initial_backoff_secs=0.01, deadline_secs=5, request_timeout_secs=1
        )
        ckpt = sync(opts, retry_config=retry)
        started = time.monotonic()
        with pytest.raises(RetriesExhaustedError):
            ckpt.save(f"{scheme}://bucket/run/step-1", {"a": torch.ones(2)})
        assert time.monotonic() - started < 30


# --- 3. damaged checkpoints ---------------------------------------------------------------


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    sd = {
        "model": nn.Linear(3, 2).state_dict(),
        "step": 7,
        "l": [torch.arange(3), (torch.ones(2, dtype=torch.bfloat16), "x")],
    }
    path = tmp_path / "run" / "step-7"
    sync().save(str(path), sd)
    return path, sd


def test_every_manifest_bit_flip_is_an_error_or_loads_the_right_data(
    saved: tuple[Path, dict[str, Any]],
) -> None:
    path, sd = saved
    original = (path / MANIFEST_NAME).read_bytes()
    ckpt = sync()
    unexpected: list[tuple[int, str]] = []
    wrong: list[int] = []
    for i in range(len(original)):
        damaged = bytearray(original)
        damaged[i] ^= 0x01
        (path / MANIFEST_NAME).write_bytes(bytes(damaged))
        try:
            out = ckpt.load(str(path))
        except CloudCkptError:
            continue
        except Exception as e:
            unexpected.append((i, f"{type(e).__name__}: {e}"))
            continue
        if not same(out, sd):
            wrong.append(i)
    assert not wrong, f"wrong data loaded silently after flipping manifest bytes {wrong[:10]}"
    assert not unexpected, unexpected[:5]


def test_truncated_manifest_is_a_manifest_error_naming_it(
    saved: tuple[Path, dict[str, Any]],
) -> None:
    path, _ = saved
    manifest = path / MANIFEST_NAME
    manifest.write_bytes(manifest.read_bytes()[:100])
    with pytest.raises(ManifestError, match=MANIFEST_NAME):
        sync().load(str(path))
    info = CheckpointManager(str(path.parent)).list()
    assert [(i.name, i.committed) for i in info] == [("step-7", False)]
    assert CheckpointManager(str(path.parent)).latest() is None


def test_manifest_from_another_checkpoint_is_detected(tmp_path: Path) -> None:
    ckpt = sync()
    model = nn.Linear(4, 4)
    ckpt.save(str(tmp_path / "step-1"), {"model": model.state_dict()})
    with torch.no_grad():
        model.weight.add_(1.0)
    ckpt.save(str(tmp_path / "step-2"), {"model": model.state_dict()})
    shutil.copy(tmp_path / "step-1" / MANIFEST_NAME, tmp_path / "step-2" / MANIFEST_NAME)
    with pytest.raises(ChecksumMismatchError, match=r"model\.weight"):
        ckpt.load(str(tmp_path / "step-2"))
    assert not verify_checkpoint(str(tmp_path / "step-2")).ok


def test_flipped_pickle_record_is_a_checksum_error(saved: tuple[Path, dict[str, Any]]) -> None:
    path, _ = saved
    offset, nbytes, _crc = manifest_of(path)["ranks"][0]["pickle"]
    flip_byte(path / "checkpoint_0.pt", offset + nbytes // 2)
    with pytest.raises(ChecksumMismatchError, match="pickle record"):
        sync().load(str(path))
    with pytest.raises(ChecksumMismatchError):
        sync().load(str(path), {"step": 0})


def test_rank_object_replaced_by_a_plain_torch_save_is_detected(tmp_path: Path) -> None:
    ckpt = sync()
    ckpt.save(str(tmp_path / "step-1"), {"w": torch.ones(10)})
    ckpt.save(str(tmp_path / "step-2"), {"w": torch.zeros(10)})
    torch.save({"something": "else", "t": torch.arange(7)}, tmp_path / "step-2" / "checkpoint_0.pt")
    with pytest.raises(CorruptCheckpointError, match="truncated or replaced"):
        ckpt.load(str(tmp_path / "step-2"))
    latest = CheckpointManager(str(tmp_path)).latest()
    assert latest is not None and latest.name == "step-1"


def test_missing_and_extra_rank_objects(saved: tuple[Path, dict[str, Any]]) -> None:
    path, sd = saved
    # An extra rank object (from some other save) is ignored: the manifest says world size 1.
    shutil.copy(path / "checkpoint_0.pt", path / "checkpoint_1.pt")
    assert same(sync().load(str(path)), sd)
    (path / "checkpoint_0.pt").unlink()
    with pytest.raises(CorruptCheckpointError, match="missing") as err:
        sync().load(str(path))
    assert err.value.rank == 0
    assert not verify_checkpoint(str(path)).ok


def test_manifest_object_name_cannot_escape_the_checkpoint(tmp_path: Path) -> None:
    """A crafted manifest naming ``../outside.pt`` must be refused: loads must not read and
    restores/copies must not write outside the checkpoint directory."""
    ckpt = sync()
    src = tmp_path / "run" / "step-1"
    ckpt.save(str(src), {"w": torch.arange(4.0)})
    shutil.copy(src / "checkpoint_0.pt", src.parent / "outside.pt")
    doc = manifest_of(src)
    doc["ranks"][0]["object"] = "../outside.pt"
    (src / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(CorruptCheckpointError):
        ckpt.load(str(src))
    dest = tmp_path / "restore" / "step-1"
    with pytest.raises(CorruptCheckpointError):
        copy_checkpoint(str(src), str(dest))
    assert not (dest.parent / "outside.pt").exists(), "restore wrote outside its destination"


# --- 4. partial loads --------------------------------------------------------------------


def test_failed_partial_load_leaves_the_callers_state_dict_untouched(tmp_path: Path) -> None:
    ckpt = sync()
    ckpt.save(str(tmp_path / "c"), {"a": torch.arange(4.0), "b": torch.ones(3)})
    a, b = torch.full((4,), 7.0), torch.zeros(5)  # "b" has the wrong shape
    target = {"a": a, "b": b}
    with pytest.raises(StateDictMismatchError, match="key b"):
        ckpt.load(str(tmp_path / "c"), target)
    assert target["a"] is a, f"target['a'] was replaced by {type(target['a']).__name__}"
    assert target["b"] is b
    assert torch.equal(a, torch.full((4,), 7.0))


def test_corrupt_storage_does_not_overwrite_the_target_model(tmp_path: Path) -> None:
    ckpt = sync()
    path = tmp_path / "c"
    ckpt.save(str(path), {"model": nn.Linear(8, 4).state_dict()})
    offset, nbytes = storage_span(path, 0)  # model.weight
    flip_byte(path / "checkpoint_0.pt", offset + nbytes // 2)
    model = nn.Linear(8, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ChecksumMismatchError, match=r"model\.weight"):
        ckpt.load(str(path), {"model": model.state_dict()})
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} was overwritten by a load that failed verification"


def test_partial_load_into_model_state_dict(tmp_path: Path) -> None:
    ckpt = sync()
    src = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    ckpt.save(str(tmp_path / "c"), {"model": src.state_dict(), "step": 3})
    dst = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    out = ckpt.load(str(tmp_path / "c"), {"model": dst.state_dict()}, strict=True)
    assert list(out) == ["model"]
    for (k, v), w in zip(src.state_dict().items(), dst.parameters(), strict=True):
        assert torch.equal(v, w), k
        assert w.requires_grad and isinstance(w, nn.Parameter)
    with pytest.raises(StateDictMismatchError, match=r"missing keys: \['optim'\]"):
        ckpt.load(str(tmp_path / "c"), {"model": dst.state_dict(), "optim": {}}, strict=True)


@pytest.mark.parametrize(
    ("target", "match"),
    [
        ({"model": nn.Linear(4, 4).state_dict()}, r"key model\.weight: target has shape"),
        ({"model": nn.Linear(3, 2).double().state_dict()}, "dtype torch.float64"),
        ({"model": torch.ones(1)}, "key model is a Tensor"),
        ({"step": torch.ones(1)}, "key step is a Tensor"),
        ({"l": [torch.zeros(4)]}, r"key l\[0\]: target has shape"),
        ({"l": [torch.arange(3), [torch.ones(2, dtype=torch.bfloat16)]]}, None),
    ],
    ids=["shape", "dtype", "tensor-vs-dict", "tensor-vs-int", "list-shape", "tuple-as-list"],
)
def test_partial_load_mismatches_name_the_key(
    saved: tuple[Path, dict[str, Any]], target: dict[str, Any], match: str | None
) -> None:
    path, sd = saved
    if match is None:  # a list target receives the checkpoint's tuple
        out = sync().load(str(path), target)
        assert torch.equal(out["l"][1][0], sd["l"][1][0])
        return
    with pytest.raises(StateDictMismatchError, match=match):
        sync().load(str(path), target)


# --- 5. unusual state dict contents --------------------------------------------------------


def unusual_state_dict() -> dict[Any, Any]:
    g = torch.Generator().manual_seed(0)
    base = torch.arange(12.0)
    return {
        "param": nn.Parameter(torch.randn(3, generator=g)),
        "requires_grad": torch.randn(2, generator=g).requires_grad_(),
        "expanded": torch.randn(3, generator=g).expand(4, 3),  # stride 0
        "transposed": torch.randn(4, 5, generator=g).t(),
        "view_a": base[2:5],
        "view_b": base[::3],
        "base": base,
        "bf16": torch.randn(3, generator=g).bfloat16(),
        "f8": torch.randn(3, generator=g).to(torch.float8_e4m3fn),
        "c64": torch.randn(2, dtype=torch.complex64, generator=g),
        "bool": torch.tensor([True, False]),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(3.5),
        7: torch.ones(2),
        (1, "x"): torch.zeros(1),
        None: 5,
        "nested": [torch.ones(1), (torch.zeros(2), "s")],
    }


@pytest.mark.parametrize("backend", ["local", "moto"], indirect=True)
def test_unusual_tensors_roundtrip(backend: Backend) -> None:
    ckpt = sync(backend.storage_options)
    sd = unusual_state_dict()
    url = backend.url("step-1")
    ckpt.save(url, sd)
    out = ckpt.load(url)
    assert_bitwise_equal(out, sd)
    assert isinstance(out["param"], nn.Parameter)
    assert out["requires_grad"].requires_grad
    assert out["view_a"].untyped_storage().data_ptr() == out["base"].untyped_storage().data_ptr()
    part = ckpt.load(url, {"expanded": torch.zeros(4, 3), "view_b": torch.zeros(4), 7: None})
    assert torch.equal(part["expanded"], sd["expanded"])
    assert torch.equal(part["view_b"], sd["view_b"])
    assert torch.equal(part[7], sd[7])
    if backend.name == "local":
        # README: plain torch.load reads a rank object.
        plain = torch.load(Path(url) / "checkpoint_0.pt")
        assert_bitwise_equal(plain, sd)


def test_empty_state_dict_roundtrips(tmp_path: Path) -> None:
    ckpt = sync()
    ckpt.save(str(tmp_path / "step-0"), {})
    assert ckpt.load(str(tmp_path / "step-0")) == {}
    assert verify_checkpoint(str(tmp_path / "step-0")).ok
    assert CheckpointManager(str(tmp_path)).latest().name == "step-0"


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_sparse_tensors_roundtrip(tmp_path: Path, layout: str) -> None:
    dense = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 3.0]])
    sparse = dense.to_sparse() if layout == "coo" else dense.to_sparse_csr()
    sd = {"s": sparse, "w": torch.ones(2)}
    ckpt = sync()
    path = str(tmp_path / "step-1")
    ckpt.save(path, sd)  # torch.save supports sparse tensors
    assert torch.equal(ckpt.load(path)["s"].to_dense(), dense)
    out = ckpt.load(path, {"s": None, "w": torch.zeros(2)})
    assert torch.equal(out["s"].to_dense(), dense)


def test_object_refused_by_weights_only_is_not_called_corruption(tmp_path: Path) -> None:
    """A checkpoint holding an argparse.Namespace: either save refuses it (nothing committed),
    or load returns it, or load fails with an error that says what is refused. It must not be
    called corrupt: `verify` says it is intact, and the 'restore an older step' advice of a
    CorruptCheckpointError sends the user to older steps that hold the same object."""
    ckpt = sync()
    path = tmp_path / "step-1"
    sd = {"args": argparse.Namespace(lr=0.1), "w": torch.ones(2)}
    try:
        ckpt.save(str(path), sd)
    except (CloudCkptError, TypeError, ValueError) as e:
        assert "args" in str(e) or "Namespace" in str(e)
        assert not (path / MANIFEST_NAME).exists()
        return
    assert verify_checkpoint(str(path)).ok
    try:
        out = ckpt.load(str(path))
    except CheckpointError as e:
        assert not isinstance(e, CorruptCheckpointError), f"called corrupt: {e}"
        assert "argparse.Namespace" in str(e)
        return
    assert out["args"].lr == 0.1


def test_unpicklable_leaf_fails_before_anything_is_written(tmp_path: Path) -> None:
    ckpt = sync()
    path = tmp_path / "step-1"
    with pytest.raises(Exception, match="pickle"):
        ckpt.save(str(path), {"fn": lambda x: x, "w": torch.ones(2)})
    assert not (path / MANIFEST_NAME).exists()
    assert not (path / "checkpoint_0.pt").exists()


def test_many_small_tensors_load_as_fast_as_they_save(tmp_path: Path) -> None:
    """15 000 tiny tensors. Measured here: save ~1.5 s, verify < 1 s, load ~8 s (the reader
    looks up each storage by a linear scan, 3 times per key). Relative bound, so that machine
    load cancels out: a load may take twice the save plus 2 s."""
    n = 15_000
    sd = {f"t{i}": torch.full((4,), float(i)) for i in range(n)}
    ckpt = sync()
    path = str(tmp_path / "many")
    started = time.perf_counter()
    ckpt.save(path, sd)
    save_secs = time.perf_counter() - started
    started = time.perf_counter()
    out = ckpt.load(path)
    load_secs = time.perf_counter() - started
    assert torch.equal(out[f"t{n - 1}"], sd[f"t{n - 1}"])
    assert load_secs <= 2 * save_secs + 2, f"save {save_secs:.1f} s, load {load_secs:.1f} s"


# --- 6. writes: twice, concurrently, interrupted, overwritten while loading ---------------------


@pytest.mark.parametrize("backend", ["local", "moto"], indirect=True)
def test_second_save_to_a_committed_path_is_refused_and_the_first_survives(
    backend: Backend,
) -> None:
    ckpt = sync(backend.storage_options)
    url = backend.url("step-1")
    ckpt.save(url, {"w": torch.ones(3)})
    with pytest.raises(CommitConflictError, match="already exists") as err:
        ckpt.save(url, {"w": torch.zeros(3)})
    assert "overwrite=True" in str(err.value)
    assert torch.equal(ckpt.load(url)["w"], torch.ones(3))


@pytest.mark.parametrize("backend", ["local", "moto"], indirect=True)
def test_concurrent_saves_to_one_path_never_destroy_the_committed_one(backend: Backend) -> None:
    """Two jobs save to the same path. B checks the path (not committed yet), then A commits,
    then B uploads and fails to commit (CommitConflictError). A's committed checkpoint must
    still load A's values: "a committed checkpoint is never silently replaced"."""
    url = backend.url("step-1")
    sd_a, sd_b = {"w": torch.full((1000,), 1.0)}, {"w": torch.full((1000,), 2.0)}
    ckpt_a, ckpt_b = sync(backend.storage_options), sync(backend.storage_options)
    real_serialize = writer_mod.serialize
    b_checked, a_committed = threading.Event(), threading.Event()

    def serialize(obj: Any, out: Any, **kw: Any) -> Any:
        if threading.current_thread().name == "saver-b":
            b_checked.set()  # B is past its "already committed?" check
            assert a_committed.wait(60)
        return real_serialize(obj, out, **kw)

    outcome: dict[str, BaseException | None] = {}

    def save_b() -> None:
        try:
            ckpt_b.save(url, sd_b)
            outcome["b"] = None
        except BaseException as e:
            outcome["b"] = e

    with mock.patch.object(writer_mod, "serialize", serialize):
        thread = threading.Thread(target=save_b, name="saver-b")
        thread.start()
        assert b_checked.wait(60)
        ckpt_a.save(url, sd_a)
        a_committed.set()
        thread.join(60)
    assert isinstance(outcome["b"], CommitConflictError), outcome["b"]
    assert same(ckpt_a.load(url), sd_a)


@pytest.mark.parametrize("backend", ["local", "moto"], indirect=True)
def test_load_while_another_job_overwrites_never_mixes_versions(backend: Backend) -> None:
    url = backend.url("step-1")
    sd_a, sd_b = {"w": torch.full((1000,), 1.0)}, {"w": torch.full((1000,), 2.0)}
    ckpt = sync(backend.storage_options)
    ckpt.save(url, sd_a)
    overwriter = sync(backend.storage_options, writer_config=CheckpointWriterConfig(overwrite=True))
    real_fetch = reader_mod.fetch

    def fetch(*args: Any, **kw: Any) -> Any:  # the overwrite lands between HEAD and the reads
        overwriter.save(url, sd_b)
        return real_fetch(*args, **kw)

    with mock.patch.object(reader_mod, "fetch", fetch), pytest.raises(ObjectChangedError):
        ckpt.load(url)
    assert same(ckpt.load(url), sd_b)


@pytest.mark.parametrize("backend", ["local", "moto"], indirect=True)
def test_keyboard_interrupt_mid_upload_leaves_nothing_and_path_is_reusable(
    backend: Backend,
) -> None:
    cfg = {"upload_config": UploadConfig(part_size_bytes=PART, max_concurrency=2)}
    ckpt = sync(backend.storage_options, **cfg)
    url = backend.url("step-1")
    sd = {"w": torch.randn(3 << 20, generator=torch.Generator().manual_seed(1))}  # 12 MiB
    upload_cls = s3_mod.S3Upload if backend.name == "moto" else local_mod.LocalUpload
    real_write = upload_cls.write
    sent = [0]

    def write(self: Any, data: Any) -> int:  # Ctrl-C after 2 parts' worth of bytes
        sent[0] += memoryview(data).nbytes
        if sent[0] > 2 * PART:
            raise KeyboardInterrupt
        return real_write(self, data)

    with mock.patch.object(upload_cls, "write", write), pytest.raises(KeyboardInterrupt):
        ckpt.save(url, sd)
    if backend.name == "local":
        leftovers = os.listdir(url) if os.path.exists(url) else []
        assert leftovers == [], leftovers  # no temp files, no rank object
    else:
        assert list_names(url, backend.storage_options) == []
        storage = get_storage(url, StorageConfig(storage_options=backend.storage_options))
        assert storage.list_pending_uploads(backend.base_url) == []  # multipart aborted
    with pytest.raises(CheckpointNotFoundError):
        ckpt.load(url)
    ckpt.save(url, sd)
    assert same(ckpt.load(url), sd)


@pytest.mark.parametrize("backend", ["moto"], indirect=True)
def test_keyboard_interrupt_before_the_commit_leaves_an_uncommitted_path(
    backend: Backend,
) -> None:
    ckpt = sync(backend.storage_options)
    url = backend.url("step-1")
    real_put = s3_mod.S3Storage.put_bytes

    def put_bytes(self: Any, u: str, data: bytes, **kw: Any) -> Any:
        if u.endswith(MANIFEST_NAME):
            raise KeyboardInterrupt
        return real_put(self, u, data, **kw)

    with (
        mock.patch.object(s3_mod.S3Storage, "put_bytes", put_bytes),
        pytest.raises(KeyboardInterrupt),
    ):
        ckpt.save(url, {"w": torch.ones(4)})
    infos = CheckpointManager(backend.base_url, storage_options=backend.storage_options).list()
    assert [(i.name, i.committed, i.problem) for i in infos] == [("step-1", False, "no manifest")]
    with pytest.raises(CheckpointNotFoundError):
        ckpt.load(url)
    ckpt.save(url, {"w": torch.ones(4)})  # the torn path can be saved again
    assert torch.equal(ckpt.load(url)["w"], torch.ones(4))


# --- 7. async checkpointer misuse ---------------------------------------------------------


def test_async_checkpointer_misuse(tmp_path: Path) -> None:
    port = closed_port()
    config = CheckpointerConfig(
        storage_options={"endpoint_url": f"http://127.0.0.1:{port}", "key": "k", "secret": "s"},
        retry_config=FAST_RETRY,
    )
    ckpt = make_async_checkpointer(config)
    try:
        with pytest.raises(UnsupportedURLError, match="memory://"):
            ckpt.save("memory://bucket/step-1", {"w": torch.ones(2)})

        stage, write = ckpt.save(str(tmp_path / "step-1"), {"w": torch.ones(4)})
        stage.result(timeout=120)
        write.result(timeout=120)

        # Load while a save is in flight: the in-flight path is either not committed yet or
        # complete; the older checkpoint loads normally.
        stage, write = ckpt.save(str(tmp_path / "step-2"), {"w": torch.full((4,), 2.0)})
        with contextlib.suppress(CheckpointNotFoundError):
            assert torch.equal(ckpt.load(str(tmp_path / "step-2"))["w"], torch.full((4,), 2.0))
        assert torch.equal(ckpt.load(str(tmp_path / "step-1"))["w"], torch.ones(4))
        write.result(timeout=120)

        # An unreachable store fails that save's future, in seconds, and the next save works.
        started = time.monotonic()
        stage, write = ckpt.save("s3://bucket/run/step-3", {"w": torch.ones(4)})
        with pytest.raises(RetriesExhaustedError, match=f"127.0.0.1:{port}"):
            write.result(timeout=120)
        assert time.monotonic() - started < 60
        stage, write = ckpt.save(str(tmp_path / "step-4"), {"w": torch.ones(4)})
        write.result(timeout=120)
    finally:
        ckpt.close()
    ckpt.close()  # twice: no error
    with pytest.raises((CloudCkptError, RuntimeError), match="clos"):
        ckpt.save(str(tmp_path / "step-5"), {"w": torch.ones(4)})
    assert not (tmp_path / "step-5").exists()
    assert torch.equal(ckpt.load(str(tmp_path / "step-4"))["w"], torch.ones(4))


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
@pytest.mark.xfail(
    strict=True,
    reason="known gap: the failing save now raises a clear SaveFailedError naming ulimit -n, but "
    "the next save under the same lowered limit still runs out of descriptors in the fd "
    "hand-off to the writer (cloudckpt/process.py); see the closing note of issue 8",
)
def test_async_save_over_the_fd_limit_fails_clearly_and_the_next_save_works(
    tmp_path: Path,
) -> None:
    """docs/async.md: one descriptor per staged storage. A state dict with more storages than
    ``ulimit -n`` allows must fail that save with an error a user can act on, and must not
    break the checkpointer for the next (small) save."""
    ckpt = make_async_checkpointer()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        _, write = ckpt.save(str(tmp_path / "warm"), {"w": torch.ones(2)})
        write.result(timeout=120)  # the writer subprocess is up (with the normal limit)
        gc.collect()
        resource.setrlimit(resource.RLIMIT_NOFILE, (_open_fds() + 150, hard))
        too_many = {f"t{i}": torch.ones(2) for i in range(400)}
        message = ""
        stage, write = ckpt.save(str(tmp_path / "too-many"), too_many)
        try:
            write.result(timeout=120)
        except Exception as e:
            message = str(e)
        assert message, "a save needing more descriptors than allowed did not fail"
        assert "open files" in message or "ulimit" in message, message
        # Drop every reference this test holds to the failed save (futures, state dict): only
        # the checkpointer itself may still hold something.
        del too_many, stage, write
        gc.collect()
        _, write = ckpt.save(str(tmp_path / "after"), {"w": torch.full((2,), 3.0)})
        write.result(timeout=120)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        ckpt.close()
        gc.collect()
    assert torch.equal(
        make_sync_checkpointer().load(str(tmp_path / "after"))["w"], torch.full((2,), 3.0)
    )


# --- 8. silly configuration values -----------------------------------------------------------

NAN = math.nan


@pytest.mark.parametrize(
    "make",
    [
        lambda: UploadConfig(part_size_bytes=0),
        lambda: UploadConfig(max_concurrency=0),
        lambda: RetryConfig(max_attempts=0),
        lambda: CheckpointerConfig(storage_options="endpoint_url=http://x"),
        lambda: UploadConfig(max_concurrency=2.5),
        lambda: UploadConfig(max_concurrency=NAN),
        lambda: DownloadConfig(range_size_bytes=1.5),
        lambda: DownloadConfig(max_concurrency=NAN),
        lambda: RetryConfig(max_attempts=NAN),
        lambda: RetryConfig(deadline_secs=NAN),
        lambda: RetryConfig(request_timeout_secs=NAN),
        lambda: CheckpointWriterConfig(poll_interval_secs=NAN),
        lambda: CheckpointWriterConfig(overwrite="no"),
        lambda: DownloadConfig(verify_checksums="false"),
        lambda: CheckpointerConfig(upload_config={"part_size_bytes": 1}),
        lambda: CheckpointerConfig(retry_config=None),
    ],
    ids=[
        "part-size-0",
        "upload-concurrency-0",
        "attempts-0",
        "storage-options-str",
        "upload-concurrency-2.5",
        "upload-concurrency-nan",
        "range-size-1.5",
        "download-concurrency-nan",
        "attempts-nan",
        "deadline-nan",
        "request-timeout-nan",
        "poll-interval-nan",
        "overwrite-str-no",
        "verify-checksums-str-false",
        "upload-config-dict",
        "retry-config-none",
    ],
)
def test_silly_config_values_are_refused_at_construction(make: Any) -> None:
    """config.py: 'Every config validates itself in __post_init__ so that a bad value fails at
    construction, before any I/O.' (overwrite='no' is truthy: it would replace checkpoints.)"""
    with pytest.raises((TypeError, ValueError)):
        make()


# --- 9. CLI on damaged checkpoints ------------------------------------------------------------


def test_cli_verify_and_restore_refuse_a_corrupt_checkpoint(
    saved: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = saved
    offset, nbytes = storage_span(path, 0)  # model.weight
    flip_byte(path / "checkpoint_0.pt", offset + nbytes // 2)
    assert run_cli(["verify", str(path)]) == 1
    out = capsys.readouterr()
    assert "checksum mismatch for key model.weight" in out.out + out.err
    dest = tmp_path / "restored"
    assert run_cli(["restore", str(path), str(dest)]) == 1
    assert "model.weight" in capsys.readouterr().err
    assert not (dest / MANIFEST_NAME).exists()
    assert run_cli(["info", str(path)]) == 0  # info reads only the manifest


def test_cli_restore_to_torch_does_not_clobber_an_existing_file(
    saved: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = saved
    target = tmp_path / "model.pt"
    target.write_bytes(b"precious weights from yesterday")
    code = run_cli(["restore", str(path), "--to-torch", str(target), "--keys", "model"])
    capsys.readouterr()
    # `restore CKPT DEST` refuses an existing DEST without --overwrite; --to-torch should too.
    assert code != 0
    assert target.read_bytes() == b"precious weights from yesterday"
