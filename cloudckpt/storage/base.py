"""The small storage interface the rest of cloudckpt needs, and nothing more.

Every method takes full URLs (``s3://bucket/key``, ``gs://...``, ``memory://...``, ``/abs/path``).
Backends translate their client's errors into :mod:`cloudckpt.errors` classes and run every
remote call under the retry policy of their :class:`~cloudckpt.config.StorageConfig`.
All methods are thread-safe: the reader calls ``read_into`` from a pool of threads.

Lifecycle of a streamed object (one per rank and save, called by that rank's writer)::

    1. up = storage.open_upload(url, size_hint_bytes=n)  # nothing visible at url yet
    2. up.write(chunk) ...                              # parts go out while bytes come in
    3. info = up.commit()                               # object appears atomically, size checked
       or up.abort()                                    # on any failure: nothing appears, the
                                                        # previous object at url (if any) stays
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..config import StorageConfig


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing or HEAD tells about one object."""

    url: str
    size_bytes: int
    version: str | None = None  # ETag (S3), generation (GCS), mtime_ns (local); pins reads
    mtime_secs: float | None = None
    crc32c: int | None = None  # the store's own CRC32C of the whole object, when it keeps one


@dataclass(frozen=True)
class PendingUpload:
    """An unfinished multipart / resumable upload (what a crashed writer leaves behind)."""

    url: str
    upload_id: str
    initiated_secs: float | None = None


@dataclass
class UploadMetrics:
    """Counters of one streamed upload, filled by the backend."""

    bytes_sent: int = 0
    parts: int = 0
    retries: int = 0
    throttles: int = 0
    seconds: float = 0.0
    notes: dict[str, float] = field(default_factory=dict)

    @property
    def mib_per_sec(self) -> float:
        return self.bytes_sent / (1 << 20) / self.seconds if self.seconds > 0 else 0.0


class Upload(abc.ABC):
    """A write-only stream that becomes an object at ``url`` only on :meth:`commit`."""

    url: str
    metrics: UploadMetrics

    @abc.abstractmethod
    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append bytes; may block while the upload pool is full (back-pressure)."""

    @property
    @abc.abstractmethod
    def bytes_written(self) -> int:
        """Bytes accepted by :meth:`write` so far (the stream position)."""

    @abc.abstractmethod
    def commit(self) -> ObjectInfo:
        """Send what is buffered, finish the upload and make the object visible."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Cancel: wait for in-flight requests, discard everything. Idempotent; never raises
        for an upload that is already gone (logs instead)."""

    # file-like conveniences so torch.save / pickle can write here directly
    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        return None

    def tell(self) -> int:
        return self.bytes_written


class Storage(abc.ABC):
    """One backend bound to one :class:`StorageConfig` (credentials, endpoints, policies)."""

    #: URL schemes this backend serves, e.g. ("s3", "s3a").
    schemes: tuple[str, ...] = ()

    def __init__(self, config: StorageConfig) -> None:
        self.config = config

    # --- writes ---------------------------------------------------------------------------
    @abc.abstractmethod
    def open_upload(self, url: str, *, size_hint_bytes: int | None = None) -> Upload:
        """Start a streamed upload to ``url``. Raises BucketNotFoundError / PermissionDeniedError
        early (before the caller serializes anything) when the destination is unusable."""

    @abc.abstractmethod
    def put_bytes(self, url: str, data: bytes, *, if_absent: bool = False) -> ObjectInfo:
        """Write a small object in one request. With ``if_absent`` the write is conditional
        (S3 If-None-Match, GCS ifGenerationMatch=0, exclusive create locally) and raises
        CommitConflictError when an object already exists."""

    # --- reads ----------------------------------------------------------------------------
    @abc.abstractmethod
    def head(self, url: str) -> ObjectInfo:
        """Size and version of one object; NotFoundError when absent."""

    @abc.abstractmethod
    def get_bytes(
        self, url: str, start: int = 0, end: int | None = None, *, version: str | None = None
    ) -> bytes:
        """Bytes ``[start, end)`` of an object (``end=None``: to the end)."""

    @abc.abstractmethod
    def read_into(
        self, url: str, offset: int, buf: memoryview, *, version: str | None = None
    ) -> None:
        """Fill ``buf`` (writable, byte-format) with exactly ``len(buf)`` bytes from ``offset``,
        without an intermediate full-size copy where the client allows. ``version`` pins the
        object: ObjectChangedError if it changed. CorruptCheckpointError-free: a short object
        raises NotFoundError/StorageError with the URL; callers decide what it means."""

    def read_into_many(
        self,
        url: str,
        offset: int,
        targets: list[memoryview | int],
        *,
        version: str | None = None,
    ) -> None:
        """Read consecutive bytes from ``offset`` scattering them over ``targets``: a memoryview
        is filled, an int is a gap of that many bytes to skip. Backends that can stream one
        GET into several buffers override this (one request for coalesced neighbours); the
        default issues one :meth:`read_into` per buffer."""
        pos = offset
        for target in targets:
            if isinstance(target, int):
                pos += target
                continue
            if target.nbytes:
                self.read_into(url, pos, target, version=version)
            pos += target.nbytes

    # --- namespace ------------------------------------------------------------------------
    @abc.abstractmethod
    def list(self, prefix_url: str) -> list[ObjectInfo]:
        """Every object under ``prefix_url`` (recursive, uncached, sorted by URL)."""

    @abc.abstractmethod
    def delete(self, urls: Iterable[str]) -> None:
        """Delete objects; absent ones are not an error."""

    def exists(self, url: str) -> bool:
        from ..errors import NotFoundError

        try:
            self.head(url)
        except NotFoundError:
            return False
        return True

    # --- unfinished uploads (stores without them keep the defaults) ------------------------
    def list_pending_uploads(self, prefix_url: str) -> list[PendingUpload]:
        """Unfinished multipart/resumable uploads under ``prefix_url``."""
        return []

    def abort_pending_upload(self, pending: PendingUpload) -> None:
        """Abort one unfinished upload found by :meth:`list_pending_uploads`."""
        return None

    def close(self) -> None:
        """Release clients and pools."""
        return None
