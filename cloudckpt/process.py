"""The async writer subprocess: upstream's CheckpointProcess protocol, made failure-proof.

Differences from upstream that a training job relies on:

* a failed write does not kill the subprocess: the error (a cloudckpt exception, picklable)
  travels back and is raised by the write future with its original type;
* a subprocess that dies mid-save (OOM-killed, segfault, kill -9) turns into a SaveFailedError
  naming the path and exit code on the write future, the other ranks are told at once (its
  failure record, written from this process, as for a failure in staging or at the writer's
  start), and the next save starts a fresh subprocess;
* a subprocess whose trainer died exits within a second (it does not finish the write);
* the write future's result is the save's :class:`~cloudckpt.writer.SaveMetrics`.

Hand-off (zero copy). Staged tensors live in fd-backed shared memory (see
:mod:`cloudckpt.staging`). A write request is the state dict pickled with each such storage
replaced by an index, followed by the storages' file descriptors sent over the same Unix socket
(``SCM_RIGHTS``): a few hundred bytes cross the pipe whatever the tensors weigh, and the writer
maps the very pages the stager filled and streams them into the upload. The descriptors travel
inside the message, so a writer that dies before reading them leaks nothing (the kernel drops
them with its socket), unlike torch's own reductions, which park a duplicate of every
descriptor in the sender's ``resource_sharer`` until the receiver fetches it. Storages that are
not fd-backed shared memory are pickled by value (correct, not zero-copy).

Lifecycle of one write, in the writer subprocess::

    1. receive the request and its descriptors; map the storages, reusing the mappings of the
       previous write for the same segments (:class:`SegmentMaps`) and unmapping the others
    2. CheckpointWriter.write(path, state_dict, **kwargs)
    3. drop every reference to the state dict and collect cycles (tracebacks included)
    4. answer (metrics or the error): the write future resolves only now, so when
       AsyncCheckpointer.save stages again (it waits for this future) nobody reads the buffers

Memory therefore stays flat across saves: between writes the subprocess holds no state dict,
only mappings of the stager's current buffers (pages the trainer holds anyway).
"""

from __future__ import annotations

import gc
import io
import logging
import os
import pickle
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import reduction
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.multiprocessing as mp

from ._upstream import STATE_DICT, CheckpointProcessConfig, RankInfo
from .barriers import record_failure
from .config import StorageConfig
from .errors import CloudCkptError, SaveFailedError
from .storage import get_storage, normalize_url
from .writer import CheckpointWriter, SaveMetrics

logger = logging.getLogger(__name__)

# Descriptors per sendmsg: below the kernel's SCM_MAX_FD (253).
_FDS_PER_MESSAGE = 200
# How often the writer checks that its trainer is alive.
PARENT_POLL_SECS = 1.0


@dataclass
class _Request:
    kind: str  # "ping" | "write" | "exit"
    payload: dict[str, Any]


@dataclass
class _Response:
    ok: bool
    value: Any = None  # SaveMetrics on a successful write, the exception otherwise


# --- the hand-off: pickled skeleton + file descriptors --------------------------------------


class _HandlePickler(pickle.Pickler):
    """Pickles with every storage replaced by a persistent id: fd-backed shared CPU storages
    by an index into ``fds`` (zero copy), any other storage by its bytes (a copy)."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.fds: list[int] = []
        self.storages: list[torch.UntypedStorage] = []  # keeps the fds open until sent
        self._ids: dict[int, tuple[Any, ...]] = {}  # storage _cdata -> its id, sharing kept

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, torch.storage.TypedStorage):  # what Tensor.__reduce_ex__ pickles
            storage, dtype = obj._untyped_storage, obj.dtype
        elif isinstance(obj, torch.UntypedStorage):  # ... for float8 and other new dtypes
            storage, dtype = obj, torch.uint8
        else:
            return None
        if storage.device.type == "meta":
            return None
        key = self._ids.get(storage._cdata)
        if key is None:
            index = len(self._ids)
            fd = _shared_fd(storage)
            if fd is not None:
                key = ("fd", index, (len(self.fds), storage.nbytes()))
                self.fds.append(fd)
                self.storages.append(storage)
            else:
                data = storage.cpu() if storage.device.type != "cpu" else storage
                key = ("bytes", index, bytes(memoryview(_as_numpy_bytes(data))))
            self._ids[storage._cdata] = key
        return (*key, dtype)


def _shared_fd(storage: torch.UntypedStorage) -> int | None:
    """The descriptor of an fd-backed shared CPU storage, else None (never moves memory)."""
    if storage.device.type != "cpu" or storage.nbytes() == 0:
        return None
    try:
        return storage._get_shared_fd()  # type: ignore[attr-defined]
    except RuntimeError:
        return None


def _as_numpy_bytes(storage: torch.UntypedStorage) -> Any:
    return torch.empty(0, dtype=torch.uint8).set_(storage).numpy()


class SegmentMaps:
    """The writer's mappings of the trainer's staging buffers, kept from one save to the next.

    Mapping a segment costs a page fault per page on first touch and unmapping it a page-table
    teardown (about 1.5 s/GiB each on small VMs): since the stager reuses its buffers, the
    writer keeps each one mapped, keyed by the shm file's identity (device, inode), and drops
    those a write no longer sends (the stager released them): it maps nothing the trainer does
    not hold too, so it adds no memory of its own.
    """

    def __init__(self) -> None:
        self._maps: dict[tuple[int, int], torch.UntypedStorage] = {}

    def map_all(self, fds: list[int], sizes: list[int]) -> list[torch.UntypedStorage]:
        """Storages for descriptors ``fds[i]`` of ``sizes[i]`` bytes; unmaps all others."""
        if len(fds) != len(sizes):
            raise ValueError(f"{len(fds)} descriptors but {len(sizes)} sizes")
        current: dict[tuple[int, int], torch.UntypedStorage] = {}
        out: list[torch.UntypedStorage] = []
        for i, nbytes in enumerate(sizes):
            st = os.fstat(fds[i])
            key = (st.st_dev, st.st_ino)
            storage = current.get(key)
            if storage is None:
                storage = self._maps.get(key)
            if storage is None or storage.nbytes() != nbytes:
                storage = torch.UntypedStorage._new_shared_fd_cpu(fds[i], nbytes)  # type: ignore[attr-defined]
            current[key] = storage
            out.append(storage)
        self._maps = current
        return out


class _HandleUnpickler(pickle.Unpickler):
    """The inverse of :class:`_HandlePickler`."""

    def __init__(self, file: io.BytesIO, mapped: list[torch.UntypedStorage]) -> None:
        super().__init__(file)
        self._mapped = mapped
        self._storages: dict[int, torch.UntypedStorage] = {}

    def persistent_load(self, pid: Any) -> Any:
        kind, index, value, dtype = pid
        storage = self._storages.get(index)
        if storage is None:
            if kind == "fd":
                storage = self._mapped[value[0]]
            elif kind == "bytes":
                storage = torch.UntypedStorage(len(value))
                if value:
                    _as_numpy_bytes(storage)[:] = memoryview(value)
            else:
                raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
            self._storages[index] = storage
        # As torch.load: storages come back typed (the tensor rebuild functions expect it).
        return torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)


def encode_write(obj: Any) -> tuple[bytes, list[int], list[torch.UntypedStorage]]:
    """``obj`` as (pickled bytes, descriptors, storages that own them): what a write sends."""
    buf = io.BytesIO()
    pickler = _HandlePickler(buf)
    pickler.dump(obj)
    return buf.getvalue(), pickler.fds, pickler.storages


def decode_write(
    data: bytes, fds: list[int], sizes: list[int], maps: SegmentMaps | None = None
) -> Any:
    """Rebuild what :func:`encode_write` pickled: ``fds`` and their ``sizes`` (the nbytes of
    its storages) mapped through ``maps`` (a fresh one by default). The caller still owns,
    and closes, ``fds``."""
    mapped = (maps if maps is not None else SegmentMaps()).map_all(fds, sizes)
    return _HandleUnpickler(io.BytesIO(data), mapped).load()


def _send_fds(conn: Connection, fds: list[int]) -> None:
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        for i in range(0, len(fds), _FDS_PER_MESSAGE):
            reduction.sendfds(sock, fds[i : i + _FDS_PER_MESSAGE])


def _recv_fds(conn: Connection, count: int) -> list[int]:
    fds: list[int] = []
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        try:
            while len(fds) < count:
                fds.extend(reduction.recvfds(sock, min(_FDS_PER_MESSAGE, count - len(fds))))
        except BaseException:
            _close_fds(fds)
            raise
    return fds


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


# --- the subprocess -------------------------------------------------------------------------


def _portable_error(e: BaseException) -> BaseException:
    """The exception itself when it survives pickling, else a CloudCkptError with its text."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return CloudCkptError(f"{type(e).__name__}: {e}\n{''.join(traceback.format_exception(e))}")


def _drop_tracebacks(e: BaseException | None) -> None:
    """Tracebacks hold the writer's frames, and so the state dict: cut them once logged."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        e.__traceback__ = None
        e = e.__cause__ or e.__context__


def _write_one(
    writer: CheckpointWriter, conn: Connection, payload: dict[str, Any], maps: SegmentMaps
) -> _Response:
    """Steps 1-3 of the module docstring; never holds the state dict once it returns."""
    path = payload["path"]
    fds = _recv_fds(conn, len(payload["sizes"]))
    state_dict = kwargs = None
    try:
        state_dict, kwargs = decode_write(payload["data"], fds, payload["sizes"], maps)
        writer.write(path, state_dict, **kwargs)
        response = _Response(True, writer.last_metrics)
    except Exception as e:
        logger.error("checkpoint write to %s failed", path, exc_info=True)
        response = _Response(False, _portable_error(e))
        _drop_tracebacks(e)
    finally:
        _close_fds(fds)  # mapped storages hold their own duplicates
    del state_dict, kwargs
    gc.collect()
    return response


def _exit_with_parent(parent_pid: int) -> None:
    """Watchdog thread: when the trainer dies (kill -9, OOM), stop at once instead of finishing
    the write in flight and waiting out the commit timeout while holding its staged memory.
    The upload left open is aborted by ``CheckpointManager.gc``."""
    while True:
        time.sleep(PARENT_POLL_SECS)
        if os.getppid() != parent_pid:
            logger.error("the trainer (pid %d) died; its checkpoint writer exits", parent_pid)
            os._exit(1)


def _subprocess_main(
    conn: Connection,
    rank_info: RankInfo,
    subprocess_init_fn: Callable[..., None],
    subprocess_init_args: tuple[Any, ...],
    writer_init_fn: Callable[..., CheckpointWriter],
    writer_init_args: dict[str, Any],
) -> None:
    # Ctrl-C reaches the whole process group: the trainer decides when this process stops
    # (close() or its pipe closing), so an upload in flight is not cut by the terminal.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(
        target=_exit_with_parent, args=(os.getppid(),), name="cloudckpt-parent-watch", daemon=True
    ).start()
    try:
        subprocess_init_fn(*subprocess_init_args)
        args = dict(writer_init_args)
        args.setdefault("rank_info", rank_info)
        writer = writer_init_fn(**args)
    except BaseException as e:
        conn.send(_Response(False, _portable_error(e)))
        return
    maps = SegmentMaps()
    # Everything imported so far lives as long as the process: keep it out of the collections
    # each write runs (a full collection of torch's heap costs ~0.3 s on a small VM).
    gc.freeze()
    try:
        while True:
            request: _Request = conn.recv()
            if request.kind == "ping":
                conn.send(_Response(True))
            elif request.kind == "exit":
                conn.send(_Response(True))
                return
            elif request.kind == "write":
                response = _write_one(writer, conn, request.payload, maps)
                del request
                conn.send(response)
            else:
                conn.send(_Response(False, ValueError(f"unknown request {request.kind!r}")))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the trainer went away: exit quietly
    finally:
        writer.close()


# --- the trainer side -----------------------------------------------------------------------


class CheckpointProcess:
    """Writes checkpoints from a spawned subprocess; same constructor as upstream's.

    Writes run one at a time, in order, on one thread of this process that talks to the
    subprocess. ``pid`` is the subprocess's (None while none runs).
    """

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
        self._closed = False
        self.process_creation_future = self._executor.submit(self._start)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()  # duplex: a Unix socket pair, which can carry descriptors
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
        response = self._receive(None, self._config.subprocess_init_timeout_secs)
        if not response.ok:
            self._discard_process()
            raise response.value
        logger.info("checkpoint writer subprocess %d started", proc.pid)

    def _died(self, path: str | None, cause: BaseException | None = None) -> SaveFailedError:
        """Reap the dead subprocess and describe it as the failure of saving ``path``."""
        code = None
        if self.process is not None:
            self.process.join(timeout=5)
            code = self.process.exitcode
        self._discard_process()
        doing = f"saving {path}" if path is not None else "starting"
        err = SaveFailedError(
            f"the checkpoint writer subprocess died (exit code {code}) while {doing}",
            url=path,
            rank=self._rank_info.global_rank,
            hint="the next save starts a new writer; in a multi-rank job the save fails on every "
            "rank unless rank 0 was already committing it (CheckpointManager.list() tells)",
        )
        err.__cause__ = cause
        return err

    def _receive(self, path: str | None, timeout_secs: float | None = None) -> _Response:
        """Wait for the subprocess's answer or its death, whichever comes first."""
        if self._conn is None or self.process is None:
            raise RuntimeError("no checkpoint writer subprocess")
        ready = wait([self._conn, self.process.sentinel], timeout_secs)
        if not ready:
            self._discard_process()
            raise SaveFailedError(
                f"the checkpoint writer subprocess did not answer in {timeout_secs}s"
                + (f" while saving {path}" if path is not None else " after it was started"),
                url=path,
                rank=self._rank_info.global_rank,
                hint="the writer is spawned: it imports your script's main module again, so the "
                "training code must run under `if __name__ == \"__main__\":`; or the host is "
                "overloaded (CheckpointProcessConfig.subprocess_init_timeout_secs)",
            )
        # An answer sent just before exiting is still an answer.
        if self._conn.poll(0):
            try:
                return self._conn.recv()
            except (EOFError, ConnectionResetError) as e:
                raise self._died(path, e) from e
        raise self._died(path)

    def _discard_process(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.kill()
        if self.process is not None:
            self.process.join(timeout=5)
            if self.process.exitcode is not None:
                self.process.close()  # its sentinel and pipe handles
        if self._conn is not None:
            self._conn.close()
        self.process, self._conn = None, None

    def write(
        self, state_dict: STATE_DICT | Future[STATE_DICT], path: str, **kwargs: Any
    ) -> Future[SaveMetrics]:
        """Queue one write; the future resolves to its metrics once committed."""
        if self._closed:
            raise RuntimeError("CheckpointProcess.write called after close()")
        return self._executor.submit(self._write, state_dict, path, **kwargs)

    def _write(
        self, state_dict: STATE_DICT | Future[STATE_DICT], path: str, **kwargs: Any
    ) -> SaveMetrics:
        # A staging failure is raised as is: the checkpointer records it, as soon as it happens.
        sd = state_dict.result() if isinstance(state_dict, Future) else state_dict
        try:
            response = self._hand_off(sd, path, kwargs)
        except Exception as e:
            # Encoding, the writer's start or its death: the writer could not record this
            # rank's failure, so this process does, and the other ranks fail now rather than
            # at commit_timeout_secs.
            self.report_failure(path, kwargs.get("save_id"), e)
            raise
        if not response.ok:
            raise response.value  # the writer's own failure, already recorded by it
        return response.value

    def _hand_off(self, sd: STATE_DICT, path: str, kwargs: dict[str, Any]) -> _Response:
        """Send one write to the subprocess (starting it if needed); its response."""
        data, fds, storages = encode_write((sd, kwargs))
        del sd
        if self.process is None or not self.process.is_alive():
            self._discard_process()
            self._start()
        assert self._conn is not None
        try:
            sizes = [s.nbytes() for s in storages]
            self._conn.send(_Request("write", {"path": path, "data": data, "sizes": sizes}))
            _send_fds(self._conn, fds)
        except OSError as e:  # BrokenPipeError, ConnectionResetError: it died meanwhile
            raise self._died(path, e) from e
        finally:
            del storages
        logger.debug("sent %s to the writer: %d bytes, %d descriptors", path, len(data), len(fds))
        return self._receive(path)

    def report_failure(self, path: str, save_id: str | None, error: Exception) -> None:
        """Write this rank's failure record of a multi-rank save, for a failure the writer
        cannot record itself (best effort)."""
        storage_config = self._init[3].get("storage_config")
        if self._rank_info.global_world_size == 1 or save_id is None:
            return
        if not isinstance(storage_config, StorageConfig):
            return  # a custom writer: this process does not know its storage
        rank = self._rank_info.global_rank
        try:
            url = normalize_url(path)
            storage = get_storage(url, storage_config)
        except Exception as e:
            logger.warning("rank %d could not record its failure at %s: %s", rank, path, e)
            return
        try:
            record_failure(storage, url, save_id, rank, error)
        finally:
            storage.close()

    def close(self) -> None:
        """Wait for the write in flight (queued ones are cancelled), then stop the subprocess,
        killing it if it does not exit within ``subprocess_shutdown_timeout_secs``."""
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self.process is None:
            return
        if self.process.is_alive() and self._conn is not None:
            try:
                self._conn.send(_Request("exit", {}))
                self.process.join(timeout=self._config.subprocess_shutdown_timeout_secs)
            except OSError as e:
                logger.warning("writer subprocess %s already gone at close: %s", self.pid, e)
            if self.process.is_alive():
                logger.warning("writer subprocess %s did not exit in time; killing it", self.pid)
        self._discard_process()
        gc.collect()  # staged dicts kept alive by finished futures' reference cycles
