"""Async saves: snapshot isolation, reusable staging buffers, flat memory, writer death,
back-pressure and the zero-copy hand-off (cloudckpt.staging, cloudckpt.process).

The CUDA variants run the same checks with CUDA tensors and pinned buffers; they skip, with
the reason, on hosts without a CUDA device. Nothing here asserts on time: memory is checked
through RSS deltas, shared memory through the segments each process maps or holds open, and
ordering through state observed at the moment an event happens.
"""

from __future__ import annotations

import copy
import gc
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
import torch.multiprocessing as mp
from backends import Backend
from cases import all_cases_state_dict, assert_bitwise_equal, shares_storage

import cloudckpt
import cloudckpt.checkpointer
from cloudckpt import (
    BarrierConfig,
    CheckpointerConfig,
    CheckpointWriter,
    RetryConfig,
    SaveFailedError,
    WriterHook,
)
from cloudckpt._upstream import create_barrier_from_config
from cloudckpt.config import default_staging_config
from cloudckpt.manifest import MANIFEST_NAME, rank_object_name
from cloudckpt.process import decode_write, encode_write
from cloudckpt.staging import CloudStager
from cloudckpt.storage import Storage, get_storage, join_url

MiB = 1 << 20
FAST_RETRY = RetryConfig(max_attempts=3, initial_backoff_secs=0.01, max_backoff_secs=0.05)
# A guard against hanging forever when something is broken, never a pacing device.
CONDITION_TIMEOUT_SECS = 180.0
NO_CUDA_REASON = "no CUDA device: torch.cuda.is_available() is False on this host"
# Skipped at collection, before any fixture starts a writer subprocess for nothing.
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA_REASON)
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]


# --- helpers --------------------------------------------------------------------------------


def device_or_skip(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip(NO_CUDA_REASON)
    return torch.device(device)


def config_for(backend: Backend) -> CheckpointerConfig:
    return CheckpointerConfig(storage_options=backend.storage_options, retry_config=FAST_RETRY)


def storage_for(backend: Backend) -> Storage:
    return get_storage(backend.base_url, config_for(backend).storage_config())


def is_committed(backend: Backend, url: str) -> bool:
    return storage_for(backend).exists(join_url(url, MANIFEST_NAME))


def model_state(device: torch.device, total_mib: int = 8, n: int = 4) -> dict[str, Any]:
    """``n`` float32 tensors of ``total_mib / n`` MiB each, plus a view, a transposed view and
    non-tensor leaves."""
    g = torch.Generator().manual_seed(1)
    per = total_mib * MiB // n // 4
    layers = {f"layer{i}": torch.randn(per, generator=g).to(device) for i in range(n)}
    square = torch.randn(64, 64, generator=g).to(device)
    return {
        "model": layers,
        "square": square,
        "square_t": square.t(),
        "head": layers["layer0"][:128],
        "step": 7,
        "schedule": {"lr": [0.1, 0.01], "name": "cosine"},
    }


def cpu_snapshot(sd: Any) -> Any:
    """A CPU deep copy that keeps views and sharing (what the checkpoint must contain)."""
    return copy.deepcopy(_to_cpu(sd, {}))


def _to_cpu(obj: Any, memo: dict[int, Any]) -> Any:
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "cpu":
            return obj
        base = memo.setdefault(
            obj.untyped_storage()._cdata, obj.untyped_storage().cpu()
        )  # one CPU storage per device storage
        return torch.empty(0, dtype=obj.dtype).set_(
            base, obj.storage_offset(), obj.size(), obj.stride()
        )
    if isinstance(obj, dict):
        return {k: _to_cpu(v, memo) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v, memo) for v in obj]
    return obj


def mutate_everything(sd: dict[str, Any]) -> None:
    """What a training step does right after the stage future resolves."""
    for t in sd["model"].values():
        t.mul_(-3.0).add_(1.0)
    sd["square"].zero_()
    sd["schedule"]["lr"].append(0.001)
    sd["schedule"]["name"] = "linear"


def shm_segments(pid: int) -> set[str]:
    """Shared-memory segments a process maps or holds open (torch's fd-backed segments are
    unlinked at creation: they only show up here, never in /dev/shm)."""
    names: set[str] = set()
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                if "/dev/shm/" in line:
                    names.add(line.split(maxsplit=5)[5].strip())
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue  # closed meanwhile
            if target.startswith("/dev/shm/"):
                names.add(target)
    except FileNotFoundError:
        return set()  # the process is gone, and its mappings with it
    return names


def dev_shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm"))


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def writer_pid(ckpt: cloudckpt.AsyncCheckpointer) -> int:
    pid = ckpt._checkpoint_process.pid
    assert pid is not None, "no writer subprocess is running"
    return pid


def stager(ckpt: cloudckpt.AsyncCheckpointer) -> CloudStager:
    st = ckpt._checkpoint_stager
    assert isinstance(st, CloudStager)
    return st


def save_and_wait(ckpt: cloudckpt.AsyncCheckpointer, url: str, sd: Any) -> cloudckpt.SaveMetrics:
    stage_future, write_future = ckpt.save(url, sd)
    stage_future.result()
    metrics = write_future.result()
    assert metrics.committed
    return metrics


def delete_prefix(backend: Backend, url: str) -> None:
    storage = storage_for(backend)
    storage.delete([info.url for info in storage.list(url)])


# --- writer-side helpers (run inside the spawned subprocess; must be importable there) --------

_SIGNAL: Connection | None = None


def install_signal(conn: Connection) -> None:
    """subprocess_init_fn: keep the test's pipe for the stalling upload below."""
    global _SIGNAL
    _SIGNAL = conn


class _StallingUpload:
    """Delegates to a real upload; its first write tells the test and then blocks forever."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._signalled = False

    def write(self, data: Any) -> int:
        if not self._signalled:
            self._signalled = True
            n = self._inner.write(data)  # the upload has really started
            assert _SIGNAL is not None
            _SIGNAL.send(("upload-started", os.getpid()))
            _SIGNAL.recv()  # released by the test, or never (killed)
            return n
        return self._inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _StallingStorage:
    def __init__(self, inner: Storage) -> None:
        self._inner = inner

    def open_upload(self, url: str, **kwargs: Any) -> Any:
        upload = self._inner.open_upload(url, **kwargs)
        return _StallingUpload(upload) if "/stall" in url else upload

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class StallingWriter(CheckpointWriter):
    """Uploads to URLs containing ``/stall`` stop after their first write (see above)."""

    def storage(self, url: str) -> Any:
        return _StallingStorage(super().storage(url))


def make_stalling_writer(rank_info: Any, **kwargs: Any) -> CheckpointWriter:
    return StallingWriter(
        config=kwargs.get("config"),
        rank_info=rank_info,
        barrier=create_barrier_from_config(BarrierConfig()),
        commit_hook=kwargs.get("commit_hook"),
        storage_config=kwargs.get("storage_config"),
    )


class RefusingHook(WriterHook):
    """Fails saves to URLs containing ``/refuse`` after their object is fully uploaded."""

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        if "/refuse" in path:
            raise RuntimeError(f"pre_commit refused {path}")

    def post_commit(self, path: str, **kwargs: Any) -> None:
        return None


@pytest.fixture
def stalling_ckpt(backend: Backend) -> Iterator[tuple[cloudckpt.AsyncCheckpointer, Connection]]:
    """An async checkpointer whose uploads to ``.../stall*`` block, and the pipe that reports
    (``("upload-started", pid)``) and releases (send anything) them."""
    parent, child = mp.get_context("spawn").Pipe()
    config = config_for(backend)
    ckpt = cloudckpt.make_async_checkpointer(
        config,
        subprocess_init_fn=install_signal,
        subprocess_init_args=(child,),
        checkpoint_writer_init_fn=make_stalling_writer,
        checkpoint_writer_init_args={
            "config": config.writer_config,
            "storage_config": config.storage_config(),
        },
    )
    try:
        yield ckpt, parent
    finally:
        # Pipe first: a writer still stalled (a failed test) then sees EOF, its write fails
        # and close() does not wait for it forever.
        parent.close()
        child.close()
        ckpt.close()


def wait_for_upload_start(signals: Connection) -> int:
    assert signals.poll(CONDITION_TIMEOUT_SECS), "the stalled upload never started"
    event, pid = signals.recv()
    assert event == "upload-started"
    return pid


# --- staging buffers and the hand-off (no subprocess) ---------------------------------------


def test_staged_dict_keeps_views_sharing_and_values() -> None:
    sd = all_cases_state_dict()
    sd["param"] = torch.nn.Parameter(torch.randn(3, 3))
    st = CloudStager(default_staging_config())
    try:
        staged = st.stage(sd).result()  # type: ignore[union-attr]
        assert_bitwise_equal(staged, sd)
        assert shares_storage(staged["shared_a"], staged["shared_b"])
        assert shares_storage(staged["shared_a"], staged["transposed"])
        assert staged["transposed"].stride() == (1, 6)
        assert isinstance(staged["param"], torch.nn.Parameter) and staged["param"].requires_grad
        assert staged["nested"]["list"] is not sd["nested"]["list"]  # non-tensors are copied
        for name in ("shared_a", "scalar_0d"):
            assert (
                staged[name].untyped_storage().data_ptr() != sd[name].untyped_storage().data_ptr()
            )
            assert staged[name].is_shared()
    finally:
        st.close()


def test_buffers_are_reused_and_reallocated_when_the_layout_changes() -> None:
    sd = model_state(torch.device("cpu"))
    st = CloudStager(default_staging_config())
    me = os.getpid()
    before = shm_segments(me)
    try:
        st.stage(sd).result()  # type: ignore[union-attr]
        ptrs, allocations = st.buffer_data_ptrs(), st.allocations
        for _ in range(3):
            sd["model"]["layer1"].add_(1.0)
            staged = st.stage(sd).result()  # type: ignore[union-attr]
            assert st.buffer_data_ptrs() == ptrs and st.allocations == allocations
            assert torch.equal(staged["model"]["layer1"], sd["model"]["layer1"])
        held = shm_segments(me) - before
        assert len(held) == len([p for p in ptrs if p])  # one segment per non-empty buffer

        # A new layout: layer1 grows, an optimizer state appears. Only those are allocated,
        # the old layer1 buffer goes away.
        sd["model"]["layer1"] = torch.randn(3 * MiB // 4)
        sd["optim"] = {"exp_avg": torch.zeros(1000)}
        del staged
        staged = st.stage(sd).result()  # type: ignore[union-attr]
        assert st.allocations == allocations + 2
        new_ptrs = st.buffer_data_ptrs()
        kept = set(ptrs) & set(new_ptrs)
        assert len(kept) == len(ptrs) - 1
        assert torch.equal(staged["model"]["layer1"], sd["model"]["layer1"])
        assert len(shm_segments(me) - before) == len(held) + 1
    finally:
        st.close()
    del staged
    gc.collect()
    assert shm_segments(me) - before == set()


def test_buffers_never_appear_in_dev_shm_even_with_the_file_system_strategy() -> None:
    previous = mp.get_sharing_strategy()
    entries = dev_shm_entries()
    mp.set_sharing_strategy("file_system")
    try:
        st = CloudStager(default_staging_config())
        staged = st.stage(model_state(torch.device("cpu"))).result()  # type: ignore[union-attr]
        assert dev_shm_entries() - entries == set()
        del staged
        st.close()
    finally:
        mp.set_sharing_strategy(previous)
    assert dev_shm_entries() - entries == set()


@pytest.mark.parametrize("device", DEVICES)
def test_staged_bytes_do_not_go_through_the_pipe(device: str) -> None:
    dev = device_or_skip(device)
    sd = model_state(dev, total_mib=16)
    tensor_bytes = 16 * MiB
    st = CloudStager(default_staging_config())
    try:
        staged = st.stage(sd).result()  # type: ignore[union-attr]
        assert all(t.device.type == "cpu" for t in staged["model"].values())
        if dev.type == "cuda":
            assert all(t.is_pinned() for t in staged["model"].values())
        # torch.multiprocessing's reductions send handles: upstream's CheckpointProcess path.
        handles = ForkingPickler.dumps(staged)
        assert len(handles) < 16 * 1024 < tensor_bytes // 100
        # (Loading here fetches the descriptors torch parked for a receiver, and checks them.)
        assert_bitwise_equal(ForkingPickler.loads(handles), cpu_snapshot(sd))
        # cloudckpt's own hand-off: a small pickle plus one descriptor per storage.
        data, fds, storages = encode_write((staged, {}))
        assert len(data) < 16 * 1024
        assert len(fds) == 5  # four layers (one viewed by head) and square (and its transpose)
        sizes = [s.nbytes() for s in storages]
        received, _ = decode_write(data, fds, sizes)  # maps the same pages
        assert_bitwise_equal(received, cpu_snapshot(sd))
        assert shares_storage(received["head"], received["model"]["layer0"])
        assert shares_storage(received["square"], received["square_t"])
    finally:
        st.close()


def test_unstaged_storages_are_sent_by_value() -> None:
    sd = {"plain": torch.arange(10), "f8": torch.zeros(4, dtype=torch.float8_e4m3fn)}
    data, fds, _ = encode_write(sd)
    assert fds == []
    assert_bitwise_equal(decode_write(data, fds, []), sd)


# --- async saves ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "device"),
    [("local", "cpu"), ("moto", "cpu"), pytest.param("local", "cuda", marks=NEEDS_CUDA)],
    indirect=["backend"],
)
def test_snapshot_isolation(backend: Backend, device: str) -> None:
    dev = device_or_skip(device)
    sd = model_state(dev)
    expected = cpu_snapshot(sd)
    ckpt = cloudckpt.make_async_checkpointer(config_for(backend))
    try:
        url = backend.url("step-1")
        stage_future, write_future = ckpt.save(url, sd)
        stage_future.result()
        mutate_everything(sd)  # right away, while the upload runs
        metrics = write_future.result()
        assert metrics.committed
        assert metrics.blocked_secs is not None and metrics.commit_secs is not None
        assert metrics.blocked_secs <= metrics.commit_secs
        assert_bitwise_equal(ckpt.load(url), expected)
    finally:
        ckpt.close()


@pytest.mark.parametrize(
    ("backend", "device"),
    [("local", "cpu"), ("moto", "cpu"), pytest.param("local", "cuda", marks=NEEDS_CUDA)],
    indirect=["backend"],
)
def test_ten_saves_keep_memory_flat_and_close_frees_everything(
    backend: Backend, device: str
) -> None:
    dev = device_or_skip(device)
    me = os.getpid()
    segments_before, dev_shm_before = shm_segments(me), dev_shm_entries()
    sd = model_state(dev, total_mib=64)
    ckpt = cloudckpt.make_async_checkpointer(config_for(backend))
    try:
        rss_after: dict[int, tuple[int, int]] = {}
        for i in range(1, 11):
            url = backend.url(f"step-{i}")
            sd["model"]["layer0"].add_(1.0)
            save_and_wait(ckpt, url, sd)
            if i == 1:
                ptrs, allocations, pid = (
                    stager(ckpt).buffer_data_ptrs(),
                    stager(ckpt).allocations,
                    writer_pid(ckpt),
                )
                if dev.type == "cuda":
                    assert all(b.pinned for b in stager(ckpt)._buffers if b.nbytes)
            # Same layout: the same buffers, no allocation, the same writer.
            assert stager(ckpt).buffer_data_ptrs() == ptrs
            assert stager(ckpt).allocations == allocations
            assert writer_pid(ckpt) == pid
            # Between writes the writer maps the stager's buffers and nothing else.
            assert shm_segments(pid) == shm_segments(me) - segments_before
            if i >= 3:
                gc.collect()
                rss_after[i] = (rss(me), rss(pid))
            if i > 2:  # keep two, as a retention policy would (and moto's memory bounded)
                delete_prefix(backend, backend.url(f"step-{i - 2}"))
        assert torch.equal(
            ckpt.load(backend.url("step-10"))["model"]["layer0"], sd["model"]["layer0"].cpu()
        )
        # A new layout: one buffer is replaced, in the trainer and in the writer.
        held = shm_segments(me) - segments_before
        sd["model"]["layer1"] = torch.randn(8 * MiB // 4, device=dev)
        save_and_wait(ckpt, backend.url("step-11"), sd)
        assert stager(ckpt).allocations == allocations + 1
        now_held = shm_segments(me) - segments_before
        assert len(now_held) == len(held) and len(now_held & held) == len(held) - 1
        assert shm_segments(pid) == now_held
        trainer_growth = rss_after[10][0] - rss_after[3][0]
        writer_growth = rss_after[10][1] - rss_after[3][1]
        assert writer_growth < 64 * MiB, f"writer RSS grew by {writer_growth / MiB:.1f} MiB"
        if backend.name != "moto":  # moto serves S3 from inside this process: its RSS too
            assert trainer_growth < 64 * MiB, f"trainer RSS grew by {trainer_growth / MiB:.1f} MiB"
    finally:
        ckpt.close()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    gc.collect()
    assert shm_segments(me) - segments_before == set()
    assert dev_shm_entries() - dev_shm_before == set()


@pytest.mark.parametrize(
    ("backend", "device"),
    [("local", "cpu"), pytest.param("local", "cuda", marks=NEEDS_CUDA)],
    indirect=["backend"],
)
def test_writer_killed_mid_save_fails_the_save_and_the_next_one_succeeds(
    backend: Backend, device: str, stalling_ckpt: tuple[cloudckpt.AsyncCheckpointer, Connection]
) -> None:
    dev = device_or_skip(device)
    ckpt, signals = stalling_ckpt
    me = os.getpid()
    sd = model_state(dev, total_mib=16)
    warm_url = backend.url("warm")
    save_and_wait(ckpt, warm_url, sd)  # buffers exist from here on
    buffers = len([p for p in stager(ckpt).buffer_data_ptrs() if p])
    allocations = stager(ckpt).allocations
    segments_before = shm_segments(me)

    url = backend.url("stall-1")
    stage_future, write_future = ckpt.save(url, sd)
    stage_future.result()
    pid = wait_for_upload_start(signals)
    assert pid == writer_pid(ckpt)
    assert len(shm_segments(pid)) == buffers  # the writer maps the staged buffers
    os.kill(pid, signal.SIGKILL)

    with pytest.raises(SaveFailedError) as excinfo:
        write_future.result(timeout=CONDITION_TIMEOUT_SECS)
    message = str(excinfo.value)
    assert url in message and f"exit code {-signal.SIGKILL}" in message
    assert not is_committed(backend, url)
    assert not os.path.exists(os.path.join(url, rank_object_name(0)))
    # The dead writer's mappings and any descriptor in flight are gone; the stager keeps its
    # buffers for the next save.
    assert shm_segments(me) == segments_before

    after_url = backend.url("after-kill")
    sd["model"]["layer2"].fill_(5.0)
    metrics = save_and_wait(ckpt, after_url, sd)
    assert metrics.committed and writer_pid(ckpt) != pid
    assert stager(ckpt).allocations == allocations
    assert_bitwise_equal(ckpt.load(after_url), cpu_snapshot(sd))


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_a_save_waits_for_the_previous_upload(
    backend: Backend,
    stalling_ckpt: tuple[cloudckpt.AsyncCheckpointer, Connection],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ckpt, signals = stalling_ckpt
    sd = model_state(torch.device("cpu"))
    first, second = backend.url("stall-first"), backend.url("second")

    # Observe, at the moment each happens, where the second save stands.
    waiting = threading.Event()
    first_committed_at_stage: list[bool] = []
    real_wait = cloudckpt.checkpointer.wait

    def recording_wait(fs: Any, *args: Any, **kwargs: Any) -> Any:
        waiting.set()
        return real_wait(fs, *args, **kwargs)

    monkeypatch.setattr(cloudckpt.checkpointer, "wait", recording_wait)
    real_stage = ckpt._checkpoint_stager.stage

    def recording_stage(state_dict: Any, **kwargs: Any) -> Any:
        first_committed_at_stage.append(is_committed(backend, first))
        return real_stage(state_dict, **kwargs)

    monkeypatch.setattr(ckpt._checkpoint_stager, "stage", recording_stage)

    stage1, write1 = ckpt.save(first, sd)
    stage1.result()
    wait_for_upload_start(signals)
    waiting.clear()
    second_futures: list[tuple[Future, Future]] = []
    saver = threading.Thread(target=lambda: second_futures.append(ckpt.save(second, sd)))
    saver.start()
    assert waiting.wait(CONDITION_TIMEOUT_SECS)
    # The second save is parked on the first's write future: it has not staged anything.
    assert first_committed_at_stage == [False]  # only the first save staged so far
    assert not write1.done() and saver.is_alive()
    signals.send("go")  # let the first upload finish
    saver.join(CONDITION_TIMEOUT_SECS)
    assert not saver.is_alive()
    assert write1.result().committed
    stage2, write2 = second_futures[0]
    stage2.result()
    assert write2.result().committed
    # The second save staged only once the first was committed.
    assert first_committed_at_stage == [False, True]


@pytest.mark.parametrize(
    ("backend", "device"),
    [("local", "cpu"), pytest.param("local", "cuda", marks=NEEDS_CUDA)],
    indirect=["backend"],
)
def test_failed_save_releases_what_it_held(backend: Backend, device: str) -> None:
    dev = device_or_skip(device)
    me = os.getpid()
    segments_start = shm_segments(me)
    sd = model_state(dev, total_mib=64)
    ckpt = cloudckpt.make_async_checkpointer(config_for(backend), commit_hook=RefusingHook())
    try:
        save_and_wait(ckpt, backend.url("ok-1"), sd)
        save_and_wait(ckpt, backend.url("ok-2"), sd)
        pid = writer_pid(ckpt)
        gc.collect()
        rss_ok = (rss(me), rss(pid))
        segments_ok = shm_segments(me)
        allocations = stager(ckpt).allocations

        for i in range(3):
            url = backend.url(f"refuse-{i}")
            stage_future, write_future = ckpt.save(url, sd)
            stage_future.result()
            with pytest.raises(RuntimeError, match="pre_commit refused"):
                write_future.result()
            assert not is_committed(backend, url)
            assert writer_pid(ckpt) == pid  # a failed write does not cost the writer
            assert shm_segments(pid) == segments_ok - segments_start  # only the buffers

        gc.collect()
        trainer_growth, writer_growth = rss(me) - rss_ok[0], rss(pid) - rss_ok[1]
        assert writer_growth < 64 * MiB, f"writer RSS grew by {writer_growth / MiB:.1f} MiB"
        assert trainer_growth < 64 * MiB, f"trainer RSS grew by {trainer_growth / MiB:.1f} MiB"
        assert shm_segments(me) == segments_ok
        assert stager(ckpt).allocations == allocations
        save_and_wait(ckpt, backend.url("ok-3"), sd)
    finally:
        ckpt.close()


ORPHAN_TRAINER = """
import os, sys, time, torch, cloudckpt

class Stall(cloudckpt.WriterHook):
    def pre_commit(self, path, **kwargs):
        print("stalling", os.getpid(), flush=True)
        time.sleep(600)

    def post_commit(self, path, **kwargs):
        pass

if __name__ == "__main__":
    ckpt = cloudckpt.make_async_checkpointer(cloudckpt.CheckpointerConfig(), commit_hook=Stall())
    ckpt.save(sys.argv[1], {"w": torch.ones(1000)})
    time.sleep(600)
"""


def test_writer_exits_when_its_trainer_is_killed_mid_save(tmp_path: Path) -> None:
    """A writer busy with a save must not outlive its trainer (kill -9, OOM), holding the
    staged memory and waiting on a commit nobody will use."""
    script = tmp_path / "trainer.py"
    script.write_text(ORPHAN_TRAINER)
    trainer = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "step-1")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert trainer.stdout is not None
        line = trainer.stdout.readline()  # the writer, inside the save (its pre_commit hook)
        assert line.startswith("stalling "), line
        writer = psutil.Process(int(line.split()[1]))
    finally:
        trainer.kill()
        trainer.wait(timeout=30)
    deadline = time.monotonic() + 30  # it checks every PARENT_POLL_SECS (1 s)
    while _alive(writer):
        assert time.monotonic() < deadline, "the writer outlived its trainer by 30 s"
        time.sleep(0.1)


def _alive(process: psutil.Process) -> bool:
    """Running and not a zombie (a container's init may never reap it)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_writer_that_does_not_start_in_time_fails_the_save_naming_the_main_guard(
    tmp_path: Path,
) -> None:
    """The usual cause: a script without ``if __name__ == "__main__":`` re-runs its training
    in the spawned writer. Stood in for by an initializer slower than the start timeout."""
    config = CheckpointerConfig(
        process_config=cloudckpt.config.CheckpointProcessConfig(subprocess_init_timeout_secs=1)
    )
    ckpt = cloudckpt.make_async_checkpointer(
        config, subprocess_init_fn=time.sleep, subprocess_init_args=(30,)
    )
    try:
        _stage, write = ckpt.save(str(tmp_path / "step-1"), {"w": torch.ones(4)})
        with pytest.raises(SaveFailedError, match="did not answer in 1s") as err:
            write.result()
        assert err.value.rank == 0
        assert 'if __name__ == "__main__":' in str(err.value)
    finally:
        ckpt.close()
