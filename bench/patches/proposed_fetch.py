"""PROTOTYPE for an A/B run, not project code: ``python -m bench.bench_load --patch
bench/patches/proposed_fetch.py`` applies it (monkeypatch) in the child of the row
``exp:cloudckpt+patch``, beside the unpatched ``cloudckpt`` row. What it sizes, for
``cloudckpt/fetch.py`` + ``cloudckpt/reader.py``:

1. plan: coalesce first (gaps <= coalesce_gap_bytes), THEN cut the merged spans into windows of
   at most range_size_bytes: small storages ride along with their neighbours instead of costing
   a GET each (the 4 KiB biases between 32 MiB weights: 64 GETs -> 33).
2. verify in the fetch threads: the worker that completes a storage's last piece computes its
   CRC32C right away (overlapping the other GETs); the reader's _verify then only compares.
"""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import cloudckpt.reader as R
from cloudckpt.checksum import crc32c

_orig_verify = R._verify
_crcs: dict[int, int] = {}


def plan(reads, config):
    items = sorted((r.offset, i, r.dest) for i, r in enumerate(reads) if r.dest.nbytes)
    spans = []  # [start, end, [(offset, idx, dest)]]
    for off, i, dest in items:
        if spans and 0 <= off - spans[-1][1] <= config.coalesce_gap_bytes:
            spans[-1][1] = off + dest.nbytes
            spans[-1][2].append((off, i, dest))
        else:
            spans.append([off, off + dest.nbytes, [(off, i, dest)]])
    groups = []  # (offset, targets, idxs)
    limit = config.range_size_bytes
    for start, _end, members in spans:
        cur_off, cur, idxs, size, pos = start, [], [], 0, start
        for off, i, dest in members:
            if off > pos:  # gap
                gap = off - pos
                if size + gap > limit and cur:
                    groups.append((cur_off, cur, idxs))
                    cur_off, cur, idxs, size = off, [], [], 0
                else:
                    cur.append(gap)
                    size += gap
                pos = off
            view, done = dest, 0
            while done < view.nbytes:
                room = limit - size
                if room == 0:
                    groups.append((cur_off, cur, idxs))
                    cur_off, cur, idxs, size = pos, [], [], 0
                    room = limit
                take = min(room, view.nbytes - done)
                cur.append(view[done : done + take])
                idxs.append(i)
                size += take
                done += take
                pos += take
        if cur:
            groups.append((cur_off, cur, idxs))
    return groups


def fetch(storage, url, reads, config, *, version=None):
    groups = plan(reads, config)
    if not groups:
        return 0
    remaining: dict[int, int] = {}
    for _, _, idxs in groups:
        for i in idxs:
            remaining[i] = remaining.get(i, 0) + 1
    lock = threading.Lock()

    def run(g):
        off, targets, idxs = g
        storage.read_into_many(url, off, list(targets), version=version)
        for i in idxs:
            with lock:
                remaining[i] -= 1
                last = remaining[i] == 0
            if last:
                r = reads[i]
                _crcs[r.offset] = crc32c(r.dest)

    with ThreadPoolExecutor(max_workers=min(config.max_concurrency, len(groups))) as pool:
        futures = [pool.submit(run, g) for g in groups]
        _, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for f in pending:
            f.cancel()
        for f in futures:
            if f.done() and not f.cancelled() and f.exception() is not None:
                raise f.exception()
    return sum(t if isinstance(t, int) else t.nbytes for _, ts, _ in groups for t in ts)


def _verify(span, data, obj_url, rank, layout):
    crc = _crcs.pop(span.offset, None)
    if crc is not None and crc == span.crc32c:
        return
    _orig_verify(span, data, obj_url, rank, layout)


R.fetch = fetch
R._verify = _verify
