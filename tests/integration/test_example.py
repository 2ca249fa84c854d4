"""examples/train_charlm.py: checkpoint to S3, crash, resume from the newest committed
checkpoint with bitwise-equal model/optimizer state and replayed losses."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from backends import TEST_BUCKET

from localstack.servers import S3Server

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "examples" / "train_charlm.py"
# A tiny model keeps each step at milliseconds: the test is about checkpoints, not learning.
TINY_MODEL = ["--embed-dim", "16", "--hidden-dim", "48", "--batch-size", "8", "--seq-len", "32"]
RUN_TIMEOUT_SECS = 240


def _run_example(args: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], Any]:
    summary_path = tmp_path / "summary.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY_MODEL, "--summary-json", str(summary_path), *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_SECS,
        cwd=tmp_path,
        env=env,
    )
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    return result, summary


def _explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}"


@pytest.mark.seaweedfs
def test_crash_and_resume_against_seaweedfs(
    seaweed_server: S3Server, unique_prefix: str, tmp_path: Path
) -> None:
    result, summary = _run_example(
        [
            "--steps", "40",
            "--ckpt-every", "10",
            "--crash-at", "25",
            "--endpoint", seaweed_server.endpoint_url,
            "--access-key", seaweed_server.access_key,
            "--secret-key", seaweed_server.secret_key,
            "--bucket", TEST_BUCKET,
            "--prefix", unique_prefix,
        ],
        tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, _explain(result)
    assert summary is not None, _explain(result)
    assert summary["committed_steps_at_resume"] == [10, 20]
    assert summary["resumed_from_step"] == 20
    assert summary["torn_step"] == 26  # left uncommitted by the crash, and skipped
    assert summary["checks"]["state_equal"] is True
    assert summary["checks"]["replayed_losses_equal"] is True
    assert summary["checks"]["replayed_steps"] == 5  # steps 21..25 ran twice, identically
    assert summary["final_step"] == 40
    assert summary["committed_steps_at_end"] == [10, 20, 30, 40]
    for ckpt in summary["checkpoints"]:
        assert ckpt["error"] is None
        assert ckpt["bytes"] > 0
        assert 0 <= ckpt["blocked_secs"] <= ckpt["commit_secs"]
    for line in ("training blocked", "committed after", "MiB/s", "bitwise equal"):
        assert line in result.stdout, _explain(result)

    # What the demo committed is really in the bucket, manifests included.
    keys = seaweed_server.client().list_objects_v2(Bucket=TEST_BUCKET, Prefix=unique_prefix)
    names = {obj["Key"].removeprefix(unique_prefix + "/") for obj in keys.get("Contents", [])}
    for step in (10, 20, 30, 40):
        assert f"step-{step:06d}/cloudckpt.manifest.json" in names
    assert "step-000026/cloudckpt.manifest.json" not in names


@pytest.mark.seaweedfs
def test_demo_starts_and_stops_its_own_seaweedfs(tmp_path: Path) -> None:
    """The README path: no endpoint, so the script runs a private SeaweedFS and stops it."""
    result, summary = _run_example(
        ["--steps", "6", "--ckpt-every", "2", "--crash-at", "3"], tmp_path
    )
    assert result.returncode == 0, _explain(result)
    assert summary is not None
    assert summary["resumed_from_step"] == 2
    assert summary["checks"]["state_equal"] is True
    assert "started SeaweedFS at http://127.0.0.1:" in result.stdout


# --------------------------------------------------------------------------------------------
# The script's own bitwise comparison (which decides its exit status)


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_charlm", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(spec.name, None)
        raise
    return module


def test_state_differences_detects_a_single_flipped_bit(example: ModuleType) -> None:
    state = {
        "model": {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1}]},
        "step": 7,
    }
    same = example.clone_state(state)
    assert example.state_differences(state, same) == []

    flipped = example.clone_state(state)
    flipped["model"]["w"].view(torch.int32)[1, 2] ^= 1
    assert example.state_differences(state, flipped) == ["/model/w: tensor bytes differ"]

    other = example.clone_state(state)
    other["optimizer"]["param_groups"][0]["lr"] = 0.2
    other["optimizer"]["state"][0]["step"] = torch.tensor(3.0, dtype=torch.float64)
    problems = example.state_differences(state, other)
    assert len(problems) == 2
    assert any("lr" not in p and "float32" in p for p in problems)

    nan = {"x": torch.tensor([float("nan")]), "f": float("nan")}
    assert example.state_differences(nan, example.clone_state(nan)) == []


def test_committed_steps_ignores_prefixes_without_a_manifest(example: ModuleType) -> None:
    class FakeStore:
        def objects(self, bucket: str, prefix: str) -> dict[str, int]:
            return {
                "run/step-000010/checkpoint_0.pt": 5,
                "run/step-000010/cloudckpt.manifest.json": 1,
                "run/step-000020/checkpoint_0.pt": 5,  # torn: no manifest
                "run/step-000005/cloudckpt.manifest.json": 1,
                "run/notes/cloudckpt.manifest.json": 1,
            }

    assert example.committed_steps(FakeStore(), "bucket", "run") == [5, 10]
