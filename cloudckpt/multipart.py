"""Backend-neutral multipart machinery: part sizing, the part chunker, the parallel uploader.

Nothing here imports a storage client. A backend plugs in ``send_part(part_number, view) ->
token`` (S3 UploadPart today; GCS parallel composite uploads may reuse it) and gets:

* :func:`choose_part_size` / :class:`PartPlan`: pure functions deciding where every part of a
  stream starts and ends. Boundaries depend only on byte positions, never on how the caller
  chunks its writes, and a stream can never need part 10 001 (the S3 limit) before 5 TiB;
* :class:`PartChunker`: copies written bytes once, into reusable part buffers;
* :class:`ParallelPartUploader`: sends full parts on a bounded thread pool with back-pressure
  (at most ``max_concurrency + 1`` part buffers exist at once) and stops at the first failure.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

import google_crc32c

from .config import S3_MAX_PART_SIZE_BYTES, S3_MAX_UPLOAD_PARTS, S3_MIN_PART_SIZE_BYTES, MiB

if TYPE_CHECKING:
    from .storage.base import PendingUpload, Storage

logger = logging.getLogger(__name__)

TokenT = TypeVar("TokenT")

# S3 limit: largest object (https://docs.aws.amazon.com/AmazonS3/latest/userguide/qfacts.html).
S3_MAX_OBJECT_SIZE_BYTES = 5 * (1 << 40)
#: Computed part sizes are rounded up to a multiple of this (tidy numbers, page friendly).
PART_SIZE_ALIGN_BYTES = MiB
#: A stream keeps its first part size for at least this many parts...
UNIFORM_PARTS_MIN = 1_000
#: ...then the part size doubles every this many parts (capped at 5 GiB), so that even 5 MiB
#: parts cover 5 TiB well before part 10 000 (see PartPlan.part_size).
GROWTH_EVERY_PARTS = 500


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def choose_part_size(size_hint_bytes: int | None, part_size_bytes: int) -> int:
    """Part size for a stream: ``part_size_bytes``, grown (MiB-aligned) so that a known size needs
    at most 10 000 parts, clamped to the S3 part limits [5 MiB, 5 GiB]. Pure.

    >>> choose_part_size(None, 32 * MiB) == 32 * MiB
    True
    >>> choose_part_size(1 << 40, 32 * MiB) == 105 * MiB  # 1 TiB / 10 000 parts, rounded up
    True
    """
    if part_size_bytes <= 0:
        raise ValueError(f"part_size_bytes must be > 0, got {part_size_bytes}")
    size = max(part_size_bytes, S3_MIN_PART_SIZE_BYTES)
    if size_hint_bytes is not None:
        if size_hint_bytes < 0:
            raise ValueError(f"size_hint_bytes must be >= 0, got {size_hint_bytes}")
        if size_hint_bytes > S3_MAX_UPLOAD_PARTS * S3_MAX_PART_SIZE_BYTES:
            raise ValueError(
                f"size_hint_bytes={size_hint_bytes} cannot be uploaded in {S3_MAX_UPLOAD_PARTS} "
                f"parts of at most {S3_MAX_PART_SIZE_BYTES} bytes"
            )
        needed = _ceil_div(size_hint_bytes, S3_MAX_UPLOAD_PARTS)
        size = max(size, _ceil_div(needed, PART_SIZE_ALIGN_BYTES) * PART_SIZE_ALIGN_BYTES)
    return min(size, S3_MAX_PART_SIZE_BYTES)


@dataclass(frozen=True)
class PartPlan:
    """Sizes of the parts of one stream, as a pure function of the part number.

    Parts ``1..uniform_parts`` have ``base_part_size_bytes``; later parts double in size every
    :data:`GROWTH_EVERY_PARTS` parts, capped at ``max_part_size_bytes``. A stream of unknown size
    (or one that overruns its size hint) thus reaches 5 TiB long before ``max_parts``.
    """

    base_part_size_bytes: int
    uniform_parts: int = UNIFORM_PARTS_MIN
    max_part_size_bytes: int = S3_MAX_PART_SIZE_BYTES
    max_parts: int = S3_MAX_UPLOAD_PARTS

    def __post_init__(self) -> None:
        if self.base_part_size_bytes <= 0:
            raise ValueError(f"base_part_size_bytes must be > 0, got {self.base_part_size_bytes}")
        if self.uniform_parts < 1 or self.max_parts < 1:
            raise ValueError("uniform_parts and max_parts must be >= 1")
        if self.max_part_size_bytes < self.base_part_size_bytes:
            raise ValueError("max_part_size_bytes must be >= base_part_size_bytes")

    @classmethod
    def for_stream(cls, size_hint_bytes: int | None, part_size_bytes: int) -> PartPlan:
        """The plan for a stream of (optionally) known size: uniform parts of
        :func:`choose_part_size` bytes cover the hinted size, growth starts after them."""
        base = choose_part_size(size_hint_bytes, part_size_bytes)
        hinted_parts = _ceil_div(size_hint_bytes, base) if size_hint_bytes else 0
        return cls(base, uniform_parts=max(UNIFORM_PARTS_MIN, hinted_parts))

    def part_size(self, part_number: int) -> int:
        """Size in bytes of part ``part_number`` (1-based); ValueError past ``max_parts``."""
        if not 1 <= part_number <= self.max_parts:
            raise ValueError(
                f"part {part_number} is outside 1..{self.max_parts}: the stream is larger than "
                f"its parts can hold (base part size {self.base_part_size_bytes} bytes); "
                "raise UploadConfig.part_size_bytes or pass a size hint"
            )
        beyond = part_number - self.uniform_parts
        if beyond <= 0:
            return self.base_part_size_bytes
        doublings = (beyond - 1) // GROWTH_EVERY_PARTS + 1
        if doublings >= 40:  # avoid huge shifts; any doubling this far is past the cap
            return self.max_part_size_bytes
        return min(self.max_part_size_bytes, self.base_part_size_bytes << doublings)

    def capacity_bytes(self, parts: int | None = None) -> int:
        """Bytes that the first ``parts`` parts (default: all allowed parts) hold together."""
        n = self.max_parts if parts is None else parts
        total = min(n, self.uniform_parts) * self.base_part_size_bytes
        number = self.uniform_parts + 1
        while number <= n:  # one step per group of equally sized parts
            beyond = number - self.uniform_parts
            group_last = self.uniform_parts + ((beyond - 1) // GROWTH_EVERY_PARTS + 1) * (
                GROWTH_EVERY_PARTS
            )
            last = min(n, group_last)
            total += (last - number + 1) * self.part_size(number)
            number = last + 1
        return total


def crc32c_of(data: bytes | bytearray | memoryview) -> int:
    """CRC32C of ``data`` without copying it (google_crc32c only takes read-only buffers, so a
    writable buffer is exposed to it through a ctypes array over the same memory)."""
    if isinstance(data, bytes):
        return int(google_crc32c.value(data))
    view = memoryview(data)
    if view.readonly:
        return int(google_crc32c.value(view.tobytes()))
    view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    if len(view) == 0:
        return int(google_crc32c.value(b""))
    shared = (ctypes.c_char * len(view)).from_buffer(view)
    try:
        return int(google_crc32c.value(shared))
    finally:
        del shared  # drop the export so the buffer can be recycled or resized


def as_byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    """A flat unsigned-byte memoryview of ``data`` (no copy)."""
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


class PartChunker:
    """Cuts a byte stream into the parts of a :class:`PartPlan`.

    Each written byte is copied exactly once, into the current part buffer; a full part is handed
    to ``emit(part_number, buffer, length)`` (the buffer then belongs to the receiver). Buffers come
    from ``acquire(capacity)``, which may block (back-pressure) or recycle old buffers. Part
    boundaries depend only on byte positions. Not thread-safe: one writer.
    """

    def __init__(
        self,
        plan: PartPlan,
        emit: Callable[[int, bytearray, int], None],
        *,
        acquire: Callable[[int], bytearray] = bytearray,
        size_hint_bytes: int | None = None,
    ) -> None:
        self.plan = plan
        self._deliver = emit
        self._acquire = acquire
        self._size_hint_bytes = size_hint_bytes
        self._part_number = 1
        self._part_size = plan.part_size(1)
        self._buf: bytearray | None = None
        self._fill = 0
        self._position = 0
        self._parts_emitted = 0

    @property
    def position(self) -> int:
        """Bytes accepted so far."""
        return self._position

    @property
    def parts_emitted(self) -> int:
        """Parts handed to ``emit`` so far."""
        return self._parts_emitted

    @property
    def next_part_number(self) -> int:
        """The number of the part being filled."""
        return self._part_number

    def buffered(self) -> memoryview:
        """The bytes of the part being filled (not yet emitted)."""
        if self._buf is None:
            return memoryview(b"")
        return memoryview(self._buf)[: self._fill]

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append ``data``; emits every part it completes. Returns ``len(data)`` in bytes."""
        view = as_byte_view(data)
        total = len(view)
        pos = 0
        while pos < total:
            buf = self._buf
            if buf is None:
                buf = self._buf = self._acquire(self._first_capacity())
            elif self._fill == len(buf) < self._part_size:
                buf = self._buf = self._grown(buf)
            take = min(total - pos, len(buf) - self._fill, self._part_size - self._fill)
            buf[self._fill : self._fill + take] = view[pos : pos + take]
            self._fill += take
            self._position += take
            pos += take
            if self._fill == self._part_size:
                self._emit(buf)
                self._part_number += 1
                self._part_size = self.plan.part_size(self._part_number)
        return total

    def flush_last(self, *, force: bool = False) -> bool:
        """Emit the partly filled last part; with ``force``, emit an empty part when nothing was
        emitted yet (so that a stream always has at least one part). True if a part was emitted."""
        if self._fill == 0 and not (force and self._parts_emitted == 0):
            return False
        buf = self._buf if self._buf is not None else self._acquire(0)
        self._emit(buf)
        self._part_number += 1
        return True

    def _first_capacity(self) -> int:
        # A whole object smaller than one part gets a buffer of its hinted size, not a full part.
        hint = self._size_hint_bytes
        if self._part_number == 1 and hint is not None and hint < self._part_size:
            return max(hint, 1)
        return self._part_size

    def _grown(self, buf: bytearray) -> bytearray:
        # Only reached when a size hint proved too small: one extra copy of the bytes so far.
        grown = bytearray(self._part_size)
        grown[: self._fill] = buf[: self._fill]
        return grown

    def _emit(self, buf: bytearray) -> None:
        fill = self._fill
        self._buf = None
        self._fill = 0
        self._parts_emitted += 1
        self._deliver(self._part_number, buf, fill)


class PartUploadCancelledError(Exception):
    """The uploader was cancelled while a writer was waiting for a part buffer."""


@dataclass
class UploaderStats:
    """What an uploader did, for metrics and for tests of its memory bound."""

    parts_sent: int = 0
    bytes_sent: int = 0
    buffers_allocated: int = 0
    max_live_buffers: int = 0


class ParallelPartUploader(Generic[TokenT]):
    """Streams bytes as numbered parts through ``send_part`` on a bounded thread pool.

    Lifecycle (one writer thread)::

        up = ParallelPartUploader(send_part, plan, max_concurrency=8)
        up.write(b) ...          # blocks while max_concurrency parts are in flight
        tokens = up.finish()     # sends the last part, waits, [(part_number, token), ...]
        # or, on any failure:
        up.cancel()              # drops queued parts, waits for in-flight ones

    At most ``max_concurrency + 1`` part buffers exist at once (the one being filled plus those
    in flight); finished buffers are recycled. The first failed part stops further sends; its
    exception is re-raised by the next :meth:`write` / :meth:`finish`. ``before_first_part`` runs
    in the writer thread right before part 1 is sent (e.g. to start a multipart upload lazily).
    """

    def __init__(
        self,
        send_part: Callable[[int, memoryview], TokenT],
        plan: PartPlan,
        *,
        max_concurrency: int,
        size_hint_bytes: int | None = None,
        before_first_part: Callable[[], None] | None = None,
        thread_name_prefix: str = "cloudckpt-part",
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self._send_part = send_part
        self._before_first_part = before_first_part
        self._max_concurrency = max_concurrency
        self._max_buffers = max_concurrency + 1
        self._thread_name_prefix = thread_name_prefix
        self._executor: ThreadPoolExecutor | None = None
        self._cond = threading.Condition()
        self._live_buffers = 0
        self._free: list[bytearray] = []
        self._futures: list[Future[None]] = []
        self._tokens: dict[int, TokenT] = {}
        self._error: BaseException | None = None
        self._cancelled = False
        self._finished = False
        self.stats = UploaderStats()
        self._chunker = PartChunker(
            plan, self._submit, acquire=self._acquire, size_hint_bytes=size_hint_bytes
        )

    # --- writer side ---------------------------------------------------------------------
    @property
    def bytes_written(self) -> int:
        """Bytes accepted by :meth:`write` so far."""
        return self._chunker.position

    @property
    def parts_submitted(self) -> int:
        """Parts handed to the pool so far."""
        return self._chunker.parts_emitted

    @property
    def live_buffers(self) -> int:
        """Part buffers in use now (being filled or in flight)."""
        with self._cond:
            return self._live_buffers

    def buffered(self) -> memoryview:
        """Bytes written but not yet handed to the pool (valid until the next write)."""
        return self._chunker.buffered()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append bytes; blocks while the pool is full; raises the first failed part's error."""
        self._check_open()
        self._raise_if_failed()
        return self._chunker.write(data)

    def finish(self) -> list[tuple[int, TokenT]]:
        """Send the last (partial) part, wait for every part and return ``(part_number, token)``
        in part order. A stream with no bytes at all still sends one empty part."""
        self._check_open()
        self._raise_if_failed()
        self._chunker.flush_last(force=True)
        wait_futures(list(self._futures))
        self._raise_if_failed()
        self._finished = True
        self._shutdown()
        return sorted(self._tokens.items())

    def cancel(self) -> None:
        """Stop: queued parts are dropped, in-flight ones are waited for. Idempotent."""
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()
        for future in self._futures:
            future.cancel()
        self._shutdown()

    # --- internals -----------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._finished:
            raise ValueError("this upload is already finished")
        if self._cancelled:
            raise ValueError("this upload was cancelled")

    def _raise_if_failed(self) -> None:
        with self._cond:
            error = self._error
        if error is not None:
            raise error

    def _acquire(self, capacity: int) -> bytearray:
        with self._cond:
            while True:
                if self._error is not None:
                    raise self._error
                if self._cancelled:
                    raise PartUploadCancelledError("the upload was cancelled")
                if self._live_buffers < self._max_buffers:
                    break
                self._cond.wait()
            self._live_buffers += 1
            self.stats.max_live_buffers = max(self.stats.max_live_buffers, self._live_buffers)
            while self._free:
                buf = self._free.pop()
                if len(buf) >= capacity:
                    return buf
                # Too small for a grown part size: drop it, so live + free stays bounded.
            self.stats.buffers_allocated += 1
        try:
            return bytearray(capacity)
        except BaseException:
            self._release(None)
            raise

    def _release(self, buf: bytearray | None) -> None:
        with self._cond:
            self._live_buffers -= 1
            if buf is not None and not self._cancelled and len(buf) > 0:
                self._free.append(buf)
            self._cond.notify_all()

    def _submit(self, part_number: int, buf: bytearray, length: int) -> None:
        try:
            if part_number == 1 and self._before_first_part is not None:
                self._before_first_part()
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=self._max_concurrency,
                    thread_name_prefix=self._thread_name_prefix,
                )
            self._futures.append(self._executor.submit(self._run_part, part_number, buf, length))
        except BaseException:
            self._release(buf)
            raise

    def _run_part(self, part_number: int, buf: bytearray, length: int) -> None:
        try:
            with self._cond:
                if self._error is not None or self._cancelled:
                    return
            token = self._send_part(part_number, memoryview(buf)[:length])
            with self._cond:
                self._tokens[part_number] = token
                self.stats.parts_sent += 1
                self.stats.bytes_sent += length
        except BaseException as e:  # incl. KeyboardInterrupt: handed to the writer thread
            with self._cond:
                if self._error is None:
                    self._error = e
                self._cond.notify_all()
        finally:
            self._release(buf)

    def _shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        with self._cond:
            self._free.clear()


def abort_stale_uploads(
    storage: Storage,
    prefix_url: str,
    older_than_secs: float,
    *,
    now_secs: float | None = None,
) -> list[PendingUpload]:
    """Abort unfinished uploads under ``prefix_url`` started more than ``older_than_secs`` ago
    (what crashed writers leave behind; they cost storage until aborted). Works on any
    :class:`~cloudckpt.storage.base.Storage`; uploads without a start time are left alone.
    Returns the aborted uploads."""
    if older_than_secs < 0:
        raise ValueError(f"older_than_secs must be >= 0, got {older_than_secs}")
    now = time.time() if now_secs is None else now_secs
    aborted: list[PendingUpload] = []
    for pending in storage.list_pending_uploads(prefix_url):
        if pending.initiated_secs is None or now - pending.initiated_secs < older_than_secs:
            continue
        logger.info(
            "aborting stale upload %s of %s (started %.0f s ago)",
            pending.upload_id,
            pending.url,
            now - pending.initiated_secs,
        )
        storage.abort_pending_upload(pending)
        aborted.append(pending)
    return aborted
