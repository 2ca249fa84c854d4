"""Sync and async checkpointers: upstream's classes, plus per-save metrics.

``SyncCheckpointer.save`` returns None and ``AsyncCheckpointer.save`` returns
``(stage_future, write_future)``, exactly as upstream; a new async save first waits for the
previous write. ``last_metrics`` reports what the caller was blocked for and what the upload
cost; ``load`` adds ``rank=`` (read another rank's part) to upstream's signature.
"""

from __future__ import annotations

import logging
import time
import uuid
from concurrent.futures import Future, wait
from typing import Any

from ._upstream import (
    STATE_DICT,
    RankInfo,
    UpstreamAsyncCheckpointer,
    UpstreamSyncCheckpointer,
    wrap_future,
)
from .barriers import check_rank_info_unchanged
from .errors import StateDictMismatchError, UnsupportedURLError
from .storage import is_process_local
from .writer import SaveMetrics

logger = logging.getLogger(__name__)


class _CheckpointerMixin:
    """``load`` as upstream's, plus ``rank=``, raising StateDictMismatchError for strict misses;
    saves and loads refused once the process group disagrees with the rank the builder derived
    from it (``derived_rank_info``; None when the caller gave ``rank_info``)."""

    _reader: Any

    def __init__(
        self, *args: Any, derived_rank_info: RankInfo | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._derived_rank_info = derived_rank_info

    def _check_ranks(self, path: str) -> None:
        if self._derived_rank_info is not None:
            check_rank_info_unchanged(self._derived_rank_info, path)

    def load(
        self,
        path: str,
        state_dict: STATE_DICT | None = None,
        *,
        default_map_location: Any = None,
        strict: bool = False,
        **kwargs: Any,
    ) -> STATE_DICT:
        self._check_ranks(path)
        logger.info("loading checkpoint from %s", path)
        loaded, missing = self._reader.read(
            path=path, state_dict=state_dict, map_location=default_map_location, **kwargs
        )
        if strict and missing:
            raise StateDictMismatchError(
                f"checkpoint at {path} is missing keys: {missing}",
                url=path,
                hint="load with strict=False to fill only the keys present",
            )
        return loaded


class SyncCheckpointer(_CheckpointerMixin, UpstreamSyncCheckpointer):
    """Saves in the calling thread: ``save()`` returns once the checkpoint is committed."""

    @property
    def last_metrics(self) -> SaveMetrics | None:
        return getattr(self._writer, "last_metrics", None)

    def save(self, path: str, state_dict: STATE_DICT, **kwargs: Any) -> None:
        started = time.perf_counter()
        self._check_ranks(path)
        super().save(path, state_dict, **kwargs)
        metrics = self.last_metrics
        if metrics is not None:
            metrics.blocked_secs = metrics.commit_secs = time.perf_counter() - started
        return None


class AsyncCheckpointer(_CheckpointerMixin, UpstreamAsyncCheckpointer):
    """Stages tensors to CPU, then writes from a spawned subprocess (see ``cloudckpt.process``).

    Like upstream, a new ``save`` first waits for the previous write to finish; unlike
    upstream, a previous write's failure is not raised again here (its own future carries it),
    so a training loop can keep checkpointing after one failed save.
    """

    def __init__(self, *args: Any, run_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_metrics: SaveMetrics | None = None
        # Save ids are minted here, not in the subprocess, so a restarted writer keeps the
        # sequence that all ranks share.
        self._run_id = run_id or uuid.uuid4().hex[:12]
        self._save_seq = 0

    def save(
        self, path: str, state_dict: STATE_DICT, **kwargs: Any
    ) -> tuple[Future, Future] | None:
        started = time.perf_counter()
        self._check_ranks(path)
        if is_process_local(path):
            raise UnsupportedURLError(
                f"cannot save {path} asynchronously: memory:// lives inside one process and the "
                "async writer runs in a subprocess",
                url=path,
                hint="use make_sync_checkpointer for memory:// (tests), or a real store",
            )
        if self._write_future is not None:
            wait([self._write_future])
        self._save_seq += 1
        save_id = f"{self._run_id}-{self._save_seq}"
        try:
            staging_result = self._checkpoint_stager.stage(state_dict=state_dict, **kwargs)
        except Exception as e:
            self._checkpoint_process.report_failure(path, save_id, e)
            raise
        write_future = self._checkpoint_process.write(
            staging_result, path, save_id=save_id, **kwargs
        )
        self._write_future = write_future
        metrics = SaveMetrics(path=path, rank=-1)
        self.last_metrics = metrics
        # Chained futures: the metrics are final before a caller's result() returns.
        stage_future: Future[None] = Future()
        done_future: Future[SaveMetrics | None] = Future()

        def staged(f: Future) -> None:
            metrics.blocked_secs = time.perf_counter() - started
            error = None if f.cancelled() else f.exception()
            if isinstance(error, Exception):  # e.g. an object deepcopy cannot copy
                # Recorded before the caller sees it: the other ranks fail now, not at the
                # commit timeout, even if this rank closes the checkpointer at once.
                self._checkpoint_process.report_failure(path, save_id, error)
            _forward(f, stage_future, None)

        def written(f: Future) -> None:
            value = None if f.cancelled() or f.exception() else f.result()
            if isinstance(value, SaveMetrics):
                value.blocked_secs = metrics.blocked_secs
                value.commit_secs = time.perf_counter() - started
                self.last_metrics = value
            _forward(f, done_future, value)

        wrap_future(staging_result).add_done_callback(staged)
        write_future.add_done_callback(written)
        logger.info("checkpoint save to %s initiated", path)
        return stage_future, done_future


def _forward(src: Future, dst: Future, value: Any) -> None:
    if src.cancelled():
        dst.cancel()
    elif src.exception() is not None:
        dst.set_exception(src.exception())
    else:
        dst.set_result(value)
