"""Part sizing, the part chunker and the parallel uploader, without any store."""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterator

import google_crc32c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudckpt.config import (
    S3_MAX_PART_SIZE_BYTES,
    S3_MAX_UPLOAD_PARTS,
    S3_MIN_PART_SIZE_BYTES,
    GiB,
    MiB,
)
from cloudckpt.multipart import (
    GROWTH_EVERY_PARTS,
    S3_MAX_OBJECT_SIZE_BYTES,
    UNIFORM_PARTS_MIN,
    ParallelPartUploader,
    PartChunker,
    PartPlan,
    abort_stale_uploads,
    choose_part_size,
    crc32c_of,
)
from cloudckpt.storage.base import PendingUpload

TiB = 1 << 40


def _chunk(plan: PartPlan, writes: list[bytes], size_hint: int | None = None) -> list[bytes]:
    """The parts a chunker emits for these writes (last partial part included)."""
    parts: list[bytes] = []

    def emit(number: int, buf: bytearray, length: int) -> None:
        assert number == len(parts) + 1
        parts.append(bytes(buf[:length]))

    chunker = PartChunker(plan, emit, size_hint_bytes=size_hint)
    for data in writes:
        chunker.write(data)
    chunker.flush_last()
    return parts


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


# --- part sizing --------------------------------------------------------------------------


def test_choose_part_size_keeps_configured_size_when_it_fits() -> None:
    assert choose_part_size(None, 32 * MiB) == 32 * MiB
    assert choose_part_size(0, 32 * MiB) == 32 * MiB
    assert choose_part_size(100 * GiB, 32 * MiB) == 32 * MiB  # 3 200 parts


def test_choose_part_size_grows_for_large_objects_and_clamps() -> None:
    assert choose_part_size(1 * TiB, 32 * MiB) == 105 * MiB  # ceil(1 TiB / 10 000), MiB-aligned
    assert choose_part_size(None, 1) == S3_MIN_PART_SIZE_BYTES
    assert choose_part_size(S3_MAX_UPLOAD_PARTS * S3_MAX_PART_SIZE_BYTES, 5 * MiB) == (
        S3_MAX_PART_SIZE_BYTES
    )
    with pytest.raises(ValueError, match="cannot be uploaded"):
        choose_part_size(S3_MAX_UPLOAD_PARTS * S3_MAX_PART_SIZE_BYTES + 1, 5 * MiB)
    with pytest.raises(ValueError):
        choose_part_size(-1, 5 * MiB)


@settings(max_examples=300, deadline=None)
@given(
    size=st.integers(min_value=0, max_value=S3_MAX_OBJECT_SIZE_BYTES),
    configured=st.integers(min_value=S3_MIN_PART_SIZE_BYTES, max_value=S3_MAX_PART_SIZE_BYTES),
)
def test_known_sizes_up_to_5_tib_never_exceed_10_000_parts(size: int, configured: int) -> None:
    part = choose_part_size(size, configured)
    assert S3_MIN_PART_SIZE_BYTES <= part <= S3_MAX_PART_SIZE_BYTES
    assert -(-size // part) <= S3_MAX_UPLOAD_PARTS
    plan = PartPlan.for_stream(size, configured)
    parts = -(-size // plan.base_part_size_bytes)
    assert parts <= plan.uniform_parts  # the hinted size is covered by uniform parts


def test_known_size_edge_cases() -> None:
    for size in (S3_MAX_OBJECT_SIZE_BYTES, S3_MAX_OBJECT_SIZE_BYTES - 1, 10_000 * 5 * MiB + 1):
        part = choose_part_size(size, 5 * MiB)
        assert -(-size // part) <= S3_MAX_UPLOAD_PARTS


@pytest.mark.parametrize(
    "base",
    [S3_MIN_PART_SIZE_BYTES, 5 * MiB + 1, 8 * MiB, 32 * MiB, 1 * GiB, S3_MAX_PART_SIZE_BYTES],
)
def test_unknown_size_stream_reaches_5_tib_before_part_10_001(base: int) -> None:
    plan = PartPlan.for_stream(None, base)
    assert plan.capacity_bytes() >= S3_MAX_OBJECT_SIZE_BYTES
    sizes = [plan.part_size(n) for n in range(1, S3_MAX_UPLOAD_PARTS + 1)]
    assert plan.capacity_bytes() == sum(sizes)
    assert plan.capacity_bytes(1234) == sum(sizes[:1234])
    assert all(S3_MIN_PART_SIZE_BYTES <= s <= S3_MAX_PART_SIZE_BYTES for s in sizes)
    assert sizes == sorted(sizes)  # never shrinks
    assert set(sizes[:UNIFORM_PARTS_MIN]) == {plan.base_part_size_bytes}
    with pytest.raises(ValueError, match="outside"):
        plan.part_size(S3_MAX_UPLOAD_PARTS + 1)


@settings(max_examples=200, deadline=None)
@given(base=st.integers(min_value=S3_MIN_PART_SIZE_BYTES, max_value=S3_MAX_PART_SIZE_BYTES))
def test_unknown_size_capacity_property(base: int) -> None:
    assert PartPlan.for_stream(None, base).capacity_bytes() >= S3_MAX_OBJECT_SIZE_BYTES


def test_part_size_growth_is_a_function_of_the_part_number_only() -> None:
    plan = PartPlan(5 * MiB, uniform_parts=2)
    assert [plan.part_size(n) for n in (1, 2, 3)] == [5 * MiB, 5 * MiB, 10 * MiB]
    assert plan.part_size(2 + GROWTH_EVERY_PARTS) == 10 * MiB
    assert plan.part_size(3 + GROWTH_EVERY_PARTS) == 20 * MiB
    assert plan.part_size(S3_MAX_UPLOAD_PARTS) == S3_MAX_PART_SIZE_BYTES


# --- chunker ------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(min_size=0, max_size=600),
    cuts_a=st.lists(st.integers(min_value=0, max_value=10_000), max_size=40),
    cuts_b=st.lists(st.integers(min_value=0, max_value=10_000), max_size=40),
    base=st.integers(min_value=1, max_value=50),
    uniform=st.integers(min_value=1, max_value=5),
)
def test_part_boundaries_do_not_depend_on_write_sizes(
    data: bytes, cuts_a: list[int], cuts_b: list[int], base: int, uniform: int
) -> None:
    plan = PartPlan(base, uniform_parts=uniform, max_part_size_bytes=base * 8, max_parts=10_000)
    parts_a = _chunk(plan, _split(data, cuts_a))
    parts_b = _chunk(plan, _split(data, cuts_b))
    assert parts_a == parts_b
    assert b"".join(parts_a) == data
    assert [len(p) for p in parts_a[:-1]] == [plan.part_size(n) for n in range(1, len(parts_a))]


@settings(max_examples=100, deadline=None)
@given(
    data=st.binary(min_size=0, max_size=300),
    cuts=st.lists(st.integers(min_value=0, max_value=1_000), max_size=20),
    hint=st.integers(min_value=0, max_value=400),
)
def test_wrong_size_hints_do_not_change_boundaries(data: bytes, cuts: list[int], hint: int) -> None:
    plan = PartPlan(64, uniform_parts=3, max_part_size_bytes=256)
    assert _chunk(plan, _split(data, cuts), size_hint=hint) == _chunk(plan, [data])


def test_12_mib_in_one_write_equals_12_288_writes_of_1_kib() -> None:
    data = os.urandom(12 * MiB)
    plan = PartPlan.for_stream(None, 5 * MiB)
    one = _chunk(plan, [data])
    writes = [data[i : i + 1024] for i in range(0, len(data), 1024)]
    assert len(writes) == 12_288
    many = _chunk(plan, writes)
    assert [len(p) for p in one] == [5 * MiB, 5 * MiB, 2 * MiB]
    assert one == many


def test_chunker_accepts_any_buffer_and_copies_each_byte_into_part_buffers() -> None:
    allocated: list[bytearray] = []

    def acquire(capacity: int) -> bytearray:
        allocated.append(bytearray(capacity))
        return allocated[-1]

    emitted: list[tuple[int, int]] = []
    chunker = PartChunker(
        PartPlan(4, uniform_parts=100),
        lambda n, buf, length: emitted.append((n, length)),
        acquire=acquire,
    )
    chunker.write(memoryview(bytearray(b"abcdef")))
    chunker.write(memoryview(b"\x01\x02\x03\x04").cast("B"))
    chunker.write(memoryview(bytes(8)).cast("I"))  # non-byte format: counted in bytes
    assert chunker.position == 18
    assert emitted == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert bytes(chunker.buffered()) == bytes(2)
    assert all(len(b) == 4 for b in allocated)


def test_small_size_hint_allocates_small_first_buffer() -> None:
    sizes: list[int] = []

    def acquire(capacity: int) -> bytearray:
        sizes.append(capacity)
        return bytearray(capacity)

    parts: list[bytes] = []
    chunker = PartChunker(
        PartPlan(5 * MiB),
        lambda n, buf, length: parts.append(bytes(buf[:length])),
        acquire=acquire,
        size_hint_bytes=10,
    )
    chunker.write(b"0123456789")
    chunker.flush_last()
    assert sizes == [10]
    assert parts == [b"0123456789"]


def test_flush_last_forces_an_empty_part_only_when_nothing_was_sent() -> None:
    parts: list[tuple[int, int]] = []
    chunker = PartChunker(PartPlan(4), lambda n, buf, length: parts.append((n, length)))
    assert chunker.flush_last() is False
    assert chunker.flush_last(force=True) is True
    assert parts == [(1, 0)]


def test_crc32c_of_views_matches_bytes_without_copying() -> None:
    data = bytearray(os.urandom(100_000))
    expected = google_crc32c.value(bytes(data[10:90_000]))
    assert crc32c_of(memoryview(data)[10:90_000]) == expected
    assert crc32c_of(bytes(data[10:90_000])) == expected
    assert crc32c_of(memoryview(bytes(data))[10:90_000]) == expected
    assert crc32c_of(bytearray()) == google_crc32c.value(b"")
    data.append(1)  # no export left behind: the buffer can still be resized


# --- parallel uploader ----------------------------------------------------------------------


class _GatedSender:
    """send_part that blocks until released, recording concurrency and parts."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.released = False
        self.in_flight = 0
        self.max_in_flight = 0
        self.parts: dict[int, bytes] = {}
        self.fail_part: int | None = None
        self.fail_with: BaseException = RuntimeError("part failed")

    def __call__(self, number: int, view: memoryview) -> str:
        with self.cond:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.released, timeout=30)
            self.in_flight -= 1
        if number == self.fail_part:
            raise self.fail_with
        self.parts[number] = bytes(view)
        return f"etag-{number}"

    def wait_in_flight(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.in_flight >= n, timeout=30)

    def release(self) -> None:
        with self.cond:
            self.released = True
            self.cond.notify_all()


@pytest.fixture
def sender() -> Iterator[_GatedSender]:
    s = _GatedSender()
    yield s
    s.release()


def test_uploader_back_pressure_bounds_buffers(sender: _GatedSender) -> None:
    part = 1000
    concurrency = 2
    data = os.urandom(part * 10 + 123)
    up: ParallelPartUploader[str] = ParallelPartUploader(
        sender, PartPlan(part), max_concurrency=concurrency
    )
    done = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(0, len(data), 100):
                up.write(data[i : i + 100])
        except BaseException as e:
            errors.append(e)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    sender.wait_in_flight(concurrency)
    # With every send blocked, the writer can fill at most one more buffer, then must wait.
    assert up.live_buffers <= concurrency + 1
    assert up.bytes_written <= (concurrency + 1) * part
    assert not done.is_set() or errors
    sender.release()
    thread.join(timeout=30)
    assert not errors
    tokens = up.finish()
    assert [n for n, _ in tokens] == list(range(1, 12))
    assert [t for _, t in tokens] == [f"etag-{n}" for n in range(1, 12)]
    assert b"".join(sender.parts[n] for n in sorted(sender.parts)) == data
    assert sender.max_in_flight <= concurrency
    assert up.stats.max_live_buffers <= concurrency + 1
    assert up.stats.buffers_allocated <= concurrency + 1  # recycled, not reallocated
    assert up.stats.bytes_sent == len(data)


def test_uploader_failed_part_stops_further_sends(sender: _GatedSender) -> None:
    sender.fail_part = 2
    sender.release()
    up: ParallelPartUploader[str] = ParallelPartUploader(sender, PartPlan(10), max_concurrency=2)
    with pytest.raises(RuntimeError, match="part failed"):
        for _ in range(1000):
            up.write(b"x" * 10)
        up.finish()
    up.cancel()
    assert 2 not in sender.parts
    assert len(sender.parts) < 1000
    with pytest.raises(ValueError, match="cancelled"):
        up.write(b"x")


def test_uploader_propagates_keyboard_interrupt(sender: _GatedSender) -> None:
    sender.fail_part = 1
    sender.fail_with = KeyboardInterrupt()
    sender.release()
    up: ParallelPartUploader[str] = ParallelPartUploader(sender, PartPlan(10), max_concurrency=1)
    up.write(b"y" * 10)
    with pytest.raises(KeyboardInterrupt):
        up.finish()
    up.cancel()


def test_uploader_cancel_waits_for_in_flight_parts(sender: _GatedSender) -> None:
    up: ParallelPartUploader[str] = ParallelPartUploader(sender, PartPlan(10), max_concurrency=2)
    up.write(b"z" * 20)
    sender.wait_in_flight(2)
    canceller = threading.Thread(target=up.cancel)
    canceller.start()
    sender.release()
    canceller.join(timeout=30)
    assert not canceller.is_alive()
    assert sender.in_flight == 0


def test_uploader_runs_hook_before_first_part_and_sends_empty_stream(
    sender: _GatedSender,
) -> None:
    sender.release()
    calls: list[str] = []
    up: ParallelPartUploader[str] = ParallelPartUploader(
        sender, PartPlan(10), max_concurrency=1, before_first_part=lambda: calls.append("start")
    )
    assert up.finish() == [(1, "etag-1")]
    assert calls == ["start"]
    assert sender.parts == {1: b""}


# --- abort_stale_uploads ------------------------------------------------------------------------


class _FakeStorage:
    def __init__(self, pending: list[PendingUpload]) -> None:
        self.pending = pending
        self.aborted: list[str] = []

    def list_pending_uploads(self, prefix_url: str) -> list[PendingUpload]:
        return [p for p in self.pending if p.url.startswith(prefix_url)]

    def abort_pending_upload(self, pending: PendingUpload) -> None:
        self.aborted.append(pending.upload_id)


def test_abort_stale_uploads_only_aborts_old_ones() -> None:
    fake = _FakeStorage(
        [
            PendingUpload("s3://b/ck/a", "old", initiated_secs=1_000.0),
            PendingUpload("s3://b/ck/b", "new", initiated_secs=9_000.0),
            PendingUpload("s3://b/ck/c", "unknown", initiated_secs=None),
            PendingUpload("s3://b/other/d", "elsewhere", initiated_secs=0.0),
        ]
    )
    done = abort_stale_uploads(fake, "s3://b/ck", 3_600, now_secs=10_000.0)  # type: ignore[arg-type]
    assert [p.upload_id for p in done] == ["old"]
    assert fake.aborted == ["old"]
    with pytest.raises(ValueError):
        abort_stale_uploads(fake, "s3://b/ck", -1)  # type: ignore[arg-type]
