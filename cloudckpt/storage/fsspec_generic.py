"""A generic backend over any fsspec filesystem (``memory://`` by default).

The filesystem is resolved per URL with ``fsspec.core.url_to_fs(url, **storage_options)``.
Uploads never expose a partial object: filesystems whose files honour ``autocommit=False``
(local files, and the buffered files of async object-store filesystems) stream into such a file
and ``commit()`` it; every other filesystem (notably ``memory://``, whose ``open("wb")`` shows
the file at once) gets the bytes buffered in RAM and written with one ``pipe_file`` on commit.

Conditional puts and pinned reads are best effort: a process-wide lock makes check-then-write
atomic against other users of this module, and versions come from what ``fs.info`` reports
(a generation / ETag / checksum when there is one, else the modification time and size).
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, TypeVar

import fsspec
from fsspec.asyn import AsyncFileSystem
from fsspec.implementations.local import LocalFileSystem

from ..config import StorageConfig
from ..errors import (
    CloudCkptError,
    CommitConflictError,
    NotFoundError,
    ObjectChangedError,
    PermissionDeniedError,
    StorageError,
    TransientStorageError,
)
from ..retry import RetryPolicy
from .base import ObjectInfo, Storage, Upload, UploadMetrics

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Serializes check-then-write of put_bytes(if_absent=True) within this process.
_PUT_LOCK = threading.Lock()
# fs.info keys that change on every overwrite, strongest first.
_VERSION_KEYS = ("generation", "version_id", "VersionId", "ETag", "etag", "checksum", "md5")
_TIME_KEYS = ("mtime", "LastModified", "last_modified", "updated", "modified", "created")


def _translate(e: Exception, url: str, what: str) -> Exception:
    """The cloudckpt error for a filesystem exception (raised by the caller ``from e``)."""
    if isinstance(e, CloudCkptError):
        return e
    message = f"{what} of {url} failed: {type(e).__name__}: {e}"
    if isinstance(e, FileNotFoundError):
        return NotFoundError(f"{what}: no object at {url}", url=url)
    if isinstance(e, PermissionError):
        return PermissionDeniedError(message, url=url, hint="check the storage_options credentials")
    if isinstance(e, ConnectionError | TimeoutError):
        return TransientStorageError(message, url=url)
    if isinstance(e, OSError):
        return StorageError(message, url=url)
    return e


def _timestamp(value: Any) -> float | None:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, int | float):
        return float(value)
    return None


def _version_of(info: dict[str, Any]) -> str:
    """An overwrite-sensitive version string from ``fs.info`` output."""
    for key in _VERSION_KEYS:
        if info.get(key):
            return f"{key}:{info[key]}"
    for key in _TIME_KEYS:
        stamp = _timestamp(info.get(key))
        if stamp is not None:
            return f"{round(stamp * 1e6)}:{info.get('size')}"
    return f"size:{info.get('size')}"


def _object_info(url: str, info: dict[str, Any]) -> ObjectInfo:
    mtime = next((t for t in (_timestamp(info.get(k)) for k in _TIME_KEYS) if t is not None), None)
    return ObjectInfo(
        url=url, size_bytes=int(info["size"]), version=_version_of(info), mtime_secs=mtime
    )


def supports_deferred_commit(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs.open(path, "wb", autocommit=False)`` hides the file until ``commit()``."""
    return isinstance(fs, LocalFileSystem | AsyncFileSystem)


class _BufferedUpload(Upload):
    """Collects the bytes in RAM and writes them with one ``pipe_file`` on commit."""

    def __init__(self, storage: FsspecStorage, url: str) -> None:
        self.url = url
        self.metrics = UploadMetrics()
        self._storage = storage
        self._buffer: io.BytesIO | None = io.BytesIO()
        self._lock = threading.Lock()
        self._state = "open"
        self._started = time.monotonic()
        self._size = 0

    @property
    def bytes_written(self) -> int:
        return self._size

    def _require_open(self) -> io.BytesIO:
        if self._state != "open" or self._buffer is None:
            raise ValueError(f"upload to {self.url} is already {self._state}")
        return self._buffer

    def write(self, data: bytes | bytearray | memoryview) -> int:
        with self._lock:
            n = self._require_open().write(data)
            self._size += n
            return n

    def commit(self) -> ObjectInfo:
        with self._lock:
            buffer = self._require_open()
            try:
                fs, path = self._storage._resolve(self.url)
                payload = buffer.getvalue()
                self._storage._call(lambda: fs.pipe_file(path, payload), self.url, "commit")
                info = self._storage._call(lambda: fs.info(path), self.url, "stat after commit")
            except BaseException:
                self._state, self._buffer = "aborted", None
                raise
            self._state, self._buffer = "committed", None
            size = int(info["size"])
            if size != self._size:
                raise StorageError(
                    f"{self.url} holds {size} bytes after commit, {self._size} were written",
                    url=self.url,
                )
            self.metrics.bytes_sent = size
            self.metrics.parts = 1
            self.metrics.seconds = time.monotonic() - self._started
            return _object_info(self.url, info)

    def abort(self) -> None:
        with self._lock:
            if self._state == "open":
                self._state, self._buffer = "aborted", None


class _DeferredCommitUpload(Upload):
    """Streams into ``fs.open(path, "wb", autocommit=False)``; commit/discard at the end."""

    def __init__(self, storage: FsspecStorage, url: str, file: Any) -> None:
        self.url = url
        self.metrics = UploadMetrics()
        self._storage = storage
        self._file = file
        self._lock = threading.Lock()
        self._state = "open"
        self._started = time.monotonic()
        self._size = 0

    @property
    def bytes_written(self) -> int:
        return self._size

    def write(self, data: bytes | bytearray | memoryview) -> int:
        with self._lock:
            if self._state != "open":
                raise ValueError(f"upload to {self.url} is already {self._state}")
            try:
                n = self._file.write(data)
            except Exception as e:
                raise _translate(e, self.url, "write") from e
            self._size += n
            return n

    def commit(self) -> ObjectInfo:
        with self._lock:
            if self._state != "open":
                raise ValueError(f"upload to {self.url} is already {self._state}")
            try:
                # fsspec's transaction order: close() sends what is buffered without
                # finishing, commit() makes the object visible.
                self._file.close()
                self._file.commit()
            except Exception as e:
                self._discard_locked()
                raise _translate(e, self.url, "commit") from e
            self._state = "committed"
        info = self._storage.head(self.url)
        if info.size_bytes != self._size:
            raise StorageError(
                f"{self.url} holds {info.size_bytes} bytes after commit, {self._size} were written",
                url=self.url,
            )
        self.metrics.bytes_sent = self._size
        self.metrics.seconds = time.monotonic() - self._started
        return info

    def abort(self) -> None:
        with self._lock:
            if self._state == "open":
                self._discard_locked()

    def _discard_locked(self) -> None:
        """close() then discard(), as an fsspec transaction rolls back; failures are logged."""
        self._state = "aborted"
        for step in (self._file.close, self._file.discard):
            try:
                step()
            except Exception as e:
                logger.warning(
                    "%s of the aborted upload to %s failed: %s", step.__name__, self.url, e
                )


class FsspecStorage(Storage):
    """Any fsspec filesystem, addressed by full URLs (``memory://bucket/key``)."""

    schemes = ("memory",)

    def __init__(self, config: StorageConfig | None = None) -> None:
        super().__init__(config or StorageConfig())
        self._retry = RetryPolicy(self.config.retry)

    # --- helpers ----------------------------------------------------------------------------
    def _resolve(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        fs, path = fsspec.core.url_to_fs(url, **dict(self.config.storage_options))
        return fs, path

    def _call(self, fn: Callable[[], T], url: str, what: str) -> T:
        """Run one filesystem call under the retry policy, with errors translated."""

        def attempt() -> T:
            try:
                return fn()
            except Exception as e:
                translated = _translate(e, url, what)
                if translated is e:
                    raise
                raise translated from e

        return self._retry.call(attempt, url=url, what=what)

    def _info(self, fs: fsspec.AbstractFileSystem, path: str, url: str) -> dict[str, Any]:
        info: dict[str, Any] = self._call(lambda: fs.info(path), url, "head")
        if info.get("type") == "directory":
            raise NotFoundError(f"{url} is a directory, not an object", url=url)
        return info

    @staticmethod
    def _url(prefix_url: str, prefix_path: str, path: str) -> str:
        """Rebuild an object's URL in the caller's spelling of the prefix."""
        return prefix_url.rstrip("/") + "/" + path[len(prefix_path) :].strip("/")

    # --- writes -----------------------------------------------------------------------------
    def open_upload(self, url: str, *, size_hint_bytes: int | None = None) -> Upload:
        fs, path = self._resolve(url)
        if supports_deferred_commit(fs):
            file = self._call(lambda: fs.open(path, "wb", autocommit=False), url, "open upload")
            if getattr(file, "autocommit", True) is False:
                return _DeferredCommitUpload(self, url, file)
            file.close()  # pragma: no cover - a filesystem that ignored autocommit=False
        return _BufferedUpload(self, url)

    def put_bytes(self, url: str, data: bytes, *, if_absent: bool = False) -> ObjectInfo:
        fs, path = self._resolve(url)
        if not if_absent:
            self._call(lambda: fs.pipe_file(path, data), url, "put")
            return self.head(url)

        def create() -> None:
            try:
                fs.pipe_file(path, data, mode="create")
            except FileExistsError as e:
                raise CommitConflictError(f"an object already exists at {url}", url=url) from e

        with _PUT_LOCK:
            if self._call(lambda: fs.exists(path), url, "exists check"):
                raise CommitConflictError(f"an object already exists at {url}", url=url)
            self._call(create, url, "put")
        return self.head(url)

    # --- reads ------------------------------------------------------------------------------
    def head(self, url: str) -> ObjectInfo:
        fs, path = self._resolve(url)
        return _object_info(url, self._info(fs, path, url))

    def _check_version(self, fs: Any, path: str, url: str, version: str | None) -> None:
        if version is None:
            return
        current = _version_of(self._info(fs, path, url))
        if current != version:
            raise ObjectChangedError(
                f"{url} changed while pinned to version {version} (now {current})",
                url=url,
                hint="the object was overwritten; reload the manifest and retry",
            )

    def get_bytes(
        self, url: str, start: int = 0, end: int | None = None, *, version: str | None = None
    ) -> bytes:
        """Ranged read; with ``version`` the version is checked before and after it."""
        if start < 0 or (end is not None and end < start):
            raise ValueError(f"invalid byte range [{start}, {end}) for {url}")
        fs, path = self._resolve(url)
        self._check_version(fs, path, url, version)
        data: bytes = self._call(lambda: fs.cat_file(path, start, end), url, "read")
        self._check_version(fs, path, url, version)
        return data

    def read_into(
        self, url: str, offset: int, buf: memoryview, *, version: str | None = None
    ) -> None:
        view = memoryview(buf).cast("B")
        data = self.get_bytes(url, offset, offset + len(view), version=version)
        if len(data) != len(view):
            raise StorageError(
                f"short read of {url}: wanted {len(view)} bytes at offset {offset}, "
                f"got {len(data)}",
                url=url,
            )
        view[:] = data

    # --- namespace --------------------------------------------------------------------------
    def list(self, prefix_url: str) -> list[ObjectInfo]:
        """Objects below the "directory" ``prefix_url`` (recursive, cache invalidated)."""
        fs, prefix_path = self._resolve(prefix_url)
        prefix_path = prefix_path.rstrip("/")
        fs.invalidate_cache(prefix_path)
        try:
            found: dict[str, dict[str, Any]] = self._call(
                lambda: fs.find(prefix_path, detail=True), prefix_url, "list"
            )
        except NotFoundError:
            return []
        out = [
            _object_info(self._url(prefix_url, prefix_path, path), info)
            for path, info in found.items()
            if info.get("type", "file") == "file" and path.startswith(prefix_path + "/")
        ]
        return sorted(out, key=lambda info: info.url)

    def delete(self, urls: Iterable[str]) -> None:
        for url in urls:
            fs, path = self._resolve(url)
            try:
                self._call(lambda fs=fs, path=path: fs.rm_file(path), url, "delete")
            except NotFoundError:
                continue
