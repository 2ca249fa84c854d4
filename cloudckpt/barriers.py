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
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator

from ._upstream import RankInfo
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
        message = f"{type(error).__name__}: {error}"
        try:
            self._storage.put_bytes(
                failure_record_url(self._url, self._save_id, self._rank),
                json.dumps({"rank": self._rank, "error": message}).encode(),
            )
        except Exception as e:  # the original error is what the caller raises
            logger.warning(
                "rank %d could not record its failure at %s: %s", self._rank, self._url, e
            )

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
