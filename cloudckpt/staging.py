"""Staging: copy a state dict's tensors into reusable CPU (shared) buffers for the writer.

:class:`CloudStager` implements upstream's ``CheckpointStager``. Per save it:

1. walks the state dict (dicts, lists, tuples) and lists the distinct storages its tensors
   view, in order of first appearance;
2. takes one staging buffer per storage from the buffers of the previous save, matched by
   size (same layout: every buffer is reused, no allocation); only sizes it has no buffer for
   are allocated, and buffers nobody needs any more are released (unpinned, dropped);
3. copies each storage's bytes into its buffer with ``Tensor.copy_`` (device storages first,
   non-blocking on a dedicated stream, then CPU storages while those run; then the stream is
   synchronized, so the future resolves only once every byte has landed);
4. rebuilds the state dict around views of the buffers: tensors that shared a storage still
   share one buffer, offsets/strides/conj bits/``requires_grad``/``Parameter`` are kept;
   non-tensor leaves are deep-copied.

Buffers are shared memory (``UntypedStorage._new_using_fd_cpu``: an unlinked shm file per
buffer, so nothing is left in ``/dev/shm`` whatever the sharing strategy), pinned with
``cudaHostRegister`` when CUDA is available. The writer subprocess maps them through their file
descriptors (see :mod:`cloudckpt.process`): the bytes are never copied again on their way to the
upload. CPU tensors are copied too: the staged dict is a snapshot the caller may mutate after.

Invariant (the reason reuse is safe): a buffer is overwritten by the next ``stage`` call, so
no staged state dict may still be read when ``stage`` is called again. ``AsyncCheckpointer.save``
guarantees it by waiting for the previous write (whose subprocess has unmapped the buffers by
then) before staging; anyone else calling ``stage`` directly must do the same, and must not hold
on to a staged dict across saves.

Tensors inside containers other than dict/list/tuple (custom objects), and tensors that are not
plain strided tensors or Parameters (sparse, quantized, nested, subclasses), are deep-copied
instead: correct, but neither reused nor shared with the subprocess.
"""

from __future__ import annotations

import copy
import errno
import gc
import logging
import resource
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ._upstream import STATE_DICT, CheckpointStager, CheckpointStagerConfig
from .errors import SaveFailedError

logger = logging.getLogger(__name__)


@dataclass
class _Buffer:
    """One staging buffer: a CPU storage, shared and/or pinned."""

    storage: torch.UntypedStorage
    pinned: bool

    @property
    def nbytes(self) -> int:
        return self.storage.nbytes()


@dataclass
class _Plan:
    """What one state dict needs staged: its distinct storages and the tensors viewing them."""

    storages: list[torch.UntypedStorage] = field(default_factory=list)
    storage_index: dict[int, int] = field(default_factory=dict)  # storage _cdata -> index

    def add(self, t: torch.Tensor) -> None:
        if not _is_stageable(t):
            return  # deep-copied when the state dict is rebuilt
        storage = t.untyped_storage()
        if storage._cdata not in self.storage_index:
            self.storage_index[storage._cdata] = len(self.storages)
            self.storages.append(storage)


def _is_stageable(t: torch.Tensor) -> bool:
    """Plain strided tensors and Parameters with real memory: what the buffers can hold."""
    return (
        type(t) in (torch.Tensor, torch.nn.Parameter)
        and t.layout == torch.strided
        and not t.is_quantized
        and not t.is_nested
        and t.device.type != "meta"
    )


def _as_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    """A flat uint8 tensor over all of ``storage`` (what ``copy_`` moves)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _walk(obj: Any, on_tensor: Callable[[torch.Tensor], None], seen: set[int]) -> None:
    """Call ``on_tensor`` on every tensor found through dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        on_tensor(obj)
    elif isinstance(obj, dict | list | tuple):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        for value in obj.values() if isinstance(obj, dict) else obj:
            _walk(value, on_tensor, seen)


class CloudStager(CheckpointStager):
    """Stages state dicts into CPU buffers allocated once and reused while the layout holds.

    ``config`` is upstream's ``CheckpointStagerConfig``: ``use_shared_memory`` (buffers the
    writer subprocess maps instead of receiving copies), ``use_pinned_memory`` and
    ``use_non_blocking_copy`` (only with CUDA; ignored on CPU-only hosts, where they mean
    nothing), ``use_async_staging`` (``stage`` returns a Future, copies run in a thread).
    See the module docstring for the reuse invariant.
    """

    def __init__(self, config: CheckpointStagerConfig) -> None:
        self._config = config
        has_cuda = torch.cuda.is_available()
        self._pin = bool(config.use_pinned_memory and has_cuda)
        self._share = bool(config.use_shared_memory)
        self._executor: ThreadPoolExecutor | None = None
        if config.use_async_staging:
            self._executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="cloudckpt-stager"
            )
        # Created here, on the caller's thread, after its default stream exists (as upstream).
        self._stream: torch.cuda.Stream | None = None
        if config.use_non_blocking_copy and has_cuda:
            self._stream = torch.cuda.Stream()
        self._buffers: list[_Buffer] = []
        self._closed = False
        #: How many buffers this stager has allocated so far (reuse keeps it constant).
        self.allocations = 0

    # --- public ------------------------------------------------------------------------------
    def stage(self, state_dict: STATE_DICT, **kwargs: Any) -> STATE_DICT | Future[STATE_DICT]:
        """Snapshot ``state_dict`` into the staging buffers (a Future with async staging)."""
        if self._closed:
            raise RuntimeError("CloudStager.stage called after close()")
        ready: torch.cuda.Event | None = None
        if self._stream is not None:
            # The caller's pending kernels may still be producing these tensors: the copies
            # wait for everything queued on the caller's current stream up to this point.
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream())
        if self._executor is None:
            return self._stage(state_dict, ready)
        return self._executor.submit(self._stage, state_dict, ready)

    def buffer_data_ptrs(self) -> list[int]:
        """Addresses of the current staging buffers, in storage order (for tests and metrics)."""
        return [b.storage.data_ptr() for b in self._buffers]

    @property
    def buffer_bytes(self) -> int:
        """Bytes held in staging buffers now."""
        return sum(b.nbytes for b in self._buffers)

    def close(self) -> None:
        """Wait for a staging in flight, then unpin and drop every buffer. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        released, self._buffers = self._buffers, []
        self._release(released)

    # --- staging ------------------------------------------------------------------------------
    @torch.no_grad()
    def _stage(self, state_dict: STATE_DICT, ready: torch.cuda.Event | None) -> STATE_DICT:
        plan = _Plan()
        _walk(state_dict, plan.add, set())
        buffers = self._buffers_for(plan.storages)

        device_pairs = []
        for src, buf in zip(plan.storages, buffers, strict=True):
            if src.nbytes() == 0:
                continue
            if src.device.type == "cpu":
                continue
            device_pairs.append((src, buf))
        if device_pairs:
            if self._stream is not None:
                assert ready is not None
                with torch.cuda.stream(self._stream):
                    self._stream.wait_event(ready)
                    for src, buf in device_pairs:
                        _as_bytes(buf.storage).copy_(_as_bytes(src), non_blocking=True)
            else:
                for src, buf in device_pairs:
                    _as_bytes(buf.storage).copy_(_as_bytes(src))
        for src, buf in zip(plan.storages, buffers, strict=True):
            if src.nbytes() and src.device.type == "cpu":
                _as_bytes(buf.storage).copy_(_as_bytes(src))
        if device_pairs and self._stream is not None:
            self._stream.synchronize()

        staged = [b.storage for b in buffers]
        memo: dict[int, Any] = {}

        def stage_tensor(t: torch.Tensor) -> Any:
            if not _is_stageable(t):
                out = copy.deepcopy(t, memo)
                return out.cpu() if out.device.type not in ("cpu", "meta") else out
            index = plan.storage_index[t.untyped_storage()._cdata]
            view = torch.empty(0, dtype=t.dtype).set_(
                staged[index], t.storage_offset(), t.size(), t.stride()
            )
            if t.is_conj():
                view = view.conj()
            if t.is_neg():
                view = torch._neg_view(view)
            if type(t) is torch.nn.Parameter:
                return torch.nn.Parameter(view, requires_grad=t.requires_grad)
            return view.requires_grad_(t.requires_grad) if t.requires_grad else view

        return _rebuild(state_dict, stage_tensor, memo)

    def _buffers_for(self, storages: list[torch.UntypedStorage]) -> list[_Buffer]:
        """One buffer per storage: the previous save's buffers reused by size, the rest new."""
        sizes = [s.nbytes() for s in storages]
        if sizes == [b.nbytes for b in self._buffers]:
            return self._buffers
        free: dict[int, list[_Buffer]] = defaultdict(list)
        for b in self._buffers:
            free[b.nbytes].append(b)
        chosen: list[_Buffer] = []
        fresh: list[_Buffer] = []
        new_bytes = 0
        try:
            for n in sizes:
                if free[n]:
                    chosen.append(free[n].pop(0))
                else:
                    fresh.append(self._allocate(n))
                    chosen.append(fresh[-1])
                    new_bytes += n
        except OSError as e:
            self._release(fresh)
            chosen.clear()
            if e.errno != errno.EMFILE:
                raise
            limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            raise SaveFailedError(
                f"staging {len(sizes)} tensor storages needs one open file each, more than the "
                f"open-file limit allows (ulimit -n = {limit})",
                hint="raise the limit (ulimit -n / resource.setrlimit) or save fewer, larger "
                "tensors; nothing was saved",
            ) from None
        leftovers = [b for group in free.values() for b in group]
        logger.info(
            "state dict layout changed: %d staging buffers, %d new (%d bytes), %d released",
            len(chosen),
            len(chosen) - (len(self._buffers) - len(leftovers)),
            new_bytes,
            len(leftovers),
        )
        self._buffers = chosen
        self._release(leftovers)
        return chosen

    def _allocate(self, nbytes: int) -> _Buffer:
        self.allocations += 1
        if nbytes == 0:
            return _Buffer(torch.UntypedStorage(0), pinned=False)
        if self._share:
            # An fd-backed segment whatever the sharing strategy: unlinked at creation, freed
            # when the last mapping goes, passed to the writer as a file descriptor.
            storage = torch.UntypedStorage._new_using_fd_cpu(nbytes)
        else:
            storage = torch.UntypedStorage(nbytes)
        if self._pin:
            import torch.cuda._pin_memory_utils as pin_memory_utils

            pin_memory_utils.pin_memory(storage.data_ptr(), nbytes)
        return _Buffer(storage, pinned=self._pin)

    def _release(self, buffers: list[_Buffer]) -> None:
        """Unpin and drop buffers; their memory goes once no staged view references them."""
        if not buffers:
            return
        for b in buffers:
            if b.pinned:
                import torch.cuda._pin_memory_utils as pin_memory_utils

                pin_memory_utils.unpin_memory(b.storage.data_ptr())
                b.pinned = False
        buffers.clear()
        # Old staged dicts linger in reference cycles (futures and their callbacks): collect
        # them now so the released segments are really unmapped.
        gc.collect()


def _rebuild(obj: Any, stage_tensor: Callable[[torch.Tensor], Any], memo: dict[int, Any]) -> Any:
    """A copy of ``obj`` with tensors staged and other leaves deep-copied (shared refs kept)."""
    found = memo.get(id(obj), memo)
    if found is not memo:
        return found
    if isinstance(obj, torch.Tensor):
        out = stage_tensor(obj)
    elif isinstance(obj, dict):
        out = {} if type(obj) is dict else copy.copy(obj)
        if out:
            out.clear()
        memo[id(obj)] = out
        for key, value in obj.items():
            out[copy.deepcopy(key, memo)] = _rebuild(value, stage_tensor, memo)
    elif isinstance(obj, list):
        out = [] if type(obj) is list else copy.copy(obj)
        memo[id(obj)] = out
        items = [_rebuild(v, stage_tensor, memo) for v in obj]
        out[:] = items
    elif isinstance(obj, tuple):
        items = [_rebuild(v, stage_tensor, memo) for v in obj]
        if type(obj) is tuple:
            out = tuple(items)
        elif hasattr(obj, "_fields"):  # namedtuple
            out = type(obj)(*items)
        else:
            out = type(obj)(items)
    else:
        return copy.deepcopy(obj, memo)
    memo[id(obj)] = out
    _keep_alive(obj, memo)
    return out


def _keep_alive(obj: Any, memo: dict[int, Any]) -> None:
    """Keep ``obj`` referenced while ``memo`` (keyed by ids) lives, as ``copy.deepcopy`` does."""
    memo.setdefault(id(memo), []).append(obj)


__all__ = ["CheckpointStager", "CloudStager"]
