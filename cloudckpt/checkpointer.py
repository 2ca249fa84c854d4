"""Sync and async checkpointers: upstream's classes, plus per-save metrics.

``SyncCheckpointer.save`` returns None and ``AsyncCheckpointer.save`` returns
``(stage_future, write_future)``, exactly as upstream; a new async save first waits for the
previous write. ``last_metrics`` reports what the caller was blocked for and what the upload
cost; ``load`` adds ``rank=`` (read another rank's part) to upstream's signature.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from typing import Any

from ._upstream import STATE_DICT, UpstreamAsyncCheckpointer, UpstreamSyncCheckpointer
from .errors import StateDictMismatchError
from .writer import SaveMetrics

logger = logging.getLogger(__name__)


class _LoadMixin:
    """``load`` as upstream's, plus ``rank=``, raising StateDictMismatchError for strict misses."""

    _reader: Any

    def load(
        self,
        path: str,
        state_dict: STATE_DICT | None = None,
        *,
        default_map_location: Any = None,
        strict: bool = False,
        **kwargs: Any,
    ) -> STATE_DICT:
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


class SyncCheckpointer(_LoadMixin, UpstreamSyncCheckpointer):
    """Saves in the calling thread: ``save()`` returns once the checkpoint is committed."""

    @property
    def last_metrics(self) -> SaveMetrics | None:
        return getattr(self._writer, "last_metrics", None)

    def save(self, path: str, state_dict: STATE_DICT, **kwargs: Any) -> None:
        started = time.perf_counter()
        super().save(path, state_dict, **kwargs)
        metrics = self.last_metrics
        if metrics is not None:
            metrics.blocked_secs = time.perf_counter() - started
        return None


class AsyncCheckpointer(_LoadMixin, UpstreamAsyncCheckpointer):
    """Stages tensors to CPU, then writes from a spawned subprocess (see ``cloudckpt.process``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_metrics: SaveMetrics | None = None

    def save(
        self, path: str, state_dict: STATE_DICT, **kwargs: Any
    ) -> tuple[Future, Future] | None:
        started = time.perf_counter()
        result = super().save(path, state_dict, **kwargs)
        if result is None:
            raise RuntimeError("upstream AsyncCheckpointer.save returned no futures")
        stage_future, write_future = result
        metrics = SaveMetrics(path=path, rank=-1)
        self.last_metrics = metrics

        def staged(_: Future) -> None:
            metrics.blocked_secs = time.perf_counter() - started

        def written(f: Future) -> None:
            metrics.total_secs = time.perf_counter() - started
            value = None if f.cancelled() or f.exception() else f.result()
            if isinstance(value, SaveMetrics):
                value.blocked_secs = metrics.blocked_secs
                value.total_secs = metrics.total_secs
                self.last_metrics = value
            else:
                metrics.committed = not f.cancelled() and f.exception() is None

        stage_future.add_done_callback(staged)
        write_future.add_done_callback(written)
        return stage_future, write_future
