"""Multi-rank saves under torchrun against a real local S3 server (moto): two-phase commit,
bounded failure on every rank, restore at any scale."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from backends import Backend
from cases import assert_bitwise_equal
from faultproxy import FaultProxy
from multirank.worker import make_state

import cloudckpt
from cloudckpt.config import StorageConfig
from cloudckpt.manifest import MANIFEST_NAME, rank_object_name
from localstack.servers import find_free_port

pytestmark = [pytest.mark.torchrun, pytest.mark.parametrize("backend", ["moto"], indirect=True)]

WORKER = Path(__file__).parent / "multirank" / "worker.py"
COMMIT_TIMEOUT_SECS = 10.0


def run_ranks(tmp_path: Path, nproc: int, **cfg: Any) -> dict[int, dict[str, Any]]:
    """Launch ``nproc`` ranks with torchrun; return each rank's result record."""
    result_dir = tmp_path / f"results-{len(list(tmp_path.iterdir()))}"
    result_dir.mkdir()
    cfg = {"commit_timeout_secs": COMMIT_TIMEOUT_SECS, "result_dir": str(result_dir), **cfg}
    cfg_file = result_dir / "config.json"
    cfg_file.write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONPATH": str(WORKER.parent.parent), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", str(WORKER), str(cfg_file),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    results = {}
    for r in range(nproc):
        record = result_dir / f"rank_{r}.json"
        assert record.exists(), f"rank {r} wrote no result; torchrun said:\n{proc.stderr[-4000:]}"
        results[r] = json.loads(record.read_text())
    return results


def storage_of(backend: Backend) -> cloudckpt.storage.Storage:
    return cloudckpt.storage.get_storage(
        backend.base_url, StorageConfig(storage_options=backend.storage_options)
    )


def manager_of(backend: Backend, *run: str) -> cloudckpt.CheckpointManager:
    return cloudckpt.CheckpointManager(
        backend.url(*run), storage_options=backend.storage_options
    )


def proxy_for(backend: Backend) -> FaultProxy:
    endpoint = urlsplit(backend.storage_options["endpoint_url"])
    return FaultProxy(endpoint.hostname or "127.0.0.1", endpoint.port or 80, seed=7).start()


@pytest.mark.parametrize(
    ("nproc", "mode"),
    [
        (2, "sync"),
        (2, "async"),
        pytest.param(4, "sync", marks=pytest.mark.slow),
        pytest.param(4, "async", marks=pytest.mark.slow),
    ],
)
def test_save_and_load_on_every_rank_and_from_one_process(
    backend: Backend, tmp_path: Path, nproc: int, mode: str
) -> None:
    path = backend.url(f"{mode}-{nproc}", "step-1")
    results = run_ranks(
        tmp_path, nproc, mode=mode, path=path, storage_options=backend.storage_options
    )
    for r, res in results.items():
        assert res["saved"], f"rank {r}: {res.get('error')}"
        assert res["load_equal"], f"rank {r} loaded different values"
    reader = cloudckpt.CheckpointReader(
        storage_config=StorageConfig(storage_options=backend.storage_options)
    )
    manifest = reader.read_manifest(path)
    assert manifest.world_size == nproc
    everything = reader.read_all_ranks(path)
    for r in range(nproc):
        assert_bitwise_equal(everything[r], make_state(r))
        single, _ = reader.read(path, rank=r)
        assert_bitwise_equal(single, make_state(r))


def test_one_rank_failing_fails_every_rank_fast_and_commits_nothing(
    backend: Backend, tmp_path: Path
) -> None:
    previous = backend.url("fail", "step-1")
    run_ranks(tmp_path, 2, mode="sync", path=previous, storage_options=backend.storage_options)
    path = backend.url("fail", "step-2")
    with proxy_for(backend) as proxy:
        # every request that writes rank 1's object fails: retries run out on rank 1 only
        proxy.fail_next("PUT", path_contains="checkpoint_1.pt", status=500, code="InternalError",
                        times=None)
        proxy.fail_next("POST", path_contains="checkpoint_1.pt", status=500, code="InternalError",
                        times=None)
        results = run_ranks(
            tmp_path, 2, mode="async", path=path, storage_options=backend.storage_options,
            rank_storage_options={"1": {"endpoint_url": proxy.endpoint_url}}, max_attempts=3,
        )
    assert results[1]["error_type"] == "RetriesExhaustedError", results[1]
    assert "checkpoint_1.pt" in results[1]["error"]
    assert results[0]["error_type"] == "SaveFailedError", results[0]
    assert "failed on rank 1" in results[0]["error"]
    assert results[0]["seconds"] < COMMIT_TIMEOUT_SECS  # told by rank 1, not timed out
    storage = storage_of(backend)
    assert not storage.exists(f"{path}/{MANIFEST_NAME}")
    assert storage.list_pending_uploads(backend.base_url) == []
    manager = manager_of(backend, "fail")
    assert manager.latest().url == previous  # type: ignore[union-attr]
    assert [(c.name, c.committed) for c in manager.list()] == [("step-1", True), ("step-2", False)]
    reader = cloudckpt.CheckpointReader(
        storage_config=StorageConfig(storage_options=backend.storage_options)
    )
    assert_bitwise_equal(reader.read(previous, rank=1)[0], make_state(1))  # intact


@pytest.mark.parametrize(
    ("mode", "barrier_type"), [("sync", None), ("sync", "dist_barrier"), ("async", None)]
)
def test_serialization_failure_on_one_rank_reaches_the_other(
    backend: Backend, tmp_path: Path, mode: str, barrier_type: str | None
) -> None:
    """With or without an upstream barrier: the failing rank never reaches it, and the other
    rank learns of the failure from the store instead of waiting at the barrier. Async, the
    state dict already fails in staging, before the writer sees it: the trainer records it."""
    path = backend.url(f"poison-{mode}-{barrier_type}", "step-1")
    results = run_ranks(
        tmp_path, 2, mode=mode, path=path, storage_options=backend.storage_options, fail_rank=1,
        barrier={"barrier_type": barrier_type},
    )
    assert "injected serialization failure" in results[1]["error"]
    assert results[0]["error_type"] == "SaveFailedError"
    assert "injected serialization failure" in results[0]["error"]
    assert results[0]["seconds"] < COMMIT_TIMEOUT_SECS
    assert not storage_of(backend).exists(f"{path}/{MANIFEST_NAME}")


def test_killed_writer_fails_the_others_and_gc_cleans_up_after_it(
    backend: Backend, tmp_path: Path
) -> None:
    previous = backend.url("kill", "step-1")
    run_ranks(tmp_path, 2, mode="sync", path=previous, storage_options=backend.storage_options)
    path = backend.url("kill", "step-2")
    # rank 1's writer subprocess SIGKILLs itself once 6 MiB of its 12 MiB object went into
    # 5 MiB parts: one part is uploaded, so a multipart upload is left open on the store
    results = run_ranks(
        tmp_path, 2, mode="async", path=path, storage_options=backend.storage_options,
        kill_writer_rank=1, kill_after_bytes=6 << 20, padding_mib=12,
        upload={"part_size_bytes": 5 << 20, "max_concurrency": 2},
    )
    assert results[1]["error_type"] == "SaveFailedError"
    assert "subprocess died" in results[1]["error"]
    assert results[0]["error_type"] == "SaveFailedError"
    # rank 1's trainer recorded its writer's death: rank 0 did not wait out the timeout
    assert "failed on rank 1" in results[0]["error"]
    assert "subprocess died" in results[0]["error"]
    assert results[0]["seconds"] < COMMIT_TIMEOUT_SECS
    storage = storage_of(backend)
    assert not storage.exists(f"{path}/{MANIFEST_NAME}")
    rank1_object = f"{path}/{rank_object_name(1)}"
    assert not storage.exists(rank1_object)
    pending = storage.list_pending_uploads(path)
    assert [p.url for p in pending] == [rank1_object]

    manager = manager_of(backend, "kill")
    assert [(c.name, c.committed) for c in manager.list()] == [("step-1", True), ("step-2", False)]
    assert manager.latest().url == previous  # type: ignore[union-attr]
    report = manager.gc(older_than_secs=0)
    assert [c.name for c in report.deleted_checkpoints] == ["step-2"]
    assert [p.url for p in report.aborted_uploads] == [rank1_object]
    assert storage.list(path) == []
    assert storage.list_pending_uploads(path) == []
    assert [c.name for c in manager.list()] == ["step-1"]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_checkpointer_built_before_init_process_group_is_refused(
    backend: Backend, tmp_path: Path, mode: str
) -> None:
    """Built before the group exists, it would save as rank 0 of 1 on every rank, each
    overwriting the others' objects: torchrun's WORLD_SIZE makes the builder refuse."""
    path = backend.url(f"early-{mode}", "step-1")
    results = run_ranks(
        tmp_path, 2, mode=mode, path=path, storage_options=backend.storage_options,
        build_before_init=True,
    )  # fmt: skip
    for res in results.values():
        assert res["error_type"] == "ValueError", res
        assert "WORLD_SIZE=2 but no torch.distributed process group" in res["error"]
        assert "call init_process_group before building the checkpointer" in res["error"]
    assert storage_of(backend).list(path) == []


def test_throttling_on_one_rank_is_retried_and_the_save_succeeds(
    backend: Backend, tmp_path: Path
) -> None:
    path = backend.url("throttle", "step-1")
    with proxy_for(backend) as proxy:
        proxy.configure(throttle_fraction=0.3)
        results = run_ranks(
            tmp_path, 2, mode="sync", path=path, storage_options=backend.storage_options,
            rank_storage_options={"1": {"endpoint_url": proxy.endpoint_url}}, max_attempts=12,
        )
        throttled = proxy.count(outcome="error 503")
    for r, res in results.items():
        assert res["saved"] and res["load_equal"], f"rank {r}: {res}"
    assert throttled > 0
    assert storage_of(backend).exists(f"{path}/{MANIFEST_NAME}")


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("barrier_type", ["tcp_store", "dist_barrier"])
def test_upstream_barriers_selected_through_barrier_config(
    backend: Backend, tmp_path: Path, barrier_type: str, mode: str
) -> None:
    """Upstream's barrier types, as upstream configures them, in the trainer (sync) and in
    the writer subprocess (async), over two saves: the rank fields come from RankInfo."""
    barrier_args = {"tcpstore_port": find_free_port()} if barrier_type == "tcp_store" else {}
    paths = [backend.url(f"{barrier_type}-{mode}", f"step-{step}") for step in (1, 2)]
    results = run_ranks(
        tmp_path,
        2,
        mode=mode,
        paths=paths,
        storage_options=backend.storage_options,
        barrier={"barrier_type": barrier_type, "barrier_args": barrier_args},
    )
    for r, res in results.items():
        assert res["saved"], f"rank {r}: {res.get('error')}"
        assert res["load_equal"], f"rank {r} loaded different values"
        assert res["barrier_ran"] == [True, True], f"rank {r}"
    reader = cloudckpt.CheckpointReader(
        storage_config=StorageConfig(storage_options=backend.storage_options)
    )
    for path in paths:
        assert reader.read_manifest(path).world_size == 2
