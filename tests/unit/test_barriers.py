"""Multi-rank coordination without launching ranks: the store rendezvous on memory:// with a fake
clock, upstream barrier construction, the writer's store barrier on a real TCPStore, and whole
multi-rank saves with one thread per rank."""

from __future__ import annotations

import gc
import io
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
from cases import assert_bitwise_equal

import cloudckpt
import cloudckpt.manifest
from cloudckpt import BarrierConfig, RankInfo
from cloudckpt.barriers import (
    StoreAddress,
    StoreBarrier,
    StoreRendezvous,
    check_rank_info_unchanged,
    check_writer_barrier_config,
    default_rank_info,
    make_barrier,
    rank_record_url,
)
from cloudckpt.config import CheckpointWriterConfig
from cloudckpt.errors import CheckpointError, SaveFailedError, StateDictMismatchError
from cloudckpt.manifest import MANIFEST_NAME
from cloudckpt.storage import Storage, get_storage, join_url
from localstack.servers import find_free_port


@pytest.fixture
def url() -> str:
    return f"memory://bucket/{uuid.uuid4().hex}/step-1"


@pytest.fixture
def storage(url: str) -> Storage:
    return get_storage(url)


class FakeClock:
    """A clock that moves only when the rendezvous sleeps; records each delay."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, secs: float) -> None:
        self.sleeps.append(secs)
        self.now += secs


def rendezvous(
    storage: Storage, url: str, rank: int, world: int, clock: FakeClock, timeout: float = 5.0
) -> StoreRendezvous:
    return StoreRendezvous(
        storage,
        url,
        "run-1",
        RankInfo(global_rank=rank, global_world_size=world),
        timeout_secs=timeout,
        poll_interval_secs=0.5,
        clock=clock,
        sleep=clock.sleep,
    )


def test_missing_rank_times_out_naming_it_with_backed_off_polls(storage: Storage, url: str) -> None:
    clock = FakeClock()
    storage.put_bytes(rank_record_url(url, "run-1", 0), b"{}")
    storage.put_bytes(rank_record_url(url, "run-1", 2), b"{}")
    with pytest.raises(SaveFailedError, match=r"rank\(s\) \[1\] did not finish within 5s") as err:
        rendezvous(storage, url, 0, 3, clock).wait_all_ranks()
    assert err.value.url == url and err.value.rank == 0
    assert "commit_timeout_secs" in str(err.value)
    # 10 ms first, doubling up to the 0.5 s poll interval, until the 5 s deadline
    assert clock.sleeps[:7] == [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.5]
    assert set(clock.sleeps[7:]) == {0.5}
    assert 5.0 <= clock.now < 5.5


def test_a_failed_rank_fails_the_wait_at_once_with_its_error(storage: Storage, url: str) -> None:
    clock = FakeClock()
    storage.put_bytes(rank_record_url(url, "run-1", 0), b"{}")
    rendezvous(storage, url, 1, 3, clock).report_failure(ValueError("disk on fire"))
    with pytest.raises(SaveFailedError, match="failed on rank 1: ValueError: disk on fire"):
        rendezvous(storage, url, 0, 3, clock).wait_all_ranks()
    assert clock.sleeps == []  # rank 2 is still missing, but the failure decides


def test_all_ranks_present_returns_without_waiting(storage: Storage, url: str) -> None:
    clock = FakeClock()
    for r in range(4):
        storage.put_bytes(rank_record_url(url, "run-1", r), b"{}")
    rendezvous(storage, url, 2, 4, clock).wait_all_ranks()
    assert clock.sleeps == []


def test_wait_commit_sees_this_saves_commit_the_commit_failure_or_the_deadline(
    storage: Storage, url: str
) -> None:
    """Phase 2 waits for this save's committed marker, not for a manifest at the path: another
    job's manifest, or one a later overwrite deletes at once, must not count."""
    clock = FakeClock()
    storage.put_bytes(join_url(url, MANIFEST_NAME), b"{}")  # e.g. another job's commit
    with pytest.raises(SaveFailedError, match="rank 0 did not commit within 2s"):
        rendezvous(storage, url, 1, 2, clock, timeout=2.0).wait_commit()
    storage.delete([join_url(url, ".cloudckpt", "run-1", "decision.json")])
    rendezvous(storage, url, 0, 2, clock).report_commit_failure(RuntimeError("quota"))
    with pytest.raises(SaveFailedError, match="rank 0 could not commit: RuntimeError: quota"):
        rendezvous(storage, url, 1, 2, FakeClock()).wait_commit()
    rendezvous(storage, url, 0, 2, FakeClock()).report_committed()
    rendezvous(storage, url, 1, 2, FakeClock()).wait_commit()


def test_a_rank_that_gave_up_keeps_rank_0_from_committing(storage: Storage, url: str) -> None:
    """Rank 1 times out waiting for rank 0 and claims the abort; rank 0, slow but alive, then
    passes its checks and must not commit: no rank reports a failure for a committed save."""
    storage.put_bytes(rank_record_url(url, "run-1", 1), b"{}")
    with pytest.raises(SaveFailedError, match=r"rank\(s\) \[0\] did not finish within 5s"):
        rendezvous(storage, url, 1, 2, FakeClock()).wait_all_ranks()
    storage.put_bytes(rank_record_url(url, "run-1", 0), b"{}")
    with pytest.raises(SaveFailedError, match=r"rank 1 gave up: rank\(s\) \[0\] did not finish"):
        rendezvous(storage, url, 0, 2, FakeClock()).claim_commit()
    # ... and a third rank still waiting learns it at its next poll
    with pytest.raises(SaveFailedError, match="rank 1 gave up"):
        rendezvous(storage, url, 2, 3, FakeClock()).wait_commit()


def test_a_rank_whose_wait_ends_after_the_commit_claim_waits_for_the_commit(
    storage: Storage, url: str
) -> None:
    for r in range(2):
        storage.put_bytes(rank_record_url(url, "run-1", r), b"{}")
    rendezvous(storage, url, 0, 2, FakeClock()).claim_commit()
    clock = FakeClock()
    with pytest.raises(SaveFailedError, match="may still become committed") as err:
        rendezvous(storage, url, 1, 2, clock, timeout=2.0).wait_commit()
    assert "claimed the commit but did not finish it within 4s" in str(err.value)
    assert 4.0 <= clock.now < 5.0  # once more up to the timeout, then a bounded failure
    rendezvous(storage, url, 0, 2, FakeClock()).report_committed()
    rendezvous(storage, url, 1, 2, FakeClock(), timeout=2.0).wait_commit()


def _empty_layout() -> Any:
    from cloudckpt.format import serialize

    return serialize({"x": 1}, io.BytesIO())


def test_a_missing_committed_marker_falls_back_to_this_saves_manifest(
    storage: Storage, url: str
) -> None:
    """Rank 0 wrote the manifest but not its marker (a failed PUT, a crash in between): the
    others accept the manifest only if it names their save."""
    for r in range(2):
        storage.put_bytes(rank_record_url(url, "run-1", r), b"{}")
    rendezvous(storage, url, 0, 2, FakeClock()).claim_commit()
    entries = tuple(
        cloudckpt.manifest.RankEntry(r, f"checkpoint_{r}.pt", None, _empty_layout())
        for r in range(2)
    )
    manifest_url = join_url(url, MANIFEST_NAME)
    another = cloudckpt.manifest.Manifest(world_size=2, ranks=entries, save_id="run-0")
    storage.put_bytes(manifest_url, another.to_json())
    clock = FakeClock()
    with pytest.raises(SaveFailedError, match="did not finish it within 4s"):
        rendezvous(storage, url, 1, 2, clock, timeout=2.0).wait_commit()
    ours = cloudckpt.manifest.Manifest(world_size=2, ranks=entries, save_id="run-1")
    assert cloudckpt.manifest.Manifest.from_json(ours.to_json(), url=url).save_id == "run-1"
    storage.put_bytes(manifest_url, ours.to_json())
    clock = FakeClock()
    rendezvous(storage, url, 1, 2, clock, timeout=2.0).wait_commit()
    assert 2.0 <= clock.now < 3.0  # at the first deadline


def test_a_failure_record_after_the_commit_claim_does_not_fail_the_save(
    storage: Storage, url: str
) -> None:
    """A rank's writer that dies after its record was written gets a failure record from its
    trainer; once rank 0 claimed the commit, that record no longer decides."""
    for r in range(3):
        storage.put_bytes(rank_record_url(url, "run-1", r), b"{}")
    rendezvous(storage, url, 0, 3, FakeClock()).claim_commit()
    rendezvous(storage, url, 1, 3, FakeClock()).report_failure(RuntimeError("writer died"))
    rendezvous(storage, url, 2, 3, FakeClock()).wait_all_ranks()  # no raise
    # without the claim, the same record fails the save and claims the abort
    other = url.rsplit("/", 1)[0] + "/step-2"
    rendezvous(storage, other, 1, 2, FakeClock()).report_failure(RuntimeError("writer died"))
    with pytest.raises(SaveFailedError, match="failed on rank 1: RuntimeError: writer died"):
        rendezvous(storage, other, 0, 2, FakeClock()).wait_all_ranks()
    with pytest.raises(SaveFailedError, match=r"gave up: save to .* failed on rank 1"):
        rendezvous(storage, other, 0, 2, FakeClock()).claim_commit()


def test_a_retried_commit_claim_that_landed_counts_as_taken(storage: Storage, url: str) -> None:
    rank0 = rendezvous(storage, url, 0, 2, FakeClock())
    rank0.claim_commit()
    rank0.claim_commit()  # the same claim again (a retried put): not a conflict


# --- upstream barrier construction ----------------------------------------------------------


def test_no_barrier_by_default() -> None:
    assert make_barrier(BarrierConfig(), RankInfo(global_rank=0, global_world_size=2), 60) is None


def test_unknown_barrier_type_names_the_registered_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown barrier type 'nope'.*dist_barrier.*tcp_store"):
        make_barrier(BarrierConfig("nope"), RankInfo(global_rank=0, global_world_size=1), 60)


def test_tcp_store_without_a_port_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(ValueError, match=r"needs barrier_args \['tcpstore_port'\]"):
        check_writer_barrier_config(
            BarrierConfig("tcp_store"), RankInfo(global_rank=1, global_world_size=2), 60
        )
    monkeypatch.delenv("MASTER_ADDR")
    with pytest.raises(ValueError, match=r"\['tcpstore_port', 'master_address'\]"):
        make_barrier(BarrierConfig("tcp_store"), RankInfo(global_rank=1, global_world_size=2), 60)


def test_tcp_store_barrier_gets_its_rank_fields_from_rank_info() -> None:
    """Upstream's BarrierConfig carries one barrier_args for all ranks, so the per-rank fields
    come from RankInfo; one rank with world size 1 passes its own barrier."""
    config = BarrierConfig(
        "tcp_store", {"tcpstore_port": find_free_port(), "master_address": "127.0.0.1"}
    )
    barrier = make_barrier(config, RankInfo(global_rank=0, global_world_size=1), 0.5)
    assert isinstance(barrier, StoreBarrier)
    assert (barrier._rank, barrier._world) == (0, 1)
    assert barrier._prefix == "cloudckpt-commit/"
    assert barrier._timeout == 0.5  # not truncated to 0 whole seconds
    barrier.execute_barrier()
    barrier.execute_barrier()


def test_explicit_barrier_args_win_over_injected_ones() -> None:
    config = BarrierConfig(
        "tcp_store",
        {
            "tcpstore_port": find_free_port(),
            "master_address": "127.0.0.1",
            "barrier_prefix": "mine",
            "global_rank": 0,
            "global_world_size": 1,
            "timeout_secs": 7,
        },
    )
    barrier = make_barrier(config, RankInfo(global_rank=0, global_world_size=1), 30)
    assert isinstance(barrier, StoreBarrier)
    assert (barrier._prefix, barrier._timeout) == ("mine/", 7)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (None, "barrier_args must be a dict, got NoneType"),
        ({"tcpstore_port": "abc", "master_address": "x"}, "must be an int within"),
        ({"tcpstore_port": 0, "master_address": "x"}, r"\[1, 65535\], got 0"),
        (
            {"tcpstore_port": 29613, "master_address": "x", "timeout_sec": 5},
            r"unknown barrier_args \['timeout_sec'\]; TCPStoreBarrier takes",
        ),
    ],
)
def test_bad_tcp_store_args_are_refused_naming_them(args: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_barrier(
            BarrierConfig("tcp_store", args), RankInfo(global_rank=0, global_world_size=2), 5
        )


def meet_on_threads(barriers: list[StoreBarrier], save_id: str) -> None:
    with ThreadPoolExecutor(len(barriers)) as pool:
        list(pool.map(lambda b: b.execute_barrier_for(save_id), barriers))


def test_tcp_store_barrier_is_bounded_and_survives_a_restarted_rank_0() -> None:
    """A rank that never arrives fails the others within the writer's timeout (upstream's
    waits 300 s), and a rank 0 rebuilt on the same port (a restarted async writer) serves the
    next save: the other ranks connect per barrier."""
    config = BarrierConfig(
        "tcp_store", {"tcpstore_port": find_free_port(), "master_address": "127.0.0.1"}
    )

    def build(rank: int, timeout: float) -> StoreBarrier:
        barrier = make_barrier(config, RankInfo(global_rank=rank, global_world_size=2), timeout)
        assert isinstance(barrier, StoreBarrier)
        return barrier

    rank0, rank1 = build(0, 10), build(1, 10)
    meet_on_threads([rank0, rank1], "run-1")
    with pytest.raises(TimeoutError, match=r"rank\(s\) \[0\] did not reach the barrier"):
        build(1, 0.5).execute_barrier_for("run-2")
    del rank0
    gc.collect()  # the old master's socket closes with it
    meet_on_threads([build(0, 10), rank1], "run-3")


def test_dist_barrier_in_the_writer_needs_a_process_group() -> None:
    assert not dist.is_initialized()
    rank_info = RankInfo(global_rank=0, global_world_size=2)
    with pytest.raises(ValueError, match="needs an initialized process group rendezvoused"):
        check_writer_barrier_config(BarrierConfig("dist_barrier"), rank_info, 60)
    with pytest.raises(ValueError, match=r"needs an initialized torch\.distributed process group"):
        make_barrier(BarrierConfig("dist_barrier"), rank_info, 60)


def test_dist_barrier_without_a_group_meets_on_the_given_store() -> None:
    """The async writer's dist_barrier: every rank arrives before any leaves, per save id, and
    a rank that never comes makes the others fail within the timeout, naming it."""
    port = find_free_port()
    master = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=10))
    world = 3
    barriers = [
        make_barrier(
            BarrierConfig("dist_barrier"),
            RankInfo(global_rank=r, global_world_size=world),
            10,
            store_address=StoreAddress("127.0.0.1", port),
        )
        for r in range(world)
    ]
    assert all(isinstance(b, StoreBarrier) for b in barriers)
    arrived: list[int] = []
    left: list[int] = []
    lock = threading.Lock()

    def meet(r: int, save_id: str) -> None:
        with lock:
            arrived.append(r)
        barriers[r].execute_barrier_for(save_id)  # type: ignore[union-attr]
        with lock:
            left.append(r)
            assert len(arrived) == world  # nobody leaves before everyone arrived

    for save_id in ("run-x-1", "run-x-2"):
        arrived.clear()
        left.clear()
        with ThreadPoolExecutor(world) as pool:
            list(pool.map(meet, range(world), [save_id] * world))
        assert sorted(left) == [0, 1, 2]

    lonely = make_barrier(
        BarrierConfig("dist_barrier"),
        RankInfo(global_rank=0, global_world_size=2),
        0.5,
        store_address=StoreAddress("127.0.0.1", port),
    )
    assert lonely is not None
    with pytest.raises(
        TimeoutError, match=r"rank\(s\) \[1\] did not reach the barrier within 0.5s"
    ):
        lonely.execute_barrier_for("run-y-1")
    del master


# --- whole multi-rank saves, one thread per rank --------------------------------------------


def save_on_ranks(
    url: str,
    states: list[dict[str, Any]],
    *,
    run_id: str,
    writer_config: CheckpointWriterConfig | None = None,
    before_write: Callable[[int], None] | None = None,
    hook_for: Callable[[int], cloudckpt.WriterHook] | None = None,
) -> list[BaseException | None]:
    """Every rank's CheckpointWriter.write on its own thread; each rank's outcome."""
    world = len(states)

    def one(rank: int) -> BaseException | None:
        writer = cloudckpt.CheckpointWriter(
            writer_config or CheckpointWriterConfig(commit_timeout_secs=5),
            RankInfo(global_rank=rank, global_world_size=world),
            commit_hook=hook_for(rank) if hook_for is not None else None,
            run_id=run_id,
        )
        try:
            if before_write is not None:
                before_write(rank)
            writer.write(url, states[rank])
            return None
        except BaseException as e:
            return e
        finally:
            writer.close()

    with ThreadPoolExecutor(world) as pool:
        return list(pool.map(one, range(world)))


def rank_state(rank: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(rank)
    return {"w": torch.randn(64, 32, generator=g), "rank": rank}


def test_threads_as_ranks_commit_one_checkpoint_every_rank_can_read(url: str) -> None:
    states = [rank_state(r) for r in range(3)]
    assert save_on_ranks(url, states, run_id="t1") == [None, None, None]
    reader = cloudckpt.CheckpointReader()
    assert reader.read_manifest(url).world_size == 3
    for r, loaded in reader.read_all_ranks(url).items():
        assert_bitwise_equal(loaded, states[r])
    same_world = cloudckpt.CheckpointReader(RankInfo(global_rank=2, global_world_size=3))
    assert_bitwise_equal(same_world.read(url)[0], states[2])


def test_loading_at_another_world_size_is_refused_unless_a_rank_is_named(url: str) -> None:
    states = [rank_state(r) for r in range(2)]
    assert save_on_ranks(url, states, run_id="t2") == [None, None]
    reader = cloudckpt.CheckpointReader(RankInfo(global_rank=1, global_world_size=4))
    with pytest.raises(StateDictMismatchError, match=r"saved by 2 rank.*this job has 4") as err:
        reader.read(url)
    assert "pass rank=" in str(err.value)
    assert_bitwise_equal(reader.read(url, rank=0)[0], states[0])
    # a lone process (a restore script) reads rank 0 unless told otherwise
    assert_bitwise_equal(cloudckpt.CheckpointReader().read(url)[0], states[0])


def test_a_refusing_pre_commit_hook_on_one_rank_fails_every_rank(url: str) -> None:
    class Refuse(cloudckpt.WriterHook):
        def __init__(self, rank: int) -> None:
            self.rank = rank

        def pre_commit(self, path: str, **kwargs: Any) -> None:
            if self.rank == 1:
                raise RuntimeError("rank 1's hook says no")

        def post_commit(self, path: str, **kwargs: Any) -> None:
            return None

    states = [rank_state(r) for r in range(2)]
    outcomes = save_on_ranks(url, states, run_id="t3", hook_for=Refuse)
    assert isinstance(outcomes[1], RuntimeError)
    assert isinstance(outcomes[0], SaveFailedError)
    assert "failed on rank 1: RuntimeError: rank 1's hook says no" in str(outcomes[0])
    assert not get_storage(url).exists(join_url(url, MANIFEST_NAME))


def test_a_rank_that_never_writes_fails_the_others_within_commit_timeout(url: str) -> None:
    states = [rank_state(r) for r in range(2)]
    gone = threading.Event()

    def rank_1_vanishes(rank: int) -> None:
        if rank == 1:
            gone.set()
            raise KeyboardInterrupt  # stands in for a process that dies without a word

    outcomes = save_on_ranks(
        url,
        states,
        run_id="t4",
        writer_config=CheckpointWriterConfig(commit_timeout_secs=0.5, poll_interval_secs=0.05),
        before_write=rank_1_vanishes,
    )
    assert gone.is_set()
    assert isinstance(outcomes[0], SaveFailedError)
    assert "rank(s) [1] did not finish within" in str(outcomes[0])
    assert not get_storage(url).exists(join_url(url, MANIFEST_NAME))


def test_rank_info_derived_from_another_group_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The builder's derived rank info is checked against the group at each save and load."""
    assert not dist.is_initialized()
    check_rank_info_unchanged(RankInfo(global_rank=0, global_world_size=1), "memory://b/p")
    with pytest.raises(
        CheckpointError, match=r"built as rank 1 of 2, but this process is rank 0 of 1"
    ) as err:
        check_rank_info_unchanged(RankInfo(global_rank=1, global_world_size=2), "memory://b/p")
    assert err.value.url == "memory://b/p"
    assert "after torch.distributed.init_process_group" in str(err.value)
    assert default_rank_info() == RankInfo(global_rank=0, global_world_size=1)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match=r"WORLD_SIZE=4 but no torch\.distributed process group"):
        cloudckpt.make_sync_checkpointer()
    lone = cloudckpt.make_sync_checkpointer(rank_info=RankInfo(global_rank=0, global_world_size=1))
    lone.close()


def test_back_to_back_overwrites_of_one_path_commit_on_every_rank(url: str) -> None:
    """A rolling "latest" path: rank 0 deletes the manifest at the start of the next save,
    perhaps before the other ranks saw it; they wait for this save's own committed marker."""
    world, saves = 3, 4

    def one(rank: int) -> list[str]:
        writer = cloudckpt.CheckpointWriter(
            CheckpointWriterConfig(commit_timeout_secs=5, overwrite=True),
            RankInfo(global_rank=rank, global_world_size=world),
            run_id="rolling",
        )
        outcomes = []
        try:
            for i in range(saves):
                try:
                    writer.write(url, {"rank": rank, "save": i, "w": torch.full((64,), float(i))})
                    outcomes.append("ok")
                except SaveFailedError as e:
                    outcomes.append(str(e))
        finally:
            writer.close()
        return outcomes

    with ThreadPoolExecutor(world) as pool:
        assert list(pool.map(one, range(world))) == [["ok"] * saves] * world
    for r, loaded in cloudckpt.CheckpointReader().read_all_ranks(url).items():
        assert (loaded["rank"], loaded["save"]) == (r, saves - 1)


@pytest.mark.parametrize("landed", [True, False])
def test_a_manifest_put_whose_answer_was_lost_counts_only_if_it_landed(
    url: str, monkeypatch: pytest.MonkeyPatch, landed: bool
) -> None:
    """The last attempt of the manifest PUT reached the store but its answer did not: the save
    is committed, on every rank. Had it not landed, the save fails on every rank."""
    import cloudckpt.writer
    from cloudckpt.errors import RetriesExhaustedError

    real_get_storage = cloudckpt.writer.get_storage

    class LosesManifestAnswers:
        def __init__(self, inner: Storage) -> None:
            self._inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

        def put_bytes(self, target: str, data: bytes, **kwargs: Any) -> Any:
            if not target.endswith(MANIFEST_NAME):
                return self._inner.put_bytes(target, data, **kwargs)
            if landed:
                self._inner.put_bytes(target, data, **kwargs)
            raise RetriesExhaustedError(f"put object {target}: timed out", attempts=3, url=target)

    monkeypatch.setattr(
        cloudckpt.writer, "get_storage", lambda u, c: LosesManifestAnswers(real_get_storage(u, c))
    )
    outcomes = save_on_ranks(url, [rank_state(r) for r in range(2)], run_id=f"lost-{landed}")
    storage = get_storage(url)
    if landed:
        assert outcomes == [None, None]
        for r, loaded in cloudckpt.CheckpointReader().read_all_ranks(url).items():
            assert_bitwise_equal(loaded, rank_state(r))
    else:
        assert isinstance(outcomes[0], RetriesExhaustedError)
        assert isinstance(outcomes[1], SaveFailedError)
        assert "rank 0 could not commit: RetriesExhaustedError" in str(outcomes[1])
        assert not storage.exists(join_url(url, MANIFEST_NAME))
