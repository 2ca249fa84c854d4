"""Google Cloud Storage backend: the GCS JSON API over gcsfs's authenticated session.

gcsfs supplies credentials (``token``, ``project``, ``endpoint_url``, ... from
``storage_options``), the aiohttp session and fsspec's IO event loop. The requests themselves
are made here, one attempt each, so that

* every retry goes through cloudckpt's :class:`~cloudckpt.retry.RetryPolicy` (gcsfs's own
  ``retry_request`` wrapper, 6 tries with sleeps up to 32 s, is never on the path, and
  aiohttp's silent resend of an idempotent request on a broken keep-alive connection is
  turned off: attempts do not multiply);
* errors are translated from the HTTP status and the JSON error body, not from the generic
  exceptions gcsfs's ``validate_response`` raises (which loses "bucket" vs "object" 404s);
* a streamed upload is either a resumable session that follows the protocol exactly
  (:class:`GCSUpload`) or, for objects of ``GCS_COMPOSITE_MIN_PARTS`` chunks or more (by the
  size hint), a parallel composite upload (:class:`GCSCompositeUpload`): parts uploaded
  concurrently as temporary objects, composed at commit. Neither makes anything visible at
  the key before the commit, and neither leaves an object whose size or CRC32C differs from
  the bytes written.

Object versions are GCS generations. ``gcsfs`` must be imported with
``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` (set below unless the user set it): its experimental
default makes a gRPC layout lookup per call that takes 40-110 s against an emulator. The class
is taken from ``gcsfs.core`` so that an earlier ``import gcsfs`` cannot swap it either.
"""

from __future__ import annotations

import os

# Before the first import of gcsfs (see the module docstring).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import builtins
import json
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import fsspec.asyn
import google.auth.exceptions
from gcsfs.core import GCSFileSystem

from ..checksum import crc32c, crc32c_b64, crc32c_from_b64
from ..config import StorageConfig
from ..errors import (
    BadRequestError,
    BucketNotFoundError,
    CloudCkptError,
    CommitConflictError,
    NotFoundError,
    ObjectChangedError,
    PermissionDeniedError,
    PreconditionFailedError,
    StorageError,
    ThrottledError,
    TransientStorageError,
    UnsupportedURLError,
)
from ..retry import RetryPolicy
from .base import ObjectInfo, PendingUpload, Storage, Upload, UploadMetrics
from .registry import split_url

logger = logging.getLogger(__name__)
T = TypeVar("T")
#: A request body: bytes, or an aiohttp payload (a multipart body that references its parts).
Body = bytes | bytearray | memoryview | aiohttp.MultipartWriter

#: Every non-final chunk of a resumable upload must be a multiple of this
#: (https://cloud.google.com/storage/docs/performing-resumable-uploads#chunked-upload).
GCS_CHUNK_ALIGNMENT_BYTES = 256 * 1024
#: Most objects one list page returns (the JSON API maximum).
GCS_MAX_LIST_PAGE = 1000
#: Most source objects one compose request takes, and most components a composite object may
#: have (https://cloud.google.com/storage/docs/composite-objects).
GCS_MAX_COMPOSE_SOURCES = 32
GCS_MAX_COMPONENTS = 1024
#: A streamed object whose size hint is at least this many chunks goes up as a parallel
#: composite upload; a smaller one (or one without a hint) through one resumable session,
#: which needs fewer requests and no temporary objects.
GCS_COMPOSITE_MIN_PARTS = 4
#: The temporary parts of a composite upload of ``<dir>/<name>`` live under
#: ``<dir>/.cloudckpt-parts/<name>/<upload id>/`` until the compose.
GCS_PARTS_DIR = ".cloudckpt-parts"
#: Parts of one size before a composite upload doubles its part size: a size hint up to 3x
#: too small still fits within GCS_MAX_COMPONENTS parts.
_PARTS_PER_SIZE = GCS_MAX_COMPONENTS // 2
_OCTET_STREAM = "application/octet-stream"
_CREDENTIALS_HINT = "check the GCS credentials (storage_options 'token') and the bucket's IAM roles"
_BUCKET_HINT = "create the bucket first, or fix the bucket name in the URL"


def chunk_size_for(part_size_bytes: int) -> int:
    """The resumable chunk size: ``part_size_bytes`` rounded down to a 256 KiB multiple."""
    return max(
        GCS_CHUNK_ALIGNMENT_BYTES, part_size_bytes - part_size_bytes % GCS_CHUNK_ALIGNMENT_BYTES
    )


def composite_part_size(part_size_bytes: int, size_hint_bytes: int | None) -> int:
    """The first part size of a composite upload: the chunk size, grown (in 256 KiB steps) so
    that ``size_hint_bytes`` needs at most ``_PARTS_PER_SIZE`` parts."""
    size = chunk_size_for(part_size_bytes)
    if size_hint_bytes:
        need = -(-size_hint_bytes // _PARTS_PER_SIZE)
        size = max(size, -(-need // GCS_CHUNK_ALIGNMENT_BYTES) * GCS_CHUNK_ALIGNMENT_BYTES)
    return size


def parts_prefix(key: str, upload_id: str) -> str:
    """The key prefix of the temporary parts of composite upload ``upload_id`` of ``key``."""
    parent, _, name = key.rpartition("/")
    return f"{parent + '/' if parent else ''}{GCS_PARTS_DIR}/{name}/{upload_id}/"


def parse_parts_key(key: str) -> tuple[str, str] | None:
    """(destination key, upload id) of a composite upload's temporary object, else None."""
    names = key.split("/")
    for i, name in enumerate(names[:-3]):
        if name == GCS_PARTS_DIR:
            return "/".join([*names[:i], names[i + 1]]), names[i + 2]
    return None


# --- requests and error translation ---------------------------------------------------------


@dataclass(frozen=True)
class GCSResponse:
    """Status, headers and body of one JSON API answer (body empty when streamed to a sink)."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        return json.loads(self.body) if self.body else {}


def _error_detail(body: bytes) -> str:
    """The message of a JSON API error body (or the start of a non-JSON one)."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        error = json.loads(text)["error"]
        return str(error.get("message", "") if isinstance(error, dict) else error)[:300]
    except (ValueError, KeyError, TypeError, AttributeError):
        return text[:300]


def status_error(status: int, body: bytes, url: str, what: str) -> StorageError:
    """The cloudckpt error for an unexpected HTTP status (see the module docstring)."""
    detail = _error_detail(body)
    message = f"{what} of {url} failed with HTTP {status}" + (f": {detail}" if detail else "")
    if status in (401, 403):
        return PermissionDeniedError(message, url=url, hint=_CREDENTIALS_HINT)
    if status in (404, 410):
        return NotFoundError(message, url=url)
    if status in (409, 412):
        return PreconditionFailedError(message, url=url)
    if status == 429:
        return ThrottledError(message, url=url)
    if status == 408 or status >= 500:
        return TransientStorageError(message, url=url)
    if status == 400:
        return BadRequestError(message, url=url)
    return StorageError(message, url=url)


def exception_error(e: BaseException, url: str, what: str) -> BaseException:
    """The cloudckpt error for a client-side exception; others are returned unchanged."""
    if isinstance(e, CloudCkptError):
        return e
    message = f"{what} of {url} failed: {type(e).__name__}: {e}"
    if isinstance(e, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError | TimeoutError):
        return TransientStorageError(message, url=url)
    if isinstance(e, google.auth.exceptions.TransportError):
        return TransientStorageError(message, url=url)
    if isinstance(e, google.auth.exceptions.RefreshError):
        if getattr(e, "retryable", False):
            return TransientStorageError(message, url=url)
        return PermissionDeniedError(message, url=url, hint=_CREDENTIALS_HINT)
    if isinstance(e, google.auth.exceptions.GoogleAuthError):
        return PermissionDeniedError(message, url=url, hint=_CREDENTIALS_HINT)
    if isinstance(e, aiohttp.ClientError):
        return StorageError(message, url=url)
    return e


class GCSClient:
    """Single-attempt JSON API requests on gcsfs's authenticated session and IO loop.

    ``fs`` is a private :class:`gcsfs.core.GCSFileSystem` (``skip_instance_cache=True``): no
    instance, session or event loop is shared with other GCSStorage objects or a parent
    process.
    """

    def __init__(self, storage_options: Mapping[str, Any], request_timeout_secs: float) -> None:
        options = dict(storage_options)
        options["skip_instance_cache"] = True
        self.fs = GCSFileSystem(**options)
        self.base_url = self.fs._location.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=request_timeout_secs, sock_read=request_timeout_secs
        )

    def request(
        self,
        method: str,
        endpoint: str,
        *,
        url: str,
        what: str,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        data: Body | None = None,
        json_body: Any = None,
        ok: Sequence[int] = (200,),
        sink: Callable[[aiohttp.ClientResponse], Awaitable[None]] | None = None,
    ) -> GCSResponse:
        """One HTTP request to ``endpoint``; a status outside ``ok`` raises its cloudckpt error.

        ``url`` and ``what`` only name the object and the operation in errors. ``sink``, when
        given, consumes a 200/206 body as it streams in (the returned body is then empty).
        """
        response: GCSResponse = fsspec.asyn.sync(
            self.fs.loop,
            self._request,
            method,
            endpoint,
            url,
            what,
            params,
            headers,
            data,
            json_body,
            tuple(ok),
            sink,
        )
        if response.status not in ok:
            raise status_error(response.status, response.body, url, what)
        return response

    async def _request(
        self,
        method: str,
        endpoint: str,
        url: str,
        what: str,
        params: Mapping[str, Any] | None,
        headers: Mapping[str, str] | None,
        data: Body | None,
        json_body: Any,
        ok: tuple[int, ...],
        sink: Callable[[aiohttp.ClientResponse], Awaitable[None]] | None,
    ) -> GCSResponse:
        # Errors are translated here, on the loop: fsspec's sync() would turn a TimeoutError
        # into its own FSTimeoutError.
        try:
            session = await self.fs._set_session()
            if getattr(session, "_retry_connection", False):
                # aiohttp resends an idempotent request (PUT, GET, DELETE) once by itself when
                # a reused connection breaks. A resumable chunk must not be resent blindly
                # (the server may hold part of it): every retry goes through the policy, which
                # asks the session for its status first. This session is ours alone.
                session._retry_connection = False
            async with session.request(
                method,
                endpoint,
                params=self.fs._get_params(dict(params or {})),
                headers=self.fs._get_headers(dict(headers or {})),
                data=data,
                json=json_body,
                timeout=self._timeout,
                allow_redirects=False,  # 308 is GCS's "resume incomplete", not a redirect
            ) as r:
                if sink is not None and r.status in ok and r.status in (200, 206):
                    await sink(r)
                    return GCSResponse(r.status, r.headers, b"")
                return GCSResponse(r.status, r.headers, await r.read())
        except Exception as e:
            translated = exception_error(e, url, what)
            if translated is e:
                raise
            raise translated from e

    def close(self) -> None:
        session = self.fs._session
        if session is not None and not session.closed:
            fsspec.asyn.sync(self.fs.loop, session.close)


# --- helpers ----------------------------------------------------------------------------------


def _multipart_body(meta: Mapping[str, Any], data: memoryview | bytes) -> aiohttp.MultipartWriter:
    """A ``multipart/related`` upload body: JSON metadata, then the bytes (referenced, not
    copied). Built anew for every attempt."""
    body = aiohttp.MultipartWriter("related")
    body.append_json(dict(meta))
    body.append(data, {"Content-Type": _OCTET_STREAM})
    return body


def _parse_time(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _object_info(url: str, meta: Mapping[str, Any]) -> ObjectInfo:
    """ObjectInfo from a JSON API object resource (generation as version, decoded crc32c)."""
    crc = meta.get("crc32c")
    return ObjectInfo(
        url=url,
        size_bytes=int(meta.get("size", 0)),
        version=str(meta["generation"]) if meta.get("generation") else None,
        mtime_secs=_parse_time(meta.get("updated")),
        crc32c=crc32c_from_b64(crc) if crc else None,
    )


class _Scatter:
    """Spreads a byte stream over buffers (memoryviews) and gaps (ints to skip)."""

    def __init__(self, targets: Sequence[memoryview | int], skip: int = 0) -> None:
        self._items: list[memoryview | int] = [skip] if skip else []
        self._items += [t if isinstance(t, int) else memoryview(t).cast("B") for t in targets]
        self._index = 0
        self._pos = 0  # within the current item
        self.received = 0

    @property
    def done(self) -> bool:
        return self._index >= len(self._items)

    def feed(self, chunk: bytes) -> None:
        data = memoryview(chunk)
        while data and not self.done:
            item = self._items[self._index]
            size = item if isinstance(item, int) else len(item)
            take = min(size - self._pos, len(data))
            if not isinstance(item, int):
                item[self._pos : self._pos + take] = data[:take]
            data = data[take:]
            self._pos += take
            self.received += take
            if self._pos == size:
                self._index += 1
                self._pos = 0


# --- streamed uploads ------------------------------------------------------------------------


class GCSUpload(Upload):
    """A resumable upload: the object appears only when the final chunk is accepted.

    Bytes collect in one buffer of ``chunk_bytes`` (a 256 KiB multiple); each full buffer is
    sent as a non-final chunk ``bytes a-b/*`` (writes of a whole chunk or more are sent
    straight from the caller's memory). When the server persists only part of a chunk (a 308
    whose ``Range`` ends early), the unacknowledged tail is kept and re-cut together with the
    bytes that follow, so every non-final chunk stays exactly ``chunk_bytes`` long. After a
    failed request the next attempt first asks the server how much it holds
    (``bytes */*``) and resumes from there. ``commit`` sends the rest as the final chunk
    ``bytes a-b/total`` (``bytes */total`` when nothing is left); ``abort`` DELETEs the session.
    Writes are synchronous: a write that fills a chunk returns once the chunk is acknowledged.

    The size and CRC32C the server reports for the finished object are checked against the
    bytes written. A server that finalizes the session early (fake-gcs-server does so on a
    status query, which real GCS only answers) or stores other bytes fails the upload, and the
    object it made is deleted (that generation only): nothing incomplete stays at the key.
    """

    def __init__(
        self,
        storage: GCSStorage,
        url: str,
        session_url: str,
        chunk_bytes: int,
        *,
        send_checksums: bool,
    ) -> None:
        if chunk_bytes <= 0 or chunk_bytes % GCS_CHUNK_ALIGNMENT_BYTES:
            raise ValueError(f"chunk_bytes must be a positive multiple of 256 KiB: {chunk_bytes}")
        self.url = url
        self.metrics = UploadMetrics()
        self.session_url = session_url
        self.chunk_bytes = chunk_bytes
        self._storage = storage
        self._lock = threading.Lock()
        self._buf: bytearray | None = None
        self._fill = 0  # bytes waiting in _buf
        self._offset = 0  # bytes the server has persisted
        self._written = 0
        self._crc: int | None = 0 if send_checksums else None
        self._state = "open"  # open -> committed | aborted; failed after an error
        self._needs_status_query = False
        self._stalls = 0
        self._started = time.monotonic()

    @property
    def bytes_written(self) -> int:
        return self._written

    def _require_open(self) -> None:
        if self._state != "open":
            raise ValueError(f"upload to {self.url} is {self._state}; abort it and start over")

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append bytes; sends each full chunk before returning (back-pressure)."""
        view = memoryview(data).cast("B")
        with self._lock:
            self._require_open()
            try:
                self._feed(view)
            except BaseException:
                self._state = "failed"
                raise
            self._written += len(view)
            return len(view)

    def _feed(self, view: memoryview) -> None:
        size = self.chunk_bytes
        pos = 0
        while pos < len(view):
            if self._fill == 0 and len(view) - pos >= size:
                acked, _ = self._send(view[pos : pos + size], final=False)
                pos += acked
                continue
            if self._buf is None:
                self._buf = bytearray(size)
            take = min(size - self._fill, len(view) - pos)
            self._buf[self._fill : self._fill + take] = view[pos : pos + take]
            self._fill += take
            pos += take
            if self._fill == size:
                acked, _ = self._send(memoryview(self._buf), final=False)
                # Keep the unacknowledged tail at the front (same-length slice assignment:
                # the buffer never resizes, so views still held by the client stay valid).
                self._buf[: size - acked] = self._buf[acked:size]
                self._fill = size - acked

    def _send(self, view: memoryview, *, final: bool) -> tuple[int, dict[str, Any] | None]:
        """PUT ``view`` at the persisted offset; returns (bytes of it persisted, object or None)."""
        start, n = self._offset, len(view)
        if final:
            total = start + n
            content_range = f"bytes {start}-{total - 1}/{total}" if n else f"bytes */{total}"
        else:
            content_range = f"bytes {start}-{start + n - 1}/*"
        client = self._storage._client()

        def attempt() -> tuple[int, dict[str, Any] | None]:
            if self._needs_status_query:
                persisted, meta = self._query_status(client)
                self._needs_status_query = False
                if meta is not None or persisted != start:
                    return persisted, meta
            try:
                response = client.request(
                    "PUT",
                    self.session_url,
                    url=self.url,
                    what="upload chunk",
                    headers={"Content-Range": content_range, "Content-Type": _OCTET_STREAM},
                    data=view,
                    ok=(200, 201, 308),
                )
            except TransientStorageError:
                self._needs_status_query = True  # the server may hold part of the chunk
                raise
            self.metrics.parts += 1
            return self._progress(response)

        try:
            persisted, meta = self._storage._call(attempt, self.url, "upload chunk", self._on_retry)
        except NotFoundError as e:
            raise StorageError(
                f"the resumable upload session of {self.url} is gone: {e.message}",
                url=self.url,
                hint="the session expired or was cancelled; save again",
            ) from e
        if meta is not None and (not final or persisted != start + n):
            # Real GCS never does this; fake-gcs-server finalizes a session when asked for its
            # status (bytes */*) and trusts any Content-Range. Whatever sits at the key now is
            # incomplete: remove exactly that generation, never leave it looking committed.
            self._storage._remove_wrong_object(self.url, meta)
            raise StorageError(
                f"upload of {self.url} was finalized by the server with {persisted} bytes while "
                f"{start + n if final else 'more'} were due; the incomplete object was removed",
                url=self.url,
                hint="a server that finalizes a resumable session early (fake-gcs-server does "
                "on a status query after a failed chunk) cannot resume it; save again",
            )
        if not start <= persisted <= start + n:
            raise StorageError(
                f"upload of {self.url}: the server reports {persisted} bytes persisted after a "
                f"chunk covering [{start}, {start + n})",
                url=self.url,
            )
        acked = persisted - start
        if self._crc is not None and acked:
            self._crc = crc32c(view[:acked], self._crc)
        self._offset = persisted
        self.metrics.bytes_sent = persisted
        self._stalls = 0 if acked or meta is not None else self._stalls + 1
        if self._stalls > self._storage.config.retry.max_attempts:
            raise StorageError(
                f"upload of {self.url} makes no progress: {self._stalls} chunks in a row were "
                f"not persisted (offset {start})",
                url=self.url,
            )
        logger.debug("%s: chunk %s -> %d bytes persisted", self.url, content_range, persisted)
        return acked, meta

    @staticmethod
    def _progress(response: GCSResponse) -> tuple[int, dict[str, Any] | None]:
        """(bytes persisted, object resource when finalized) from a chunk or status answer."""
        if response.status == 308:
            last = response.headers.get("Range", "")
            return (int(last.rsplit("-", 1)[1]) + 1 if last else 0), None
        meta = response.json()
        return int(meta.get("size", 0)), meta

    def _query_status(self, client: GCSClient) -> tuple[int, dict[str, Any] | None]:
        """Ask how many bytes the session holds (an empty PUT ``bytes */*``)."""
        response = client.request(
            "PUT",
            self.session_url,
            url=self.url,
            what="upload status query",
            headers={"Content-Range": "bytes */*"},
            data=b"",
            ok=(200, 201, 308),
        )
        return self._progress(response)

    def _on_retry(self, e: BaseException) -> None:
        self.metrics.retries += 1
        if isinstance(e, ThrottledError):
            self.metrics.throttles += 1

    def commit(self) -> ObjectInfo:
        """Send the buffered rest as the final chunk; the object appears with it."""
        with self._lock:
            self._require_open()
            try:
                view = memoryview(self._buf or b"")[: self._fill]
                meta: dict[str, Any] | None = None
                while meta is None:
                    acked, meta = self._send(view, final=True)
                    view = view[acked:]
                info = self._storage._check_committed(self.url, meta, self._written, self._crc)
            except BaseException:
                self._state = "failed"
                raise
            self._state, self._buf, self._fill = "committed", None, 0
            self.metrics.seconds = time.monotonic() - self._started
        logger.debug(
            "committed %s (%d bytes, %d chunks)", self.url, info.size_bytes, self.metrics.parts
        )
        return info

    def abort(self) -> None:
        """Cancel the resumable session (DELETE); nothing becomes visible."""
        with self._lock:
            if self._state in ("committed", "aborted"):
                logger.debug("abort of %s upload to %s: nothing to do", self._state, self.url)
                return
            self._state, self._buf, self._fill = "aborted", None, 0
        self._storage._cancel_session(self.url, self.session_url)


@dataclass(frozen=True)
class _Part:
    """One temporary object of a composite upload, as the server stored it."""

    name: str
    size_bytes: int
    generation: str


class GCSCompositeUpload(Upload):
    """A parallel composite upload: parts become temporary objects, composed at commit.

    Bytes collect in part buffers (``part_bytes``, doubled every ``_PARTS_PER_SIZE`` parts);
    each full buffer is uploaded by a pool of ``max_concurrency`` threads while the caller
    keeps writing, as ``<dir>/.cloudckpt-parts/<name>/<upload id>/<index>`` in one multipart
    request with its CRC32C (at most ``max_concurrency + 1`` buffers exist: a write blocks
    while all are busy). A failed part is sent again whole from its buffer: there is no
    session to resume, so no status query. ``commit`` uploads the rest, composes the parts
    into the object (32 sources per request, through intermediate temporaries above 32, each
    source pinned to its generation), checks the object's size and CRC32C against the bytes
    written (deleting it if they differ) and deletes the temporaries. An object that fits in
    one part skips all that: it goes straight to its key in one request. ``abort`` waits for
    the parts in flight and deletes every temporary. Nothing appears at the key before the
    final compose; temporaries left by a crash are found by
    :meth:`GCSStorage.list_pending_uploads` (``cloudckpt gc``).
    """

    def __init__(
        self,
        storage: GCSStorage,
        url: str,
        part_bytes: int,
        *,
        max_concurrency: int,
        send_checksums: bool,
    ) -> None:
        if part_bytes <= 0:
            raise ValueError(f"part_bytes must be positive: {part_bytes}")
        self.url = url
        self.metrics = UploadMetrics()
        self.upload_id = uuid.uuid4().hex[:16]
        self.part_bytes = part_bytes
        self._scheme, self._bucket, self._key = storage._split(url)
        self.temp_prefix = parts_prefix(self._key, self.upload_id)
        self._storage = storage
        self._send_checksums = send_checksums
        self._max_in_flight = max_concurrency
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="cloudckpt-gcs-part")
        self._lock = threading.Lock()
        self._metrics_lock = threading.Lock()
        self._in_flight: dict[Future[_Part], tuple[int, bytearray]] = {}
        self._free: list[bytearray] = []
        self._parts: dict[int, _Part] = {}
        self._temps: list[str] = []  # every temporary name ever sent, for the clean-up
        self._buf: bytearray | None = None
        self._fill = 0
        self._next_index = 0
        self._written = 0
        self._crc = 0
        self._state = "open"  # open -> committed | aborted; failed after an error
        self._started = time.monotonic()

    @property
    def bytes_written(self) -> int:
        return self._written

    def _require_open(self) -> None:
        if self._state != "open":
            raise ValueError(f"upload to {self.url} is {self._state}; abort it and start over")

    def _temp_url(self, name: str) -> str:
        return f"{self._scheme}://{self._bucket}/{name}"

    def _part_size(self, index: int) -> int:
        return self.part_bytes << (index // _PARTS_PER_SIZE)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append bytes; hands each full part to the pool (blocks while all buffers are busy)."""
        view = memoryview(data).cast("B")
        with self._lock:
            self._require_open()
            try:
                self._feed(view)
                self._reap(block=False)  # surface a failed part early
            except BaseException:
                self._state = "failed"
                raise
            self._written += len(view)
            self._crc = crc32c(view, self._crc)
            return len(view)

    def _feed(self, view: memoryview) -> None:
        pos = 0
        while pos < len(view):
            if self._buf is None:
                self._buf = self._take_buffer()
            buf = self._buf
            take = min(len(buf) - self._fill, len(view) - pos)
            buf[self._fill : self._fill + take] = view[pos : pos + take]
            self._fill += take
            pos += take
            if self._fill == len(buf):
                self._submit(buf)

    def _take_buffer(self) -> bytearray:
        """A buffer for the next part, once fewer than ``max_concurrency`` parts are in flight."""
        index = self._next_index
        if index >= GCS_MAX_COMPONENTS:
            raise StorageError(
                f"{self.url} needs more than {GCS_MAX_COMPONENTS} parts (the GCS limit of "
                f"components of a composite object) at part size {self.part_bytes}",
                url=self.url,
                hint="raise UploadConfig.part_size_bytes, or pass a size hint close to the size",
            )
        while len(self._in_flight) >= self._max_in_flight:
            self._reap(block=True)
        size = self._part_size(index)
        self._free = [b for b in self._free if len(b) == size]
        return self._free.pop() if self._free else bytearray(size)

    def _submit(self, buf: bytearray) -> None:
        """Hand ``buf`` (the current buffer) to the pool as the next part."""
        index, n = self._next_index, self._fill
        name = f"{self.temp_prefix}{index:05d}"
        self._temps.append(name)
        self._buf, self._fill, self._next_index = None, 0, index + 1
        future = self._pool.submit(self._upload_part, index, name, memoryview(buf)[:n])
        self._in_flight[future] = (index, buf)

    def _reap(self, *, block: bool) -> None:
        """Collect finished parts (waiting for one with ``block``); re-raise a part's error."""
        if block and self._in_flight:
            wait(list(self._in_flight), return_when=FIRST_COMPLETED)
        for future in [f for f in self._in_flight if f.done()]:
            index, buf = self._in_flight.pop(future)
            self._parts[index] = future.result()
            self._free.append(buf)

    def _upload_part(self, index: int, name: str, view: memoryview) -> _Part:
        meta = self._storage._upload_object(
            self._bucket,
            name,
            view,
            url=self.url,
            what=f"upload of part {index}",
            send_checksum=self._send_checksums,
            retry_mismatch=True,  # a temporary: sending it again overwrites it
            on_retry=self._on_retry,
        )
        with self._metrics_lock:
            self.metrics.parts += 1
            self.metrics.bytes_sent += len(view)
        logger.debug("%s: part %d (%d bytes) stored as %s", self.url, index, len(view), name)
        return _Part(name, len(view), str(meta["generation"]))

    def _on_retry(self, e: BaseException) -> None:
        with self._metrics_lock:
            self.metrics.retries += 1
            if isinstance(e, ThrottledError):
                self.metrics.throttles += 1

    def commit(self) -> ObjectInfo:
        """Upload the rest, compose the parts into the object, delete the temporaries."""
        with self._lock:
            self._require_open()
            try:
                info = self._complete()
            except BaseException:
                self._state = "failed"
                self._discard()
                raise
            self._state = "committed"
            self.metrics.seconds = time.monotonic() - self._started
        self._pool.shutdown(wait=False)
        logger.debug(
            "committed %s (%d bytes, %d parts)", self.url, info.size_bytes, self.metrics.parts
        )
        return info

    def _complete(self) -> ObjectInfo:
        if self._next_index == 0:  # one part at most: straight to the key, no temporaries
            view = memoryview(self._buf or b"")[: self._fill]
            meta = self._storage._upload_object(
                self._bucket,
                self._key,
                view,
                url=self.url,
                what="upload",
                send_checksum=self._send_checksums,
                on_retry=self._on_retry,
            )
            with self._metrics_lock:
                self.metrics.parts += 1
                self.metrics.bytes_sent += len(view)
        else:
            if self._buf is not None and self._fill:
                self._submit(self._buf)
            while self._in_flight:
                self._reap(block=True)
            meta = self._compose_all([self._parts[i] for i in range(self._next_index)])
        self._buf, self._fill, self._free = None, 0, []
        info = self._storage._check_committed(self.url, meta, self._written, self._crc)
        self._delete_temps()
        return info

    def _compose_all(self, parts: list[_Part]) -> dict[str, Any]:
        """Compose ``parts`` into the object, 32 at a time (a tree of temporaries above 32)."""
        sources, level = parts, 0
        while len(sources) > GCS_MAX_COMPOSE_SOURCES:
            step = GCS_MAX_COMPOSE_SOURCES
            groups = [sources[i : i + step] for i in range(0, len(sources), step)]
            names = [f"{self.temp_prefix}c{level}-{i:05d}" for i in range(len(groups))]
            self._temps.extend(names)
            metas = list(
                self._pool.map(
                    lambda job: self._storage._compose(
                        self._bucket,
                        job[0],
                        job[1],
                        url=self._temp_url(job[0]),
                        on_retry=self._on_retry,
                    ),
                    zip(names, groups, strict=True),
                )
            )
            sources = [
                _Part(name, int(m.get("size", 0)), str(m["generation"]))
                for name, m in zip(names, metas, strict=True)
            ]
            level += 1
        return self._storage._compose(
            self._bucket, self._key, sources, url=self.url, on_retry=self._on_retry
        )

    def _discard(self) -> None:
        """Wait for the parts in flight, then delete every temporary (idempotent)."""
        if self._in_flight:
            wait(list(self._in_flight))
        for future, (index, _) in self._in_flight.items():
            error = future.exception()
            if error is not None:
                logger.debug("%s: part %d failed while discarding: %s", self.url, index, error)
        self._in_flight.clear()
        self._buf, self._fill, self._free = None, 0, []
        self._delete_temps()
        self._pool.shutdown(wait=False)

    def _delete_temps(self) -> None:
        if not self._temps:
            return
        try:
            self._storage.delete([self._temp_url(name) for name in self._temps])
        except StorageError as e:
            logger.warning(
                "could not delete the %d temporary parts of %s under %s (remove them with "
                "`cloudckpt gc` or a delete of that prefix): %s",
                len(self._temps),
                self.url,
                self._temp_url(self.temp_prefix),
                e,
            )
            return
        logger.debug("%s: deleted %d temporary objects", self.url, len(self._temps))
        self._temps.clear()

    def abort(self) -> None:
        """Wait for the parts in flight and delete every temporary; nothing becomes visible."""
        with self._lock:
            if self._state in ("committed", "aborted"):
                logger.debug("abort of %s upload to %s: nothing to do", self._state, self.url)
                return
            self._state = "aborted"
            self._discard()


# --- the backend -------------------------------------------------------------------------------


class GCSStorage(Storage):
    """``gs://bucket/key`` (or ``gcs://``) objects through the GCS JSON API."""

    schemes = ("gs", "gcs")

    def __init__(self, config: StorageConfig | None = None) -> None:
        super().__init__(config or StorageConfig())
        self._retry = RetryPolicy(self.config.retry)
        self._lock = threading.Lock()
        self._gcs: GCSClient | None = None
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        # Only the config travels (to the writer subprocess); the client is rebuilt there.
        return {"config": self.config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["config"])  # type: ignore[misc]

    def _client(self) -> GCSClient:
        """This process's client, created on first use (and again after a fork)."""
        with self._lock:
            if self._gcs is None or self._pid != os.getpid():
                try:
                    self._gcs = GCSClient(
                        self.config.storage_options, self.config.retry.request_timeout_secs
                    )
                except Exception as e:
                    translated = exception_error(e, "gs://", "creating the GCS client")
                    if translated is e:
                        raise
                    raise translated from e
                self._pid = os.getpid()
            return self._gcs

    def close(self) -> None:
        with self._lock:
            client, self._gcs = self._gcs, None
        if client is not None and self._pid == os.getpid():
            client.close()

    def _call(
        self,
        fn: Callable[[], T],
        url: str,
        what: str,
        on_retry: Callable[[BaseException], None] | None = None,
    ) -> T:
        return self._retry.call(fn, url=url, what=what, on_retry=on_retry)

    # --- URLs -------------------------------------------------------------------------------
    @staticmethod
    def _split(url: str, *, need_key: bool = True) -> tuple[str, str, str]:
        """(scheme, bucket, key) of ``gs://bucket/key``; ValueError-type errors before I/O."""
        scheme, rest = split_url(url)
        if scheme not in GCSStorage.schemes:
            raise UnsupportedURLError(f"GCSStorage cannot serve {url!r}", url=url)
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise UnsupportedURLError(f"no bucket in {url!r}", url=url, hint="use gs://bucket/key")
        if need_key and not key:
            raise UnsupportedURLError(f"no object name in {url!r}", url=url)
        return scheme, bucket, key

    def _object_endpoint(self, bucket: str, key: str) -> str:
        return f"{self._client().base_url}/storage/v1/b/{quote(bucket, safe='')}/o/{quote(key, safe='')}"

    def _upload_endpoint(self, bucket: str) -> str:
        return f"{self._client().base_url}/upload/storage/v1/b/{quote(bucket, safe='')}/o"

    def _not_found(self, e: NotFoundError, url: str, bucket: str) -> NotFoundError:
        """Tell a missing bucket from a missing object by looking the bucket up (by status, not
        by message text: fake-gcs-server's 404 bodies are all alike)."""
        client = self._client()
        endpoint = f"{client.base_url}/storage/v1/b/{quote(bucket, safe='')}"
        try:
            self._call(
                lambda: client.request(
                    "GET", endpoint, url=url, what="bucket lookup", params={"fields": "name"}
                ),
                url,
                "bucket lookup",
            )
        except NotFoundError:
            return self._bucket_missing(url, bucket)
        except StorageError as probe:  # e.g. no storage.buckets.get permission
            logger.debug("bucket lookup for %s failed (%s); reporting a missing object", url, probe)
        return NotFoundError(f"no object at {url}", url=url)

    @staticmethod
    def _bucket_missing(url: str, bucket: str) -> BucketNotFoundError:
        return BucketNotFoundError(f"bucket {bucket!r} does not exist", url=url, hint=_BUCKET_HINT)

    # --- writes -----------------------------------------------------------------------------
    def open_upload(self, url: str, *, size_hint_bytes: int | None = None) -> Upload:
        """A :class:`GCSCompositeUpload` when ``size_hint_bytes`` is at least
        ``GCS_COMPOSITE_MIN_PARTS`` chunks, else a resumable :class:`GCSUpload`.

        Either way a resumable session is started now, so that a missing bucket or write
        permission fails here, before anything is serialized (a composite upload cancels it
        at once: it only needed the check).
        """
        _, bucket, key = self._split(url)
        upload = self.config.upload
        chunk = chunk_size_for(upload.part_size_bytes)
        session_url = self._start_session(url, bucket, key)
        if size_hint_bytes is None or size_hint_bytes < GCS_COMPOSITE_MIN_PARTS * chunk:
            logger.debug("resumable upload of %s started", url)
            return GCSUpload(self, url, session_url, chunk, send_checksums=upload.send_checksums)
        self._cancel_session(url, session_url)
        composite = GCSCompositeUpload(
            self,
            url,
            composite_part_size(upload.part_size_bytes, size_hint_bytes),
            max_concurrency=upload.max_concurrency,
            send_checksums=upload.send_checksums,
        )
        logger.debug(
            "composite upload of %s started (parts of %d bytes under %s)",
            url,
            composite.part_bytes,
            composite.temp_prefix,
        )
        return composite

    def _start_session(self, url: str, bucket: str, key: str) -> str:
        """Start a resumable upload session; returns its session URI."""
        client = self._client()
        endpoint = self._upload_endpoint(bucket)
        try:
            response = self._call(
                lambda: client.request(
                    "POST",
                    endpoint,
                    url=url,
                    what="start resumable upload",
                    params={"uploadType": "resumable", "name": key},
                    headers={"X-Upload-Content-Type": _OCTET_STREAM},
                    json_body={"name": key, "contentType": _OCTET_STREAM},
                    ok=(200, 201),
                ),
                url,
                "start resumable upload",
            )
        except NotFoundError as e:  # an upload can only miss its bucket
            raise self._bucket_missing(url, bucket) from e
        session_url = response.headers.get("Location")
        if not session_url:
            raise StorageError(f"no session URI in the answer to starting {url}", url=url)
        return session_url

    def _cancel_session(self, url: str, session_url: str) -> None:
        """DELETE a resumable session; a failure is logged (the session never becomes an
        object and GCS drops it within a week)."""
        client = self._client()
        try:
            self._call(
                lambda: client.request(
                    "DELETE",
                    session_url,
                    url=url,
                    what="cancel upload",
                    ok=(200, 204, 404, 410, 499),  # 499: GCS's answer to a cancelled session
                ),
                url,
                "cancel upload",
            )
        except StorageError as e:
            logger.warning(
                "could not cancel the resumable upload of %s (nothing is visible; GCS drops "
                "the session within a week): %s",
                url,
                e,
            )

    def _upload_object(
        self,
        bucket: str,
        key: str,
        data: bytes | bytearray | memoryview,
        *,
        url: str,
        what: str,
        send_checksum: bool,
        retry_mismatch: bool = False,
        params: Mapping[str, str] | None = None,
        on_retry: Callable[[BaseException], None] | None = None,
    ) -> dict[str, Any]:
        """One multipart upload (metadata + bytes, not copied) under the retry policy; returns
        the stored object resource. With ``send_checksum`` the server checks the CRC32C. With
        ``retry_mismatch`` a stored size or CRC32C that differs from the bytes counts as a
        transient failure (fit for temporaries: the retry overwrites them)."""
        client = self._client()
        data = memoryview(data).cast("B")
        crc = crc32c(data)
        meta: dict[str, Any] = {"name": key, "contentType": _OCTET_STREAM}
        if send_checksum:
            meta["crc32c"] = crc32c_b64(crc)  # GCS rejects the upload if the bytes differ
        query = {"uploadType": "multipart", "name": key, **(params or {})}
        endpoint = self._upload_endpoint(bucket)

        def attempt() -> dict[str, Any]:
            stored = client.request(
                "POST", endpoint, url=url, what=what, params=query, data=_multipart_body(meta, data)
            ).json()
            if retry_mismatch:
                size, stored_crc = int(stored.get("size", -1)), stored.get("crc32c")
                if size != len(data) or (stored_crc and crc32c_from_b64(stored_crc) != crc):
                    raise TransientStorageError(
                        f"{what}: the server stored {size} bytes with CRC32C {stored_crc}, "
                        f"{len(data)} bytes with CRC32C {crc32c_b64(crc)} were sent",
                        url=url,
                    )
            return stored

        try:
            return self._call(attempt, url, what, on_retry)
        except NotFoundError as e:  # an upload can only miss its bucket
            raise self._bucket_missing(url, bucket) from e

    def _compose(
        self,
        bucket: str,
        key: str,
        sources: Sequence[_Part],
        *,
        url: str,
        on_retry: Callable[[BaseException], None] | None = None,
    ) -> dict[str, Any]:
        """Compose ``sources`` (at most 32, each pinned to its generation) into ``key``."""
        if not 0 < len(sources) <= GCS_MAX_COMPOSE_SOURCES:
            raise ValueError(f"compose takes 1 to 32 sources, got {len(sources)} for {url}")
        client = self._client()
        endpoint = self._object_endpoint(bucket, key) + "/compose"
        body = {
            "sourceObjects": [
                {"name": p.name, "objectPreconditions": {"ifGenerationMatch": p.generation}}
                for p in sources
            ],
            "destination": {"name": key, "contentType": _OCTET_STREAM},
        }
        what = f"compose of {len(sources)} parts"
        try:
            response = self._call(
                lambda: client.request("POST", endpoint, url=url, what=what, json_body=body),
                url,
                what,
                on_retry,
            )
        except NotFoundError as e:
            raise StorageError(
                f"{what} into {url} failed: a part is missing ({e.message})",
                url=url,
                hint="the temporary parts were deleted while the upload ran; save again",
            ) from e
        return response.json()

    def _check_committed(
        self, url: str, meta: Mapping[str, Any], size_bytes: int, crc: int | None
    ) -> ObjectInfo:
        """The info of a just-finished object if its size (and CRC32C, when both sides have
        one) match what was written; otherwise delete it and raise StorageError."""
        info = _object_info(url, meta)
        problem = None
        if info.size_bytes != size_bytes:
            problem = f"holds {info.size_bytes} bytes, {size_bytes} were written"
        elif crc is not None and info.crc32c is not None and info.crc32c != crc:
            problem = (
                f"has CRC32C {info.crc32c:#010x}, the bytes written have {crc:#010x} "
                "(corrupted in transit)"
            )
        if problem is None:
            return info
        self._remove_wrong_object(url, meta)
        raise StorageError(
            f"{url} {problem}; the object was deleted",
            url=url,
            hint="nothing was committed; save again",
        )

    def _remove_wrong_object(self, url: str, meta: Mapping[str, Any]) -> None:
        """Delete the generation of ``url`` that ``meta`` describes (not a newer one)."""
        _, bucket, key = self._split(url)
        client = self._client()
        generation = meta.get("generation")
        params = {"ifGenerationMatch": str(generation)} if generation else {}
        try:
            self._call(
                lambda: client.request(
                    "DELETE",
                    self._object_endpoint(bucket, key),
                    url=url,
                    what="delete of an incomplete object",
                    params=params,
                    ok=(200, 204, 404, 412),
                ),
                url,
                "delete of an incomplete object",
            )
        except StorageError as e:
            logger.error(
                "could not delete the incomplete object %s (generation %s): %s; delete it "
                "before reading that key",
                url,
                generation,
                e,
            )
            return
        logger.warning("deleted the incomplete object %s (generation %s)", url, generation)

    def put_bytes(self, url: str, data: bytes, *, if_absent: bool = False) -> ObjectInfo:
        """One multipart upload; ``if_absent`` adds ``ifGenerationMatch=0``."""
        _, bucket, key = self._split(url)
        crc = crc32c(data)
        params = {"ifGenerationMatch": "0"} if if_absent else {}
        attempts = 0

        def on_retry(_: BaseException) -> None:
            nonlocal attempts
            attempts += 1

        try:
            meta = self._upload_object(
                bucket,
                key,
                data,
                url=url,
                what="put",
                send_checksum=self.config.upload.send_checksums,
                params=params,
                on_retry=on_retry,
            )
        except PreconditionFailedError as e:
            if if_absent and attempts > 0:
                # An earlier attempt may have landed before its answer was lost: if the object
                # holds exactly our bytes, that write was ours.
                mine = self.head(url)
                if mine.size_bytes == len(data) and mine.crc32c in (crc, None):
                    return mine
            raise CommitConflictError(
                f"an object already exists at {url}", url=url, hint="delete it or write elsewhere"
            ) from e
        return self._check_committed(url, meta, len(data), crc)

    # --- unfinished composite uploads ---------------------------------------------------------
    def list_pending_uploads(self, prefix_url: str) -> builtins.list[PendingUpload]:
        """The composite uploads under ``prefix_url`` whose temporary parts are still stored
        (a crashed writer's). Open resumable sessions cannot be listed on GCS: they never
        become objects and expire after a week."""
        scheme, bucket, _ = self._split(prefix_url, need_key=False)
        started: dict[tuple[str, str], float | None] = {}
        for info in self.list(prefix_url):
            parsed = parse_parts_key(info.url.split("/", 3)[3])
            if parsed is None:
                continue
            stamps = [t for t in (started.get(parsed), info.mtime_secs) if t is not None]
            started[parsed] = min(stamps) if stamps else None
        return [
            PendingUpload(f"{scheme}://{bucket}/{key}", upload_id, stamp)
            for (key, upload_id), stamp in sorted(started.items())
        ]

    def abort_pending_upload(self, pending: PendingUpload) -> None:
        """Delete the temporary parts of one composite upload."""
        scheme, bucket, key = self._split(pending.url)
        prefix_url = f"{scheme}://{bucket}/{parts_prefix(key, pending.upload_id)}"
        temps = [info.url for info in self.list(prefix_url)]
        self.delete(temps)
        logger.info(
            "deleted %d temporary parts of %s (upload %s)",
            len(temps),
            pending.url,
            pending.upload_id,
        )

    # --- reads ------------------------------------------------------------------------------
    def head(self, url: str) -> ObjectInfo:
        _, bucket, key = self._split(url)
        client = self._client()
        endpoint = self._object_endpoint(bucket, key)
        try:
            response = self._call(
                lambda: client.request("GET", endpoint, url=url, what="head"), url, "head"
            )
        except NotFoundError as e:
            raise self._not_found(e, url, bucket) from e
        return _object_info(url, response.json())

    def get_bytes(
        self, url: str, start: int = 0, end: int | None = None, *, version: str | None = None
    ) -> bytes:
        if start < 0 or (end is not None and end < start):
            raise ValueError(f"invalid byte range [{start}, {end}) for {url}")
        if end is not None:
            buf = bytearray(end - start)
            received = self._ranged_get(url, start, [memoryview(buf)], version, exact=False)
            return bytes(buf[:received]) if received < len(buf) else bytes(buf)
        _, bucket, key = self._split(url)
        client = self._client()
        params = {"alt": "media"} | ({"ifGenerationMatch": version} if version else {})
        headers = {"Range": f"bytes={start}-"} if start else {}
        try:
            response = self._call(
                lambda: client.request(
                    "GET",
                    self._object_endpoint(bucket, key),
                    url=url,
                    what="read",
                    params=params,
                    headers=headers,
                    ok=(200, 206, 416),
                ),
                url,
                "read",
            )
        except NotFoundError as e:
            raise self._not_found(e, url, bucket) from e
        except PreconditionFailedError as e:
            raise self._changed(url, version) from e
        if response.status == 416:  # start is at or past the end: nothing to read
            return b""
        self._check_generation(response.headers, url, version)
        return response.body

    def read_into(
        self, url: str, offset: int, buf: memoryview, *, version: str | None = None
    ) -> None:
        """One ranged GET streamed straight into ``buf``."""
        self.read_into_many(url, offset, [buf], version=version)

    def read_into_many(
        self,
        url: str,
        offset: int,
        targets: list[memoryview | int],
        *,
        version: str | None = None,
    ) -> None:
        """One ranged GET covering all ``targets``, scattered into the buffers as it streams."""
        if offset < 0:
            raise ValueError(f"negative offset {offset} for {url}")
        self._ranged_get(url, offset, targets, version, exact=True)

    def _ranged_get(
        self,
        url: str,
        offset: int,
        targets: Sequence[memoryview | int],
        version: str | None,
        *,
        exact: bool,
    ) -> int:
        """GET ``[offset, offset + span)`` into ``targets``; returns the bytes received.

        With ``exact``, fewer bytes than the span (a short object) raise StorageError.
        """
        span = sum(t if isinstance(t, int) else memoryview(t).nbytes for t in targets)
        if span == 0:
            return 0
        _, bucket, key = self._split(url)
        client = self._client()
        params = {"alt": "media"} | ({"ifGenerationMatch": version} if version else {})
        received = 0

        async def sink(r: aiohttp.ClientResponse) -> None:
            nonlocal received
            self._check_generation(r.headers, url, version)
            # A 200 means the server ignored Range and sends the object from byte 0.
            scatter = _Scatter(targets, skip=offset if r.status == 200 else 0)
            async for chunk in r.content.iter_any():
                scatter.feed(chunk)
                if scatter.done:
                    break
            received = scatter.received - (offset if r.status == 200 else 0)

        try:
            response = self._call(
                lambda: client.request(
                    "GET",
                    self._object_endpoint(bucket, key),
                    url=url,
                    what="ranged read",
                    params=params,
                    headers={"Range": f"bytes={offset}-{offset + span - 1}"},
                    ok=(200, 206, 416),
                    sink=sink,
                ),
                url,
                "ranged read",
            )
        except NotFoundError as e:
            raise self._not_found(e, url, bucket) from e
        except PreconditionFailedError as e:
            raise self._changed(url, version) from e
        if response.status == 416:  # the range starts at or past the end of the object
            received = 0
        if exact and received < span:
            raise StorageError(
                f"short read of {url}: wanted {span} bytes at offset {offset}, got {received} "
                "(the object is shorter)",
                url=url,
            )
        return received

    @staticmethod
    def _changed(url: str, version: str | None) -> ObjectChangedError:
        return ObjectChangedError(
            f"{url} changed while pinned to generation {version}",
            url=url,
            hint="the object was overwritten; reload the manifest and retry",
        )

    def _check_generation(self, headers: Mapping[str, str], url: str, version: str | None) -> None:
        """Pinning that does not rely on the server honouring ifGenerationMatch (the emulator
        ignores it on media GETs): the answer names the generation it serves."""
        served = headers.get("X-Goog-Generation")
        if version is not None and served is not None and served != version:
            raise self._changed(url, version)

    # --- namespace --------------------------------------------------------------------------
    def list(self, prefix_url: str) -> list[ObjectInfo]:
        """Objects below the "directory" ``prefix_url`` (recursive, paged, never cached)."""
        scheme, bucket, key = self._split(prefix_url, need_key=False)
        prefix = key.rstrip("/") + "/" if key.strip("/") else ""
        client = self._client()
        endpoint = f"{client.base_url}/storage/v1/b/{quote(bucket, safe='')}/o"
        out: list[ObjectInfo] = []
        page_token: str | None = None
        while True:
            params: dict[str, Any] = {"prefix": prefix, "maxResults": str(GCS_MAX_LIST_PAGE)}
            if page_token:
                params["pageToken"] = page_token
            try:
                page = self._call(
                    lambda params=params: client.request(
                        "GET", endpoint, url=prefix_url, what="list", params=params
                    ),
                    prefix_url,
                    "list",
                ).json()
            except NotFoundError as e:
                raise self._bucket_missing(prefix_url, bucket) from e
            for item in page.get("items", []):
                name = item["name"]
                if not name.endswith("/"):  # skip "directory" placeholder objects
                    out.append(_object_info(f"{scheme}://{bucket}/{name}", item))
            page_token = page.get("nextPageToken")
            if not page_token:
                return sorted(out, key=lambda info: info.url)

    def delete(self, urls: Iterable[str]) -> None:
        """DELETE each object (a few at a time); absent objects are skipped."""
        targets = [(url, *self._split(url)[1:]) for url in urls]
        if not targets:
            return
        client = self._client()

        def delete_one(target: tuple[str, str, str]) -> None:
            url, bucket, key = target
            endpoint = self._object_endpoint(bucket, key)
            self._call(
                lambda: client.request(
                    "DELETE", endpoint, url=url, what="delete", ok=(200, 204, 404)
                ),
                url,
                "delete",
            )

        workers = min(len(targets), self.config.upload.max_concurrency)
        with ThreadPoolExecutor(workers, thread_name_prefix="cloudckpt-gcs-delete") as pool:
            for _ in pool.map(delete_one, targets):
                pass


__all__ = [
    "GCS_CHUNK_ALIGNMENT_BYTES",
    "GCSClient",
    "GCSResponse",
    "GCSStorage",
    "GCSUpload",
    "chunk_size_for",
]
