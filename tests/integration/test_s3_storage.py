"""S3Storage against real local servers: moto (in-process) and SeaweedFS (signature-checking),
with a fault-injecting proxy in between where a test needs throttling, resets or counting.

Servers come from tests/conftest.py (``moto_server``, ``seaweed_server``); every test writes
under its own unique prefix. No test sleeps to wait; the only timing assertion is the explicit
"a 403 fails within 2 s" bound.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import botocore
import botocore.exceptions
import pytest
import urllib3.exceptions
from backends import TEST_BUCKET
from faultproxy import FaultProxy

from cloudckpt.config import MiB, RetryConfig, StorageConfig, UploadConfig
from cloudckpt.errors import (
    BadRequestError,
    BucketNotFoundError,
    CommitConflictError,
    NotFoundError,
    ObjectChangedError,
    PermissionDeniedError,
    PreconditionFailedError,
    RetriesExhaustedError,
    StorageError,
    ThrottledError,
    TransientStorageError,
    UnsupportedURLError,
)
from cloudckpt.multipart import abort_stale_uploads, crc32c_of
from cloudckpt.retry import is_retryable
from cloudckpt.storage import get_storage
from cloudckpt.storage.s3 import (
    NoSuchUploadError,
    S3Storage,
    S3Upload,
    make_client_kwargs,
    translate_boto_error,
)

PART = 5 * MiB
FAST_RETRY = RetryConfig(
    max_attempts=6,
    initial_backoff_secs=0.01,
    max_backoff_secs=0.05,
    deadline_secs=120.0,
    request_timeout_secs=20.0,
)


def make_storage(
    options: dict[str, Any],
    *,
    endpoint_url: str | None = None,
    concurrency: int = 4,
    max_attempts: int = 6,
    send_checksums: bool = True,
    **overrides: Any,
) -> S3Storage:
    """An S3Storage with 5 MiB parts and fast retries (``endpoint_url`` e.g. a FaultProxy)."""
    opts = {**options, **overrides}
    if endpoint_url is not None:
        opts["endpoint_url"] = endpoint_url
    retry = RetryConfig(
        max_attempts=max_attempts,
        initial_backoff_secs=FAST_RETRY.initial_backoff_secs,
        max_backoff_secs=FAST_RETRY.max_backoff_secs,
        deadline_secs=FAST_RETRY.deadline_secs,
        request_timeout_secs=FAST_RETRY.request_timeout_secs,
    )
    return S3Storage(
        StorageConfig(
            storage_options=opts,
            upload=UploadConfig(
                part_size_bytes=PART, max_concurrency=concurrency, send_checksums=send_checksums
            ),
            retry=retry,
        )
    )


def stream(up: S3Upload, data: bytes | bytearray | memoryview, chunk: int = 777_777) -> None:
    """Write like a serializer does: many writes of an awkward size."""
    view = memoryview(data)
    for i in range(0, len(view), chunk):
        up.write(view[i : i + chunk])


def multipart_etag(data: bytes, part: int = PART) -> str:
    """The ETag S3 gives a multipart object of uniform ``part``-sized parts (MD5 of MD5s)."""
    digests = [hashlib.md5(data[i : i + part]).digest() for i in range(0, len(data), part)]
    return f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"


@pytest.fixture
def prefix(unique_prefix: str) -> str:
    return f"s3://{TEST_BUCKET}/{unique_prefix}"


@pytest.fixture
def moto_storage(moto_server: Any) -> Iterator[S3Storage]:
    storage = make_storage(moto_server.storage_options)
    yield storage
    storage.close()


@pytest.fixture
def moto_proxy(moto_server: Any) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", moto_server.port, seed=14) as proxy:
        yield proxy
    assert not proxy.errors


@pytest.fixture
def seaweed_storage(seaweed_server: Any) -> Iterator[S3Storage]:
    storage = make_storage(seaweed_server.storage_options)
    yield storage
    storage.close()


# --- round trips ---------------------------------------------------------------------------

SIZES = {
    "empty": 0,
    "one-byte": 1,
    "part-1": PART - 1,
    "part": PART,
    "part+1": PART + 1,
    "3.5-parts": PART * 7 // 2,
}


def _round_trip(storage: S3Storage, url: str, size: int) -> None:
    data = os.urandom(size)
    up = storage.open_upload(url, size_hint_bytes=None)
    stream(up, data)
    assert up.bytes_written == up.tell() == size
    info = up.commit()
    assert info.size_bytes == size
    assert storage.get_bytes(url) == data
    buf = bytearray(size)
    storage.read_into(url, 0, memoryview(buf), version=info.version)
    assert buf == data
    if size:
        middle = bytearray(min(size, 3 * MiB))
        offset = (size - len(middle)) // 2
        storage.read_into(url, offset, memoryview(middle))
        assert middle == data[offset : offset + len(middle)]
        assert storage.get_bytes(url, offset, offset + 10) == data[offset : offset + 10]
    expected_parts = 0 if size < PART else -(-size // PART)
    assert up.metrics.parts == expected_parts
    assert up.metrics.bytes_sent == size
    assert (up.metrics.notes.get("single_put") == 1.0) == (size < PART)
    head = storage.head(url)
    assert head.size_bytes == size
    assert head.version == info.version
    if expected_parts:
        assert head.version == multipart_etag(data)


@pytest.mark.parametrize("size", list(SIZES.values()), ids=list(SIZES))
def test_round_trip_moto(moto_storage: S3Storage, prefix: str, size: int) -> None:
    _round_trip(moto_storage, f"{prefix}/obj", size)


@pytest.mark.seaweedfs
@pytest.mark.parametrize("size", [0, PART - 1, PART + 1, PART * 7 // 2], ids=str)
def test_round_trip_seaweedfs(seaweed_storage: S3Storage, prefix: str, size: int) -> None:
    # SeaweedFS verifies each part's CRC32C (moto accepts any value without checking it).
    _round_trip(seaweed_storage, f"{prefix}/obj", size)


def test_registry_serves_s3_urls(moto_server: Any, prefix: str) -> None:
    storage = get_storage(f"{prefix}/x", StorageConfig(storage_options=moto_server.storage_options))
    assert isinstance(storage, S3Storage)
    storage.put_bytes(f"{prefix}/x", b"hi")
    s3a = get_storage("s3a://b/k", StorageConfig(storage_options=moto_server.storage_options))
    assert s3a.get_bytes(f"s3a{prefix[2:]}/x") == b"hi"


def test_small_objects_go_in_one_put(moto_server: Any, moto_proxy: FaultProxy, prefix: str) -> None:
    storage = make_storage(moto_server.storage_options, endpoint_url=moto_proxy.endpoint_url)
    moto_proxy.reset_counters()
    up = storage.open_upload(f"{prefix}/small", size_hint_bytes=1000)
    up.write(b"x" * 1000)
    up.commit()
    assert moto_proxy.counts_by_kind() == {"HEAD": 1, "PUT": 1}  # head_bucket + put_object


def test_back_pressure_bounds_part_buffers(moto_server: Any, prefix: str) -> None:
    storage = make_storage(moto_server.storage_options, concurrency=2)
    data = os.urandom(8 * PART + 17)
    up = storage.open_upload(f"{prefix}/bp")
    stream(up, data, chunk=1 << 20)
    up.commit()
    assert up.metrics.parts == 9
    assert up.metrics.notes["max_live_buffers"] <= 3  # max_concurrency + 1
    assert up.metrics.notes["buffers_allocated"] <= 3  # recycled, not reallocated
    assert storage.head(f"{prefix}/bp").version == multipart_etag(data)


# --- abort paths ----------------------------------------------------------------------------


def test_abort_leaves_no_object_and_no_pending_upload(moto_storage: S3Storage, prefix: str) -> None:
    url = f"{prefix}/aborted"
    up = moto_storage.open_upload(url)
    stream(up, os.urandom(12 * MiB))
    assert up.upload_id is not None  # parts went out
    up.abort()
    up.abort()  # idempotent
    assert not moto_storage.exists(url)
    assert moto_storage.list_pending_uploads(prefix) == []
    with pytest.raises(ValueError, match="aborted"):
        up.write(b"x")


def test_previous_object_survives_a_failed_overwrite(moto_storage: S3Storage, prefix: str) -> None:
    url = f"{prefix}/obj"
    old = os.urandom(PART + 5)
    up = moto_storage.open_upload(url)
    up.write(old)
    before = up.commit()
    with pytest.raises(RuntimeError, match="serializer"), moto_storage.open_upload(url) as up2:
        stream(up2, os.urandom(12 * MiB))
        raise RuntimeError("serializer failed")
    assert moto_storage.head(url).version == before.version
    assert moto_storage.get_bytes(url) == old
    assert moto_storage.list_pending_uploads(prefix) == []


def test_serializer_failure_after_20_mib_commits_nothing(
    moto_storage: S3Storage, prefix: str
) -> None:
    url = f"{prefix}/failed"

    def serialize(out: io.RawIOBase | S3Upload) -> None:
        chunk = os.urandom(64 * 1024)
        for _ in range(20 * MiB // len(chunk)):
            out.write(chunk)
        raise ValueError("cannot pickle this object")

    up = moto_storage.open_upload(url)
    with pytest.raises(ValueError, match="cannot pickle"):
        try:
            serialize(up)
        except BaseException:
            up.abort()
            raise
    assert up.upload_id is not None
    assert up.bytes_written == 20 * MiB
    assert not moto_storage.exists(url)
    assert moto_storage.list(prefix) == []
    assert moto_storage.list_pending_uploads(prefix) == []


def test_keyboard_interrupt_in_a_part_aborts(
    moto_storage: S3Storage, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = moto_storage.client.upload_part

    def upload_part(**kwargs: Any) -> Any:
        if kwargs["PartNumber"] == 2:
            raise KeyboardInterrupt
        return real(**kwargs)

    monkeypatch.setattr(moto_storage.client, "upload_part", upload_part)
    up = moto_storage.open_upload(f"{prefix}/ki")
    with pytest.raises(KeyboardInterrupt):
        stream(up, os.urandom(3 * PART))
        up.commit()
    assert moto_storage.list_pending_uploads(prefix) == []
    assert not moto_storage.exists(f"{prefix}/ki")


# --- faults through the proxy -----------------------------------------------------------------


def _upload_many_through_faults(
    moto_server: Any,
    proxy: FaultProxy,
    prefix: str,
    *,
    count: int,
    throttle_fraction: float,
    reset_fraction: float,
) -> None:
    proxy.configure(throttle_fraction=throttle_fraction, reset_fraction=reset_fraction)
    storage = make_storage(
        moto_server.storage_options, endpoint_url=proxy.endpoint_url, max_attempts=12
    )
    direct = make_storage(moto_server.storage_options)
    base = bytearray(os.urandom(64 * MiB))
    etags = {}
    for i in range(count):
        base[:8] = i.to_bytes(8, "big")  # each object differs
        url = f"{prefix}/big-{i}"
        up = storage.open_upload(url, size_hint_bytes=len(base))
        stream(up, base, chunk=1 << 20)
        up.commit()
        etags[url] = multipart_etag(bytes(base))
    proxy.clear_faults()
    # Bitwise: the multipart ETag is the MD5 of every part's MD5; one object is read back too.
    assert {info.url: info.version for info in direct.list(prefix)} == etags
    assert direct.get_bytes(f"{prefix}/big-{count - 1}") == bytes(base)
    assert direct.list_pending_uploads(prefix) == []
    assert proxy.count(outcome="error 503") > 0
    assert proxy.count(outcome="reset") > 0


def test_uploads_survive_throttling_and_resets(
    moto_server: Any, moto_proxy: FaultProxy, prefix: str
) -> None:
    """Ten 64 MiB uploads through 10% 503 SlowDown and 2% connection resets (~15 s on moto)."""
    _upload_many_through_faults(
        moto_server, moto_proxy, prefix, count=10, throttle_fraction=0.10, reset_fraction=0.02
    )


@pytest.mark.slow
def test_uploads_survive_heavy_throttling_and_resets(
    moto_server: Any, moto_proxy: FaultProxy, prefix: str
) -> None:
    _upload_many_through_faults(
        moto_server, moto_proxy, prefix, count=10, throttle_fraction=0.25, reset_fraction=0.05
    )


@pytest.mark.parametrize(
    "operation",
    [
        lambda s, url: s.open_upload(url),
        lambda s, url: s.put_bytes(url, b"data"),
        lambda s, url: s.read_into(url, 0, memoryview(bytearray(4))),
    ],
    ids=["open_upload", "put_bytes", "read_into"],
)
def test_forbidden_fails_after_one_attempt(
    moto_server: Any,
    moto_proxy: FaultProxy,
    prefix: str,
    operation: Callable[[S3Storage, str], object],
) -> None:
    storage = make_storage(moto_server.storage_options, endpoint_url=moto_proxy.endpoint_url)
    url = f"{prefix}/forbidden"
    moto_proxy.configure(deny_all=True)
    moto_proxy.reset_counters()
    started = time.monotonic()
    with pytest.raises(PermissionDeniedError) as info:
        operation(storage, url)
    assert time.monotonic() - started < 2.0
    assert moto_proxy.count() == 1
    assert url in str(info.value)
    assert "storage_options" in str(info.value)  # the hint
    assert isinstance(info.value.__cause__, botocore.exceptions.ClientError)


def test_retries_exhausted_names_part_and_aborts(
    moto_server: Any, moto_proxy: FaultProxy, prefix: str
) -> None:
    storage = make_storage(
        moto_server.storage_options, endpoint_url=moto_proxy.endpoint_url, max_attempts=3
    )
    url = f"{prefix}/exhausted"
    moto_proxy.fail_next("PUT", "partNumber", times=None)
    up = storage.open_upload(url)
    with pytest.raises(RetriesExhaustedError) as info:
        stream(up, os.urandom(3 * PART))
        up.commit()
    err = info.value
    assert err.attempts == 3
    assert url in str(err)
    assert "upload part " in str(err) and "3 attempts" in str(err)
    assert isinstance(err.__cause__, ThrottledError)
    assert up.metrics.throttles >= 2
    assert moto_proxy.count("DELETE", "uploadId") == 1  # AbortMultipartUpload
    moto_proxy.clear_faults()
    assert not storage.exists(url)
    assert storage.list_pending_uploads(prefix) == []


@pytest.mark.parametrize("action", ["error", "drop_response"])
def test_complete_failing_once_is_retried(
    moto_server: Any, moto_proxy: FaultProxy, prefix: str, action: str
) -> None:
    storage = make_storage(moto_server.storage_options, endpoint_url=moto_proxy.endpoint_url)
    url = f"{prefix}/complete"
    data = os.urandom(PART * 2 + 3)
    moto_proxy.fail_next("POST", "uploadId", action=action)  # CompleteMultipartUpload
    up = storage.open_upload(url)
    stream(up, data)
    info = up.commit()
    assert info.size_bytes == len(data)
    assert moto_proxy.count("POST", "uploadId") == 2
    assert up.metrics.retries == 1
    assert storage.get_bytes(url) == data


def test_store_rejecting_part_checksums_falls_back(
    moto_server: Any, moto_proxy: FaultProxy, prefix: str
) -> None:
    storage = make_storage(moto_server.storage_options, endpoint_url=moto_proxy.endpoint_url)
    moto_proxy.fail_next("POST", "uploads", status=400, code="InvalidArgument")
    data = os.urandom(PART + 1)
    up = storage.open_upload(f"{prefix}/nocrc")
    up.write(data)
    up.commit()
    assert not storage.send_checksums
    assert moto_proxy.count("POST", "uploads") == 2
    assert storage.get_bytes(f"{prefix}/nocrc") == data


def test_read_into_retries_a_cut_body(
    moto_server: Any, moto_proxy: FaultProxy, prefix: str
) -> None:
    storage = make_storage(moto_server.storage_options, endpoint_url=moto_proxy.endpoint_url)
    url = f"{prefix}/cut"
    data = os.urandom(3 * MiB)
    storage.put_bytes(url, data)
    moto_proxy.reset_counters()
    moto_proxy.fail_next("GET", action="response_reset")
    buf = bytearray(len(data))
    storage.read_into(url, 0, memoryview(buf))
    assert buf == data
    assert moto_proxy.count("GET") == 2
    path = url[len("s3:/") :]
    assert len(data) < moto_proxy.bytes_to_client(path) < 2 * len(data)


def test_conditional_put_whose_answer_was_lost_is_recognized(
    moto_server: Any, moto_proxy: FaultProxy, prefix: str
) -> None:
    storage = make_storage(moto_server.storage_options, endpoint_url=moto_proxy.endpoint_url)
    url = f"{prefix}/manifest.json"
    moto_proxy.fail_next("PUT", action="drop_response")
    info = storage.put_bytes(url, b'{"step": 1}', if_absent=True)
    assert info.size_bytes == 11
    assert moto_proxy.count("PUT") == 2
    with pytest.raises(CommitConflictError):
        storage.put_bytes(url, b'{"step": 2}', if_absent=True)


def test_proxy_delay_and_bandwidth_cap_keep_bytes_intact(
    moto_server: Any, moto_proxy: FaultProxy, prefix: str
) -> None:
    moto_proxy.configure(delay_secs=0.01, bandwidth_bytes_per_sec=64 * MiB)
    storage = make_storage(moto_server.storage_options, endpoint_url=moto_proxy.endpoint_url)
    data = os.urandom(PART + 100)
    up = storage.open_upload(f"{prefix}/paced")
    up.write(data)
    up.commit()
    assert storage.get_bytes(f"{prefix}/paced") == data
    assert moto_proxy.count(outcome="forwarded") == moto_proxy.count()


@pytest.mark.seaweedfs
def test_seaweedfs_rejects_a_wrong_part_checksum(
    seaweed_server: Any, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Proves the CRC32C we send is the one the store checks: a wrong one never gets stored.
    storage = make_storage(seaweed_server.storage_options, max_attempts=2)
    good = storage.put_bytes(f"{prefix}/good", b"checked")
    assert good.crc32c == crc32c_of(b"checked")
    monkeypatch.setattr("cloudckpt.storage.s3.crc32c_of", lambda data: 12345)
    url = f"{prefix}/corrupt"
    up = storage.open_upload(url)
    with pytest.raises(RetriesExhaustedError) as info:
        stream(up, os.urandom(PART + 1))
        up.commit()
    assert isinstance(info.value.__cause__, TransientStorageError)  # BadDigest: resent, in vain
    assert "BadDigest" in str(info.value)
    with pytest.raises(RetriesExhaustedError):
        storage.put_bytes(url, b"data")
    assert not storage.exists(url)
    assert storage.list_pending_uploads(prefix) == []


# --- auth, missing things, preconditions -------------------------------------------------------


@pytest.mark.seaweedfs
@pytest.mark.parametrize(
    "operation",
    [
        lambda s, url: s.open_upload(url),
        lambda s, url: s.put_bytes(url, b"data"),
        lambda s, url: s.list(url),
    ],
    ids=["open_upload", "put_bytes", "list"],
)
def test_wrong_secret_on_seaweedfs_is_not_retried(
    seaweed_server: Any, prefix: str, operation: Callable[[S3Storage, str], object]
) -> None:
    with FaultProxy("127.0.0.1", seaweed_server.port) as proxy:
        storage = make_storage(
            seaweed_server.storage_options, endpoint_url=proxy.endpoint_url, secret="wrong"
        )
        with pytest.raises(PermissionDeniedError) as info:
            operation(storage, f"{prefix}/denied")
        assert proxy.count() == 1
    assert f"{prefix}/denied" in str(info.value)
    assert not is_retryable(info.value)


@pytest.mark.parametrize(
    "server", ["moto_server", pytest.param("seaweed_server", marks=pytest.mark.seaweedfs)]
)
def test_missing_bucket(request: pytest.FixtureRequest, server: str) -> None:
    storage = make_storage(request.getfixturevalue(server).storage_options)
    url = "s3://no-such-bucket-cloudckpt/ckpt/rank0"
    with pytest.raises(BucketNotFoundError) as info:
        storage.open_upload(url)
    assert isinstance(info.value, FileNotFoundError)
    assert "no-such-bucket-cloudckpt" in str(info.value)
    assert "create the bucket" in str(info.value)
    with pytest.raises(BucketNotFoundError):
        storage.list("s3://no-such-bucket-cloudckpt/ckpt")


def test_missing_object(moto_storage: S3Storage, prefix: str) -> None:
    url = f"{prefix}/nothing"
    for call in (
        lambda: moto_storage.head(url),
        lambda: moto_storage.get_bytes(url),
        lambda: moto_storage.read_into(url, 0, memoryview(bytearray(3))),
    ):
        with pytest.raises(NotFoundError) as info:
            call()
        assert isinstance(info.value, FileNotFoundError)
        assert url in str(info.value)
    assert not moto_storage.exists(url)


@pytest.mark.parametrize(
    "server", ["moto_server", pytest.param("seaweed_server", marks=pytest.mark.seaweedfs)]
)
def test_conditional_put_conflict(request: pytest.FixtureRequest, prefix: str, server: str) -> None:
    storage = make_storage(request.getfixturevalue(server).storage_options)
    url = f"{prefix}/manifest.json"
    storage.put_bytes(url, b"first", if_absent=True)
    with pytest.raises(CommitConflictError) as info:
        storage.put_bytes(url, b"second", if_absent=True)
    assert url in str(info.value)
    assert storage.get_bytes(url) == b"first"
    storage.put_bytes(url, b"third")  # unconditional overwrite
    assert storage.get_bytes(url) == b"third"


def test_pinned_read_after_overwrite_raises_object_changed(
    moto_storage: S3Storage, prefix: str
) -> None:
    url = f"{prefix}/pinned"
    first = moto_storage.put_bytes(url, b"a" * 100)
    moto_storage.put_bytes(url, b"b" * 100)
    with pytest.raises(ObjectChangedError) as info:
        moto_storage.read_into(url, 10, memoryview(bytearray(20)), version=first.version)
    assert url in str(info.value)
    with pytest.raises(ObjectChangedError):
        moto_storage.get_bytes(url, 0, 5, version=first.version)
    current = moto_storage.head(url).version
    assert moto_storage.get_bytes(url, 0, 5, version=current) == b"b" * 5


def test_read_past_the_end(moto_storage: S3Storage, prefix: str) -> None:
    url = f"{prefix}/short"
    moto_storage.put_bytes(url, b"0123456789")
    with pytest.raises(StorageError, match="shorter"):
        moto_storage.read_into(url, 5, memoryview(bytearray(10)))
    with pytest.raises(BadRequestError):
        moto_storage.read_into(url, 20, memoryview(bytearray(1)))
    assert moto_storage.get_bytes(url, 8) == b"89"
    assert moto_storage.get_bytes(url, 3, 3) == b""


# --- namespace ---------------------------------------------------------------------------------


def test_list_delete_pending_and_abort_stale(
    moto_storage: S3Storage,
    moto_server: Any,
    moto_proxy: FaultProxy,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, size in (("b/two", 2), ("a", 1), ("c/d/three", 3)):
        moto_storage.put_bytes(f"{prefix}/{name}", b"x" * size)
    moto_storage.put_bytes(f"{prefix}-sibling/not-under", b"x")
    listed = moto_storage.list(prefix)
    assert [(i.url, i.size_bytes) for i in listed] == [
        (f"{prefix}/a", 1),
        (f"{prefix}/b/two", 2),
        (f"{prefix}/c/d/three", 3),
    ]
    assert all(i.version and i.mtime_secs for i in listed)
    assert moto_storage.list(prefix + "/") == listed

    # delete_objects in batches (shrunk to 2 keys to see the batching), absent keys are fine
    storage = make_storage(moto_server.storage_options, endpoint_url=moto_proxy.endpoint_url)
    monkeypatch.setattr("cloudckpt.storage.s3.DELETE_BATCH_KEYS", 2)
    moto_proxy.reset_counters()
    storage.delete([f"{prefix}/a", f"{prefix}/b/two", f"{prefix}/never-existed"])
    assert moto_proxy.count("POST", "delete") == 2
    assert [i.url for i in moto_storage.list(prefix)] == [f"{prefix}/c/d/three"]
    storage.delete([])

    # an unfinished upload shows up as pending, and abort_stale_uploads removes it
    up = moto_storage.open_upload(f"{prefix}/crashed")
    up.write(os.urandom(PART))  # one full part: the multipart upload exists now
    pending = moto_storage.list_pending_uploads(prefix)
    assert [(p.url, p.upload_id) for p in pending] == [(f"{prefix}/crashed", up.upload_id)]
    assert pending[0].initiated_secs is not None
    assert moto_storage.list_pending_uploads(f"{prefix}-sibling") == []
    assert abort_stale_uploads(moto_storage, prefix, older_than_secs=10**10) == []
    assert abort_stale_uploads(moto_storage, prefix, older_than_secs=0) == pending
    assert moto_storage.list_pending_uploads(prefix) == []
    up.abort()  # its upload is gone already: logged, not raised


# --- error translation and options (no server needed) ------------------------------------------


def _client_error(code: str, status: int, op: str = "PutObject") -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        op,
    )


@pytest.mark.parametrize(
    ("exc", "expected", "retryable"),
    [
        (_client_error("NoSuchBucket", 404), BucketNotFoundError, False),
        (_client_error("NoSuchKey", 404), NotFoundError, False),
        (_client_error("404", 404, "HeadObject"), NotFoundError, False),
        (_client_error("AccessDenied", 403), PermissionDeniedError, False),
        (_client_error("InvalidAccessKeyId", 403), PermissionDeniedError, False),
        (_client_error("SignatureDoesNotMatch", 403), PermissionDeniedError, False),
        (_client_error("403", 403, "HeadBucket"), PermissionDeniedError, False),
        (_client_error("Unauthorized", 401), PermissionDeniedError, False),
        (_client_error("EntityTooSmall", 400), BadRequestError, False),
        (_client_error("InvalidPart", 400), BadRequestError, False),
        (_client_error("InvalidPartOrder", 400), BadRequestError, False),
        (_client_error("MalformedXML", 400), BadRequestError, False),
        (_client_error("Whatever", 400), BadRequestError, False),
        (_client_error("NoSuchUpload", 404), NoSuchUploadError, False),
        (_client_error("PreconditionFailed", 412), PreconditionFailedError, False),
        (_client_error("ConditionalRequestConflict", 409), PreconditionFailedError, False),
        (_client_error("SlowDown", 503), ThrottledError, True),
        (_client_error("503", 503, "HeadObject"), ThrottledError, True),
        (_client_error("TooManyRequests", 429), ThrottledError, True),
        (_client_error("Throttling", 400), ThrottledError, True),
        (_client_error("InternalError", 500), TransientStorageError, True),
        (_client_error("500", 500), TransientStorageError, True),
        (_client_error("BadGateway", 502), TransientStorageError, True),
        (_client_error("GatewayTimeout", 504), TransientStorageError, True),
        (_client_error("RequestTimeout", 400), TransientStorageError, True),
        (
            botocore.exceptions.EndpointConnectionError(endpoint_url="http://x"),
            TransientStorageError,
            True,
        ),
        (
            botocore.exceptions.ConnectionClosedError(endpoint_url="http://x"),
            TransientStorageError,
            True,
        ),
        (
            botocore.exceptions.ReadTimeoutError(endpoint_url="http://x"),
            TransientStorageError,
            True,
        ),
        (
            botocore.exceptions.ConnectTimeoutError(endpoint_url="http://x"),
            TransientStorageError,
            True,
        ),
        (urllib3.exceptions.ProtocolError("reset"), TransientStorageError, True),
        (urllib3.exceptions.IncompleteRead(3, 5), TransientStorageError, True),
        (ConnectionResetError(104, "reset"), TransientStorageError, True),
        (botocore.exceptions.NoCredentialsError(), PermissionDeniedError, False),
    ],
)
def test_translate_boto_error(exc: BaseException, expected: type, retryable: bool) -> None:
    err = translate_boto_error(exc, url="s3://bkt/key", what="put object")
    assert type(err) is expected
    assert "s3://bkt/key" in str(err)
    assert err.hint
    assert is_retryable(err) is retryable


def test_translate_picks_the_precondition_and_not_found_flavour() -> None:
    err = translate_boto_error(
        _client_error("PreconditionFailed", 412, "GetObject"),
        url="s3://b/k",
        what="get",
        precondition=ObjectChangedError,
    )
    assert type(err) is ObjectChangedError
    err = translate_boto_error(
        _client_error("404", 404, "HeadBucket"),
        url="s3://bkt/k",
        what="head bucket",
        not_found=BucketNotFoundError,
    )
    assert type(err) is BucketNotFoundError
    assert "'bkt'" in str(err)


def test_storage_options_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    config = StorageConfig()
    with pytest.raises(ValueError, match="endpoint"):
        make_client_kwargs({"endpoint": "http://x"}, config)
    kwargs = make_client_kwargs(
        {
            "key": "K",
            "secret": "S",
            "token": "T",
            "client_kwargs": {"endpoint_url": "http://e:1", "region_name": "eu-west-1"},
            "config_kwargs": {"connect_timeout": 3},
        },
        config,
    )
    assert kwargs["aws_access_key_id"] == "K"
    assert kwargs["aws_secret_access_key"] == "S"
    assert kwargs["aws_session_token"] == "T"
    assert kwargs["endpoint_url"] == "http://e:1"
    assert kwargs["region_name"] == "eu-west-1"
    cfg = kwargs["config"]
    assert cfg.retries == {"total_max_attempts": 1, "mode": "standard"}
    assert cfg.connect_timeout == 3
    assert cfg.read_timeout == config.retry.request_timeout_secs
    assert cfg.max_pool_connections >= 2 * config.upload.max_concurrency
    assert (
        make_client_kwargs({"anon": True}, config)["config"].signature_version is botocore.UNSIGNED
    )
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://from-env:9")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert make_client_kwargs({}, config)["endpoint_url"] == "http://from-env:9"
    with pytest.raises(ValueError, match="unknown S3 storage_options"):
        S3Storage(StorageConfig(storage_options={"bogus": 1}))
    storage = S3Storage(StorageConfig(storage_options={"endpoint_url": "http://127.0.0.1:9"}))
    assert storage.client.meta.config.retries["total_max_attempts"] == 1  # botocore never retries


def test_bad_urls_and_arguments_fail_before_io() -> None:
    storage = S3Storage(StorageConfig(storage_options={"endpoint_url": "http://127.0.0.1:9"}))
    with pytest.raises(UnsupportedURLError):
        storage.head("s3://bucket-only")
    with pytest.raises(UnsupportedURLError):
        storage.head("gs://b/k")
    with pytest.raises(ValueError):
        storage.get_bytes("s3://b/k", 5, 2)
    with pytest.raises(TypeError):
        storage.read_into("s3://b/k", 0, memoryview(b"readonly"))
