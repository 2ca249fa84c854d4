"""cloudckpt.fetch: read planning (pure), parallel execution against a fake in-memory store,
and writable byte views of tensors."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudckpt.config import DownloadConfig, StorageConfig
from cloudckpt.errors import NotFoundError, ObjectChangedError
from cloudckpt.fetch import RangeRead, ReadGroup, fetch, plan_reads, tensor_memoryview
from cloudckpt.format import serialize
from cloudckpt.storage.base import ObjectInfo, Storage, Upload

URL = "memory://bucket/ckpt/checkpoint_0.pt"


class BytesStorage(Storage):
    """A read-only store holding one object; records every request."""

    def __init__(self, data: bytes, *, version: str | None = None) -> None:
        super().__init__(StorageConfig())
        self.data = data
        self.version = version
        self.lock = threading.Lock()
        self.read_into_calls: list[tuple[int, int]] = []
        self.many_calls: list[tuple[int, int, str]] = []  # offset, nbytes, thread name
        self.fail_at: dict[int, BaseException] = {}

    def _check(self, url: str, version: str | None) -> None:
        if url != URL:
            raise NotFoundError("no such object", url=url)
        if version is not None and version != self.version:
            raise ObjectChangedError("object changed", url=url)

    def read_into(
        self, url: str, offset: int, buf: memoryview, *, version: str | None = None
    ) -> None:
        self._check(url, version)
        with self.lock:
            self.read_into_calls.append((offset, buf.nbytes))
        if offset in self.fail_at:
            raise self.fail_at[offset]
        chunk = self.data[offset : offset + buf.nbytes]
        if len(chunk) != buf.nbytes:
            raise NotFoundError(f"short read at {offset}", url=url)
        buf[:] = chunk

    def read_into_many(
        self,
        url: str,
        offset: int,
        targets: list[memoryview | int],
        *,
        version: str | None = None,
    ) -> None:
        nbytes = sum(t if isinstance(t, int) else t.nbytes for t in targets)
        with self.lock:
            self.many_calls.append((offset, nbytes, threading.current_thread().name))
        # The base class scatters the request over read_into calls.
        super().read_into_many(url, offset, targets, version=version)

    # --- unused by fetch --------------------------------------------------------------------
    def open_upload(self, url: str, *, size_hint_bytes: int | None = None) -> Upload:
        raise NotImplementedError

    def put_bytes(self, url: str, data: bytes, *, if_absent: bool = False) -> ObjectInfo:
        raise NotImplementedError

    def head(self, url: str) -> ObjectInfo:
        self._check(url, None)
        return ObjectInfo(url, len(self.data), self.version)

    def get_bytes(
        self, url: str, start: int = 0, end: int | None = None, *, version: str | None = None
    ) -> bytes:
        self._check(url, version)
        return self.data[start:end]

    def list(self, prefix_url: str) -> list[ObjectInfo]:
        return [self.head(URL)] if URL.startswith(prefix_url) else []

    def delete(self, urls: Iterable[str]) -> None:
        raise NotImplementedError


def object_bytes(n: int = 4096) -> bytes:
    return bytes((i * 37 + 11) % 251 for i in range(n))


def reads_of(spec: list[tuple[int, int]]) -> list[RangeRead]:
    return [RangeRead(off, memoryview(bytearray(n))) for off, n in spec]


def cfg(range_size: int = 1 << 20, gap: int = 0, concurrency: int = 4) -> DownloadConfig:
    return DownloadConfig(
        range_size_bytes=range_size, coalesce_gap_bytes=gap, max_concurrency=concurrency
    )


def simulate(groups: list[ReadGroup], data: bytes) -> None:
    """Execute a plan against ``data`` the way a single-request backend would."""
    for g in groups:
        pos = g.offset
        for t in g.targets:
            if isinstance(t, int):
                pos += t
            else:
                t[:] = data[pos : pos + t.nbytes]
                pos += t.nbytes


def layout(groups: list[ReadGroup]) -> list[tuple[int, list[int | str]]]:
    """A plan as (offset, [buffer sizes as 'Nb', gaps as ints])."""
    return [
        (g.offset, [t if isinstance(t, int) else f"{t.nbytes}b" for t in g.targets]) for g in groups
    ]


# --- plan_reads ----------------------------------------------------------------------------


def test_neighbours_within_the_gap_are_coalesced() -> None:
    groups = plan_reads(reads_of([(0, 10), (15, 10), (25, 5)]), cfg(gap=5))
    assert layout(groups) == [(0, ["10b", 5, "10b", "5b"])]
    assert groups[0].nbytes == 30


def test_gap_one_byte_too_wide_is_not_coalesced() -> None:
    groups = plan_reads(reads_of([(0, 10), (16, 10)]), cfg(gap=5))
    assert layout(groups) == [(0, ["10b"]), (16, ["10b"])]


def test_adjacent_reads_coalesce_even_with_zero_gap() -> None:
    groups = plan_reads(reads_of([(0, 10), (10, 10)]), cfg(gap=0))
    assert layout(groups) == [(0, ["10b", "10b"])]


def test_coalescing_never_exceeds_range_size() -> None:
    groups = plan_reads(reads_of([(i * 10, 10) for i in range(7)]), cfg(range_size=25, gap=0))
    # coalesced first, then cut into full windows: reads may straddle two requests
    assert layout(groups) == [
        (0, ["10b", "10b", "5b"]),
        (25, ["5b", "10b", "10b"]),
        (50, ["10b", "10b"]),
    ]
    # the gap counts too
    groups = plan_reads(reads_of([(0, 10), (14, 10)]), cfg(range_size=23, gap=8))
    assert layout(groups) == [(0, ["10b", 4, "9b"]), (23, ["1b"])]
    groups = plan_reads(reads_of([(0, 10), (14, 10)]), cfg(range_size=24, gap=8))
    assert layout(groups) == [(0, ["10b", 4, "10b"])]


def test_large_reads_are_split() -> None:
    (read,) = reads_of([(1000, 100)])
    groups = plan_reads([read], cfg(range_size=32, gap=1000))
    assert layout(groups) == [
        (1000, ["32b"]),
        (1032, ["32b"]),
        (1064, ["32b"]),
        (1096, ["4b"]),
    ]
    # the pieces are views of the destination, not copies
    data = object_bytes(2000)
    simulate(groups, data)
    assert bytes(read.dest) == data[1000:1100]


def test_empty_reads_are_skipped() -> None:
    assert plan_reads(reads_of([(5, 0), (100, 0)]), cfg()) == []
    assert plan_reads([], cfg()) == []
    groups = plan_reads(reads_of([(5, 0), (10, 3), (50, 0)]), cfg(gap=100))
    assert layout(groups) == [(10, ["3b"])]


def test_plan_is_sorted_by_offset() -> None:
    reads = reads_of([(300, 10), (0, 10), (150, 10)])
    groups = plan_reads(reads, cfg(gap=0))
    assert [g.offset for g in groups] == [0, 150, 300]
    data = object_bytes(400)
    simulate(groups, data)
    for r in reads:
        assert bytes(r.dest) == data[r.offset : r.end]


def test_overlapping_reads_each_get_their_bytes() -> None:
    reads = reads_of([(0, 20), (10, 20), (10, 5)])
    groups = plan_reads(reads, cfg(gap=100))
    data = object_bytes(100)
    simulate(groups, data)
    for r in reads:
        assert bytes(r.dest) == data[r.offset : r.end]


@st.composite
def read_plans(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, int]], DownloadConfig]:
    size = draw(st.integers(1, 3000))
    spec = draw(
        st.lists(
            st.integers(0, size - 1).flatmap(
                lambda off: st.tuples(st.just(off), st.integers(0, min(size - off, 400)))
            ),
            max_size=25,
        )
    )
    config = cfg(
        range_size=draw(st.integers(1, 512)),
        gap=draw(st.integers(0, 128)),
        concurrency=draw(st.integers(1, 4)),
    )
    return object_bytes(size), spec, config


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(read_plans())
def test_random_plans_preserve_the_byte_mapping(
    plan: tuple[bytes, list[tuple[int, int]], DownloadConfig],
) -> None:
    data, spec, config = plan
    reads = reads_of(spec)
    groups = plan_reads(reads, config)

    offsets = [g.offset for g in groups]
    assert offsets == sorted(offsets)
    requested = 0
    for g in groups:
        assert 0 < g.nbytes <= config.range_size_bytes
        assert not isinstance(g.targets[0], int)
        assert not isinstance(g.targets[-1], int)
        for t in g.targets:
            if isinstance(t, int):
                assert 0 < t <= config.coalesce_gap_bytes
            else:
                assert t.nbytes > 0
                requested += t.nbytes
    assert requested == sum(n for _, n in spec)

    simulate(groups, data)
    for r in reads:
        assert bytes(r.dest) == data[r.offset : r.end]

    # the same plan through the Storage interface (default read_into_many)
    fresh = reads_of(spec)
    store = BytesStorage(data)
    total = fetch(store, URL, fresh, config)
    assert total == sum(g.nbytes for g in groups)
    for r in fresh:
        assert bytes(r.dest) == data[r.offset : r.end]


# --- fetch ---------------------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 2, 8])
def test_fetch_fills_every_destination(concurrency: int) -> None:
    data = object_bytes(10_000)
    spec = [(i * 300 + (i % 3), 100 + 10 * i) for i in range(30)]
    reads = reads_of(spec)
    store = BytesStorage(data, version="v1")
    config = cfg(range_size=256, gap=16, concurrency=concurrency)
    total = fetch(store, URL, reads, config, version="v1")
    for r in reads:
        assert bytes(r.dest) == data[r.offset : r.end]
    groups = plan_reads(reads_of(spec), config)
    assert total == sum(g.nbytes for g in groups)
    assert sorted((off, n) for off, n, _ in store.many_calls) == [
        (g.offset, g.nbytes) for g in groups
    ]
    threads = {name for _, _, name in store.many_calls}
    if concurrency == 1:
        assert threads == {threading.current_thread().name}
        assert [off for off, _, _ in store.many_calls] == [g.offset for g in groups]
    else:
        assert all(name.startswith("cloudckpt-fetch") for name in threads)
        assert len(threads) <= concurrency


def test_fetch_single_group_runs_in_the_caller() -> None:
    data = object_bytes(100)
    reads = reads_of([(10, 5), (20, 5)])
    store = BytesStorage(data)
    assert fetch(store, URL, reads, cfg(gap=10, concurrency=8)) == 15
    assert store.many_calls == [(10, 15, threading.current_thread().name)]
    # gaps are skipped, not read
    assert store.read_into_calls == [(10, 5), (20, 5)]


def test_fetch_nothing() -> None:
    store = BytesStorage(b"abc")
    assert fetch(store, URL, [], cfg()) == 0
    assert fetch(store, URL, reads_of([(1, 0)]), cfg()) == 0
    assert store.many_calls == []


@pytest.mark.parametrize("concurrency", [1, 4])
def test_an_error_in_one_read_propagates(concurrency: int) -> None:
    data = object_bytes(5000)
    reads = reads_of([(i * 500, 100) for i in range(10)])
    store = BytesStorage(data)
    boom = NotFoundError("object vanished", url=URL, rank=2)
    store.fail_at[2500] = boom
    with pytest.raises(NotFoundError) as excinfo:
        fetch(store, URL, reads, cfg(range_size=100, gap=0, concurrency=concurrency))
    assert excinfo.value is boom
    if concurrency == 1:  # sequential: the reads after the failing one never ran
        assert [off for off, _ in store.read_into_calls] == [0, 500, 1000, 1500, 2000, 2500]


def test_version_mismatch_propagates() -> None:
    store = BytesStorage(object_bytes(100), version="v2")
    with pytest.raises(ObjectChangedError):
        fetch(store, URL, reads_of([(0, 10), (50, 10)]), cfg(concurrency=2), version="v1")


# --- tensor_memoryview ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype",
    [torch.bfloat16, torch.bool, torch.complex64, torch.float8_e4m3fn, torch.int64, torch.float16],
    ids=str,
)
def test_writes_through_the_view_land_in_the_tensor(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (24 * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        raw = raw % 2
    want = raw.view(dtype).reshape(4, 6)
    t = torch.zeros(4, 6, dtype=dtype)
    view = tensor_memoryview(t)
    assert view.format == "B"
    assert not view.readonly
    assert view.nbytes == t.numel() * t.element_size()
    view[:] = raw.numpy().tobytes()
    assert torch.equal(t.reshape(-1).view(torch.uint8), raw)
    assert torch.equal(t.view(torch.uint8), want.view(torch.uint8))


def test_view_of_a_contiguous_slice_covers_only_the_slice() -> None:
    base = torch.zeros(10, dtype=torch.int32)
    part = base[3:6]
    view = tensor_memoryview(part)
    assert view.nbytes == 12
    view[:] = torch.tensor([7, 8, 9], dtype=torch.int32).numpy().tobytes()
    assert base.tolist() == [0, 0, 0, 7, 8, 9, 0, 0, 0, 0]


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.zeros(3, 4).t(),
        lambda: torch.zeros(10)[::2],
        lambda: torch.zeros(4, 4)[:, 1:3],
        lambda: torch.zeros(3, device="meta"),
    ],
    ids=["transposed", "stepped", "column-slice", "meta"],
)
def test_refuses_non_contiguous_or_non_cpu_tensors(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="contiguous CPU tensor"):
        tensor_memoryview(make())


def test_empty_tensor_gives_an_empty_view() -> None:
    assert tensor_memoryview(torch.empty(0, 3)).nbytes == 0


def test_fetch_into_tensors_from_a_serialized_object() -> None:
    """End to end on the pure pieces: the layout's storage spans read back into fresh tensors
    through tensor_memoryview equal the saved tensors bitwise."""
    gen = torch.Generator().manual_seed(5)
    obj = {
        "a": torch.randn(64, 33, generator=gen).to(torch.bfloat16),
        "b": torch.randint(0, 2, (100,), generator=gen).bool(),
        "c": torch.randn(17, generator=gen, dtype=torch.float32).to(torch.complex64),
        "d": torch.arange(4, dtype=torch.float32),
    }
    out = io.BytesIO()
    layout = serialize(obj, out)
    store = BytesStorage(out.getvalue())
    targets = {}
    reads = []
    for spec in layout.tensors:
        src = obj[spec.path[0]]
        t = torch.empty_like(src)
        targets[spec.path[0]] = t
        reads.append(RangeRead(layout.storage(spec.storage_key).offset, tensor_memoryview(t)))
    fetch(store, URL, reads, cfg(range_size=1024, gap=64, concurrency=3))
    for key, t in targets.items():
        assert torch.equal(t.view(torch.uint8), obj[key].view(torch.uint8)), key


@pytest.mark.parametrize("concurrency", [1, 4])
def test_on_read_done_fires_once_per_read_after_all_its_bytes(concurrency: int) -> None:
    data = object_bytes(4096)
    store = BytesStorage(data)
    spec = [(0, 100), (100, 900), (1500, 2000), (3600, 400)]  # split, coalesced and alone
    reads = reads_of(spec)
    seen: list[int] = []
    lock = threading.Lock()

    def done(i: int) -> None:
        off, n = spec[i]
        assert bytes(reads[i].dest) == data[off : off + n]  # complete when reported
        with lock:
            seen.append(i)

    fetch(store, URL, reads, cfg(range_size=512, gap=64, concurrency=concurrency), on_read_done=done)
    assert sorted(seen) == [0, 1, 2, 3]


def test_an_error_in_on_read_done_fails_the_fetch() -> None:
    store = BytesStorage(object_bytes(1024))

    def done(i: int) -> None:
        raise ValueError(f"read {i} is bad")

    with pytest.raises(ValueError, match="read 0 is bad"):
        fetch(store, URL, reads_of([(0, 100)]), cfg(), on_read_done=done)
