"""Data-parallel training under torchrun, checkpointed to S3 with cloudckpt: a rank crashes, a
new job resumes every rank from the newest committed checkpoint, and the result is checked the
way a restore script would.

    python examples/train_ddp.py                  # 2 ranks; starts a private SeaweedFS
    python examples/train_ddp.py --nproc 4 --steps 120

The launcher (this script run directly) starts SeaweedFS unless ``--endpoint`` is given, runs
``torchrun --nproc-per-node N`` on this script in worker mode twice (the second launch is what
a scheduler does after a job failed), then checks.

* Attempt 0 (every rank): the character GRU of ``train_charlm.py`` wrapped in
  ``DistributedDataParallel`` (gloo), each rank drawing its own batches; an async save of every
  rank's part every ``--ckpt-every`` steps to ``CheckpointManager.path_for(step)``; once a save is
  committed, rank 0 applies keep-last-2 retention. After step ``--crash-at`` rank 1 dies
  (``os._exit``); torchrun stops the other ranks and the job fails.
* Attempt 1, a new job: rank 0 picks ``manager.latest()`` and broadcasts it, every rank loads its own part
  (model, optimizer, RNG, its data position), the steps up to the crash are replayed (rank 0's
  losses must be bitwise those of attempt 0 with 2 ranks, within 1e-6 with more (see
  ``_same_loss``): they depend on every rank's restored state through the gradient all-reduce), and training runs to ``--steps``. (A second launch rather than
  torchrun's ``--max-restarts``: gloo process groups do not re-form after an in-place restart
  in this torch version.)
* The launcher, afterwards: the committed steps are exactly the two newest plus the resume
  source (protected from retention), nothing uncommitted is left, and ``read_all_ranks`` of the
  newest loads every rank's part in this one process, with bitwise equal model replicas.

Exit status 0 when every check holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # train_charlm beside this script: the model, data and checks
from train_charlm import (  # noqa: E402
    DEFAULT_CORPUS,
    CharBatcher,
    CharGRU,
    Trainer,
    VerificationError,
    load_corpus,
    state_differences,
)

KEEP_LAST = 2
CRASHING_RANK = 1
CRASH_EXIT_CODE = 17


# --------------------------------------------------------------------------------------------
# Worker: one rank, under torchrun


def worker(args: argparse.Namespace) -> int:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import cloudckpt

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    attempt = args.attempt
    work_dir = Path(args.work_dir)
    storage_options = json.loads(args.storage_options)
    manager = cloudckpt.CheckpointManager(
        args.run_url, storage_options=storage_options, step_digits=6
    )
    checkpointer = cloudckpt.make_async_checkpointer(
        cloudckpt.CheckpointerConfig(storage_options=storage_options)
    )
    data, vocab = load_corpus(args.data)
    torch.manual_seed(args.seed)  # the same initial model everywhere (DDP also broadcasts it)
    model = DistributedDataParallel(
        CharGRU(len(vocab), args.embed_dim, args.hidden_dim, args.layers)
    )
    trainer = Trainer(
        model=model,  # type: ignore[arg-type]  # DDP forwards to the CharGRU
        optimizer=torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01),
        batcher=CharBatcher(data, args.batch_size, args.seq_len, seed=args.seed + 1 + rank),
    )
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"[attempt {attempt}] {world} ranks, checkpoints to {args.run_url}", flush=True)

    # Rank 0 decides what to resume from, so every rank loads the same checkpoint.
    latest = [manager.latest() if rank == 0 else None]
    dist.broadcast_object_list(latest, src=0)
    resumed = latest[0]
    if resumed is not None:
        trainer.load_state_dict(checkpointer.load(resumed.url))  # this rank's own part
        say(f"[attempt {attempt}] resumed from {resumed.url} (step {trainer.step})", flush=True)
    losses_path = work_dir / "losses_attempt0.jsonl"
    before_crash = _read_losses(losses_path) if attempt > 0 else {}
    replayed = 0
    loss: float | None = None
    pending: Any = None  # the write future of the save in flight

    def wait_and_retain() -> None:
        if pending is None:
            return
        metrics = pending.result()  # raises if any rank's part failed
        say(
            f"  committed {metrics.path}: {metrics.bytes / 2**20:.2f} MiB per rank, training "
            f"blocked {metrics.blocked_secs:.3f} s, committed after {metrics.commit_secs:.3f} s",
            flush=True,
        )
        if rank == 0:
            protect = [resumed.name] if resumed is not None else []
            for gone in manager.apply_retention(keep_last=KEEP_LAST, protect=protect):
                say(f"  retention deleted {gone.name}", flush=True)

    try:
        with losses_path.open("a") if attempt == 0 and rank == 0 else _nowhere() as log:
            while trainer.step < args.steps:
                loss = trainer.train_step()
                step = trainer.step
                if log is not None:
                    log.write(json.dumps({"step": step, "loss": loss}) + "\n")
                    log.flush()
                if rank == 0 and step in before_crash:
                    if not _same_loss(loss, before_crash[step], world):
                        raise VerificationError(
                            f"step {step} replayed after the restart gave loss {loss!r}, before "
                            f"the crash {before_crash[step]!r}: the state was not fully restored"
                        )
                    replayed += 1
                if step % args.log_every == 0:
                    say(f"[attempt {attempt}] step {step:>4} loss {loss:.4f}", flush=True)
                if attempt == 0 and step == args.crash_at and rank == CRASHING_RANK:
                    last = pending.result().path if pending is not None else "nothing"
                    print(f"*** rank {rank} crashes after step {step} ***", flush=True)
                    print(
                        f"    (on purpose; the newest committed checkpoint is {last})", flush=True
                    )
                    os._exit(CRASH_EXIT_CODE)
                if step % args.ckpt_every == 0 or step == args.steps:
                    wait_and_retain()
                    stage, pending = checkpointer.save(manager.path_for(step), trainer.state_dict())
                    stage.result()  # the tensors are staged: training may change them again
            wait_and_retain()
    finally:
        checkpointer.close()
        manager.close()
    if rank == 0:
        summary = {
            "world_size": world,
            "resumed_from": resumed.name if resumed is not None else None,
            "resumed_from_step": resumed.step if resumed is not None else None,
            "replayed_steps": replayed,
            "final_step": trainer.step,
            "final_loss": loss,
        }
        (work_dir / "worker_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    dist.destroy_process_group()
    return 0


def _same_loss(replayed: float, before: float, world: int) -> bool:
    """Bitwise with 2 ranks. With more, a fresh DDP's first step all-reduces in its initial
    bucket order while the original run had rebuilt its buckets, and gloo then adds the ranks'
    gradients in another order (a ~1e-9 difference that plain torch shows without any
    checkpoint): equal within 1e-6 relative there."""
    if world <= 2:
        return replayed == before
    return abs(replayed - before) <= 1e-6 * max(1.0, abs(before))


class _nowhere:
    """A context manager yielding None: the ranks that keep no loss log."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _read_losses(path: Path) -> dict[int, float]:
    if not path.exists():
        return {}
    rows = (json.loads(line) for line in path.read_text().splitlines() if line)
    return {int(r["step"]): float(r["loss"]) for r in rows}


# --------------------------------------------------------------------------------------------
# Launcher: server, torchrun, checks


def check_result(args: argparse.Namespace, storage_options: dict[str, Any]) -> dict[str, Any]:
    """What a restore script sees after the run; raises VerificationError on any mismatch."""
    import cloudckpt

    summary = json.loads((Path(args.work_dir) / "worker_summary.json").read_text())
    resumed_step = summary["resumed_from_step"]
    expected_resume = (args.crash_at // args.ckpt_every) * args.ckpt_every
    if resumed_step != expected_resume:
        raise VerificationError(f"resumed from step {resumed_step}, expected {expected_resume}")
    if summary["replayed_steps"] != args.crash_at - expected_resume:
        raise VerificationError(
            f"replayed {summary['replayed_steps']} steps, expected {args.crash_at - expected_resume}"
        )
    with cloudckpt.CheckpointManager(args.run_url, storage_options=storage_options) as manager:
        listed = manager.list()
    saved = sorted({*range(args.ckpt_every, args.steps + 1, args.ckpt_every), args.steps})
    expected = sorted({*saved[-KEEP_LAST:], expected_resume})
    committed = [c.step for c in listed if c.committed]
    if committed != expected or len(listed) != len(committed):
        raise VerificationError(
            f"after retention the run holds {[(c.name, c.committed) for c in listed]}; "
            f"expected exactly the committed steps {expected}"
        )
    newest = listed[-1]
    reader = cloudckpt.CheckpointReader(
        storage_config=cloudckpt.StorageConfig(storage_options=storage_options)
    )
    parts = reader.read_all_ranks(newest.url)
    if sorted(parts) != list(range(args.nproc)):
        raise VerificationError(f"{newest.url} holds ranks {sorted(parts)}, not {args.nproc}")
    for r, part in parts.items():
        problems = state_differences(parts[0]["model"], part["model"], f"rank {r} model")
        problems += state_differences(parts[0]["optimizer"], part["optimizer"], f"rank {r} optim")
        if problems:
            raise VerificationError("DDP replicas differ:\n  " + "\n  ".join(problems[:10]))
        if part["step"] != args.steps or part["data"]["position"] != args.steps:
            raise VerificationError(f"rank {r}'s part is at step {part['step']}, not {args.steps}")
    summary.update(committed_steps=committed, newest=newest.url, newest_bytes=newest.size_bytes)
    return summary


def launch(args: argparse.Namespace, endpoint: str, key: str, secret: str) -> int:
    storage_options = {"endpoint_url": endpoint, "key": key, "secret": secret}
    pythonpath = os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])
    for attempt, expect_failure in ((0, True), (1, False)):
        command = [
            sys.executable, "-m", "torch.distributed.run",
            "--standalone", f"--nproc-per-node={args.nproc}",
            str(Path(__file__).resolve()), "--worker", f"--attempt={attempt}",
            "--run-url", args.run_url, "--storage-options", json.dumps(storage_options),
            "--work-dir", args.work_dir,
            *(f"--{k.replace('_', '-')}={getattr(args, k)}" for k in _SHARED_ARGS),
        ]  # fmt: skip
        print(f"\n=== job {attempt}: torchrun --nproc-per-node={args.nproc} ===", flush=True)
        started = time.perf_counter()
        status = subprocess.run(
            command, env={**os.environ, "PYTHONPATH": pythonpath}, timeout=args.timeout_secs
        ).returncode
        print(f"=== job {attempt} exited with {status} after "
              f"{time.perf_counter() - started:.1f} s ===", flush=True)  # fmt: skip
        if expect_failure and status != 0:
            print("    (expected: rank 1 crashed on purpose; a new job resumes)", flush=True)
        if (status != 0) != expect_failure:
            expected = "fail at the crash" if expect_failure else "succeed"
            print(f"FAILED: job {attempt} was expected to {expected}", file=sys.stderr)
            return 1
    try:
        summary = check_result(args, storage_options)
    except VerificationError as e:
        print(f"\nVERIFICATION FAILED: {e}", file=sys.stderr, flush=True)
        return 1
    print(f"\nOK: {json.dumps(summary)}", flush=True)
    if args.summary_json is not None:
        args.summary_json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


_SHARED_ARGS = (
    "steps", "ckpt_every", "crash_at", "data", "batch_size", "seq_len", "embed_dim",
    "hidden_dim", "layers", "lr", "seed", "log_every",
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="ranks (processes) on this host")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--ckpt-every", type=int, default=10)
    parser.add_argument("--crash-at", type=int, default=35, help="rank 1 dies after this step")
    parser.add_argument("--endpoint", help="S3 endpoint URL; default: a private SeaweedFS")
    parser.add_argument("--access-key", default=os.environ.get("AWS_ACCESS_KEY_ID"))
    parser.add_argument("--secret-key", default=os.environ.get("AWS_SECRET_ACCESS_KEY"))
    parser.add_argument("--bucket", default="cloudckpt-demo")
    parser.add_argument("--prefix", help="run prefix (default: ddp-<UTC timestamp>)")
    parser.add_argument("--data", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--embed-dim", type=int, default=32)
    parser.add_argument("--hidden-dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--timeout-secs", type=float, default=600, help="limit for the job")
    parser.add_argument("--summary-json", type=Path, help="also write the checked summary here")
    # Worker mode (set by the launcher):
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-url", help=argparse.SUPPRESS)
    parser.add_argument("--storage-options", help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    parser.add_argument("--attempt", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    if args.nproc < 2:
        parser.error("--nproc must be >= 2 (rank 1 is the one that crashes)")
    for name in ("steps", "ckpt_every", "log_every", "batch_size", "seq_len"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    if not args.ckpt_every <= args.crash_at < args.steps or args.crash_at % args.ckpt_every == 0:
        parser.error(
            "--crash-at must fall between two checkpoints: at least --ckpt-every, below --steps, "
            "and not a multiple of --ckpt-every"
        )
    prefix = args.prefix or "ddp-" + time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    args.run_url = f"s3://{args.bucket}/{prefix.strip('/')}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    with ExitStack() as stack:
        args.work_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="cloudckpt-ddp-"))
        if args.endpoint is None:
            try:
                from localstack import SeaweedServer
            except ImportError:  # not installed: the checkout's localstack/ beside examples/
                sys.path.insert(0, str(HERE.parent))
                from localstack import SeaweedServer

            server = stack.enter_context(SeaweedServer())
            print(f"started SeaweedFS at {server.endpoint_url} (stopped at exit)", flush=True)
            endpoint, key, secret = server.endpoint_url, server.access_key, server.secret_key
            server.create_bucket(args.bucket)
        else:
            if not (args.access_key and args.secret_key):
                print("--endpoint needs --access-key/--secret-key (or AWS_* env)", file=sys.stderr)
                return 2
            endpoint, key, secret = args.endpoint, args.access_key, args.secret_key
        return launch(args, endpoint, key, secret)


if __name__ == "__main__":
    sys.exit(main())
