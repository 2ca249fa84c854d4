"""Parallel ranged reads of one object straight into destination memory.

A read plan is a list of ``(offset, destination)`` pairs. Neighbours closer than
``coalesce_gap_bytes`` are fetched by one request (the gap bytes are skipped, not stored),
ranges longer than ``range_size_bytes`` are split, and groups run on a bounded thread pool.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from .config import DownloadConfig
from .storage.base import Storage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RangeRead:
    """Fill ``dest`` with the object's bytes ``[offset, offset + len(dest))``."""

    offset: int
    dest: memoryview

    @property
    def end(self) -> int:
        return self.offset + self.dest.nbytes


@dataclass(frozen=True)
class ReadGroup:
    """One request: starts at ``offset``; ``targets`` alternate buffers and skipped gaps."""

    offset: int
    targets: tuple[memoryview | int, ...]
    #: for each buffer in ``targets``, the index of the read it belongs to
    owners: tuple[int, ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(t if isinstance(t, int) else t.nbytes for t in self.targets)


def tensor_memoryview(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (any dtype, bf16/fp8 too)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("tensor_memoryview needs a contiguous CPU tensor")
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return memoryview(b"").cast("B")
    return memoryview((ctypes.c_char * nbytes).from_address(t.data_ptr())).cast("B")


def plan_reads(reads: Sequence[RangeRead], config: DownloadConfig) -> list[ReadGroup]:
    """Coalesce, then split ``reads`` into requests (pure; sorted by offset).

    Neighbours closer than ``coalesce_gap_bytes`` are merged into one span first; each span is
    then cut into requests of at most ``range_size_bytes`` (gaps included). Small tensors thus
    ride along with their big neighbours instead of costing a GET each.
    """
    limit = config.range_size_bytes
    index = {id(r): i for i, r in enumerate(reads)}
    ordered = sorted((r for r in reads if r.dest.nbytes), key=lambda r: r.offset)
    spans: list[list[RangeRead]] = []
    span_end = 0
    for r in ordered:
        if spans and 0 <= r.offset - span_end <= config.coalesce_gap_bytes:
            spans[-1].append(r)
        else:
            spans.append([r])
        span_end = r.end if len(spans[-1]) == 1 else max(span_end, r.end)

    groups: list[ReadGroup] = []
    for span in spans:
        start = pos = span[0].offset
        cur: list[memoryview | int] = []
        owners: list[int] = []
        size = 0
        for r in span:
            gap = r.offset - pos
            if gap:
                if cur and size + gap > limit:
                    groups.append(ReadGroup(start, tuple(cur), tuple(owners)))
                    start, cur, owners, size = r.offset, [], [], 0
                else:
                    cur.append(gap)
                    size += gap
                pos = r.offset
            done = 0
            while done < r.dest.nbytes:
                if size == limit:
                    groups.append(ReadGroup(start, tuple(cur), tuple(owners)))
                    start, cur, owners, size = pos, [], [], 0
                take = min(limit - size, r.dest.nbytes - done)
                cur.append(r.dest[done : done + take])
                owners.append(index[id(r)])
                size += take
                done += take
                pos += take
        if cur:
            groups.append(ReadGroup(start, tuple(cur), tuple(owners)))
    groups.sort(key=lambda g: g.offset)  # overlapping reads make spans that interleave
    return groups


def fetch(
    storage: Storage,
    url: str,
    reads: Sequence[RangeRead],
    config: DownloadConfig,
    *,
    version: str | None = None,
    on_read_done: Callable[[int], None] | None = None,
) -> int:
    """Run ``reads`` against ``url`` concurrently; returns the bytes requested from the store.

    ``on_read_done(i)`` runs in the fetching thread as soon as every byte of ``reads[i]`` has
    arrived (e.g. to verify it while other requests are still in flight); an exception it
    raises fails the fetch. The first failure cancels what has not started and is re-raised.
    """
    groups = plan_reads(reads, config)
    if not groups:
        return 0
    total = sum(g.nbytes for g in groups)
    logger.debug("fetching %d bytes of %s in %d requests", total, url, len(groups))
    remaining: dict[int, int] = {}
    for g in groups:
        for i in g.owners:
            remaining[i] = remaining.get(i, 0) + 1
    lock = threading.Lock()

    def run(g: ReadGroup) -> None:
        storage.read_into_many(url, g.offset, list(g.targets), version=version)
        if on_read_done is None:
            return
        finished = []
        with lock:
            for i in g.owners:
                remaining[i] -= 1
                if remaining[i] == 0:
                    finished.append(i)
        for i in finished:
            on_read_done(i)

    if len(groups) == 1 or config.max_concurrency == 1:
        for g in groups:
            run(g)
        return total
    with ThreadPoolExecutor(
        max_workers=min(config.max_concurrency, len(groups)), thread_name_prefix="cloudckpt-fetch"
    ) as pool:
        futures = [pool.submit(run, g) for g in groups]
        _, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for f in pending:
            f.cancel()
        for f in futures:
            if f.done() and not f.cancelled() and f.exception() is not None:
                raise f.exception()  # type: ignore[misc]
    return total
