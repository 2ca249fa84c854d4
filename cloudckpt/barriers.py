"""Multi-rank coordination of a save through the store itself (two-phase commit).

Upstream's barriers (``tcp_store``, ``dist_barrier``) only say "everyone arrived": a rank that
failed never arrives and the others wait out the barrier timeout. cloudckpt adds a rendezvous
on the store that also carries failures, and works in the async writer subprocess (which has
no process group of its own)::

    phase 1  every rank writes  .cloudckpt/<save_id>/rank_<r>.json    (its object is durable)
             or, on failure,     .cloudckpt/<save_id>/failed_<r>.json  (its error message)
             and polls the folder until all ranks succeeded, one failed, or the timeout passed
    phase 2  rank 0 writes the manifest, or commit_failed.json; the other ranks poll for one

``save_id`` must be the same on every rank and new for every save: the checkpointer derives it
from a run id agreed once (broadcast from rank 0) and a per-save sequence number.

After the rendezvous, the barrier chosen by upstream's ``BarrierConfig`` runs (:func:`make_barrier`):
``tcp_store`` and ``dist_barrier`` as upstream builds them, with the rank fields upstream's
docstring promises but does not inject filled in from ``RankInfo``. The async writer subprocess
has no process group, so there ``dist_barrier`` meets on the default group's TCPStore instead
(:class:`GroupStoreBarrier`, keyed by save id so a restarted writer rejoins cleanly).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ._upstream import BARRIER_REGISTRY, Barrier, BarrierConfig, RankInfo
from .errors import SaveFailedError
from .manifest import RANK_RECORD_DIR
from .storage import Storage, join_url

logger = logging.getLogger(__name__)

COMMIT_FAILED_NAME = "commit_failed.json"
FIRST_POLL_SECS = 0.01


def agree_run_id(rank_info: RankInfo) -> str:
    """A random id shared by all ranks: rank 0's, broadcast over the default process group.

    Single-rank jobs need no agreement. A multi-rank job without an initialized process group
    must pass ``run_id`` explicitly (e.g. from its launcher's job id).
    """
    import torch.distributed as dist

    if rank_info.global_world_size == 1:
        return uuid.uuid4().hex[:12]
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"rank {rank_info.global_rank} of {rank_info.global_world_size}: a multi-rank "
            "checkpointer needs an initialized torch.distributed process group to agree on a "
            "run id, or an explicit run_id (the same string on every rank)"
        )
    box = [uuid.uuid4().hex[:12] if rank_info.global_rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])


def records_url(ckpt_url: str, save_id: str) -> str:
    return join_url(ckpt_url, RANK_RECORD_DIR, save_id)


def rank_record_url(ckpt_url: str, save_id: str, rank: int) -> str:
    return join_url(records_url(ckpt_url, save_id), f"rank_{rank}.json")


def failure_record_url(ckpt_url: str, save_id: str, rank: int) -> str:
    return join_url(records_url(ckpt_url, save_id), f"failed_{rank}.json")


def record_failure(
    storage: Storage, ckpt_url: str, save_id: str, rank: int, error: BaseException
) -> None:
    """Write rank ``rank``'s failure record of one save; best effort (logged, never raised):
    the caller raises the original error, and the other ranks time out without the record."""
    message = f"{type(error).__name__}: {error}"
    try:
        storage.put_bytes(
            failure_record_url(ckpt_url, save_id, rank),
            json.dumps({"rank": rank, "error": message}).encode(),
        )
    except Exception as e:
        logger.warning("rank %d could not record its failure at %s: %s", rank, ckpt_url, e)


class StoreRendezvous:
    """Phase-1 and phase-2 waits of one save, polling the store (see module docstring)."""

    def __init__(
        self,
        storage: Storage,
        ckpt_url: str,
        save_id: str,
        rank_info: RankInfo,
        *,
        timeout_secs: float,
        poll_interval_secs: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._storage = storage
        self._url = ckpt_url
        self._save_id = save_id
        self._rank = rank_info.global_rank
        self._world = rank_info.global_world_size
        self._timeout = timeout_secs
        self._poll = poll_interval_secs
        self._clock = clock
        self._sleep = sleep

    def _delays(self) -> Iterator[float]:
        """Poll delays: 10 ms at first, doubling to ``poll_interval_secs``.

        Ranks of one job usually finish within milliseconds of each other, so a short first
        wait keeps the commit quick; the backoff keeps a long wait from hammering the store.
        """
        delay = min(FIRST_POLL_SECS, self._poll)
        while True:
            yield delay
            delay = min(2 * delay, self._poll)

    def report_failure(self, error: BaseException) -> None:
        """Tell the other ranks this rank failed (best effort: they time out otherwise)."""
        record_failure(self._storage, self._url, self._save_id, self._rank, error)

    def wait_all_ranks(self) -> None:
        """Phase 1: return once every rank's record exists; raise if one failed or timed out."""
        folder = records_url(self._url, self._save_id)
        deadline = self._clock() + self._timeout
        delays = self._delays()
        while True:
            names = {o.url.rsplit("/", 1)[-1] for o in self._storage.list(folder)}
            failed = sorted(
                int(n[len("failed_") : -len(".json")]) for n in names if n.startswith("failed_")
            )
            if failed:
                raise self._peer_failure(failed[0])
            missing = [r for r in range(self._world) if f"rank_{r}.json" not in names]
            if not missing:
                return
            if self._clock() >= deadline:
                raise SaveFailedError(
                    f"save to {self._url} failed: rank(s) {missing} did not finish within "
                    f"{self._timeout:.0f}s",
                    url=self._url,
                    rank=self._rank,
                    hint="a rank crashed or hangs; nothing was committed "
                    "(CheckpointWriterConfig.commit_timeout_secs bounds this wait)",
                )
            self._sleep(next(delays))

    def _peer_failure(self, rank: int) -> SaveFailedError:
        try:
            doc = json.loads(
                self._storage.get_bytes(failure_record_url(self._url, self._save_id, rank))
            )
            cause = doc.get("error", "unknown error")
        except Exception as e:
            cause = f"(its failure record is unreadable: {e})"
        return SaveFailedError(
            f"save to {self._url} failed on rank {rank}: {cause}",
            url=self._url,
            rank=self._rank,
            hint="nothing was committed; fix the failing rank's problem and save again",
        )

    def report_commit_failure(self, error: BaseException) -> None:
        """Rank 0: the manifest could not be written; release the waiting ranks."""
        try:
            self._storage.put_bytes(
                join_url(records_url(self._url, self._save_id), COMMIT_FAILED_NAME),
                json.dumps({"error": f"{type(error).__name__}: {error}"}).encode(),
            )
        except Exception as e:
            logger.warning("rank 0 could not record the commit failure at %s: %s", self._url, e)

    def wait_commit(self, manifest_url: str) -> None:
        """Phase 2 (ranks != 0): return once rank 0 committed; raise if it failed or timed out."""
        failed_url = join_url(records_url(self._url, self._save_id), COMMIT_FAILED_NAME)
        deadline = self._clock() + self._timeout
        delays = self._delays()
        while True:
            if self._storage.exists(manifest_url):
                return
            if self._storage.exists(failed_url):
                doc = json.loads(self._storage.get_bytes(failed_url))
                raise SaveFailedError(
                    f"save to {self._url} failed: rank 0 could not commit: {doc.get('error')}",
                    url=self._url,
                    rank=self._rank,
                )
            if self._clock() >= deadline:
                raise SaveFailedError(
                    f"save to {self._url} failed: rank 0 did not commit within {self._timeout:.0f}s",
                    url=self._url,
                    rank=self._rank,
                    hint="rank 0 crashed or hangs; nothing was committed",
                )
            self._sleep(next(delays))


# --- upstream barriers -----------------------------------------------------------------------

DIST_BARRIER = "dist_barrier"
TCP_STORE_BARRIER = "tcp_store"


@dataclass(frozen=True)
class StoreAddress:
    """Where the default process group's TCPStore listens (picklable, for the writer)."""

    host: str
    port: int


def default_store_address() -> StoreAddress | None:
    """The TCPStore behind this process's default process group, or None (no group, or a
    group rendezvoused some other way, e.g. a FileStore)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    store = dist.distributed_c10d._get_default_store()
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    if not isinstance(store, dist.TCPStore):
        return None
    return StoreAddress(store.host, store.port)


class GroupStoreBarrier(Barrier):
    """``dist_barrier`` for a process without a process group (the async writer): every rank
    meets on the default group's TCPStore, under a key of the save (or a sequence number)."""

    def __init__(
        self, address: StoreAddress, rank_info: RankInfo, *, run_id: str, timeout_secs: float
    ) -> None:
        import torch.distributed as dist

        self._store = dist.PrefixStore(
            f"cloudckpt/{run_id}/",
            dist.TCPStore(
                address.host,
                address.port,
                is_master=False,
                timeout=timedelta(seconds=timeout_secs),
            ),
        )
        self._rank = rank_info.global_rank
        self._world = rank_info.global_world_size
        self._timeout = timeout_secs
        self._seq = 0

    def execute_barrier(self) -> None:
        self._seq += 1
        self.execute_barrier_for(f"seq-{self._seq}")

    def execute_barrier_for(self, save_id: str) -> None:
        """Wait for every rank's writer at the barrier of ``save_id``."""
        import torch.distributed.elastic.utils.store as store_util

        store_util.barrier(
            self._store,
            self._world,
            f"{save_id}/",
            barrier_timeout=self._timeout,
            rank=self._rank,
            trace_timeout=min(10.0, self._timeout),  # naming the missing ranks, after a timeout
        )


def _barrier_kwargs(
    config: BarrierConfig, rank_info: RankInfo, timeout_secs: float
) -> tuple[type[Barrier], dict[str, Any]]:
    """The registered class of ``config`` and its constructor arguments: ``barrier_args``, plus
    what this process knows for the parameters they leave out (rank fields, timeouts)."""
    if config.barrier_type not in BARRIER_REGISTRY:
        raise ValueError(
            f"unknown barrier type {config.barrier_type!r}; registered: {sorted(BARRIER_REGISTRY)}"
        )
    cls = BARRIER_REGISTRY[config.barrier_type]
    known: dict[str, Any] = {
        "rank_info": rank_info,
        "global_rank": rank_info.global_rank,
        "global_world_size": rank_info.global_world_size,
        "timeout_secs": int(timeout_secs),
    }
    if config.barrier_type == TCP_STORE_BARRIER:
        known.update(
            barrier_prefix="cloudckpt-commit",
            timeout_barrier_init_secs=int(timeout_secs),
            use_checkpoint_barrier_tcpstore_libuv=False,
        )
        if os.environ.get("MASTER_ADDR"):
            known["master_address"] = os.environ["MASTER_ADDR"]
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in known.items() if k in params}
    kwargs.update(config.barrier_args)
    missing = [
        name
        for name, p in params.items()
        if name != "self"
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.default is p.empty
        and name not in kwargs
    ]
    if missing:
        raise ValueError(
            f"BarrierConfig(barrier_type={config.barrier_type!r}) on rank "
            f"{rank_info.global_rank} needs barrier_args {missing}"
            + (
                " (a free port for the barrier's own TCPStore)"
                if "tcpstore_port" in missing
                else ""
            )
        )
    return cls, kwargs


def check_writer_barrier_config(
    config: BarrierConfig, rank_info: RankInfo, timeout_secs: float
) -> StoreAddress | None:
    """For the async writer: refuse a barrier config that cannot be built before the writer is
    spawned, and return the store address its ``dist_barrier`` will meet on."""
    if config.barrier_type is None:
        return None
    _barrier_kwargs(config, rank_info, timeout_secs)
    if config.barrier_type != DIST_BARRIER:
        return None
    address = default_store_address()
    if address is None:
        raise ValueError(
            f"rank {rank_info.global_rank}: BarrierConfig(barrier_type='dist_barrier') in the "
            "async writer needs an initialized process group rendezvoused through a TCPStore "
            "(torchrun, or init_method tcp:// / env://); use barrier_type='tcp_store' otherwise"
        )
    return address


def make_barrier(
    config: BarrierConfig,
    rank_info: RankInfo,
    timeout_secs: float,
    *,
    store_address: StoreAddress | None = None,
    run_id: str = "",
) -> Barrier | None:
    """The barrier ``config`` selects, as upstream's ``create_barrier_from_config`` builds it,
    with rank fields filled in; ``dist_barrier`` without a process group in this process (the
    async writer) meets on ``store_address`` instead."""
    import torch.distributed as dist

    if config.barrier_type is None:
        return None
    if config.barrier_type == DIST_BARRIER and not dist.is_initialized():
        if store_address is None:
            raise ValueError(
                f"rank {rank_info.global_rank}: BarrierConfig(barrier_type='dist_barrier') needs "
                "an initialized torch.distributed process group"
            )
        return GroupStoreBarrier(store_address, rank_info, run_id=run_id, timeout_secs=timeout_secs)
    cls, kwargs = _barrier_kwargs(config, rank_info, timeout_secs)
    return cls(**kwargs)
