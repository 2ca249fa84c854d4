"""One rank of a multi-rank save/load, launched by torchrun from tests/integration/test_multirank.py.

Configuration comes from a JSON file named by argv[1]; each rank writes
``<result_dir>/rank_<r>.json`` with what happened (ok, error type and message, seconds).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist


def make_state(rank: int) -> dict[str, Any]:
    """A deterministic per-rank state dict (shared with the test for the expected values)."""
    g = torch.Generator().manual_seed(1000 + rank)
    return {
        "model": {
            "weight": torch.randn(512, 256, generator=g),
            "bias": torch.randn(256, generator=g).to(torch.bfloat16),
        },
        "optim": {"step": 10 + rank, "exp_avg": torch.randn(512, 256, generator=g)},
        "rank": rank,
    }


def _same_state(loaded: dict[str, Any], expected: dict[str, Any], rank: int) -> bool:
    """Bitwise equality of every tensor (bfloat16 compared as bytes) and the scalars."""

    def as_bits(t: torch.Tensor) -> torch.Tensor:
        return t.view(torch.uint8) if t.dtype == torch.bfloat16 else t

    return (
        all(
            torch.equal(as_bits(loaded[k][n]), as_bits(expected[k][n]))
            for k in ("model", "optim")
            for n in expected[k]
            if isinstance(expected[k][n], torch.Tensor)
        )
        and loaded["rank"] == rank
        and loaded["optim"]["step"] == 10 + rank
    )


class _Unpicklable:
    def __reduce__(self) -> Any:
        raise RuntimeError("injected serialization failure")


def die_midway_through_the_upload(after_bytes: int = 256 * 1024) -> None:
    """Writer-subprocess initializer: SIGKILL this process once ``after_bytes`` of its object
    went into the upload."""
    import signal

    import cloudckpt.writer

    real = cloudckpt.writer.serialize

    def serialize(obj: Any, out: Any, **kw: Any) -> Any:
        class Tripwire:
            def write(self, data: memoryview) -> None:
                if out.bytes_written > after_bytes:
                    os.kill(os.getpid(), signal.SIGKILL)
                out.write(data)

        return real(obj, Tripwire(), **kw)

    cloudckpt.writer.serialize = serialize


def build(cfg: dict[str, Any], config: Any) -> Any:
    """The checkpointer ``cfg`` asks for (this rank's writer killed mid-upload if named)."""
    import cloudckpt

    rank = int(os.environ["RANK"])
    if cfg["mode"] == "async":
        kill = (
            {
                "subprocess_init_fn": die_midway_through_the_upload,
                "subprocess_init_args": (cfg.get("kill_after_bytes", 256 * 1024),),
            }
            if cfg.get("kill_writer_rank") == rank
            else {}
        )
        return cloudckpt.make_async_checkpointer(config, **kill)
    return cloudckpt.make_sync_checkpointer(config)


def main() -> None:
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    from cloudckpt import (
        BarrierConfig,
        CheckpointerConfig,
        CheckpointWriterConfig,
        RetryConfig,
        UploadConfig,
    )

    options = dict(cfg["storage_options"])
    options.update(cfg.get("rank_storage_options", {}).get(os.environ["RANK"], {}))
    config = CheckpointerConfig(
        storage_options=options,
        writer_config=CheckpointWriterConfig(
            commit_timeout_secs=cfg["commit_timeout_secs"], poll_interval_secs=0.1
        ),
        retry_config=RetryConfig(
            max_attempts=cfg.get("max_attempts", 8), initial_backoff_secs=0.02, max_backoff_secs=0.2
        ),
        barrier_config=BarrierConfig(**cfg.get("barrier", {})),
        upload_config=UploadConfig(**cfg.get("upload", {})),
    )
    # ``build_before_init``: the mistake of building the checkpointer before the group exists
    if cfg.get("build_before_init"):
        try:
            build(cfg, config)
            refusal = {"error_type": "none", "error": "built without a process group"}
        except Exception as e:
            refusal = {"error_type": type(e).__name__, "error": str(e)}
        with open(os.path.join(cfg["result_dir"], f"rank_{os.environ['RANK']}.json"), "w") as f:
            json.dump(refusal, f)
        return
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ckpt = build(cfg, config)
    state = make_state(rank)
    if cfg.get("padding_mib"):
        state["padding"] = torch.ones(cfg["padding_mib"] << 18)  # float32: 4 bytes each
    if cfg.get("fail_rank") == rank:
        state["poison"] = _Unpicklable()
    result: dict[str, Any] = {"rank": rank, "world": world}
    started = time.monotonic()
    try:
        # ``paths``: several saves in a row (barriers and save ids are reused across saves)
        paths = cfg.get("paths") or [cfg["path"]]
        for path in paths:
            if cfg["mode"] == "async":
                stage, write = ckpt.save(path, state)
                stage.result()
                write.result()
            else:
                ckpt.save(path, state)
            result.setdefault("barrier_ran", []).append("barrier_secs" in ckpt.last_metrics.extra)
        result["saved"] = True
        expected = make_state(rank)
        result["load_equal"] = all(
            _same_state(ckpt.load(path), expected, rank) for path in paths
        )
    except Exception as e:
        result["saved"] = False
        result["error_type"] = type(e).__name__
        result["error"] = str(e)
    result["seconds"] = time.monotonic() - started
    with open(os.path.join(cfg["result_dir"], f"rank_{rank}.json"), "w") as f:
        json.dump(result, f)
    ckpt.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
