"""Multi-rank coordination of a save through the store itself (two-phase commit).

Upstream's barriers (``tcp_store``, ``dist_barrier``) only say "everyone arrived": a rank that
failed never arrives and the others wait out the barrier timeout. cloudckpt adds a rendezvous
on the store that also carries failures, and works in the async writer subprocess (which has
no process group of its own)::

    phase 1  every rank writes  .cloudckpt/<save_id>/rank_<r>.json    (its object is durable)
             or, on failure,     .cloudckpt/<save_id>/failed_<r>.json  (its error message)
             and polls the folder until all ranks succeeded, one failed, or the timeout passed
    phase 2  rank 0 claims the commit (decision.json, conditional put), writes the manifest
             and committed.json, or commit_failed.json; the other ranks poll for one

A rank whose wait times out, or that sees another rank's failure record, claims the abort in the
same decision.json: the conditional put lets only one of "rank 0 commits" and "the save failed"
take effect, so a rank never reports a failure for a save that rank 0 then commits. A rank that finds the commit already claimed waits
for the manifest instead (once more up to the timeout).

``save_id`` must be the same on every rank and new for every save: the checkpointer derives it
from a run id agreed once (broadcast from rank 0) and a per-save sequence number.

After the rendezvous, the barrier chosen by upstream's ``BarrierConfig`` runs (:func:`make_barrier`):
``tcp_store`` and ``dist_barrier`` take upstream's arguments, with the rank fields upstream's
docstring promises but does not inject filled in from ``RankInfo``. The async writer subprocess
has no process group, so there ``dist_barrier`` meets on the default group's TCPStore instead.
Both run as a :class:`StoreBarrier`: keyed by save id, so a restarted writer rejoins cleanly, and
bounded by the writer's ``write_barrier_timeout_secs``.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ._upstream import BARRIER_REGISTRY, Barrier, BarrierConfig, RankInfo
from .errors import CheckpointError, CloudCkptError, CommitConflictError, SaveFailedError
from .manifest import MANIFEST_NAME, RANK_RECORD_DIR, Manifest
from .storage import Storage, join_url

logger = logging.getLogger(__name__)

COMMIT_FAILED_NAME = "commit_failed.json"
DECISION_NAME = "decision.json"
COMMITTED_NAME = "committed.json"
FIRST_POLL_SECS = 0.01


def _group_rank_info() -> RankInfo:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return RankInfo(global_world_size=dist.get_world_size(), global_rank=dist.get_rank())
    return RankInfo(global_world_size=1, global_rank=0)


def default_rank_info() -> RankInfo:
    """This process's rank from the default process group, or a single rank. Refused when
    the launcher says there are more ranks but no group exists: every rank would save as rank
    0 of 1, over the others' objects."""
    info = _group_rank_info()
    launched = os.environ.get("WORLD_SIZE", "1")
    if info.global_world_size == 1 and launched.isdigit() and int(launched) > 1:
        raise ValueError(
            f"WORLD_SIZE={launched} but no torch.distributed process group is initialized: "
            "call init_process_group before building the checkpointer, or pass rank_info= "
            "explicitly (e.g. RankInfo(global_rank=0, global_world_size=1) to save alone)"
        )
    return info


def check_rank_info_unchanged(derived: RankInfo, url: str) -> None:
    """Refuse a save or load whose rank info, derived from the process group when the
    checkpointer was built, no longer matches it (built before ``init_process_group``): every
    rank would save as rank 0 of 1, over each other's objects."""
    now = _group_rank_info()
    before = (derived.global_rank, derived.global_world_size)
    if (now.global_rank, now.global_world_size) != before:
        raise CheckpointError(
            f"cannot use {url}: the checkpointer was built as rank {before[0]} of {before[1]}, "
            f"but this process is rank {now.global_rank} of {now.global_world_size} of its "
            "process group",
            url=url,
            rank=now.global_rank,
            hint="build the checkpointer after torch.distributed.init_process_group, or pass "
            "rank_info= to the builder explicitly",
        )


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
        self._folder = records_url(ckpt_url, save_id)
        self._rank = rank_info.global_rank
        self._world = rank_info.global_world_size
        self._timeout = timeout_secs
        self._poll = poll_interval_secs
        self._clock = clock
        self._sleep = sleep
        self._commit_claimed = False  # seen rank 0's claim: a wait ends only at the commit

    def _delays(self) -> Iterator[float]:
        """Poll delays: 10 ms at first, doubling to ``poll_interval_secs``.

        Ranks of one job usually finish within milliseconds of each other, so a short first
        wait keeps the commit quick; the backoff keeps a long wait from hammering the store.
        """
        delay = min(FIRST_POLL_SECS, self._poll)
        while True:
            yield delay
            delay = min(2 * delay, self._poll)

    def _error(self, what: str, hint: str | None = None) -> SaveFailedError:
        return SaveFailedError(
            f"save to {self._url} failed: {what}", url=self._url, rank=self._rank, hint=hint
        )

    # --- the decision ---------------------------------------------------------------------
    def _decision(self) -> dict[str, Any]:
        return dict(json.loads(self._storage.get_bytes(join_url(self._folder, DECISION_NAME))))

    def _claim(self, outcome: str, reason: str) -> dict[str, Any] | None:
        """Record this save's outcome unless one is recorded; None if this claim took effect,
        else the outcome already decided."""
        doc = {"outcome": outcome, "rank": self._rank, "reason": reason}
        try:
            self._storage.put_bytes(
                join_url(self._folder, DECISION_NAME), json.dumps(doc).encode(), if_absent=True
            )
            return None
        except CommitConflictError:
            decided = self._decision()
            # A retried put whose first attempt landed finds its own claim.
            return None if decided == doc else decided

    def _aborted(self, decided: dict[str, Any]) -> SaveFailedError:
        return self._error(
            f"rank {decided.get('rank')} gave up: {decided.get('reason')}",
            hint="nothing was committed; the rank that gave up names what it waited for",
        )

    def claim_commit(self) -> None:
        """Rank 0, just before the manifest: take the commit; raise if a rank gave up first."""
        decided = self._claim("commit", "")
        if decided is not None:
            raise self._aborted(decided)

    def _abort_unless_committing(self, reason: str, error: SaveFailedError) -> None:
        """This save is failing here: claim the abort and raise ``error``, unless rank 0 already
        claimed the commit (then return: the caller waits for the commit to finish)."""
        decided = self._claim("abort", reason)
        if decided is None or decided.get("outcome") != "commit":
            raise error
        self._commit_claimed = True
        logger.info("rank %d: %s, but rank 0 is committing %s", self._rank, reason, self._url)

    def _give_up(self, what: str, hint: str) -> None:
        """A wait timed out: see :meth:`_abort_unless_committing`."""
        self._abort_unless_committing(
            what, self._error(what, hint=hint + "; nothing was committed")
        )

    def _check_decision(self, names: set[str]) -> None:
        """Raise if the listing shows an abort; remember a commit claim."""
        if DECISION_NAME in names and not self._commit_claimed:
            decided = self._decision()
            if decided.get("outcome") != "commit":
                raise self._aborted(decided)
            self._commit_claimed = True

    # --- the waits ------------------------------------------------------------------------
    def report_failure(self, error: BaseException) -> None:
        """Tell the other ranks this rank failed (best effort: they time out otherwise)."""
        record_failure(self._storage, self._url, self._save_id, self._rank, error)

    def _names(self) -> set[str]:
        return {o.url.rsplit("/", 1)[-1] for o in self._storage.list(self._folder)}

    def wait_all_ranks(self) -> None:
        """Phase 1: return once every rank's record exists; raise if one failed or timed out."""
        deadline = self._clock() + self._timeout
        delays = self._delays()
        while True:
            names = self._names()
            failed = sorted(
                int(n[len("failed_") : -len(".json")]) for n in names if n.startswith("failed_")
            )
            if failed and not self._commit_claimed:
                # Final only once the abort is claimed: a rank whose writer died after its
                # record was written may report a failure while rank 0 is already committing.
                error = self._peer_failure(failed[0])
                self._abort_unless_committing(str(error), error)
            self._check_decision(names)
            missing = [r for r in range(self._world) if f"rank_{r}.json" not in names]
            if not missing or self._commit_claimed:
                return
            if self._clock() >= deadline:
                self._give_up(
                    f"rank(s) {missing} did not finish within {self._timeout:.0f}s",
                    "a rank crashed, hangs, cannot write to the store (credentials, bucket) "
                    "or saves another path "
                    "(CheckpointWriterConfig.commit_timeout_secs bounds this wait)",
                )
                return
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
                join_url(self._folder, COMMIT_FAILED_NAME),
                json.dumps({"error": f"{type(error).__name__}: {error}"}).encode(),
            )
        except Exception as e:
            logger.warning("rank 0 could not record the commit failure at %s: %s", self._url, e)

    def give_up_after(self, error: SaveFailedError) -> None:
        """This rank failed after phase 1 (at its barrier): see
        :meth:`_abort_unless_committing`."""
        self._abort_unless_committing(f"{type(error).__name__}: {error}", error)

    def report_committed(self) -> None:
        """Rank 0, after the manifest: tell the other ranks this save (not another save of the
        same path, nor a manifest a later overwrite already deleted) was committed."""
        try:
            self._storage.put_bytes(join_url(self._folder, COMMITTED_NAME), b"{}")
        except Exception as e:  # committed all the same; the others say "may be committed"
            logger.warning("rank 0 could not tell the others %s is committed: %s", self._url, e)

    def _manifest_is_ours(self) -> bool:
        """Whether the manifest at the path is this save's (its ``save_id``)."""
        url = join_url(self._url, MANIFEST_NAME)
        try:
            return (
                Manifest.from_json(self._storage.get_bytes(url), url=url).save_id == self._save_id
            )
        except CloudCkptError:  # absent or unreadable: not (yet) ours
            return False

    def wait_commit(self) -> None:
        """Phase 2 (ranks != 0): return once rank 0 committed this save; raise if it failed or
        timed out. Once rank 0 claimed the commit, the wait goes on for one more timeout."""
        deadline = self._clock() + self._timeout
        delays = self._delays()
        extended = False
        while True:
            names = self._names()
            if COMMITTED_NAME in names:
                return
            if COMMIT_FAILED_NAME in names:
                doc = json.loads(
                    self._storage.get_bytes(join_url(self._folder, COMMIT_FAILED_NAME))
                )
                raise self._error(f"rank 0 could not commit: {doc.get('error')}")
            self._check_decision(names)
            if self._clock() >= deadline:
                if self._commit_claimed and self._manifest_is_ours():
                    return  # committed; only rank 0's marker went missing
                if not self._commit_claimed:
                    self._give_up(
                        f"rank 0 did not commit within {self._timeout:.0f}s",
                        "rank 0 crashed or hangs",
                    )
                if extended:
                    raise self._error(
                        f"rank 0 claimed the commit but did not finish it within "
                        f"{2 * self._timeout:.0f}s",
                        hint="rank 0 stalls while writing the manifest: the checkpoint may still "
                        "become committed; check CheckpointManager.list() before relying on it",
                    )
                extended = True
                deadline = self._clock() + self._timeout
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


class StoreBarrier(Barrier):
    """A barrier of every rank on a torch.distributed store, under a key of the save: a
    restarted process (the async writer) rejoins the next save cleanly, and every wait is bounded
    by ``timeout_secs`` (upstream's barriers wait 300 s, or 30 min for ``dist.barrier``).

    ``connect`` returns the store for one barrier: a shared object (the process group's own
    store, or the TCPStore rank 0 hosts), or a fresh client, so that a rank reconnects to a
    restarted server instead of failing on a dead connection.
    """

    def __init__(
        self,
        connect: Callable[[], Any],
        rank_info: RankInfo,
        *,
        key_prefix: str,
        timeout_secs: float,
    ) -> None:
        self._connect = connect
        self._rank = rank_info.global_rank
        self._world = rank_info.global_world_size
        self._prefix = key_prefix.rstrip("/") + "/"
        self._timeout = timeout_secs
        self._seq = 0

    def execute_barrier(self) -> None:
        self._seq += 1
        self.execute_barrier_for(f"seq-{self._seq}")

    def execute_barrier_for(self, save_id: str) -> None:
        """Wait for every rank at the barrier of ``save_id``; within ``timeout_secs``, or raise
        TimeoutError naming the ranks that did not arrive."""
        store = self._connect()
        key = f"{self._prefix}{save_id}/"
        store.set(f"{key}rank_{self._rank}", "1")
        if store.add(f"{key}arrived", 1) == self._world:
            store.set(f"{key}all", "1")
        try:
            store.wait([f"{key}all"], timedelta(seconds=self._timeout))
        except Exception as e:  # DistStoreError (timeout) or a lost connection
            try:
                missing = [r for r in range(self._world) if not store.check([f"{key}rank_{r}"])]
            except Exception:
                missing = []  # the store itself is gone
            raise TimeoutError(
                f"rank(s) {missing or '?'} did not reach the barrier within {self._timeout:g}s "
                f"({type(e).__name__}: {e})"
            ) from e


def _tcp_client(host: str, port: int, timeout_secs: float) -> Callable[[], Any]:
    """A connect function making a new TCPStore client per barrier."""
    import torch.distributed as dist

    def connect() -> Any:
        return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_secs))

    return connect


def _tcp_store_barrier(kwargs: dict[str, Any], rank_info: RankInfo) -> StoreBarrier:
    """``tcp_store`` with upstream's arguments: rank 0 hosts the TCPStore (without waiting for
    the others to connect, so a restarted rank 0 is not stuck at construction), the others
    connect per barrier."""
    import torch.distributed as dist

    port = kwargs["tcpstore_port"]
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(
            f"BarrierConfig(barrier_type='tcp_store'): tcpstore_port must be an int within "
            f"[1, 65535], got {port!r}"
        )
    host = str(kwargs["master_address"])
    timeout_secs = float(kwargs["timeout_secs"])
    if rank_info.global_rank == 0:
        master = dist.TCPStore(
            host,
            port,
            is_master=True,
            wait_for_workers=False,
            timeout=timedelta(seconds=timeout_secs),
            use_libuv=bool(kwargs["use_checkpoint_barrier_tcpstore_libuv"]),
        )
        connect: Callable[[], Any] = lambda: master  # noqa: E731
    else:
        connect = _tcp_client(host, port, float(kwargs["timeout_barrier_init_secs"]))
    return StoreBarrier(
        connect, rank_info, key_prefix=str(kwargs["barrier_prefix"]), timeout_secs=timeout_secs
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
    if not isinstance(config.barrier_args, dict):
        raise ValueError(
            f"BarrierConfig(barrier_type={config.barrier_type!r}): barrier_args must be a dict, "
            f"got {type(config.barrier_args).__name__}"
        )
    cls = BARRIER_REGISTRY[config.barrier_type]
    whole_secs = max(1, math.ceil(timeout_secs))  # upstream's barriers take int seconds
    known: dict[str, Any] = {
        "rank_info": rank_info,
        "global_rank": rank_info.global_rank,
        "global_world_size": rank_info.global_world_size,
        "timeout_secs": whole_secs,
    }
    if config.barrier_type == TCP_STORE_BARRIER:
        known.update(
            barrier_prefix="cloudckpt-commit",
            timeout_barrier_init_secs=whole_secs,
            use_checkpoint_barrier_tcpstore_libuv=False,
        )
        if os.environ.get("MASTER_ADDR"):
            known["master_address"] = os.environ["MASTER_ADDR"]
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(config.barrier_args) - set(params) - {"self"})
    if unknown:
        raise ValueError(
            f"BarrierConfig(barrier_type={config.barrier_type!r}): unknown barrier_args "
            f"{unknown}; {cls.__name__} takes {sorted(set(params) - {'self'})}"
        )
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
) -> Barrier | None:
    """The barrier ``config`` selects, bounded by ``timeout_secs``.

    ``tcp_store`` and ``dist_barrier`` take upstream's arguments but run as a
    :class:`StoreBarrier` (keyed by save, bounded): ``dist_barrier`` on the default process
    group's store, or, in a process without a group (the async writer), on ``store_address``.
    Other registered types are built as upstream builds them, with rank fields filled in.
    """
    import torch.distributed as dist

    if config.barrier_type is None:
        return None
    cls, kwargs = _barrier_kwargs(config, rank_info, timeout_secs)
    if config.barrier_type == TCP_STORE_BARRIER:
        if "timeout_secs" not in config.barrier_args:
            kwargs["timeout_secs"] = timeout_secs  # not rounded up: this one takes floats
        return _tcp_store_barrier(kwargs, rank_info)
    if config.barrier_type != DIST_BARRIER:
        return cls(**kwargs)
    if dist.is_initialized():
        group_store = dist.distributed_c10d._get_default_store()
        connect: Callable[[], Any] = lambda: group_store  # noqa: E731
    elif store_address is not None:
        connect = _tcp_client(store_address.host, store_address.port, timeout_secs)
    else:
        raise ValueError(
            f"rank {rank_info.global_rank}: BarrierConfig(barrier_type='dist_barrier') needs "
            "an initialized torch.distributed process group"
        )
    return StoreBarrier(
        connect, rank_info, key_prefix="cloudckpt-dist-barrier", timeout_secs=timeout_secs
    )
