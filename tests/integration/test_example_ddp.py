"""examples/train_ddp.py: a 2-rank DDP job checkpoints to S3, rank 1 crashes, a new job resumes
every rank bitwise (replayed losses equal), retention keeps the two newest plus the resume
source, and one process restores every rank's part."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from backends import TEST_BUCKET

from localstack.servers import S3Server

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "examples" / "train_ddp.py"
TINY_MODEL = ["--embed-dim", "16", "--hidden-dim", "32", "--batch-size", "4", "--seq-len", "16"]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, str(SCRIPT), *TINY_MODEL, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
    )


@pytest.mark.seaweedfs
def test_ddp_crash_resume_retention_and_restore(
    seaweed_server: S3Server, unique_prefix: str, tmp_path: Path
) -> None:
    summary_path = tmp_path / "summary.json"
    result = _run(
        [
            "--steps", "40", "--ckpt-every", "10", "--crash-at", "17", "--log-every", "5",
            "--endpoint", seaweed_server.endpoint_url,
            "--access-key", seaweed_server.access_key,
            "--secret-key", seaweed_server.secret_key,
            "--bucket", TEST_BUCKET, "--prefix", unique_prefix,
            "--summary-json", str(summary_path),
        ],
        tmp_path,
    )  # fmt: skip
    explain = f"exit {result.returncode}\n{result.stdout[-5000:]}\n{result.stderr[-5000:]}"
    assert result.returncode == 0, explain
    summary = json.loads(summary_path.read_text())
    assert summary["world_size"] == 2
    assert summary["resumed_from"] == "step-000010"
    assert summary["replayed_steps"] == 7  # steps 11..17 ran twice, with bitwise equal losses
    assert summary["final_step"] == 40
    assert summary["committed_steps"] == [10, 30, 40]  # keep-last-2 plus the resume source
    assert "*** rank 1 crashes after step 17 ***" in result.stdout
    assert "retention deleted step-000020" in result.stdout

    keys = seaweed_server.client().list_objects_v2(Bucket=TEST_BUCKET, Prefix=unique_prefix)
    names = {obj["Key"].removeprefix(unique_prefix + "/") for obj in keys.get("Contents", [])}
    assert not any(name.startswith("step-000020/") for name in names)
    for step in (10, 30, 40):
        for obj in ("cloudckpt.manifest.json", "checkpoint_0.pt", "checkpoint_1.pt"):
            assert f"step-{step:06d}/{obj}" in names


def test_crash_step_must_fall_between_checkpoints(tmp_path: Path) -> None:
    result = _run(["--steps", "30", "--ckpt-every", "10", "--crash-at", "20"], tmp_path)
    assert result.returncode == 2
    assert "--crash-at must fall between two checkpoints" in result.stderr
