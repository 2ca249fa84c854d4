"""GCSStorage against fake-gcs-server: resumable uploads with 256 KiB-aligned chunks, partial
acknowledgements and lost answers, generation pinning, error translation.

The emulator comes from the shared ``gcs_server`` fixture (``tests/conftest.py``). Chunk sizes
are observed by wrapping the backend's single HTTP entry point, :meth:`GCSClient.request`.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest
from backends import TEST_BUCKET

from cloudckpt.checksum import crc32c
from cloudckpt.config import MiB, RetryConfig, StorageConfig, UploadConfig
from cloudckpt.errors import (
    BadRequestError,
    BucketNotFoundError,
    CommitConflictError,
    NotFoundError,
    ObjectChangedError,
    PermissionDeniedError,
    PreconditionFailedError,
    StorageError,
    ThrottledError,
    TransientStorageError,
)
from cloudckpt.retry import is_retryable
from cloudckpt.storage.base import Upload
from cloudckpt.storage.gcs import (
    GCS_CHUNK_ALIGNMENT_BYTES,
    GCSResponse,
    GCSStorage,
    GCSUpload,
    chunk_size_for,
    exception_error,
    status_error,
)
from cloudckpt.storage.registry import get_storage

pytestmark = pytest.mark.gcs

KiB = 1 << 10
ALIGN = GCS_CHUNK_ALIGNMENT_BYTES
SIZES = [0, 1, 256 * KiB - 1, 256 * KiB, 5 * MiB + 3, 12 * MiB]
WRITE_PATTERN = [1, 7, 4093, 65_537, MiB + 5, 3 * MiB - 1]
_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\*|\d+)")


def make_storage(server: Any, *, part_size_bytes: int = 5 * MiB) -> GCSStorage:
    config = StorageConfig(
        storage_options=server.storage_options,
        upload=UploadConfig(part_size_bytes=part_size_bytes),
        # No waiting between attempts: retries happen, sleeps are zero.
        retry=RetryConfig(max_attempts=3, initial_backoff_secs=0, max_backoff_secs=0),
    )
    storage = get_storage(f"gs://{TEST_BUCKET}", config)
    assert isinstance(storage, GCSStorage)
    return storage


@pytest.fixture
def storage(gcs_server: Any) -> Iterator[GCSStorage]:
    s = make_storage(gcs_server)
    yield s
    s.close()


@pytest.fixture
def base(unique_prefix: str) -> str:
    return f"gs://{TEST_BUCKET}/{unique_prefix}"


def write_unevenly(upload: Upload, data: bytes) -> None:
    view = memoryview(data)
    pos, i = 0, 0
    while pos < len(view):
        n = WRITE_PATTERN[i % len(WRITE_PATTERN)]
        upload.write(view[pos : pos + n])
        pos += n
        i += 1


class ChunkSpy:
    """Wraps GCSClient.request: records every chunk PUT and can meddle with one of them.

    ``meddle(index, method, endpoint, kwargs, forward)`` is called for the chunk PUT number
    ``index`` (0-based, status queries excluded) and returns the response to hand back.
    """

    def __init__(self, storage: GCSStorage, monkeypatch: pytest.MonkeyPatch) -> None:
        self.client = storage._client()
        self._forward = self.client.request
        self.chunks: list[tuple[str, int]] = []  # (Content-Range, body bytes) as the client sent
        self.status_queries = 0
        self.deletes = 0
        self.meddle: Callable[..., GCSResponse] | None = None
        self.answer_status_query: Callable[[], GCSResponse] | None = None
        monkeypatch.setattr(self.client, "request", self)

    def __call__(self, method: str, endpoint: str, **kwargs: Any) -> GCSResponse:
        if "upload_id=" in endpoint and method == "DELETE":
            self.deletes += 1
        if "upload_id=" in endpoint and method == "PUT":
            content_range = kwargs["headers"]["Content-Range"]
            if content_range == "bytes */*":
                self.status_queries += 1
                assert self.answer_status_query is not None, "unexpected status query"
                # fake-gcs-server finalizes the upload on a status query: answer it here.
                return self.answer_status_query()
            index = len(self.chunks)
            self.chunks.append((content_range, len(kwargs["data"])))
            if self.meddle is not None:
                return self.meddle(index, method, endpoint, kwargs, self._forward)
        return self._forward(method, endpoint, **kwargs)

    def non_final_sizes(self) -> list[int]:
        return [n for rng, n in self.chunks if rng.endswith("/*")]

    def assert_aligned(self) -> None:
        sizes = self.non_final_sizes()
        assert all(n > 0 and n % ALIGN == 0 for n in sizes), sizes


# --- round trips and chunking ----------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_uneven_writes(
    storage: GCSStorage, base: str, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = ChunkSpy(storage, monkeypatch)
    url = f"{base}/rank-0/data.bin"
    data = os.urandom(size)
    upload = storage.open_upload(url, size_hint_bytes=size)
    write_unevenly(upload, data)
    assert upload.bytes_written == size
    info = upload.commit()
    assert (info.url, info.size_bytes, info.crc32c) == (url, size, crc32c(data))
    assert storage.get_bytes(url) == data
    head = storage.head(url)
    assert (head.size_bytes, head.version, head.crc32c) == (size, info.version, crc32c(data))
    spy.assert_aligned()
    assert len(spy.non_final_sizes()) == size // (5 * MiB)  # a small object is one request
    assert upload.metrics.bytes_sent == size


@pytest.mark.parametrize(
    ("part_size", "chunk"),
    [(5 * MiB, 5 * MiB), (5 * MiB + 12_345, 5 * MiB), (8 * MiB, 8 * MiB)],
    ids=["5MiB", "5MiB+12345-rounded-down", "8MiB"],
)
def test_uneven_writes_send_aligned_chunks(
    gcs_server: Any, base: str, part_size: int, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = make_storage(gcs_server, part_size_bytes=part_size)
    spy = ChunkSpy(storage, monkeypatch)
    data = os.urandom(12 * MiB + 20)
    writes = [5 * MiB - 10, 30, 7 * MiB]
    upload = storage.open_upload(f"{base}/obj")
    pos = 0
    for n in writes:
        upload.write(data[pos : pos + n])
        pos += n
    info = upload.commit()
    assert storage.get_bytes(f"{base}/obj") == data
    assert info.size_bytes == len(data)
    spy.assert_aligned()
    assert spy.non_final_sizes() == [chunk] * (len(data) // chunk)
    final_range, final_size = spy.chunks[-1]
    assert final_range == f"bytes {len(data) - final_size}-{len(data) - 1}/{len(data)}"
    storage.close()


def test_large_single_write_is_cut_into_chunks(
    storage: GCSStorage, base: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = ChunkSpy(storage, monkeypatch)
    data = os.urandom(12 * MiB + 1)
    upload = storage.open_upload(f"{base}/obj")
    upload.write(data)
    upload.commit()
    assert storage.get_bytes(f"{base}/obj") == data
    assert spy.non_final_sizes() == [5 * MiB, 5 * MiB]
    assert spy.chunks[-1][1] == 2 * MiB + 1


@pytest.mark.parametrize("chunks", [1, 2])
def test_exact_multiple_of_chunk_size_ends_with_empty_final_chunk(
    storage: GCSStorage, base: str, chunks: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = ChunkSpy(storage, monkeypatch)
    data = os.urandom(chunks * 5 * MiB)
    upload = storage.open_upload(f"{base}/obj")
    upload.write(data)
    assert upload.commit().size_bytes == len(data)
    assert storage.get_bytes(f"{base}/obj") == data
    assert spy.non_final_sizes() == [5 * MiB] * chunks
    assert spy.chunks[-1] == (f"bytes */{len(data)}", 0)


def test_chunk_size_rounding() -> None:
    assert chunk_size_for(5 * MiB + 1) == 5 * MiB
    assert chunk_size_for(32 * MiB) == 32 * MiB
    assert chunk_size_for(1) == ALIGN
    with pytest.raises(ValueError):
        GCSUpload(None, "gs://b/k", "http://x", 5 * MiB + 1, send_checksums=False)  # type: ignore[arg-type]


# --- partial acknowledgements and lost answers ---------------------------------------------


@pytest.mark.parametrize("cut", [ALIGN, 1000], ids=["256KiB-short", "1000B-short"])
def test_partial_ack_resumes_at_the_acknowledged_offset(
    storage: GCSStorage, base: str, cut: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server keeps only part of chunk 0 (its 308 Range ends early): the client resends the
    tail merged with what follows, still in exact 256 KiB multiples."""
    spy = ChunkSpy(storage, monkeypatch)

    def truncate_first(index: int, method: str, endpoint: str, kw: dict[str, Any], forward: Any):
        if index != 0:
            return forward(method, endpoint, **kw)
        start, end, _ = _RANGE.match(kw["headers"]["Content-Range"]).groups()  # type: ignore[union-attr]
        kept = int(end) - int(start) + 1 - cut
        headers = dict(
            kw["headers"], **{"Content-Range": f"bytes {start}-{int(start) + kept - 1}/*"}
        )
        # Only `kept` bytes reach the server, so its Range answer acknowledges only those.
        return forward(method, endpoint, **dict(kw, headers=headers, data=kw["data"][:kept]))

    spy.meddle = truncate_first
    data = os.urandom(12 * MiB + 7)
    upload = storage.open_upload(f"{base}/obj")
    write_unevenly(upload, data)
    info = upload.commit()
    assert storage.get_bytes(f"{base}/obj") == data
    assert info.crc32c == crc32c(data)
    spy.assert_aligned()
    starts = [int(_RANGE.match(r).group(1)) for r, _ in spy.chunks]  # type: ignore[union-attr]
    assert starts[:2] == [0, 5 * MiB - cut]  # resumed exactly where the server stopped


@pytest.mark.parametrize("landed", [True, False], ids=["chunk-landed", "chunk-lost"])
def test_lost_answer_queries_status_then_resumes(
    storage: GCSStorage, base: str, landed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunk 1's answer is lost (connection reset). The retry asks the session how much it
    holds and resumes from there: no byte is sent twice into the object, none is skipped."""
    spy = ChunkSpy(storage, monkeypatch)
    persisted = [0]

    def lose_answer(index: int, method: str, endpoint: str, kw: dict[str, Any], forward: Any):
        if index == 1 and landed:
            forward(method, endpoint, **kw)
        if index == 1:
            raise TransientStorageError("connection reset (injected)", url=endpoint)
        response = forward(method, endpoint, **kw)
        if response.status == 308:
            persisted[0] = int(response.headers["Range"].rsplit("-", 1)[1]) + 1
        return response

    def status() -> GCSResponse:
        held = persisted[0] + (5 * MiB if landed else 0)
        return GCSResponse(308, {"Range": f"bytes=0-{held - 1}"}, b"")

    spy.meddle = lose_answer
    spy.answer_status_query = status
    data = os.urandom(12 * MiB + 3)
    upload = storage.open_upload(f"{base}/obj")
    write_unevenly(upload, data)
    info = upload.commit()
    assert storage.get_bytes(f"{base}/obj") == data
    assert info.size_bytes == len(data)
    assert spy.status_queries == 1
    assert upload.metrics.retries == 1
    spy.assert_aligned()
    # chunk-landed: the status query acknowledged chunk 1, so it is not sent again.
    assert len(spy.non_final_sizes()) == (2 if landed else 3)


def test_failed_upload_refuses_more_writes_and_aborts(
    storage: GCSStorage, base: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = ChunkSpy(storage, monkeypatch)

    def forbid(index: int, method: str, endpoint: str, kw: dict[str, Any], forward: Any):
        raise status_error(403, b'{"error": {"message": "denied"}}', endpoint, "upload chunk")

    spy.meddle = forbid
    upload = storage.open_upload(f"{base}/obj")
    with pytest.raises(PermissionDeniedError):
        upload.write(os.urandom(6 * MiB))
    assert len(spy.chunks) == 1  # 403 is not retried
    with pytest.raises(ValueError, match="failed"):
        upload.write(b"x")
    upload.abort()
    assert spy.deletes == 1
    with pytest.raises(NotFoundError):
        storage.head(f"{base}/obj")


# --- abort -------------------------------------------------------------------------------------


def test_abort_leaves_nothing_and_keeps_previous(
    storage: GCSStorage, base: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = ChunkSpy(storage, monkeypatch)
    fresh, existing = f"{base}/fresh", f"{base}/existing"
    storage.put_bytes(existing, b"previous")
    before = storage.head(existing)
    for url in (fresh, existing):
        upload = storage.open_upload(url)
        upload.write(os.urandom(6 * MiB))  # one chunk reaches the server
        assert storage.list(base) == [before]  # nothing partial is visible mid-upload
        upload.abort()
        upload.abort()  # idempotent
        with pytest.raises(ValueError, match="aborted"):
            upload.commit()
    assert spy.deletes == 2  # each session was cancelled once
    with pytest.raises(NotFoundError):
        storage.head(fresh)
    assert storage.get_bytes(existing) == b"previous"
    assert storage.head(existing) == before
    assert storage.list(base) == [before]


# --- small objects, reads, versions, namespace ----------------------------------------------


def test_put_if_absent_conflict(storage: GCSStorage, base: str) -> None:
    url = f"{base}/manifest.json"
    info = storage.put_bytes(url, b"first", if_absent=True)
    assert (info.size_bytes, info.crc32c) == (5, crc32c(b"first"))
    with pytest.raises(CommitConflictError) as excinfo:
        storage.put_bytes(url, b"second", if_absent=True)
    assert isinstance(excinfo.value, PreconditionFailedError)
    assert storage.get_bytes(url) == b"first"
    storage.put_bytes(url, b"third")
    assert storage.get_bytes(url) == b"third"


def test_put_if_absent_retry_after_lost_answer_is_not_a_conflict(
    storage: GCSStorage, base: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first attempt lands but its answer is lost; the retry's 412 is our own write."""
    client = storage._client()
    forward = client.request
    calls = []

    def lose_first(method: str, endpoint: str, **kw: Any) -> GCSResponse:
        calls.append(method)
        response = forward(method, endpoint, **kw)
        if len(calls) == 1:
            raise TransientStorageError("answer lost (injected)", url=endpoint)
        return response

    monkeypatch.setattr(client, "request", lose_first)
    info = storage.put_bytes(f"{base}/m", b"mine", if_absent=True)
    assert info.size_bytes == 4
    monkeypatch.undo()
    with pytest.raises(CommitConflictError):
        storage.put_bytes(f"{base}/m", b"other", if_absent=True)


@pytest.mark.parametrize(
    ("offset", "length"),
    [(0, 100), (MiB, 4096), (12 * MiB - 100, 100), (5 * MiB - 10, 20), (0, 12 * MiB)],
    ids=["start", "middle", "end", "crossing-chunk-boundary", "whole"],
)
def test_read_into_ranges(storage: GCSStorage, base: str, offset: int, length: int) -> None:
    url = f"{base}/obj"
    data = os.urandom(12 * MiB)
    upload = storage.open_upload(url)
    upload.write(data)
    version = upload.commit().version
    buf = bytearray(length)
    storage.read_into(url, offset, memoryview(buf), version=version)
    assert buf == data[offset : offset + length]
    assert storage.get_bytes(url, offset, offset + length) == data[offset : offset + length]


def test_read_into_many_is_one_request(
    storage: GCSStorage, base: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"{base}/obj"
    data = os.urandom(100_000)
    storage.put_bytes(url, data)
    client = storage._client()
    forward, gets = client.request, []
    monkeypatch.setattr(client, "request", lambda m, e, **kw: gets.append(m) or forward(m, e, **kw))
    a, b, c = bytearray(10), bytearray(50_000), bytearray(3)
    storage.read_into_many(url, 5, [memoryview(a), 90, memoryview(b), 7, memoryview(c)])
    assert gets == ["GET"]
    assert a == data[5:15] and b == data[105:50_105] and c == data[50_112:50_115]


def test_short_reads(storage: GCSStorage, base: str) -> None:
    url = f"{base}/obj"
    storage.put_bytes(url, b"0123456789")
    with pytest.raises(StorageError, match="short read") as excinfo:
        storage.read_into(url, 5, memoryview(bytearray(10)))
    assert not isinstance(excinfo.value, ObjectChangedError | NotFoundError)
    with pytest.raises(StorageError, match="short read"):
        storage.read_into(url, 50, memoryview(bytearray(10)))  # starts past the end (416)
    assert storage.get_bytes(url, 8, 20) == b"89"
    assert storage.get_bytes(url, 10) == b""
    assert storage.get_bytes(url, 3, 3) == b""


def test_version_pinning_detects_overwrite(storage: GCSStorage, base: str) -> None:
    url = f"{base}/obj"
    version = storage.put_bytes(url, b"A" * 100).version
    assert version is not None and storage.head(url).version == version
    buf = bytearray(10)
    storage.read_into(url, 0, memoryview(buf), version=version)
    storage.put_bytes(url, b"B" * 100)
    with pytest.raises(ObjectChangedError) as excinfo:
        storage.read_into(url, 0, memoryview(buf), version=version)
    assert url in str(excinfo.value)
    with pytest.raises(ObjectChangedError):
        storage.get_bytes(url, version=version)
    with pytest.raises(ObjectChangedError):
        storage.get_bytes(url, 0, 5, version=version)
    assert buf == b"A" * 10


def test_server_side_precondition_failure_is_object_changed(
    storage: GCSStorage, base: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real GCS answers a pinned read of a newer generation with 412 (the emulator does not)."""
    url = f"{base}/obj"
    storage.put_bytes(url, b"x")
    client = storage._client()

    def precondition_failed(method: str, endpoint: str, **kw: Any) -> GCSResponse:
        assert kw["params"]["ifGenerationMatch"] == "123"
        raise status_error(412, b"", url, kw["what"])

    monkeypatch.setattr(client, "request", precondition_failed)
    with pytest.raises(ObjectChangedError):
        storage.read_into(url, 0, memoryview(bytearray(1)), version="123")


def test_head_list_delete(storage: GCSStorage, base: str) -> None:
    urls = [f"{base}/step-1/b", f"{base}/step-1/a", f"{base}/step-1/sub/c"]
    for i, url in enumerate(urls):
        storage.put_bytes(url, b"x" * i)
    storage.put_bytes(f"{base}/step-10/other", b"not under step-1")
    listed = storage.list(f"{base}/step-1")
    assert [i.url for i in listed] == sorted(urls)
    assert [i.size_bytes for i in listed] == [1, 0, 2]
    assert all(i.version and i.crc32c is not None for i in listed)
    assert storage.list(f"{base}/step-1/") == listed
    assert storage.list(f"{base}/nothing-here") == []
    storage.delete([urls[0], urls[2], f"{base}/step-1/never-existed"])
    assert [i.url for i in storage.list(f"{base}/step-1")] == [urls[1]]
    assert not storage.exists(urls[0])
    assert storage.exists(urls[1])


def test_list_pages_through_results(
    storage: GCSStorage, base: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("cloudckpt.storage.gcs.GCS_MAX_LIST_PAGE", 2)
    urls = [f"{base}/o{i}" for i in range(5)]
    for url in urls:
        storage.put_bytes(url, b"x")
    assert [i.url for i in storage.list(base)] == urls


def test_gcs_scheme_alias(storage: GCSStorage, unique_prefix: str) -> None:
    url = f"gcs://{TEST_BUCKET}/{unique_prefix}/obj"
    storage.put_bytes(url, b"alias")
    assert [i.url for i in storage.list(f"gcs://{TEST_BUCKET}/{unique_prefix}")] == [url]


# --- missing things ------------------------------------------------------------------------


def test_missing_object(storage: GCSStorage, base: str) -> None:
    url = f"{base}/missing"
    for call in (
        lambda: storage.head(url),
        lambda: storage.get_bytes(url),
        lambda: storage.read_into(url, 0, memoryview(bytearray(1))),
    ):
        with pytest.raises(NotFoundError) as excinfo:
            call()
        assert not isinstance(excinfo.value, BucketNotFoundError)
        assert isinstance(excinfo.value, FileNotFoundError)
        assert url in str(excinfo.value)


def test_missing_bucket(storage: GCSStorage) -> None:
    url = "gs://no-such-bucket-cloudckpt/prefix/obj"
    for call in (
        lambda: storage.open_upload(url),
        lambda: storage.put_bytes(url, b"x"),
        lambda: storage.head(url),
        lambda: storage.get_bytes(url),
        lambda: storage.read_into(url, 0, memoryview(bytearray(1))),
        lambda: storage.list("gs://no-such-bucket-cloudckpt/prefix"),
    ):
        with pytest.raises(BucketNotFoundError) as excinfo:
            call()
        assert isinstance(excinfo.value, FileNotFoundError)
        assert "'no-such-bucket-cloudckpt'" in str(excinfo.value)
    storage.delete([url])  # absent is not an error


# --- clients, pickling, retries, translation ------------------------------------------------


def test_each_storage_has_its_own_client_and_pickles(gcs_server: Any, base: str) -> None:
    a, b = make_storage(gcs_server), make_storage(gcs_server)
    assert a._client().fs is not b._client().fs  # skip_instance_cache: nothing shared
    a.put_bytes(f"{base}/obj", b"data")
    clone = pickle.loads(pickle.dumps(a))
    assert clone.config == a.config
    assert clone._client() is not a._client()
    assert clone.get_bytes(f"{base}/obj") == b"data"
    for s in (a, b, clone):
        s.close()


def test_transient_errors_are_retried_by_our_policy_only(
    storage: GCSStorage, base: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage.put_bytes(f"{base}/obj", b"data")
    client = storage._client()
    forward, calls = client.request, []

    def flaky(method: str, endpoint: str, **kw: Any) -> GCSResponse:
        calls.append(method)
        if len(calls) == 1:
            raise status_error(503, b"", endpoint, kw["what"])
        return forward(method, endpoint, **kw)

    monkeypatch.setattr(client, "request", flaky)
    assert storage.head(f"{base}/obj").size_bytes == 4
    assert calls == ["GET", "GET"]

    def forbidden(method: str, endpoint: str, **kw: Any) -> GCSResponse:
        calls.append(method)
        raise status_error(403, b"", endpoint, kw["what"])

    calls.clear()
    monkeypatch.setattr(client, "request", forbidden)
    with pytest.raises(PermissionDeniedError):
        storage.head(f"{base}/obj")
    assert calls == ["GET"]


@pytest.mark.parametrize(
    ("status", "expected", "retryable"),
    [
        (400, BadRequestError, False),
        (401, PermissionDeniedError, False),
        (403, PermissionDeniedError, False),
        (404, NotFoundError, False),
        (412, PreconditionFailedError, False),
        (429, ThrottledError, True),
        (500, TransientStorageError, True),
        (503, TransientStorageError, True),
        (408, TransientStorageError, True),
    ],
)
def test_status_translation(status: int, expected: type, retryable: bool) -> None:
    body = b'{"error": {"code": %d, "message": "details here"}}' % status
    error = status_error(status, body, "gs://b/k", "head")
    assert type(error) is expected
    assert is_retryable(error) is retryable
    assert "gs://b/k" in str(error) and "details here" in str(error)


@pytest.mark.parametrize(
    "exc",
    [
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientConnectionError("reset"),
        aiohttp.ClientPayloadError("truncated"),
        TimeoutError(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_client_exception_translation(exc: BaseException) -> None:
    error = exception_error(exc, "gs://b/k", "read")
    assert isinstance(error, TransientStorageError) and is_retryable(error)
