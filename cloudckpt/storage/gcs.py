"""Google Cloud Storage backend: the GCS JSON API over gcsfs's authenticated session.

gcsfs supplies credentials (``token``, ``project``, ``endpoint_url``, ... from
``storage_options``), the aiohttp session and fsspec's IO event loop. The requests themselves
are made here, one attempt each, so that

* every retry goes through cloudckpt's :class:`~cloudckpt.retry.RetryPolicy` (gcsfs's own
  ``retry_request`` wrapper, 6 tries with sleeps up to 32 s, is never on the path: attempts do
  not multiply);
* errors are translated from the HTTP status and the JSON error body, not from the generic
  exceptions gcsfs's ``validate_response`` raises (which loses "bucket" vs "object" 404s);
* a streamed upload follows the resumable-upload protocol exactly (see :class:`GCSUpload`).

Object versions are GCS generations. ``gcsfs`` must be imported with
``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` (set below unless the user set it): its experimental
default makes a gRPC layout lookup per call that takes 40-110 s against an emulator. The class
is taken from ``gcsfs.core`` so that an earlier ``import gcsfs`` cannot swap it either.
"""

from __future__ import annotations

import os

# Before the first import of gcsfs (see the module docstring).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import json
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
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
from .base import ObjectInfo, Storage, Upload, UploadMetrics
from .registry import split_url

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: Every non-final chunk of a resumable upload must be a multiple of this
#: (https://cloud.google.com/storage/docs/performing-resumable-uploads#chunked-upload).
GCS_CHUNK_ALIGNMENT_BYTES = 256 * 1024
#: Most objects one list page returns (the JSON API maximum).
GCS_MAX_LIST_PAGE = 1000
_OCTET_STREAM = "application/octet-stream"
_CREDENTIALS_HINT = "check the GCS credentials (storage_options 'token') and the bucket's IAM roles"
_BUCKET_HINT = "create the bucket first, or fix the bucket name in the URL"


def chunk_size_for(part_size_bytes: int) -> int:
    """The resumable chunk size: ``part_size_bytes`` rounded down to a 256 KiB multiple."""
    return max(
        GCS_CHUNK_ALIGNMENT_BYTES, part_size_bytes - part_size_bytes % GCS_CHUNK_ALIGNMENT_BYTES
    )


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
        data: bytes | bytearray | memoryview | None = None,
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
        data: bytes | bytearray | memoryview | None,
        json_body: Any,
        ok: tuple[int, ...],
        sink: Callable[[aiohttp.ClientResponse], Awaitable[None]] | None,
    ) -> GCSResponse:
        # Errors are translated here, on the loop: fsspec's sync() would turn a TimeoutError
        # into its own FSTimeoutError.
        try:
            session = await self.fs._set_session()
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
        if not start <= persisted <= start + n:
            raise StorageError(
                f"upload of {self.url}: the server reports {persisted} bytes persisted after a "
                f"chunk covering [{start}, {start + n})",
                url=self.url,
            )
        if meta is not None and not final:
            raise StorageError(f"upload of {self.url} was finalized early", url=self.url)
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
            except BaseException:
                self._state = "failed"
                raise
            self._state, self._buf, self._fill = "committed", None, 0
            self.metrics.seconds = time.monotonic() - self._started
        info = _object_info(self.url, meta)
        if info.size_bytes != self._written:
            raise StorageError(
                f"{self.url} holds {info.size_bytes} bytes after commit, {self._written} were "
                "written",
                url=self.url,
            )
        if self._crc is not None and info.crc32c is not None and info.crc32c != self._crc:
            raise StorageError(
                f"{self.url}: the stored CRC32C {info.crc32c:#010x} differs from the sent "
                f"bytes' {self._crc:#010x}",
                url=self.url,
                hint="the data was corrupted in transit; save again",
            )
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
        client = self._storage._client()
        try:
            self._storage._call(
                lambda: client.request(
                    "DELETE",
                    self.session_url,
                    url=self.url,
                    what="cancel upload",
                    ok=(200, 204, 404, 410, 499),  # 499: GCS's answer to a cancelled session
                ),
                self.url,
                "cancel upload",
            )
        except StorageError as e:
            logger.warning(
                "could not cancel the resumable upload of %s (nothing is visible; GCS drops "
                "the session within a week): %s",
                self.url,
                e,
            )


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
        """Start a resumable session now, so a missing bucket or write permission fails here."""
        _, bucket, key = self._split(url)
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
        logger.debug("resumable upload of %s started", url)
        return GCSUpload(
            self,
            url,
            session_url,
            chunk_size_for(self.config.upload.part_size_bytes),
            send_checksums=self.config.upload.send_checksums,
        )

    def put_bytes(self, url: str, data: bytes, *, if_absent: bool = False) -> ObjectInfo:
        """One multipart upload; ``if_absent`` adds ``ifGenerationMatch=0``."""
        _, bucket, key = self._split(url)
        client = self._client()
        crc = crc32c(data)
        meta: dict[str, Any] = {"name": key, "contentType": _OCTET_STREAM}
        if self.config.upload.send_checksums:
            meta["crc32c"] = crc32c_b64(crc)  # GCS rejects the upload if the bytes differ
        boundary = uuid.uuid4().hex
        body = b"".join(
            [
                f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n".encode(),
                json.dumps(meta).encode(),
                f"\r\n--{boundary}\r\nContent-Type: {_OCTET_STREAM}\r\n\r\n".encode(),
                data,
                f"\r\n--{boundary}--\r\n".encode(),
            ]
        )
        params = {"uploadType": "multipart", "name": key}
        if if_absent:
            params["ifGenerationMatch"] = "0"
        attempts = 0

        def attempt() -> GCSResponse:
            nonlocal attempts
            attempts += 1
            return client.request(
                "POST",
                self._upload_endpoint(bucket),
                url=url,
                what="put",
                params=params,
                headers={"Content-Type": f'multipart/related; boundary="{boundary}"'},
                data=body,
            )

        try:
            response = self._call(attempt, url, "put")
        except NotFoundError as e:
            raise self._bucket_missing(url, bucket) from e
        except PreconditionFailedError as e:
            if if_absent and attempts > 1:
                # An earlier attempt may have landed before its answer was lost: if the object
                # holds exactly our bytes, that write was ours.
                mine = self.head(url)
                if mine.size_bytes == len(data) and mine.crc32c in (crc, None):
                    return mine
            raise CommitConflictError(
                f"an object already exists at {url}", url=url, hint="delete it or write elsewhere"
            ) from e
        info = _object_info(url, response.json())
        if info.size_bytes != len(data):
            raise StorageError(
                f"{url} holds {info.size_bytes} bytes after put, {len(data)} were sent", url=url
            )
        return info

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
