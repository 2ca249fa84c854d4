"""Train a small character-level language model, checkpoint it to S3, crash, resume, verify.

What it shows, end to end on one CPU machine:

1. Training a GRU character model (~0.7M parameters) with AdamW on ``data/tiny_corpus.txt``.
2. Asynchronous checkpoints every ``--ckpt-every`` steps to ``s3://<bucket>/<prefix>/step-<N>``
   with ``cloudckpt.make_async_checkpointer``: the training loop only waits for staging (the
   copy of the tensors), the upload runs in a background process. Each checkpoint reports its
   size in the store, how long ``save()`` blocked training (until the stage future resolved),
   how long until it was durably committed (until the write future resolved), and the MiB/s
   of the background part (bytes / (commit - blocked)).
3. A simulated crash at ``--crash-at``: model, optimizer, data loader and checkpointer are
   dropped, a half-written checkpoint is left behind (objects but no commit manifest), and
   everything is rebuilt from scratch with a different seed.
4. Resume from the newest *committed* checkpoint; the restored model and optimizer must be
   bitwise equal to what was saved, and the replayed steps must produce bitwise the same losses
   as before the crash (proof that RNG and data position were restored too). Any mismatch
   exits with status 1.

Without ``--endpoint`` it starts a private SeaweedFS (``localstack.SeaweedServer``) and stops it
at the end. Run ``python examples/train_charlm.py --help`` for the knobs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import sys
import time
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
DEFAULT_CORPUS = HERE / "data" / "tiny_corpus.txt"
MANIFEST_NAME = "cloudckpt.manifest.json"  # a checkpoint is committed once this object exists
MiB = 1 << 20


class VerificationError(RuntimeError):
    """The resumed state differs from what was saved: the demo's own failure."""


# --------------------------------------------------------------------------------------------
# Model and data


class CharGRU(nn.Module):
    """Embedding → multi-layer GRU → linear head over the character vocabulary."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.rnn = nn.GRU(embed_dim, hidden_dim, num_layers=layers, batch_first=True, dropout=0.1)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(hidden_dim, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(tokens))
        return self.head(self.drop(out))


class CharBatcher:
    """Random windows of the corpus; its position and generator state are checkpointed."""

    def __init__(self, data: torch.Tensor, batch_size: int, seq_len: int, seed: int) -> None:
        if data.numel() <= seq_len + 1:
            raise ValueError(f"corpus of {data.numel()} chars is too short for seq_len {seq_len}")
        self.data = data
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.generator = torch.Generator().manual_seed(seed)
        self.position = 0  # batches served so far

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(
            0, self.data.numel() - self.seq_len - 1, (self.batch_size,), generator=self.generator
        )
        window = torch.stack([self.data[s : s + self.seq_len + 1] for s in starts.tolist()])
        self.position += 1
        return window[:, :-1], window[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])
        self.generator.set_state(state["generator"])


@dataclass
class Trainer:
    """Everything a crash destroys: model, optimizer, data position."""

    model: CharGRU
    optimizer: torch.optim.Optimizer
    batcher: CharBatcher
    step: int = 0

    def train_step(self) -> float:
        self.model.train()
        inputs, targets = self.batcher.next_batch()
        logits = self.model(inputs)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.step += 1
        return float(loss.item())

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds; everything needed to continue bit-for-bit."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "rng": {"torch": torch.get_rng_state()},
            "data": self.batcher.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        torch.set_rng_state(state["rng"]["torch"])
        self.batcher.load_state_dict(state["data"])


def load_corpus(path: Path) -> tuple[torch.Tensor, list[str]]:
    """The corpus as a tensor of character ids, and the vocabulary (sorted characters)."""
    text = path.read_text(encoding="utf-8")
    vocab = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocab)}
    return torch.tensor([index[ch] for ch in text], dtype=torch.long), vocab


def build_trainer(
    args: argparse.Namespace, data: torch.Tensor, vocab_size: int, seed: int
) -> Trainer:
    """A fresh model/optimizer/batcher, as a newly started process would build them."""
    torch.manual_seed(seed)
    model = CharGRU(vocab_size, args.embed_dim, args.hidden_dim, args.layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    batcher = CharBatcher(data, args.batch_size, args.seq_len, seed=seed + 1)
    return Trainer(model=model, optimizer=optimizer, batcher=batcher)


@torch.no_grad()
def sample(model: CharGRU, vocab: list[str], prompt: str, length: int, seed: int) -> str:
    """Greedy-ish sampling (temperature 0.8) to eyeball what the model learned."""
    model.eval()
    index = {ch: i for i, ch in enumerate(vocab)}
    tokens = [index.get(ch, 0) for ch in prompt]
    generator = torch.Generator().manual_seed(seed)
    for _ in range(length):
        logits = model(torch.tensor([tokens[-128:]]))[0, -1] / 0.8
        tokens.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)))
    return "".join(vocab[t] for t in tokens)


# --------------------------------------------------------------------------------------------
# Bitwise comparison of nested state


def clone_state(obj: Any) -> Any:
    """A deep copy whose tensors are detached clones (the in-memory reference of a save)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: clone_state(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(clone_state(v) for v in obj)
    return copy.deepcopy(obj)


def state_differences(expected: Any, actual: Any, where: str = "") -> list[str]:
    """Where ``actual`` is not bitwise identical to ``expected`` (empty list: identical)."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(actual, torch.Tensor):
            return [f"{where}: expected a tensor, got {type(actual).__name__}"]
        if expected.dtype != actual.dtype or expected.shape != actual.shape:
            return [
                f"{where}: {expected.dtype}{list(expected.shape)} != "
                f"{actual.dtype}{list(actual.shape)}"
            ]
        if expected.numel() and not torch.equal(
            expected.reshape(-1).view(torch.uint8), actual.reshape(-1).view(torch.uint8)
        ):
            return [f"{where}: tensor bytes differ"]
        return []
    if isinstance(expected, dict):
        if not isinstance(actual, dict) or set(expected) != set(actual):
            got = sorted(map(str, actual)) if isinstance(actual, dict) else type(actual).__name__
            return [f"{where}: keys {sorted(map(str, expected))} != {got}"]
        out: list[str] = []
        for key in expected:
            out += state_differences(expected[key], actual[key], f"{where}/{key}")
        return out
    if isinstance(expected, list | tuple):
        if not isinstance(actual, list | tuple) or len(expected) != len(actual):
            return [f"{where}: sequence {expected!r} != {actual!r}"]
        out = []
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            out += state_differences(e, a, f"{where}[{i}]")
        return out
    if isinstance(expected, float) and isinstance(actual, float):
        same = expected == actual or (math.isnan(expected) and math.isnan(actual))
        return [] if same else [f"{where}: {expected!r} != {actual!r}"]
    return [] if expected == actual else [f"{where}: {expected!r} != {actual!r}"]


# --------------------------------------------------------------------------------------------
# Checkpoint bookkeeping


@dataclass
class SaveRecord:
    """One checkpoint: where, and what it cost the training loop and the store."""

    step: int
    url: str
    started: float
    blocked_secs: float = 0.0
    commit_secs: float | None = None
    bytes: int = 0
    error: str | None = None
    reported: bool = False
    write_future: Future[Any] | None = field(default=None, repr=False)

    @property
    def mib_per_sec(self) -> float:
        """Bytes over the background part of the save: from staged to committed."""
        if self.commit_secs is None:
            return 0.0
        background_secs = self.commit_secs - self.blocked_secs
        return self.bytes / MiB / background_secs if background_secs > 0 else float("inf")

    def summary(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "url": self.url,
            "bytes": self.bytes,
            "blocked_secs": self.blocked_secs,
            "commit_secs": self.commit_secs,
            "mib_per_sec": self.mib_per_sec,
            "error": self.error,
        }


class S3Store:
    """The few direct S3 calls the demo makes besides cloudckpt: bucket, sizes, listing."""

    def __init__(self, endpoint_url: str, key: str, secret: str, region: str) -> None:
        import boto3
        from botocore.config import Config

        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            region_name=region,
            config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard"}),
        )

    def ensure_bucket(self, bucket: str) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=bucket)
        except ClientError:
            self.client.create_bucket(Bucket=bucket)

    def objects(self, bucket: str, prefix: str) -> dict[str, int]:
        """Key → size of every object under ``prefix``."""
        out: dict[str, int] = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix
        ):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = int(obj["Size"])
        return out

    def put(self, bucket: str, key: str, body: bytes) -> None:
        self.client.put_object(Bucket=bucket, Key=key, Body=body)


def step_of(name: str) -> int | None:
    """``step-000120`` → 120; anything else → None."""
    if not name.startswith("step-"):
        return None
    digits = name.removeprefix("step-")
    return int(digits) if digits.isdigit() else None


def committed_steps(store: S3Store, bucket: str, prefix: str) -> list[int]:
    """Steps under ``prefix`` whose commit manifest exists, ascending."""
    steps = set()
    for key in store.objects(bucket, prefix + "/"):
        parts = key[len(prefix) + 1 :].split("/")
        if len(parts) == 2 and parts[1] == MANIFEST_NAME:
            step = step_of(parts[0])
            if step is not None:
                steps.add(step)
    return sorted(steps)


def latest_checkpoint_url(
    cloudckpt: Any, run_url: str, storage_options: dict[str, Any], listed: list[int]
) -> str | None:
    """The newest committed checkpoint by ``cloudckpt.CheckpointManager``, cross-checked against
    a plain listing of ``step-*/cloudckpt.manifest.json``."""
    latest = cloudckpt.CheckpointManager(run_url, storage_options=storage_options).latest()
    by_manager = latest.url.rstrip("/") if latest is not None else None
    by_listing = f"{run_url}/step-{listed[-1]:06d}" if listed else None
    if by_manager != by_listing:
        raise VerificationError(
            f"CheckpointManager.latest() = {by_manager!r} but the newest committed "
            f"checkpoint by listing is {by_listing!r}"
        )
    return by_manager


# --------------------------------------------------------------------------------------------
# The run


class Run:
    """Training with periodic async checkpoints, one crash, and a verified resume."""

    def __init__(
        self, args: argparse.Namespace, endpoint_url: str, key: str, secret: str, region: str
    ) -> None:
        import cloudckpt

        self.cloudckpt = cloudckpt
        self.args = args
        self.storage_options = {"endpoint_url": endpoint_url, "key": key, "secret": secret}
        self.store = S3Store(endpoint_url, key, secret, region)
        self.bucket = args.bucket
        self.prefix = args.prefix.strip("/")
        self.run_url = f"s3://{self.bucket}/{self.prefix}"
        self.data, self.vocab = load_corpus(args.data)
        self.records: dict[int, SaveRecord] = {}
        self.saved_states: dict[int, Any] = {}  # step → in-memory copy of what was saved
        self.losses_before_crash: dict[int, float] = {}
        self.summary: dict[str, Any] = {
            "run_url": self.run_url,
            "steps": args.steps,
            "ckpt_every": args.ckpt_every,
            "crash_at": args.crash_at,
            "checks": {"state_equal": None, "replayed_losses_equal": None, "replayed_steps": 0},
        }

    # -- checkpointing ----------------------------------------------------------------------

    def make_checkpointer(self) -> Any:
        config = self.cloudckpt.CheckpointerConfig(storage_options=self.storage_options)
        return self.cloudckpt.make_async_checkpointer(config=config)

    def save(self, checkpointer: Any, trainer: Trainer) -> None:
        """Start an async save; return once the tensors are staged (training may go on)."""
        step = trainer.step
        url = f"{self.run_url}/step-{step:06d}"
        state = trainer.state_dict()
        self.saved_states[step] = clone_state(state)  # reference for the resume check
        record = SaveRecord(step=step, url=url, started=time.perf_counter())
        stage_future, write_future = checkpointer.save(url, state)
        stage_future.result()
        record.blocked_secs = time.perf_counter() - record.started
        record.write_future = write_future

        def committed(future: Future[Any], record: SaveRecord = record) -> None:
            record.commit_secs = time.perf_counter() - record.started
            if future.cancelled():
                record.error = "cancelled"
            elif future.exception() is not None:
                record.error = repr(future.exception())

        write_future.add_done_callback(committed)
        self.records[step] = record

    def report_commits(self, *, wait: bool = False) -> None:
        """Print each checkpoint once its write finished (all of them when ``wait``)."""
        for record in sorted(self.records.values(), key=lambda r: r.step):
            if record.reported or record.write_future is None:
                continue
            if wait:
                with contextlib.suppress(Exception):  # the done-callback records failures
                    record.write_future.result()
            if not record.write_future.done() or record.commit_secs is None:
                continue
            record.reported = True
            if record.error is not None:
                print(f"  checkpoint step {record.step}: FAILED: {record.error}", flush=True)
                continue
            key_prefix = record.url.removeprefix(f"s3://{self.bucket}/") + "/"
            record.bytes = sum(self.store.objects(self.bucket, key_prefix).values())
            print(
                f"  checkpoint step {record.step:>5}: {record.bytes / MiB:7.2f} MiB | "
                f"training blocked {record.blocked_secs:6.3f} s | "
                f"committed after {record.commit_secs:6.3f} s | "
                f"{record.mib_per_sec:7.1f} MiB/s in the background",
                flush=True,
            )
            # Older in-memory references are no longer needed once a newer save committed.
            for old in [s for s in self.saved_states if s < record.step]:
                del self.saved_states[old]

    # -- the run ----------------------------------------------------------------------------

    def train(self, checkpointer: Any, trainer: Trainer, until: int, *, phase: str) -> None:
        """Train up to step ``until`` (inclusive), saving every ``ckpt_every`` steps."""
        args = self.args
        loss: float | None = None
        window_start, window_steps = time.perf_counter(), 0
        while trainer.step < until:
            loss = trainer.train_step()
            window_steps += 1
            step = trainer.step
            if phase == "before-crash":
                self.losses_before_crash[step] = loss
            elif step in self.losses_before_crash:
                self._check_replayed_loss(step, loss)
            if step % args.log_every == 0 or step == until:
                ms_per_step = (time.perf_counter() - window_start) * 1000 / window_steps
                print(
                    f"[{phase}] step {step:>5} loss {loss:.4f} ({ms_per_step:.0f} ms/step)",
                    flush=True,
                )
                window_start, window_steps = time.perf_counter(), 0
            if step % args.ckpt_every == 0:
                self.save(checkpointer, trainer)
            self.report_commits()
        if loss is not None:
            self.summary[f"last_loss_{phase}"] = loss

    def _check_replayed_loss(self, step: int, loss: float) -> None:
        before = self.losses_before_crash[step]
        checks = self.summary["checks"]
        if loss != before:
            checks["replayed_losses_equal"] = False
            raise VerificationError(
                f"step {step} replayed after resume gave loss {loss!r}, before the crash "
                f"{before!r}: RNG or data position was not restored"
            )
        checks["replayed_losses_equal"] = True
        checks["replayed_steps"] += 1

    def simulate_crash(self, checkpointer: Any, trainer: Trainer) -> None:
        """Lose all in-process state, as a killed process would (writes already committed
        stay), and leave a half-written checkpoint behind as a crash mid-save would."""
        print(f"\n*** simulated crash after step {trainer.step} ***", flush=True)
        # Let the last started save finish: this crash comes after its commit (a crash during
        # it would leave an uncommitted prefix, which is simulated below).
        self.report_commits(wait=True)
        checkpointer.close()
        torn_step = trainer.step + 1
        torn_key = f"{self.prefix}/step-{torn_step:06d}/checkpoint_0.pt"
        self.store.put(self.bucket, torn_key, b"half a checkpoint, no manifest")
        print(f"    left an uncommitted checkpoint at s3://{self.bucket}/{torn_key}", flush=True)
        self.summary["torn_step"] = torn_step

    def resume(self) -> tuple[Any, Trainer]:
        """A fresh 'process': new objects with a different seed, then the newest checkpoint."""
        args = self.args
        trainer = build_trainer(args, self.data, len(self.vocab), seed=args.seed + 1000)
        checkpointer = self.make_checkpointer()
        try:
            return checkpointer, self._restore(checkpointer, trainer)
        except BaseException:
            checkpointer.close()
            raise

    def _restore(self, checkpointer: Any, trainer: Trainer) -> Trainer:
        """Load the newest committed checkpoint into ``trainer`` and verify it bit for bit."""
        args = self.args
        listed = committed_steps(self.store, self.bucket, self.prefix)
        url = latest_checkpoint_url(self.cloudckpt, self.run_url, self.storage_options, listed)
        self.summary["committed_steps_at_resume"] = listed
        if url is None:
            print("no committed checkpoint: starting over from scratch", flush=True)
            self.summary["resumed_from_step"] = 0
            return build_trainer(args, self.data, len(self.vocab), seed=args.seed)

        started = time.perf_counter()
        loaded = checkpointer.load(url)
        load_secs = time.perf_counter() - started
        step = int(loaded["step"])
        print(f"resuming from {url} (step {step}), loaded in {load_secs:.3f} s", flush=True)
        self.summary["resumed_from_step"] = step
        self.summary["load_secs"] = load_secs

        expected = self.saved_states.get(step)
        if expected is None:
            raise VerificationError(f"no in-memory copy of the state saved at step {step}")
        problems = state_differences(expected, loaded, "checkpoint")
        trainer.load_state_dict(loaded)
        restored = {
            "model": trainer.model.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
        }
        problems += state_differences(
            {"model": expected["model"], "optimizer": expected["optimizer"]}, restored, "restored"
        )
        self.summary["checks"]["state_equal"] = not problems
        if problems:
            raise VerificationError(
                "restored state differs from what was saved:\n  " + "\n  ".join(problems[:20])
            )
        print(
            f"verified: model ({sum(t.numel() for t in expected['model'].values())} values) and "
            "optimizer state are bitwise equal to what was saved",
            flush=True,
        )
        return trainer

    def run(self) -> dict[str, Any]:
        args = self.args
        self.store.ensure_bucket(self.bucket)
        trainer = build_trainer(args, self.data, len(self.vocab), seed=args.seed)
        params = sum(p.numel() for p in trainer.model.parameters())
        print(
            f"char-level GRU: {params / 1e6:.2f}M parameters, vocabulary {len(self.vocab)}, "
            f"corpus {self.data.numel() / 1e3:.0f}k chars; checkpoints to {self.run_url}",
            flush=True,
        )
        self.summary["parameters"] = params
        crash_at = args.crash_at if 0 < args.crash_at < args.steps else None
        checkpointer = self.make_checkpointer()
        try:
            if crash_at is not None:
                self.train(checkpointer, trainer, crash_at, phase="before-crash")
                self.simulate_crash(checkpointer, trainer)
                checkpointer = None  # already closed by the crash
                del trainer
                gc.collect()
                checkpointer, trainer = self.resume()
            phase = "after-resume" if crash_at is not None else "train"
            self.train(checkpointer, trainer, args.steps, phase=phase)
            if args.steps % args.ckpt_every != 0:
                self.save(checkpointer, trainer)  # always end with a checkpoint
            self.report_commits(wait=True)
        finally:
            if checkpointer is not None:
                checkpointer.close()
        failed = [r.step for r in self.records.values() if r.error is not None]
        self.summary["checkpoints"] = [
            r.summary() for r in sorted(self.records.values(), key=lambda r: r.step)
        ]
        self.summary["final_step"] = trainer.step
        self.summary["committed_steps_at_end"] = committed_steps(
            self.store, self.bucket, self.prefix
        )
        if failed:
            raise VerificationError(f"checkpoints at steps {failed} failed")
        print("\nsample: " + sample(trainer.model, self.vocab, "The ", 120, args.seed), flush=True)
        return self.summary


# --------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="total training steps")
    parser.add_argument("--ckpt-every", type=int, default=50, help="checkpoint every K steps")
    parser.add_argument(
        "--crash-at", type=int, default=180, help="simulate a crash after this step (0: never)"
    )
    parser.add_argument(
        "--endpoint",
        help="S3 endpoint URL; default: start a private SeaweedFS for the run and stop it after",
    )
    parser.add_argument("--access-key", default=os.environ.get("AWS_ACCESS_KEY_ID"))
    parser.add_argument("--secret-key", default=os.environ.get("AWS_SECRET_ACCESS_KEY"))
    parser.add_argument("--region", default=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    parser.add_argument("--bucket", default="cloudckpt-demo")
    parser.add_argument(
        "--prefix",
        default=None,
        help="run prefix inside the bucket (default: charlm-<UTC timestamp>)",
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_CORPUS, help="UTF-8 text corpus")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--hidden-dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--summary-json", type=Path, help="also write the run summary here")
    args = parser.parse_args(argv)
    for name in ("steps", "ckpt_every", "log_every", "batch_size", "seq_len"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    if args.crash_at < 0:
        parser.error("--crash-at must be >= 0")
    if args.prefix is None:
        args.prefix = "charlm-" + time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the demo; 0 on success, 1 when a verification failed."""
    args = parse_args(argv)
    with ExitStack() as stack:
        if args.endpoint is None:
            try:
                from localstack import SeaweedServer
            except ImportError:  # not installed: use the checkout's localstack/ beside examples/
                sys.path.insert(0, str(HERE.parent))
                from localstack import SeaweedServer

            started = time.perf_counter()
            server = stack.enter_context(SeaweedServer())
            print(
                f"started SeaweedFS at {server.endpoint_url} in "
                f"{time.perf_counter() - started:.2f} s (stopped at exit)",
                flush=True,
            )
            endpoint, key, secret = server.endpoint_url, server.access_key, server.secret_key
        else:
            if not (args.access_key and args.secret_key):
                print("--endpoint needs --access-key/--secret-key (or AWS_* env)", file=sys.stderr)
                return 2
            endpoint, key, secret = args.endpoint, args.access_key, args.secret_key
        run = Run(args, endpoint, key, secret, args.region)
        try:
            summary = run.run()
            status = 0
        except VerificationError as e:
            print(f"\nVERIFICATION FAILED: {e}", file=sys.stderr, flush=True)
            summary = run.summary
            summary["error"] = str(e)
            status = 1
    if args.summary_json is not None:
        args.summary_json.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if status == 0:
        print(f"\nOK: {json.dumps({k: v for k, v in summary.items() if k != 'checkpoints'})}")
    return status


if __name__ == "__main__":
    sys.exit(main())
