"""Local-filesystem backend: atomic uploads through a temp file and ``os.replace``.

URLs are absolute paths, given plain (``/data/ckpt``) or as ``file:///data/ckpt``; returned URLs
keep the form of the URL that was passed in. A directory plays the role of a bucket, so missing
parent directories are created on upload. Local calls are not retried: they do not fail
transiently (EINTR is retried by Python itself).

Versions are ``"<st_mtime_ns>:<st_size>"``. Because Linux stamps file times from a coarse clock
(one tick, 1-4 ms), a commit sets the temp file's mtime from ``time.time_ns()`` before the
rename, so two commits to one path practically never share a version.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
import threading
import time
import uuid
from collections.abc import Iterable

from ..config import StorageConfig
from ..errors import (
    CommitConflictError,
    NotFoundError,
    ObjectChangedError,
    PermissionDeniedError,
    StorageError,
    UnsupportedURLError,
)
from .base import ObjectInfo, Storage, Upload, UploadMetrics
from .registry import split_url

logger = logging.getLogger(__name__)

_TEMP_MARKER = ".tmp-"
_WRITE_BUFFER_BYTES = 1 << 20  # batches the many small writes torch.save / pickle make
# link() errors meaning "this filesystem cannot hard-link", not "permission denied".
_NO_HARDLINK_ERRNOS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV}


def is_temp_name(name: str) -> bool:
    """True for the ``.<name>.tmp-<uuid>`` files in-progress uploads write (never listed)."""
    return name.startswith(".") and _TEMP_MARKER in name


def _temp_path(path: str) -> str:
    head, name = os.path.split(path)
    return os.path.join(head, f".{name}{_TEMP_MARKER}{uuid.uuid4().hex}")


def _version(st: os.stat_result) -> str:
    return f"{st.st_mtime_ns}:{st.st_size}"


def _translate(e: OSError, url: str, what: str) -> StorageError:
    """Map an OSError to the cloudckpt error for it (the caller raises it ``from e``)."""
    message = f"{what} of {url} failed: {e.strerror or e}"
    if isinstance(e, FileNotFoundError) or e.errno == errno.ENOENT:
        return NotFoundError(f"{what}: no such file {url}", url=url)
    if isinstance(e, PermissionError) or e.errno in (errno.EACCES, errno.EPERM):
        return PermissionDeniedError(message, url=url, hint="check the directory's permissions")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(message, url=url, hint="free disk space or write elsewhere")
    return StorageError(message, url=url)


def _fsync_dir(path: str) -> None:
    """Persist a rename / link in ``path`` (a directory) across a power loss."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_temp(temp: str) -> None:
    """Delete a temp file if it is still there; a failure is logged (the caller's outcome
    stands, and a leftover temp file is never listed)."""
    try:
        os.unlink(temp)
    except FileNotFoundError:
        pass
    except OSError as e:
        logger.warning("could not delete temp file %s: %s", temp, e)


def _stamp_now(fd: int) -> None:
    """Set a fine-grained mtime (see the module docstring) on an open file."""
    now = time.time_ns()
    os.utime(fd, ns=(now, now))


class LocalUpload(Upload):
    """Writes to ``.<name>.tmp-<uuid>`` beside the target; commit renames it into place."""

    def __init__(self, url: str, path: str) -> None:
        self.url = url
        self.metrics = UploadMetrics()
        self._path = path
        self._temp = _temp_path(path)
        self._lock = threading.Lock()
        self._bytes_written = 0
        self._started = time.monotonic()
        self._state = "open"  # open -> committed | aborted
        fd = os.open(self._temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        self._file: io.BufferedWriter | None = open(  # noqa: SIM115 (closed on commit/abort)
            fd, "wb", buffering=_WRITE_BUFFER_BYTES
        )

    @property
    def bytes_written(self) -> int:
        return self._bytes_written

    def _require_open(self) -> io.BufferedWriter:
        if self._state != "open" or self._file is None:
            raise ValueError(f"upload to {self.url} is already {self._state}")
        return self._file

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append bytes to the temp file (buffered; durable only after commit)."""
        with self._lock:
            f = self._require_open()
            n = memoryview(data).nbytes
            try:
                f.write(data)
            except OSError as e:
                raise _translate(e, self.url, "write") from e
            self._bytes_written += n
            self.metrics.bytes_sent += n
            return n

    def commit(self) -> ObjectInfo:
        """fsync the temp file, rename it over the target, fsync the directory."""
        with self._lock:
            f = self._require_open()
            try:
                f.flush()
                _stamp_now(f.fileno())
                os.fsync(f.fileno())
                f.close()
                self._file = None
                st = os.stat(self._temp)
                if st.st_size != self._bytes_written:
                    raise StorageError(
                        f"upload to {self.url} wrote {st.st_size} bytes, expected "
                        f"{self._bytes_written}",
                        url=self.url,
                    )
                os.replace(self._temp, self._path)
                _fsync_dir(os.path.dirname(self._path))
            except BaseException as e:
                self._discard_locked()
                if isinstance(e, OSError):
                    raise _translate(e, self.url, "commit") from e
                raise
            self._state = "committed"
            self.metrics.parts = 1
            self.metrics.seconds = time.monotonic() - self._started
            logger.debug("committed %s (%d bytes)", self.url, st.st_size)
            return ObjectInfo(
                url=self.url,
                size_bytes=st.st_size,
                version=_version(st),
                mtime_secs=st.st_mtime_ns / 1e9,
            )

    def abort(self) -> None:
        """Close and delete the temp file; the target path is untouched."""
        with self._lock:
            if self._state != "open":
                logger.debug("abort of %s upload to %s: nothing to do", self._state, self.url)
                return
            self._discard_locked()

    def _discard_locked(self) -> None:
        self._state = "aborted"
        if self._file is not None:
            try:
                self._file.close()
            except OSError as e:
                logger.warning("closing temp file %s failed while aborting: %s", self._temp, e)
            self._file = None
        _remove_temp(self._temp)


class LocalStorage(Storage):
    """Objects are files; see the module docstring for URL forms and versions."""

    schemes = ("file",)

    def __init__(self, config: StorageConfig | None = None) -> None:
        super().__init__(config or StorageConfig())

    # --- helpers ----------------------------------------------------------------------------
    @staticmethod
    def _path(url: str) -> str:
        """Absolute filesystem path of ``url``; UnsupportedURLError for other schemes."""
        scheme, rest = split_url(url)
        if scheme != "file":
            raise UnsupportedURLError(f"LocalStorage cannot serve {url!r}", url=url)
        return rest

    @staticmethod
    def _url(path: str, like: str) -> str:
        """``path`` written in the form of ``like`` (plain path or ``file://``)."""
        return f"file://{path}" if os.fspath(like).startswith("file://") else path

    # --- writes -----------------------------------------------------------------------------
    def open_upload(self, url: str, *, size_hint_bytes: int | None = None) -> Upload:
        """Create the parent directory if needed and open the temp file."""
        path = self._path(url)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            return LocalUpload(url, path)
        except OSError as e:
            raise _translate(e, url, "open upload") from e

    def put_bytes(self, url: str, data: bytes, *, if_absent: bool = False) -> ObjectInfo:
        """Write through a temp file; ``if_absent`` links it into place (exclusive)."""
        path = self._path(url)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            temp = _temp_path(path)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            try:
                with open(fd, "wb", buffering=0) as f:
                    view = memoryview(data)
                    while view:
                        view = view[f.write(view) :]
                    _stamp_now(fd)
                    os.fsync(fd)
                if if_absent:
                    self._link_exclusive(temp, path, data, url)
                else:
                    os.replace(temp, path)
            finally:
                _remove_temp(temp)
            _fsync_dir(os.path.dirname(path))
            st = os.stat(path)
        except OSError as e:
            raise _translate(e, url, "put") from e
        return ObjectInfo(url, st.st_size, _version(st), st.st_mtime_ns / 1e9)

    @staticmethod
    def _link_exclusive(temp: str, path: str, data: bytes, url: str) -> None:
        """Hard-link ``temp`` to ``path`` unless ``path`` exists (O_EXCL where links fail)."""
        try:
            os.link(temp, path)
            return
        except FileExistsError as e:
            raise CommitConflictError(f"an object already exists at {url}", url=url) from e
        except OSError as e:
            if e.errno not in _NO_HARDLINK_ERRNOS:
                raise
            logger.debug("hard links unsupported for %s (%s); using O_EXCL create", url, e)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError as e:
            raise CommitConflictError(f"an object already exists at {url}", url=url) from e
        with open(fd, "wb", buffering=0) as f:
            f.write(data)
            os.fsync(fd)

    # --- reads ------------------------------------------------------------------------------
    def head(self, url: str) -> ObjectInfo:
        path = self._path(url)
        try:
            st = os.stat(path)
        except OSError as e:
            raise _translate(e, url, "head") from e
        if not stat.S_ISREG(st.st_mode):
            raise NotFoundError(f"{url} is a directory, not an object", url=url)
        return ObjectInfo(url, st.st_size, _version(st), st.st_mtime_ns / 1e9)

    def get_bytes(
        self, url: str, start: int = 0, end: int | None = None, *, version: str | None = None
    ) -> bytes:
        path = self._path(url)
        if start < 0 or (end is not None and end < start):
            raise ValueError(f"invalid byte range [{start}, {end}) for {url}")
        try:
            with open(path, "rb", buffering=0) as f:
                self._check_version(os.fstat(f.fileno()), version, url)
                f.seek(start)
                data = f.read() if end is None else f.read(end - start)
                self._check_version(os.fstat(f.fileno()), version, url)
        except OSError as e:
            raise _translate(e, url, "read") from e
        return data

    def read_into(
        self, url: str, offset: int, buf: memoryview, *, version: str | None = None
    ) -> None:
        """``os.preadv`` straight into ``buf``; the open fd pins the inode being read."""
        path = self._path(url)
        if offset < 0:
            raise ValueError(f"negative offset {offset} for {url}")
        view = memoryview(buf).cast("B")
        want = len(view)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                self._check_version(os.fstat(fd), version, url)
                got = 0
                while got < want:
                    n = os.preadv(fd, [view[got:]], offset + got)
                    if n == 0:
                        raise StorageError(
                            f"short read of {url}: wanted {want} bytes at offset {offset}, "
                            f"the file ends after {got}",
                            url=url,
                        )
                    got += n
                self._check_version(os.fstat(fd), version, url)
            finally:
                os.close(fd)
        except OSError as e:
            raise _translate(e, url, "read") from e

    @staticmethod
    def _check_version(st: os.stat_result, version: str | None, url: str) -> None:
        if version is not None and _version(st) != version:
            raise ObjectChangedError(
                f"{url} changed while pinned to version {version} (now {_version(st)})",
                url=url,
                hint="the object was overwritten; reload the manifest and retry",
            )

    # --- namespace --------------------------------------------------------------------------
    def list(self, prefix_url: str) -> list[ObjectInfo]:
        """Files below the directory ``prefix_url`` (recursive; temp files skipped)."""
        root = self._path(prefix_url)
        out: list[ObjectInfo] = []
        errors: list[OSError] = []
        for dirpath, _dirnames, filenames in os.walk(root, onerror=errors.append):
            for name in filenames:
                if is_temp_name(name):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue  # deleted while listing
                except OSError as e:
                    raise _translate(e, self._url(path, prefix_url), "list") from e
                out.append(
                    ObjectInfo(
                        self._url(path, prefix_url),
                        st.st_size,
                        _version(st),
                        st.st_mtime_ns / 1e9,
                    )
                )
        for e in errors:
            if not isinstance(e, FileNotFoundError | NotADirectoryError):
                raise _translate(e, prefix_url, "list") from e
        return sorted(out, key=lambda info: info.url)

    def delete(self, urls: Iterable[str]) -> None:
        for url in urls:
            path = self._path(url)
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise _translate(e, url, "delete") from e
