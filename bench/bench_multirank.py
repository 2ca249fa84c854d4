"""Aggregate save throughput of N ranks vs 1 rank saving the same total bytes (issue 6).

One SeaweedFS for the whole run; each configuration is a fresh ``torchrun`` launch (rank counts
interleaved over rounds). A rank saves ``total / N`` bytes with the sync checkpointer; the
aggregate throughput of a launch is ``total bytes / slowest rank's save time``. Target: the
N-rank figure is at least 0.9x the 1-rank one (the server is shared, so "no loss").

    python -m bench.bench_multirank [--total-mib 512] [--ranks 4] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_RATIO = 0.9
MiB = 1 << 20


def rank_main(config_path: str) -> None:
    """One rank under torchrun: save its share, report seconds and bytes."""
    import torch
    import torch.distributed as dist

    import cloudckpt

    cfg = json.loads(Path(config_path).read_text())
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    share_mib = cfg["total_mib"] // world
    g = torch.Generator().manual_seed(rank)
    state = {f"t{i}": torch.randn(8 * MiB // 4, generator=g) for i in range(share_mib // 8)}
    ckpt = cloudckpt.make_sync_checkpointer(
        cloudckpt.CheckpointerConfig(storage_options=cfg["storage_options"])
    )
    dist.barrier()
    started = time.perf_counter()
    ckpt.save(cfg["path"], state)
    seconds = time.perf_counter() - started
    out = {"rank": rank, "seconds": seconds, "bytes": ckpt.last_metrics.bytes}
    Path(cfg["result_dir"], f"rank_{rank}.json").write_text(json.dumps(out))
    ckpt.close()
    dist.destroy_process_group()


def launch(nproc: int, total_mib: int, url: str, options: dict, workdir: Path) -> float:
    """MiB/s of one launch: all ranks' bytes over the slowest rank's save time."""
    result_dir = Path(tempfile.mkdtemp(dir=workdir))
    cfg = result_dir / "config.json"
    cfg.write_text(
        json.dumps(
            {"total_mib": total_mib, "path": url, "storage_options": options,
             "result_dir": str(result_dir)}
        )
    )
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={nproc}", "-m", "bench.bench_multirank", "--rank-main", str(cfg)],
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=Path(__file__).resolve().parent.parent,
    )
    results = [json.loads(p.read_text()) for p in result_dir.glob("rank_*.json")]
    if len(results) != nproc:
        raise RuntimeError(f"{nproc} ranks launched, {len(results)} reported")
    total = sum(r["bytes"] for r in results)
    return total / MiB / max(r["seconds"] for r in results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total-mib", type=int, default=512)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rank-main", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_main:
        rank_main(args.rank_main)
        return 0

    from localstack.servers import SeaweedServer

    figures: dict[int, list[float]] = {1: [], args.ranks: []}
    with SeaweedServer() as server, tempfile.TemporaryDirectory() as work:
        server.create_bucket("bench")
        for round_ in range(args.rounds):
            order = [1, args.ranks] if round_ % 2 == 0 else [args.ranks, 1]
            for n in order:
                url = f"s3://bench/multirank/r{round_}-n{n}"
                mib_s = launch(n, args.total_mib, url, server.storage_options, Path(work))
                figures[n].append(mib_s)
                print(f"round {round_}: {n} rank(s) saved {args.total_mib} MiB at {mib_s:.1f} MiB/s")
    one = statistics.median(figures[1])
    many = statistics.median(figures[args.ranks])
    ratio = many / one
    print(f"\n{args.ranks} ranks vs 1 rank, same total bytes ({args.total_mib} MiB), median of "
          f"{args.rounds}: {many:.1f} vs {one:.1f} MiB/s = {ratio:.2f}x "
          f"(target >= {TARGET_RATIO}x): {'PASS' if ratio >= TARGET_RATIO else 'MISS'}")
    return 0 if ratio >= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
