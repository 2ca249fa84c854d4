"""The rank object format: a genuine ``torch.save`` zip, written as a stream, plus its byte map.

cloudckpt writes rank objects with torch's own zip writer (``PyTorchFileWriter``) and the same
records, pickle protocol and persistent ids as ``torch.save``, so ``torch.load`` and upstream's
``CheckpointReader`` read them unchanged. Doing the pickling here (instead of calling
``torch.save``) tells us, while the bytes stream out, where each storage lands in the object and
its CRC32C, which is what ranged, verified, partial loads need.
"""

from __future__ import annotations

import functools
import io
import pickle
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.serialization import _get_storage_alignment, location_tag, normalize_storage_type

from .checksum import crc32c

PICKLE_RECORD = "data.pkl"
PICKLE_PROTOCOL = 2  # torch.save's DEFAULT_PROTOCOL
# miniz writes a 16-byte data descriptor after each record's data when streaming (24 in zip64).
_MAX_HEADER_WRITE_BYTES = 4096
_DATA_DESCRIPTOR_SIGNATURE = b"PK\x07\x08"
_DATA_DESCRIPTOR_SIZES = (16, 24)


class Writable(Protocol):
    def write(self, data: memoryview, /) -> Any: ...


@dataclass(frozen=True)
class Span:
    """Where a record's data sits inside the rank object, and its checksum."""

    offset: int
    nbytes: int
    crc32c: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclass(frozen=True)
class StorageSpan(Span):
    """One tensor storage record (``data/<key>``)."""

    key: str
    dtype: str  # dtype the storage was saved with, e.g. "float32"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor leaf of the state dict and which storage bytes it views."""

    path: tuple[str | int, ...]
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int  # in elements, as torch counts it
    storage_key: str

    @property
    def name(self) -> str:
        return key_path_name(self.path)

    @property
    def nbytes(self) -> int:
        numel = 1
        for s in self.shape:
            numel *= s
        return numel * dtype_from_name(self.dtype).itemsize


@dataclass(frozen=True)
class RankLayout:
    """The byte map of one rank object."""

    size_bytes: int
    crc32c: int  # of the whole object
    pickle: Span
    storages: tuple[StorageSpan, ...]
    tensors: tuple[TensorSpec, ...]

    def storage(self, key: str) -> StorageSpan:
        return self._storages_by_key[key]

    @functools.cached_property
    def _storages_by_key(self) -> dict[str, StorageSpan]:
        return {s.key: s for s in self.storages}


def key_path_name(path: tuple[str | int, ...]) -> str:
    """Display a key path the way upstream reports missing keys: ``a.b[0].c``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out = f"{out}.{part}" if out else str(part)
    return out


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def iter_tensors(
    obj: Any, path: tuple[str | int, ...] = ()
) -> Iterator[tuple[tuple[str | int, ...], torch.Tensor]]:
    """Tensor leaves reachable through dicts (str/int keys), lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, str | int):
                yield from iter_tensors(v, (*path, k))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from iter_tensors(v, (*path, i))


class _RecordingSink:
    """Forwards torch's zip writes to ``out``, tracking the position, the object CRC32C and the
    offset + CRC32C of the one write that carries an expected record's data.

    An exception must never propagate into torch's C++ zip writer: its destructor then
    finalizes the archive, fails a position check and aborts the whole process. So the first
    failure (KeyboardInterrupt included) is stored, later writes are dropped, and
    :meth:`raise_if_failed` re-raises it from Python after each record.
    """

    def __init__(self, out: Writable) -> None:
        self._out = out
        self.error: BaseException | None = None  # first failure, until raise_if_failed raises it
        self.failed = False  # once set, writes are dropped (see write)
        self.position = 0
        self.crc = 0
        self._expect_nbytes: int | None = None
        self._candidates: list[tuple[int, int]] = []  # (offset, crc) of writes of that size
        self._descriptor_offset = -1  # offset of the last write if it was a data descriptor

    def write(self, data: memoryview) -> int:
        n = data.nbytes
        if self.failed:
            return n
        try:
            self._write(data)
        except BaseException as e:  # re-raised by raise_if_failed, see the class docstring
            self.error = e
            self.failed = True
        return n

    def raise_if_failed(self) -> None:
        if self.error is not None:
            # Drop the reference: the traceback will hold serialize's frame, which holds
            # torch's writer, which holds this sink; kept here, that cycle (through C++, so
            # invisible to the GC) would leak the whole state dict.
            error, self.error = self.error, None
            raise error

    def _write(self, data: memoryview) -> None:
        n = data.nbytes
        if self._expect_nbytes == n and n > 0:
            # Small records can be mistaken for a header write of the same size: keep every
            # candidate and take the last one (data is written after the header).
            if n > _MAX_HEADER_WRITE_BYTES:
                self._expect_nbytes = None
            self._candidates.append((self.position, crc32c(data)))
        is_descriptor = (
            n in _DATA_DESCRIPTOR_SIZES and data[:4].tobytes() == _DATA_DESCRIPTOR_SIGNATURE
        )
        self._descriptor_offset = self.position if is_descriptor else -1
        self.crc = crc32c(data, self.crc)
        self._out.write(data)
        self.position += n

    def expect(self, nbytes: int) -> None:
        self._expect_nbytes = nbytes
        self._candidates = []

    def take(self, nbytes: int) -> tuple[int, int]:
        """Offset and CRC32C of the expected record's data written since :meth:`expect`."""
        self._expect_nbytes = None
        if nbytes == 0:
            return self.position, crc32c(b"")
        if not self._candidates:
            raise RuntimeError(f"torch's zip writer did not write a {nbytes}-byte record in one call")
        candidates = self._candidates
        if len(candidates) > 1 and candidates[-1][0] == self._descriptor_offset:
            # A 16/24-byte record: the last write of its size is the data descriptor that
            # follows the data, not the data.
            candidates = candidates[:-1]
        return candidates[-1]

    def flush(self) -> None:
        flush = getattr(self._out, "flush", None)
        if flush is not None and not self.failed:
            flush()


def serialize(obj: Any, out: Writable, *, zip_crc32: bool = False) -> RankLayout:
    """Stream ``obj`` to ``out`` in ``torch.save`` format and return where everything landed.

    Storages are sent straight from tensor memory (GPU storages are copied to CPU one at a
    time); only the pickle stream is buffered. ``zip_crc32`` adds the zip format's own CRC32
    per record (torch.save's default); cloudckpt's CRC32C in the manifest makes it redundant
    and it costs about 0.5 s/GiB, so it is off unless asked for.
    """
    sink = _RecordingSink(out)

    id_map: dict[int, str] = {}
    serialized: dict[str, torch.UntypedStorage] = {}
    storage_dtypes: dict[str, torch.dtype] = {}
    dtype_by_ptr: dict[int, torch.dtype] = {}

    def persistent_id(o: Any) -> tuple[Any, ...] | None:
        # Same records as torch.serialization._save, so torch.load reads the result.
        if not (isinstance(o, torch.storage.TypedStorage) or torch.is_storage(o)):
            return None
        if isinstance(o, torch.storage.TypedStorage):
            storage = o._untyped_storage
            storage_dtype = o.dtype
            storage_type = getattr(torch, o._pickle_storage_type())
            storage_numel = o._size()
        else:
            storage = o
            storage_dtype = torch.uint8
            storage_type = normalize_storage_type(type(o))
            storage_numel = storage.nbytes()
        if str(storage.device) != "meta" and storage.data_ptr() != 0:
            seen = dtype_by_ptr.setdefault(storage.data_ptr(), storage_dtype)
            if seen != storage_dtype:
                raise RuntimeError(
                    "Cannot save multiple tensors or storages that view the same data as "
                    "different types"
                )
        key = id_map.setdefault(storage._cdata, str(len(id_map)))
        serialized[key] = storage
        storage_dtypes.setdefault(key, storage_dtype)
        return ("storage", storage_type, key, location_tag(storage), storage_numel)

    class _Pickler(pickle.Pickler):
        def persistent_id(self, o: Any) -> Any:
            return persistent_id(o)  # noqa: F821 (deleted below, after the dump)

    buf = io.BytesIO()
    _Pickler(buf, protocol=PICKLE_PROTOCOL).dump(obj)
    data = buf.getvalue()
    buf.close()
    # The local class keeps this closure, and through it every storage, alive until the next
    # full GC pass; empty its cell now, as torch.save does.
    del persistent_id

    # Created after pickling, so that a pickling error leaves ``out`` untouched.
    writer = torch._C.PyTorchFileWriter(sink, zip_crc32, _get_storage_alignment())
    try:
        sink.expect(len(data))
        writer.write_record(PICKLE_RECORD, data, len(data))
        sink.raise_if_failed()
        pkl_offset, pkl_crc = sink.take(len(data))
        pickle_span = Span(pkl_offset, len(data), pkl_crc)
        del data

        alignment = str(_get_storage_alignment())
        for name, value in (
            (".format_version", "1"),
            (".storage_alignment", alignment),
            ("byteorder", sys.byteorder),
        ):
            writer.write_record(name, value, len(value))
            sink.raise_if_failed()

        spans: list[StorageSpan] = []
        for key, storage in serialized.items():
            nbytes = storage.nbytes()
            if storage.device.type != "cpu":
                storage = storage.cpu()
            sink.expect(nbytes)
            writer.write_record(f"data/{key}", storage, nbytes)
            sink.raise_if_failed()
            offset, crc = sink.take(nbytes)
            spans.append(StorageSpan(offset, nbytes, crc, key, dtype_name(storage_dtypes[key])))

        writer.write_end_of_file()
        sink.raise_if_failed()
        sink.flush()
    except BaseException:
        # Destroy torch's writer here: it finalizes the archive then, into the failed sink
        # (dropped), not later into ``out`` (an aborted upload, a closed file). Left to the
        # traceback, which keeps this frame, it would also keep the sink alive through C++
        # (invisible to the GC), and with it the state dict if ``out`` keeps the error.
        sink.failed = True
        del writer
        raise

    tensors: list[TensorSpec] = []
    for path, t in iter_tensors(obj):
        if t.layout != torch.strided or t.is_nested or type(t) not in (
            torch.Tensor,
            torch.nn.Parameter,
        ):
            continue  # saved by pickle all the same; just not addressable by range
        key = id_map.get(t.untyped_storage()._cdata)
        if key is None:
            continue
        tensors.append(
            TensorSpec(
                path=path,
                dtype=dtype_name(t.dtype),
                shape=tuple(t.shape),
                stride=tuple(t.stride()),
                storage_offset=int(t.storage_offset()),
                storage_key=key,
            )
        )
    return RankLayout(
        size_bytes=sink.position,
        crc32c=sink.crc,
        pickle=pickle_span,
        storages=tuple(spans),
        tensors=tuple(tensors),
    )


def estimate_size_bytes(obj: Any) -> int:
    """A cheap upper-bound-ish estimate of the serialized size (for part sizing)."""
    seen: set[int] = set()
    total = 0
    for _, t in iter_tensors(obj):
        if t.layout != torch.strided:
            total += t.element_size() * t._nnz() * 2 if t.is_sparse else 0
            continue
        st = t.untyped_storage()
        if st._cdata not in seen:
            seen.add(st._cdata)
            total += st.nbytes() + 128
    return total + (1 << 20)
