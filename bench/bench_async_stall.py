"""How long an async save stops the training loop, and what the upload costs it meanwhile.

For a state dict of ``--tensors`` float32 tensors totalling ``--size-mib`` (default 16 x 64 MiB
= 1 GiB), each in a fresh process:

* ``cloudckpt``: ``SaveMetrics.blocked_secs`` (``save()`` entry until the stage future has
  resolved) of ``--saves`` async saves, median of all but the first (which allocates the
  staging buffers), each save waiting for the previous write first so that staging runs
  alone; memcpys (``Tensor.copy_`` of the same bytes into preallocated, warm tensors) are
  timed right before and after each save, in the same process, and the ratio is the median
  of blocked / bracketing memcpy over the saves (a paired comparison: memory bandwidth drifts
  with the neighbours' load on shared hosts, and a new process's first copies run at a
  fraction of it on VMs whose memory the host maps lazily);
* ``upstream``: the same for torch's own ``make_async_checkpointer`` (DefaultStager, torch.save
  writer) writing to a local directory;
* ``new tensors``: then a few saves of a state dict whose tensors are new each time (as when
  it is gathered or rebuilt per save): upstream's stager caches buffers by source storage and
  allocates again, cloudckpt's matches them by size;
* ``loop``: a CPU training loop (256x256 float32 matmuls) while a cloudckpt upload runs in
  the writer subprocess, and alone in equal windows right before and after each upload; the
  slowdown is the ratio of the median iteration rates.

On a CUDA host the ``cloudckpt`` run is repeated with CUDA tensors against a ``copy_`` into
pinned memory. Exits 1 when cloudckpt's blocked time exceeds ``--target`` (1.2) x memcpy.

    python bench/bench_async_stall.py                   # 1 GiB to a temporary directory
    python bench/bench_async_stall.py --size-mib 256    # smaller hosts
    python bench/bench_async_stall.py --url s3://bucket/bench --storage-options '{"endpoint_url": ...}'
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

MiB = 1 << 20
LOOP_MATMUL_SIZE = 256
LOOP_BASELINE_SECS = 3.0
LOOP_UPLOADS = 3
FRESH_SAVES = 3


# --- measurements (each runs in its own process) ----------------------------------------------


def make_state(size_mib: int, tensors: int, device: str) -> dict[str, Any]:
    import torch

    per = size_mib * MiB // tensors // 4
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}": torch.randn(per, generator=g).to(device) for i in range(tensors)}


def make_copy(sd: dict[str, Any], device: str) -> Callable[[], float]:
    """A timed ``copy_`` of every tensor into preallocated CPU tensors (pinned for CUDA)."""
    import torch

    pinned = device == "cuda"
    dst = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=pinned) for k, v in sd.items()}

    def copy() -> float:
        started = time.perf_counter()
        for k, v in sd.items():
            dst[k].copy_(v, non_blocking=pinned)
        if pinned:
            torch.cuda.synchronize()
        return time.perf_counter() - started

    copy()  # fault the pages in, as the stager's buffers are after its first save
    return copy


def drop(url: str, storage: Any | None) -> None:
    if storage is None:
        shutil.rmtree(url, ignore_errors=True)
    else:
        storage.delete([info.url for info in storage.list(url)])


def paired_ratio(blocked: list[float], copies: list[float]) -> float:
    """Median over saves (the first excluded) of blocked time / the memcpy bracketing it."""
    return statistics.median(b / c for b, c in zip(blocked[1:], copies[1:], strict=True))


def timed_saves(
    save: Callable[[str, dict[str, Any]], tuple[float, float]],
    sd: dict[str, Any],
    copy: Callable[[], float],
    url_of: Callable[[str], str],
    cleanup: Callable[[str], None],
    saves: int,
) -> dict[str, Any]:
    """``saves`` saves of ``sd`` bracketed by memcpys, then FRESH_SAVES of new tensors each
    (what a state dict gathered or rebuilt per save looks like: new storages every time)."""
    blocked, committed, copies = [], [], []
    for i in range(saves):
        before = copy()
        url = url_of(f"step-{i}")
        b, c = save(url, sd)
        blocked.append(b)
        committed.append(c)
        copies.append((before + copy()) / 2)  # bracket the save: the load drifts
        cleanup(url)
    fresh = []
    for i in range(FRESH_SAVES):
        sd = {k: v.clone() for k, v in sd.items()}
        url = url_of(f"fresh-{i}")
        fresh.append(save(url, sd)[0])
        cleanup(url)
    return {
        "blocked_secs": statistics.median(blocked[1:]),
        "first_blocked_secs": blocked[0],
        "commit_secs": statistics.median(committed[1:]),
        "memcpy_secs": statistics.median(copies[1:]),
        "ratio": paired_ratio(blocked, copies),
        "fresh_blocked_secs": statistics.median(fresh),
        "blocked_samples": blocked,
        "memcpy_samples": copies,
        "fresh_samples": fresh,
    }


def measure_cloudckpt(args: argparse.Namespace) -> dict[str, Any]:
    import cloudckpt
    from cloudckpt.storage import get_storage, split_url

    options = json.loads(args.storage_options)
    config = cloudckpt.CheckpointerConfig(storage_options=options)
    remote = split_url(args.url)[0] != "file"
    storage = get_storage(args.url, config.storage_config()) if remote else None
    sd = make_state(args.size_mib, args.tensors, args.device)
    copy = make_copy(sd, args.device)
    ckpt = cloudckpt.make_async_checkpointer(config)
    ckpt._checkpoint_process.process_creation_future.result()  # start-up is not a save's cost

    def save(url: str, state: dict[str, Any]) -> tuple[float, float]:
        stage_future, write_future = ckpt.save(url, state)
        stage_future.result()
        metrics = write_future.result()
        return metrics.blocked_secs, metrics.commit_secs

    base = args.url.rstrip("/")
    try:
        out = timed_saves(
            save,
            sd,
            copy,
            lambda n: f"{base}/cloudckpt-{n}",
            lambda u: drop(u, storage),
            args.saves,
        )
        out.update(measure_loop(ckpt, sd, f"{base}/cloudckpt-loop", storage))
    finally:
        ckpt.close()
    return out


def measure_loop(ckpt: Any, sd: dict[str, Any], url: str, storage: Any | None) -> dict[str, Any]:
    """Iteration rate of a matmul loop during uploads, vs alone in equal windows around them
    (before and after each upload: the neighbours' load drifts)."""
    import torch

    a = torch.randn(LOOP_MATMUL_SIZE, LOOP_MATMUL_SIZE)
    b = torch.empty_like(a)

    def rate_until(done: Callable[[], bool]) -> tuple[float, float]:
        iters, started = 0, time.perf_counter()
        while not done():
            torch.mm(a, a, out=b)
            iters += 1
        secs = time.perf_counter() - started
        return iters / secs, secs

    def rate_for(secs: float) -> float:
        deadline = time.perf_counter() + secs
        return rate_until(lambda: time.perf_counter() >= deadline)[0]

    rate_for(0.2)  # warm-up
    alone, during, uploads = [], [], []
    window = LOOP_BASELINE_SECS
    for i in range(LOOP_UPLOADS):
        alone.append(rate_for(window))
        stage_future, write_future = ckpt.save(f"{url}-{i}", sd)
        stage_future.result()
        rate, window = rate_until(write_future.done)
        write_future.result()
        during.append(rate)
        uploads.append(window)
        alone.append(rate_for(window))
        drop(f"{url}-{i}", storage)
    alone_rate, during_rate = statistics.median(alone), statistics.median(during)
    return {
        "loop_alone_iters_per_sec": alone_rate,
        "loop_during_upload_iters_per_sec": during_rate,
        "loop_slowdown": alone_rate / during_rate if during_rate > 0 else float("inf"),
        "upload_secs": statistics.median(uploads),
    }


def measure_upstream(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch.distributed.checkpoint._experimental import (
        CheckpointerConfig,
        CheckpointStagerConfig,
        make_async_checkpointer,
    )

    on_gpu = torch.accelerator.is_available()
    config = CheckpointerConfig(
        staging_config=CheckpointStagerConfig(
            use_pinned_memory=on_gpu, use_non_blocking_copy=on_gpu
        )
    )
    sd = make_state(args.size_mib, args.tensors, args.device)
    copy = make_copy(sd, args.device)
    root = tempfile.mkdtemp(prefix="upstream-", dir=args.local_dir)
    ckpt = make_async_checkpointer(config)

    def save(path: str, state: dict[str, Any]) -> tuple[float, float]:
        started = time.perf_counter()
        stage_future, write_future = ckpt.save(path, state)
        stage_future.result()
        blocked = time.perf_counter() - started
        write_future.result()
        return blocked, time.perf_counter() - started

    try:
        return timed_saves(
            save,
            sd,
            copy,
            lambda n: f"{root}/{n}",
            lambda p: shutil.rmtree(p, ignore_errors=True),
            args.saves,
        )
    finally:
        ckpt.close()
        shutil.rmtree(root, ignore_errors=True)


MEASUREMENTS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "cloudckpt": measure_cloudckpt,
    "upstream": measure_upstream,
}


# --- driver -----------------------------------------------------------------------------------


def run_fresh(kind: str, args: argparse.Namespace, device: str) -> dict[str, Any]:
    """Run one measurement in a new interpreter; its last stdout line is the JSON result."""
    cmd = [sys.executable, __file__, "--child", kind, "--device", device]
    for name in ("size_mib", "tensors", "saves", "url", "storage_options", "local_dir"):
        if getattr(args, name) is not None:
            cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    print(f"# {kind} ({device}) ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} measurement failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size-mib", type=int, default=1024, help="state dict size (default 1024)")
    p.add_argument("--tensors", type=int, default=16, help="number of tensors (default 16)")
    p.add_argument("--saves", type=int, default=12, help="saves per run; the first is not counted")
    p.add_argument("--url", default="", help="where cloudckpt writes (default: a temporary dir)")
    p.add_argument("--storage-options", default="{}", help="JSON storage options for --url")
    p.add_argument("--local-dir", default=None, help="parent of the temporary directories")
    p.add_argument("--target", type=float, default=1.2, help="max blocked/memcpy (default 1.2)")
    p.add_argument("--skip-upstream", action="store_true", help="do not run torch's checkpointer")
    p.add_argument("--child", choices=sorted(MEASUREMENTS), help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.saves < 2:
        p.error("--saves must be >= 2 (the first save is not counted)")
    if args.size_mib <= 0 or args.tensors <= 0:
        p.error("--size-mib and --tensors must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(MEASUREMENTS[args.child](args)), flush=True)
        return 0

    import torch

    own_dir = not args.url
    if own_dir:
        args.url = tempfile.mkdtemp(prefix="bench-async-", dir=args.local_dir)
    try:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        results: dict[str, dict[str, Any]] = {}
        for device in devices:
            results[f"cloudckpt-{device}"] = run_fresh("cloudckpt", args, device)
            if not args.skip_upstream and device == "cpu":
                results["upstream-cpu"] = run_fresh("upstream", args, device)
    finally:
        if own_dir:
            shutil.rmtree(args.url, ignore_errors=True)

    gib = args.size_mib / 1024
    print(
        f"\nstate dict: {args.tensors} x {args.size_mib / args.tensors:.0f} MiB float32 "
        f"({gib:.2f} GiB), {args.saves} saves (first not counted), writing to "
        f"{'a temporary directory' if own_dir else args.url}"
    )
    print(f"{'measurement':<44}{'seconds':>10}{'GiB/s':>8}{'ratio':>8}")
    failed = False
    for device in devices:
        ours = results[f"cloudckpt-{device}"]
        base = "pinned copy_" if device == "cuda" else "memcpy (copy_)"
        rows = [
            (f"{base} around each save [{device}]", ours["memcpy_secs"], None),
            (f"cloudckpt blocked, first save [{device}]", ours["first_blocked_secs"], None),
            (
                f"cloudckpt blocked [{device}]",
                ours["blocked_secs"],
                ours["ratio"],
            ),
            (f"cloudckpt blocked, new tensors [{device}]", ours["fresh_blocked_secs"], None),
            (f"cloudckpt save -> committed [{device}]", ours["commit_secs"], None),
        ]
        if f"upstream-{device}" in results:
            up = results[f"upstream-{device}"]
            rows += [
                (
                    f"upstream blocked [{device}] (vs cloudckpt)",
                    up["blocked_secs"],
                    up["blocked_secs"] / ours["blocked_secs"],
                ),
                (
                    f"upstream blocked [{device}] (vs its memcpy)",
                    up["blocked_secs"],
                    up["ratio"],
                ),
                (
                    f"upstream blocked, new tensors [{device}]",
                    up["fresh_blocked_secs"],
                    up["fresh_blocked_secs"] / ours["fresh_blocked_secs"],
                ),
                (f"upstream save -> committed [{device}]", up["commit_secs"], None),
            ]
        for name, secs, ratio in rows:
            ratio_text = f"{ratio:>7.2f}x" if ratio is not None else ""
            print(f"{name:<44}{secs:>10.3f}{gib / secs:>8.2f}{ratio_text}")
        print(
            f"{'training loop slowdown during upload [' + device + ']':<44}"
            f"{ours['upload_secs']:>10.3f}{'':>8}{ours['loop_slowdown']:>7.2f}x"
        )
        ratio = ours["ratio"]
        if ratio > args.target:
            failed = True
            print(f"MISS [{device}]: blocked time is {ratio:.2f}x memcpy (target {args.target}x)")
    if "cuda" not in devices:
        print("CUDA: skipped (no CUDA device: torch.cuda.is_available() is False)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
