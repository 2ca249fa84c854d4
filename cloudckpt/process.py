"""The async writer subprocess: upstream's CheckpointProcess protocol, made failure-proof.

Differences from upstream that a training job relies on:

* a failed write does not kill the subprocess: the error (a cloudckpt exception, picklable)
  travels back and is raised by the write future with its original type;
* a subprocess that dies mid-save (OOM-killed, segfault) turns into a SaveFailedError naming
  the path and exit code on the write future, and the next save starts a fresh subprocess;
* the write future's result is the save's :class:`~cloudckpt.writer.SaveMetrics`.

Staged tensors live in shared memory; sending the state dict through the pipe pickles only
their shared-memory handles (torch.multiprocessing's reductions), not their bytes.
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch.multiprocessing as mp

from ._upstream import STATE_DICT, CheckpointProcessConfig, RankInfo
from .errors import CloudCkptError, SaveFailedError
from .writer import CheckpointWriter, SaveMetrics

logger = logging.getLogger(__name__)

_POLL_SECS = 0.5


@dataclass
class _Request:
    kind: str  # "ping" | "write" | "exit"
    payload: dict[str, Any]


@dataclass
class _Response:
    ok: bool
    value: Any = None  # SaveMetrics on a successful write, the exception otherwise


def _portable_error(e: BaseException) -> BaseException:
    """The exception itself when it survives pickling, else a CloudCkptError with its text."""
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return CloudCkptError(
            f"{type(e).__name__}: {e}\n{''.join(traceback.format_exception(e))}"
        )


def _subprocess_main(
    conn: Connection,
    rank_info: RankInfo,
    subprocess_init_fn: Callable[..., None],
    subprocess_init_args: tuple[Any, ...],
    writer_init_fn: Callable[..., CheckpointWriter],
    writer_init_args: dict[str, Any],
) -> None:
    writer: CheckpointWriter | None = None
    try:
        subprocess_init_fn(*subprocess_init_args)
        args = dict(writer_init_args)
        args.setdefault("rank_info", rank_info)
        writer = writer_init_fn(**args)
    except BaseException as e:
        conn.send(_Response(False, _portable_error(e)))
        return
    try:
        while True:
            request: _Request = conn.recv()
            if request.kind == "ping":
                conn.send(_Response(True))
            elif request.kind == "exit":
                conn.send(_Response(True))
                return
            elif request.kind == "write":
                path = request.payload["path"]
                try:
                    writer.write(path, request.payload["state_dict"], **request.payload["kwargs"])
                    conn.send(_Response(True, writer.last_metrics))
                except Exception as e:
                    logger.error("checkpoint write to %s failed: %s", path, e)
                    conn.send(_Response(False, _portable_error(e)))
                finally:
                    del request
            else:
                conn.send(_Response(False, ValueError(f"unknown request {request.kind!r}")))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return  # parent went away: exit quietly
    finally:
        writer.close()


class CheckpointProcess:
    """Writes checkpoints from a spawned subprocess; same constructor as upstream's."""

    def __init__(
        self,
        rank_info: RankInfo,
        config: CheckpointProcessConfig,
        subprocess_init_fn: Callable[..., None],
        subprocess_init_args: tuple[Any, ...],
        checkpoint_writer_init_fn: Callable[..., CheckpointWriter],
        checkpoint_writer_init_args: dict[str, Any],
    ) -> None:
        self._rank_info = rank_info
        self._config = config
        self._init = (
            subprocess_init_fn,
            subprocess_init_args,
            checkpoint_writer_init_fn,
            checkpoint_writer_init_args,
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cloudckpt-writer")
        self.process: Any = None
        self._conn: Connection | None = None
        self.process_creation_future = self._executor.submit(self._start)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        os.environ.setdefault("MKL_SERVICE_FORCE_INTEL", "GNU")
        proc = ctx.Process(
            target=_subprocess_main,
            args=(child, self._rank_info, *self._init),
            daemon=True,
            name=f"cloudckpt-writer-{self._rank_info.global_rank}",
        )
        proc.start()
        child.close()
        self.process, self._conn = proc, parent
        parent.send(_Request("ping", {}))
        response = self._receive("start", self._config.subprocess_init_timeout_secs)
        if not response.ok:
            self._discard_process()
            raise response.value
        logger.info("checkpoint writer subprocess %d started", proc.pid)

    def _receive(self, path: str, timeout_secs: float | None = None) -> _Response:
        """Wait for the subprocess's answer, noticing its death instead of hanging."""
        assert self._conn is not None and self.process is not None
        waited = 0.0
        while not self._conn.poll(_POLL_SECS):
            waited += _POLL_SECS
            if not self.process.is_alive():
                code = self.process.exitcode
                self._discard_process()
                raise SaveFailedError(
                    f"the checkpoint writer subprocess died (exit code {code}) while saving {path}",
                    url=path,
                    rank=self._rank_info.global_rank,
                    hint="nothing was committed; the next save starts a new writer",
                )
            if timeout_secs is not None and waited >= timeout_secs:
                self._discard_process()
                raise TimeoutError(f"checkpoint writer subprocess did not answer in {timeout_secs}s")
        try:
            return self._conn.recv()
        except (EOFError, ConnectionResetError) as e:
            self._discard_process()
            raise SaveFailedError(
                f"lost the checkpoint writer subprocess while saving {path}",
                url=path,
                rank=self._rank_info.global_rank,
            ) from e

    def _discard_process(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.kill()
        if self.process is not None:
            self.process.join(timeout=5)
        if self._conn is not None:
            self._conn.close()
        self.process, self._conn = None, None

    def write(
        self, state_dict: STATE_DICT | Future[STATE_DICT], path: str, **kwargs: Any
    ) -> Future[SaveMetrics]:
        """Queue one write; the future resolves to its metrics once committed."""
        return self._executor.submit(self._write, state_dict, path, **kwargs)

    def _write(
        self, state_dict: STATE_DICT | Future[STATE_DICT], path: str, **kwargs: Any
    ) -> SaveMetrics:
        sd = state_dict.result() if isinstance(state_dict, Future) else state_dict
        if self.process is None or not self.process.is_alive():
            self._discard_process()
            self._start()
        assert self._conn is not None
        self._conn.send(_Request("write", {"state_dict": sd, "path": path, "kwargs": kwargs}))
        del sd
        response = self._receive(path)
        if not response.ok:
            raise response.value
        return response.value

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self.process is None or not self.process.is_alive():
            return
        try:
            assert self._conn is not None
            self._conn.send(_Request("exit", {}))
            self.process.join(timeout=self._config.subprocess_shutdown_timeout_secs)
        except (BrokenPipeError, OSError) as e:
            logger.warning("writer subprocess %s already gone at close: %s", self.pid, e)
        if self.process.is_alive():
            logger.warning("writer subprocess %s did not exit in time; killing it", self.pid)
        self._discard_process()
