"""Fault injection on GCS: fake-gcs-server behind a FaultProxy answering 503 / 429, cutting
request bodies mid-chunk and losing answers; what a failed save leaves behind.

Which upload path a save takes depends on its size hint (``GCS_COMPOSITE_MIN_PARTS``): the
~24 MiB state dict with 5 MiB parts goes up as a parallel composite upload (parts as temporary
objects, composed at commit), which survives every fault here on the emulator because a failed
part is simply sent again. A resumable session cannot be resumed against the emulator: after
a failed chunk the client asks the session how much it holds (``bytes */*``), and
fake-gcs-server answers that status query by FINALIZING the upload with the bytes it has
(real GCS only reports them). The backend then deletes that incomplete object and fails the
upload; ``test_resumable_retry_on_the_emulator_fails_cleanly`` pins that fallback and the
``xfail(strict=True)`` case of ``test_throttling_is_retried`` documents the gap. The resume
protocol itself is covered with simulated answers in ``test_gcs_storage.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import torch
from backends import TEST_BUCKET
from cases import all_cases_state_dict, assert_bitwise_equal
from faultproxy import FaultProxy

import cloudckpt
from cloudckpt import CheckpointerConfig, RetryConfig, UploadConfig
from cloudckpt.config import MiB, StorageConfig
from cloudckpt.errors import (
    BadRequestError,
    CheckpointNotFoundError,
    PermissionDeniedError,
    RetriesExhaustedError,
    StorageError,
)
from cloudckpt.manager import CheckpointManager
from cloudckpt.manifest import MANIFEST_NAME
from cloudckpt.retry import is_retryable
from cloudckpt.storage import gcs as gcs_module
from cloudckpt.storage.gcs import (
    GCS_PARTS_DIR,
    GCSCompositeUpload,
    GCSStorage,
    GCSUpload,
    composite_part_size,
    parse_parts_key,
    parts_prefix,
)
from cloudckpt.storage.registry import get_storage

pytestmark = pytest.mark.gcs

KiB = 1 << 10
PART = 5 * MiB
#: Enough attempts that the random faults here practically never exhaust them; tiny backoffs.
RETRY = RetryConfig(max_attempts=10, initial_backoff_secs=0.01, max_backoff_secs=0.1)
EMULATOR_GAP = (
    "fake-gcs-server finalizes a resumable upload when asked for its status (bytes */*) after "
    "a failed chunk, so the session cannot be resumed; the backend deletes the incomplete "
    "object and fails the upload instead (see test_resumable_retry_on_the_emulator_fails_cleanly)"
)


def gcs_error_body(status: int, code: str) -> tuple[bytes, str]:
    """A GCS JSON API error document (the proxy's ``error_body``)."""
    message = f"{code} injected by FaultProxy (HTTP {status})"
    body = {
        "error": {
            "code": status,
            "message": message,
            "errors": [{"domain": "global", "reason": code, "message": message}],
        }
    }
    return json.dumps(body).encode(), "application/json; charset=UTF-8"


@pytest.fixture
def proxy(gcs_server: Any) -> Iterator[FaultProxy]:
    host = urlsplit(gcs_server.endpoint_url).hostname or "127.0.0.1"
    with FaultProxy(host, gcs_server.port, seed=5, error_body=gcs_error_body) as p:
        yield p
    assert not p.errors


@pytest.fixture
def options(gcs_server: Any, proxy: FaultProxy) -> dict[str, Any]:
    """gcsfs storage_options that reach the emulator through the proxy."""
    return {**gcs_server.storage_options, "endpoint_url": proxy.endpoint_url}


@pytest.fixture
def base(unique_prefix: str) -> str:
    return f"gs://{TEST_BUCKET}/{unique_prefix}"


def make_checkpointer(options: dict[str, Any], part_size_bytes: int = PART) -> Any:
    return cloudckpt.make_sync_checkpointer(
        CheckpointerConfig(
            storage_options=options,
            upload_config=UploadConfig(part_size_bytes=part_size_bytes),
            retry_config=RETRY,
        )
    )


def make_storage(options: dict[str, Any], *, max_concurrency: int = 8) -> GCSStorage:
    config = StorageConfig(
        storage_options=options,
        upload=UploadConfig(part_size_bytes=PART, max_concurrency=max_concurrency),
        retry=RETRY,
    )
    storage = get_storage(f"gs://{TEST_BUCKET}", config)
    assert isinstance(storage, GCSStorage)
    return storage


def big_state_dict() -> dict[str, Any]:
    """~24 MiB of tensors (size hint >= 4 parts of 5 MiB: a composite upload) plus every
    dtype / view / container case."""
    g = torch.Generator().manual_seed(11)
    sd = all_cases_state_dict()
    sd["layers"] = {f"w{i}": torch.randn(1024, 1024, generator=g) for i in range(5)}
    sd["layers"]["half"] = torch.randn(1024, 1024, generator=g).to(torch.bfloat16)
    return sd


def requests_to(proxy: FaultProxy, method: str, path_contains: str) -> list[Any]:
    return [r for r in proxy.requests if r.method == method and path_contains in r.path]


@pytest.fixture
def at_first_part(
    proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> Callable[[Callable[[], None]], None]:
    """``at_first_part(arm)``: call ``arm()`` when the first composite part starts uploading.

    Part uploads look like the session start and the rank record to the proxy (POST
    ``?uploadType&name``); rules armed at the first part land on parts: every later request of
    that kind is a part (or its retry) until all parts succeeded.
    """
    upload_part = GCSCompositeUpload._upload_part
    pending: list[Callable[[], None]] = []

    def arm_then_upload(self: GCSCompositeUpload, index: int, name: str, view: memoryview) -> Any:
        while pending:
            pending.pop()()
        return upload_part(self, index, name, view)

    monkeypatch.setattr(GCSCompositeUpload, "_upload_part", arm_then_upload)
    return pending.append


def assert_nothing_left(storage: GCSStorage, path: str, base: str) -> None:
    """No rank object, no manifest, no temporary part, no pending composite upload."""
    assert [o.url for o in storage.list(path)] == []
    assert storage.list_pending_uploads(base) == []


# --- full saves under faults ---------------------------------------------------------------

FAULTS = {
    # every kind of request may be answered 503; the first part uploads and one compose 429
    "throttled-503-429": {"throttle_fraction": 0.15},
    # request bodies cut mid-chunk (TCP reset), answers cut mid-body, and a few 503s
    "resets-mid-chunk": {
        "reset_fraction": 0.15,
        "response_reset_fraction": 0.1,
        "throttle_fraction": 0.05,
    },
}


@pytest.mark.parametrize("faults", list(FAULTS.values()), ids=list(FAULTS))
def test_save_under_faults_succeeds_and_loads_bitwise(
    options: dict[str, Any],
    proxy: FaultProxy,
    base: str,
    faults: dict[str, float],
    at_first_part: Callable[[Callable[[], None]], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ckpt = make_checkpointer(options)
    storage = ckpt._writer.storage(base)
    path = f"{base}/step-1"
    listed_at_compose: list[list[str]] = []
    compose = GCSStorage._compose

    def spy_compose(self: GCSStorage, bucket: str, key: str, sources: Any, **kw: Any) -> Any:
        if GCS_PARTS_DIR not in key:  # the final compose: the object appears with it
            listed_at_compose.append([o.url for o in self.list(path)])
        return compose(self, bucket, key, sources, **kw)

    def arm() -> None:  # deterministic faults on parts, so that each kind surely happens
        proxy.fail_next("POST", "uploadType", status=429, code="rateLimitExceeded", times=2)
        proxy.fail_next("POST", "uploadType", status=503, code="backendError")
        proxy.fail_next("POST", "uploadType", action="reset", times=2)  # cut mid-part

    monkeypatch.setattr(GCSStorage, "_compose", spy_compose)
    at_first_part(arm)
    proxy.fail_next("POST", path_contains="/compose", status=429, code="rateLimitExceeded")
    proxy.configure(**faults)
    sd = big_state_dict()
    try:
        ckpt.save(path, sd)
        metrics = ckpt.last_metrics
        assert metrics is not None and metrics.committed
        assert metrics.retries >= 5 and metrics.throttles >= 2
        assert proxy.count(outcome="error 429") >= 3
        assert proxy.count(outcome="error 503") >= 1
        assert proxy.count(outcome="reset") >= 2
        # While the parts were being composed, only temporaries were visible under the path.
        assert len(listed_at_compose) == 1
        assert listed_at_compose[0]
        assert all(f"/{GCS_PARTS_DIR}/" in u for u in listed_at_compose[0])
        # Loading under the same faults (ranged reads retried whole) is bitwise too.
        assert_bitwise_equal(ckpt.load(path), sd)
        proxy.clear_faults()
        assert_bitwise_equal(ckpt.load(path), sd)
        names = sorted(o.url.removeprefix(path + "/") for o in storage.list(path))
        assert "checkpoint_0.pt" in names and MANIFEST_NAME in names
        assert not any(GCS_PARTS_DIR in name for name in names)
        assert storage.list_pending_uploads(base) == []
    finally:
        ckpt.close()


def test_lost_answers_are_retried_safely(
    options: dict[str, Any],
    proxy: FaultProxy,
    base: str,
    at_first_part: Callable[[Callable[[], None]], None],
) -> None:
    """Part uploads, the compose and the manifest write land but their answers are lost: the
    retries overwrite a temporary, redo the compose, and recognise the manifest as ours."""
    ckpt = make_checkpointer(options)
    path = f"{base}/step-1"
    at_first_part(lambda: proxy.fail_next("POST", "uploadType", action="drop_response", times=3))
    proxy.fail_next("POST", path_contains="/compose", action="drop_response")
    proxy.fail_next("POST", "ifGenerationMatch", action="drop_response")  # the manifest
    sd = big_state_dict()
    try:
        ckpt.save(path, sd)
        assert proxy.count(outcome="dropped") == 5
        proxy.clear_faults()
        assert_bitwise_equal(ckpt.load(path), sd)
        storage = ckpt._writer.storage(path)
        assert not any(GCS_PARTS_DIR in o.url for o in storage.list(path))
    finally:
        ckpt.close()


def test_failed_save_leaves_no_rank_object_no_manifest_no_parts(
    options: dict[str, Any], proxy: FaultProxy, base: str
) -> None:
    """Every compose is answered 503 until the retry policy gives up: the parts were all
    uploaded, yet nothing stays behind."""
    ckpt = make_checkpointer(options)
    path = f"{base}/step-1"
    proxy.fail_next("POST", path_contains="/compose", status=503, times=None)
    try:
        with pytest.raises(RetriesExhaustedError, match="compose"):
            ckpt.save(path, big_state_dict())
        assert len(requests_to(proxy, "POST", "/compose")) == RETRY.max_attempts
        assert proxy.count("POST", "uploadType") >= 5  # the parts did go up
        proxy.clear_faults()
        assert_nothing_left(ckpt._writer.storage(path), path, base)
        with pytest.raises(CheckpointNotFoundError):
            ckpt.load(path)
    finally:
        ckpt.close()


@pytest.mark.parametrize("part_size_mib", [5, 8], ids=["composite", "resumable"])
def test_serializer_failure_midway_leaves_nothing(
    options: dict[str, Any],
    proxy: FaultProxy,
    base: str,
    part_size_mib: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Like test_checkpointer's midway failure, on both upload paths: no object at the key
    that looks complete, no temporary parts, the older checkpoint untouched."""
    ckpt = make_checkpointer(options, part_size_mib * MiB)
    storage = ckpt._writer.storage(base)
    older = f"{base}/step-7"
    ckpt.save(older, {"w": torch.full((16,), 7.0)})
    real_serialize = cloudckpt.writer.serialize
    fail_after_bytes = 12 * MiB
    opened: list[Any] = []

    def serialize_then_fail(obj: object, out: Any, **kw: object) -> object:
        opened.append(out)

        class Tripwire:
            def write(self, data: memoryview) -> None:
                if out.bytes_written + data.nbytes > fail_after_bytes:
                    raise RuntimeError("serializer failed halfway")
                out.write(data)

        return real_serialize(obj, Tripwire(), **kw)

    monkeypatch.setattr(cloudckpt.writer, "serialize", serialize_then_fail)
    path = f"{base}/step-8"
    proxy.reset_counters()
    try:
        with pytest.raises(RuntimeError, match="serializer failed halfway"):
            ckpt.save(path, big_state_dict())
        expected = GCSCompositeUpload if part_size_mib == 5 else GCSUpload
        assert [type(u) for u in opened] == [expected]
        if expected is GCSCompositeUpload:
            assert proxy.count("DELETE") >= 2  # the two parts that went up were deleted
        else:
            assert proxy.count("DELETE", "upload_id") == 1  # the session was cancelled
        assert_nothing_left(storage, path, base)
        with pytest.raises(CheckpointNotFoundError):
            ckpt.load(path)
        assert ckpt.load(older)["w"][0].item() == 7.0
    finally:
        ckpt.close()


# --- what is retried and what is not (counted at the proxy) ----------------------------------

#: target -> (method, query parameter, path part, size hint): which request the fault hits.
TARGETS: dict[str, tuple[str, str | None, str | None, int | None]] = {
    "part": ("POST", "uploadType", None, 4 * PART),  # a composite upload's part
    "compose": ("POST", None, "/compose", 4 * PART),
    "chunk": ("PUT", "upload_id", None, None),  # a resumable session's chunk
}


def _fail_target(proxy: FaultProxy, target: str, *, times: int | None, **kw: Any) -> None:
    method, param, path_part, _ = TARGETS[target]
    proxy.fail_next(method, param, path_contains=path_part, times=times, **kw)


def _count_target(proxy: FaultProxy, target: str) -> int:
    method, param, path_part, _ = TARGETS[target]
    if path_part is not None:
        return len(requests_to(proxy, method, path_part))
    return proxy.count(method, param)


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize(
    ("status", "expected"),
    [(400, BadRequestError), (403, PermissionDeniedError), (404, StorageError)],
    ids=["400", "403", "404"],
)
def test_client_errors_are_not_retried(
    options: dict[str, Any],
    proxy: FaultProxy,
    base: str,
    target: str,
    status: int,
    expected: type[StorageError],
) -> None:
    storage = make_storage(options, max_concurrency=1)
    url = f"{base}/obj"
    upload = storage.open_upload(url, size_hint_bytes=TARGETS[target][3])
    proxy.reset_counters()
    _fail_target(proxy, target, times=None, status=status, code="injected")
    with pytest.raises(expected) as excinfo:
        upload.write(os.urandom(12 * MiB))
        upload.commit()
    upload.abort()
    assert not is_retryable(excinfo.value)
    assert not isinstance(excinfo.value, RetriesExhaustedError)
    assert _count_target(proxy, target) == 1  # exactly one attempt
    proxy.clear_faults()
    assert storage.list(base) == []
    storage.close()


@pytest.mark.parametrize(
    "target",
    [
        "part",
        "compose",
        pytest.param(
            "chunk", marks=pytest.mark.xfail(strict=True, raises=StorageError, reason=EMULATOR_GAP)
        ),
    ],
)
@pytest.mark.parametrize(
    ("status", "code"), [(429, "rateLimitExceeded"), (503, "backendError")], ids=["429", "503"]
)
def test_throttling_is_retried(
    options: dict[str, Any], proxy: FaultProxy, base: str, target: str, status: int, code: str
) -> None:
    storage = make_storage(options, max_concurrency=1)
    url = f"{base}/obj"
    data = os.urandom(12 * MiB + 5)
    upload = storage.open_upload(url, size_hint_bytes=TARGETS[target][3])
    proxy.reset_counters()
    _fail_target(proxy, target, times=1, status=status, code=code)
    try:
        upload.write(data)
        info = upload.commit()
    finally:
        upload.abort()  # nothing to do after a commit
        storage.close()
    assert info.size_bytes == len(data)
    assert upload.metrics.retries == 1 and upload.metrics.throttles == (status == 429)
    sent = {"part": 3, "compose": 1, "chunk": 3}[target]
    assert _count_target(proxy, target) == sent + 1  # the failed request went again, once
    assert storage.get_bytes(url) == data


@pytest.mark.parametrize(
    "fault",
    [{"status": 503}, {"status": 429, "code": "rateLimitExceeded"}, {"action": "reset"}],
    ids=["503", "429", "reset-mid-chunk"],
)
def test_resumable_retry_on_the_emulator_fails_cleanly(
    options: dict[str, Any], proxy: FaultProxy, base: str, fault: dict[str, Any]
) -> None:
    """The fallback for the emulator gap: the retry's status query makes fake-gcs-server
    finalize the upload early; the backend deletes that generation and fails the upload, so
    no incomplete object is ever left at the key, and a previous object is not resurrected."""
    storage = make_storage(options)
    url = f"{base}/obj"
    upload = storage.open_upload(url)
    assert isinstance(upload, GCSUpload)
    upload.write(os.urandom(6 * MiB))  # chunk 0 lands
    proxy.reset_counters()
    proxy.fail_next("PUT", "upload_id", **fault)
    with pytest.raises(StorageError, match="finalized by the server with 5242880 bytes"):
        upload.write(os.urandom(5 * MiB))
    upload.abort()
    # chunk 1 failed, the status query finalized 5 MiB, that generation was deleted
    assert proxy.count("PUT", "upload_id") == 2
    assert proxy.count("DELETE", "ifGenerationMatch") == 1
    assert not storage.exists(url)
    assert storage.list(base) == []
    storage.close()


# --- composite uploads: many parts, crashed writers ---------------------------------------


def test_more_than_32_parts_compose_through_intermediates(
    options: dict[str, Any], proxy: FaultProxy, base: str
) -> None:
    storage = make_storage(options)
    url = f"{base}/obj"
    # 256 KiB parts (the smallest the backend would cut) so 70 parts stay small.
    upload = GCSCompositeUpload(storage, url, 256 * KiB, max_concurrency=8, send_checksums=True)
    data = os.urandom(70 * 256 * KiB - 3)
    proxy.configure(throttle_fraction=0.05)
    for i in range(0, len(data), 1_000_003):
        upload.write(data[i : i + 1_000_003])
    info = upload.commit()
    proxy.clear_faults()
    assert info.size_bytes == len(data)
    assert upload.metrics.parts == 70
    composes = requests_to(proxy, "POST", "/compose")
    assert len([r for r in composes if r.outcome == "forwarded"]) == 3 + 1  # 32 + 32 + 6, then 3
    assert storage.get_bytes(url) == data
    assert [o.url for o in storage.list(base)] == [url]
    storage.close()


def test_part_corrupted_in_transit_is_sent_again(
    options: dict[str, Any], base: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The emulator stores whatever arrives (it ignores the CRC32C in the metadata, which real
    GCS checks): the stored size/CRC32C of the part is compared with the bytes, and a
    mismatching part is uploaded again."""
    storage = make_storage(options)
    url = f"{base}/obj"
    build_body = gcs_module._multipart_body
    bodies: list[str] = []

    def corrupt_first(meta: dict[str, Any], data: Any) -> Any:
        bodies.append(meta["name"])
        if len(bodies) == 1:
            data = bytes(len(data))  # same length, other bytes
        return build_body(meta, data)

    monkeypatch.setattr(gcs_module, "_multipart_body", corrupt_first)
    data = os.urandom(3 * PART + 1)
    upload = storage.open_upload(url, size_hint_bytes=4 * PART)
    upload.write(data)
    info = upload.commit()
    assert upload.metrics.retries == 1 and len(bodies) == 5  # 4 parts, one sent twice
    assert info.size_bytes == len(data)
    assert storage.get_bytes(url) == data
    storage.close()


def test_wrong_object_after_compose_is_deleted(
    options: dict[str, Any], base: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should the composed object differ from the bytes written (here: a part goes missing
    from the compose), the commit fails and that object is deleted: nothing committed-looking
    and wrong stays at the key, and the temporaries go too."""
    storage = make_storage(options)
    url = f"{base}/obj"
    compose = GCSStorage._compose

    def lose_last_part(self: GCSStorage, bucket: str, key: str, sources: Any, **kw: Any) -> Any:
        return compose(self, bucket, key, sources[:-1], **kw)

    monkeypatch.setattr(GCSStorage, "_compose", lose_last_part)
    upload = storage.open_upload(url, size_hint_bytes=4 * PART)
    upload.write(os.urandom(3 * PART + 7))
    with pytest.raises(StorageError, match=r"holds 15728640 bytes, 15728647 were written"):
        upload.commit()
    upload.abort()
    assert storage.list(base) == []
    storage.close()


def test_gc_removes_parts_left_by_a_crashed_writer(options: dict[str, Any], base: str) -> None:
    storage = make_storage(options)
    url = f"{base}/step-3/checkpoint_0.pt"
    upload = storage.open_upload(url, size_hint_bytes=64 * MiB)
    assert isinstance(upload, GCSCompositeUpload)
    upload.write(os.urandom(3 * PART + 10))
    upload._pool.shutdown(wait=True)  # the writer "crashes" once its parts have landed
    pending = storage.list_pending_uploads(base)
    assert [(p.url, p.upload_id) for p in pending] == [(url, upload.upload_id)]
    assert pending[0].initiated_secs is not None
    manager = CheckpointManager(base, storage_options=options)
    report = manager.gc(older_than_secs=0)
    assert [p.upload_id for p in report.aborted_uploads] == [upload.upload_id]
    assert storage.list(base) == []
    assert storage.list_pending_uploads(base) == []
    storage.close()


def test_abort_pending_upload_deletes_only_its_parts(options: dict[str, Any], base: str) -> None:
    storage = make_storage(options)
    url = f"{base}/obj"
    uploads: list[GCSCompositeUpload] = []
    for _ in range(2):
        upload = storage.open_upload(url, size_hint_bytes=64 * MiB)
        assert isinstance(upload, GCSCompositeUpload)
        upload.write(os.urandom(PART))  # one full part goes up
        upload._pool.shutdown(wait=True)
        uploads.append(upload)
    pending = {p.upload_id: p for p in storage.list_pending_uploads(base)}
    assert set(pending) == {u.upload_id for u in uploads}
    storage.abort_pending_upload(pending[uploads[0].upload_id])
    assert [p.upload_id for p in storage.list_pending_uploads(base)] == [uploads[1].upload_id]
    uploads[1].abort()
    assert storage.list(base) == []
    storage.close()


def test_part_naming_and_sizing() -> None:
    assert parts_prefix("run/step-1/checkpoint_0.pt", "abc") == (
        f"run/step-1/{GCS_PARTS_DIR}/checkpoint_0.pt/abc/"
    )
    assert parts_prefix("top.pt", "abc") == f"{GCS_PARTS_DIR}/top.pt/abc/"
    for key in ("run/step-1/checkpoint_0.pt", "top.pt"):
        assert parse_parts_key(parts_prefix(key, "abc") + "00007") == (key, "abc")
    assert parse_parts_key("run/step-1/checkpoint_0.pt") is None
    assert parse_parts_key(f"run/{GCS_PARTS_DIR}/x") is None
    assert composite_part_size(5 * MiB, None) == 5 * MiB
    assert composite_part_size(5 * MiB, 100 * MiB) == 5 * MiB
    grown = composite_part_size(5 * MiB, 10 << 30)  # 10 GiB: at most 512 parts of the base
    assert grown % (256 * KiB) == 0 and grown * 512 >= 10 << 30 > (grown - 256 * KiB) * 512
