"""cloudckpt.format: the torch.save-compatible stream writer and the byte map it returns.

Every test serializes into an in-memory sink and checks the result three ways: ``torch.load``
reads it back bitwise, the zip directory (parsed independently with :mod:`zipfile`) puts each
record where the layout says, and the layout's checksums match the bytes.
"""

from __future__ import annotations

import gc
import io
import pickle
import struct
import subprocess
import sys
import textwrap
import weakref
import zipfile
from typing import Any

import pytest
import torch
from cases import DTYPES  # the dtype matrix, shared with the integration tests
from torch.multiprocessing.reductions import StorageWeakRef

from cloudckpt.checksum import crc32c
from cloudckpt.format import (
    PICKLE_RECORD,
    RankLayout,
    TensorSpec,
    dtype_from_name,
    dtype_name,
    estimate_size_bytes,
    iter_tensors,
    key_path_name,
    serialize,
)

LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # zip local file header, 30 bytes


# --- helpers --------------------------------------------------------------------------------


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bit patterns (NaN payloads, infinities, subnormals included); bools are 0/1."""
    numel = 1
    for s in shape:
        numel *= s
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        return (raw % 2).bool().reshape(shape)
    return raw.view(dtype).reshape(shape)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as raw bytes, in logical order (bitwise, NaN payloads included)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def storage_bytes(t: torch.Tensor) -> bytes:
    st = t.untyped_storage()
    return bytes(torch.empty(0, dtype=torch.uint8).set_(st).numpy()) if st.nbytes() else b""


def save(obj: Any, **kwargs: Any) -> tuple[bytes, RankLayout]:
    out = io.BytesIO()
    layout = serialize(obj, out, **kwargs)
    return out.getvalue(), layout


def load(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)


def zip_records(data: bytes) -> dict[str, tuple[int, int]]:
    """Record name (without the archive prefix) -> (data offset, size), from the zip itself."""
    records = {}
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            header = LOCAL_HEADER.unpack_from(data, info.header_offset)
            assert header[0] == b"PK\x03\x04"
            name_len, extra_len = header[9], header[10]
            offset = info.header_offset + LOCAL_HEADER.size + name_len + extra_len
            records[info.filename.split("/", 1)[1]] = (offset, info.file_size)
    return records


def saved_storage_dtype(dtype: torch.dtype) -> str:
    """torch.save pickles dtypes without a legacy typed storage class (float8, ...) through
    an untyped (uint8) storage; the layout records the storage as it was saved."""
    return dtype_name(dtype) if dtype in torch.storage._dtype_to_storage_type_map() else "uint8"


def get_path(obj: Any, path: tuple[str | int, ...]) -> Any:
    for part in path:
        obj = obj[part]
    return obj


def check_layout(obj: Any, data: bytes, layout: RankLayout) -> None:
    """Everything the layout promises about ``data``, checked against ``obj`` and the zip."""
    assert layout.size_bytes == len(data)
    assert layout.crc32c == crc32c(data)

    records = zip_records(data)
    assert (layout.pickle.offset, layout.pickle.nbytes) == records[PICKLE_RECORD]
    assert layout.pickle.crc32c == crc32c(data[layout.pickle.offset : layout.pickle.end])

    assert sorted(s.key for s in layout.storages) == sorted(
        name.removeprefix("data/") for name in records if name.startswith("data/")
    )
    for span in layout.storages:
        assert (span.offset, span.nbytes) == records[f"data/{span.key}"], span
        assert span.crc32c == crc32c(data[span.offset : span.end]), span

    for spec in layout.tensors:
        t = get_path(obj, spec.path)
        span = layout.storage(spec.storage_key)
        assert spec.dtype == dtype_name(t.dtype)
        assert spec.shape == tuple(t.shape)
        assert spec.stride == tuple(t.stride())
        assert spec.storage_offset == t.storage_offset()
        assert span.dtype == saved_storage_dtype(t.dtype)
        assert span.nbytes == t.untyped_storage().nbytes()
        assert data[span.offset : span.end] == storage_bytes(t), spec.name


def assert_same_tensor(got: torch.Tensor, want: torch.Tensor) -> None:
    assert type(got) is type(want)
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert got.stride() == want.stride()
    assert got.storage_offset() == want.storage_offset()
    assert got.requires_grad == want.requires_grad
    assert torch.equal(bits(got), bits(want))


# --- the dtype / shape matrix ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_dtype_and_view_matrix_round_trips_bitwise(dtype: torch.dtype) -> None:
    base = random_tensor(dtype, (6, 5), seed=DTYPES.index(dtype))
    flat = random_tensor(dtype, (17,), seed=100)
    obj = {
        "matrix": base,
        "transposed": base.t(),
        "rows_step": base[1::2],
        "cols_step": base[:, ::3],
        "scalar_view": base[2, 3],
        "scalar": random_tensor(dtype, (), seed=7),
        "empty": torch.empty((0, 3), dtype=dtype),
        "flat": flat,
        "flat_tail": flat[5:],
    }
    data, layout = save(obj)
    check_layout(obj, data, layout)

    loaded = load(data)
    assert loaded.keys() == obj.keys()
    for key, want in obj.items():
        assert_same_tensor(loaded[key], want)
    # Views of one storage come back as views of one storage, at the right offsets.
    ptr = loaded["matrix"].untyped_storage().data_ptr()
    for key in ("transposed", "rows_step", "cols_step", "scalar_view"):
        assert loaded[key].untyped_storage().data_ptr() == ptr, key
    assert loaded["flat_tail"].untyped_storage().data_ptr() == (
        loaded["flat"].untyped_storage().data_ptr()
    )
    # One storage record per distinct storage: matrix, scalar, empty, flat.
    assert len(layout.storages) == 4
    specs = {spec.path: spec for spec in layout.tensors}
    assert specs[("cols_step",)] == TensorSpec(
        path=("cols_step",),
        dtype=dtype_name(dtype),
        shape=(6, 2),
        stride=(5, 3),
        storage_offset=0,
        storage_key=specs[("matrix",)].storage_key,
    )
    assert specs[("scalar_view",)].shape == ()
    assert specs[("scalar_view",)].stride == ()
    assert specs[("scalar_view",)].storage_offset == 13
    assert specs[("flat_tail",)].storage_offset == 5
    assert specs[("empty",)].nbytes == 0
    assert specs[("matrix",)].nbytes == 30 * dtype.itemsize


def test_nan_payloads_survive_bitwise() -> None:
    payloads = torch.tensor(
        [0x7FC00000, 0x7FC00001, 0xFFBADBAD, 0x7F800001, 0x7F800000, 0x80000000, 1],
        dtype=torch.int64,
    ).to(torch.int32)
    t = payloads.view(torch.float32)
    data, layout = save({"t": t})
    check_layout({"t": t}, data, layout)
    assert torch.equal(load(data)["t"].view(torch.int32), payloads)


def test_nested_containers_python_scalars_and_parameters() -> None:
    shared = torch.arange(12, dtype=torch.float32)
    param = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(1)))
    obj = {
        "model": {
            "layers": [
                {"w": shared.view(3, 4), "b": torch.zeros(4)},
                {"w": param, "b": torch.ones(3, dtype=torch.bfloat16)},
            ],
            "pair": (shared[2:6], torch.tensor(3, dtype=torch.int64)),
        },
        "alias": shared,
        "step": 1234,
        "lr": 3e-4,
        "name": "run-7",
        "nothing": None,
        "flags": [True, False],
        7: torch.full((2,), 7, dtype=torch.int8),
    }
    data, layout = save(obj)
    check_layout(obj, data, layout)

    loaded = load(data)
    assert loaded["step"] == 1234
    assert loaded["lr"] == 3e-4
    assert loaded["name"] == "run-7"
    assert loaded["nothing"] is None
    assert loaded["flags"] == [True, False]
    assert isinstance(loaded["model"]["pair"], tuple)
    got_param = loaded["model"]["layers"][1]["w"]
    assert isinstance(got_param, torch.nn.Parameter)
    assert got_param.requires_grad
    assert_same_tensor(got_param, param)
    assert_same_tensor(loaded["model"]["layers"][0]["w"], obj["model"]["layers"][0]["w"])
    assert_same_tensor(loaded["model"]["pair"][0], shared[2:6])
    assert_same_tensor(loaded[7], obj[7])
    ptrs = {
        loaded["alias"].untyped_storage().data_ptr(),
        loaded["model"]["layers"][0]["w"].untyped_storage().data_ptr(),
        loaded["model"]["pair"][0].untyped_storage().data_ptr(),
    }
    assert len(ptrs) == 1

    by_name = {spec.name: spec for spec in layout.tensors}
    assert set(by_name) == {
        "model.layers[0].w",
        "model.layers[0].b",
        "model.layers[1].w",
        "model.layers[1].b",
        "model.pair[0]",
        "model.pair[1]",
        "alias",
        "[7]",
    }
    assert by_name["model.pair[0]"].path == ("model", "pair", 0)
    assert by_name["model.pair[0]"].storage_offset == 2
    assert by_name["model.pair[0]"].storage_key == by_name["alias"].storage_key
    assert by_name["model.layers[0].w"].storage_key == by_name["alias"].storage_key
    assert by_name["model.layers[1].b"].dtype == "bfloat16"
    # Distinct storages: shared, zeros, param, ones (bf16), tensor(3), full (int8).
    assert len(layout.storages) == 6


def test_two_keys_sharing_one_storage_are_one_record() -> None:
    a = torch.arange(10, dtype=torch.int64)
    obj = {"a": a, "b": a, "c": a[3:]}
    data, layout = save(obj)
    check_layout(obj, data, layout)
    assert len(layout.storages) == 1
    assert {spec.storage_key for spec in layout.tensors} == {layout.storages[0].key}
    loaded = load(data)
    assert loaded["a"].untyped_storage().data_ptr() == loaded["b"].untyped_storage().data_ptr()
    assert loaded["c"].untyped_storage().data_ptr() == loaded["a"].untyped_storage().data_ptr()
    assert loaded["c"].storage_offset() == 3


def test_object_without_tensors() -> None:
    obj = {"step": 3, "names": ["a", "b"], "nested": {"x": (1.5, None)}}
    data, layout = save(obj)
    check_layout(obj, data, layout)
    assert layout.storages == ()
    assert layout.tensors == ()
    assert load(data) == obj


def test_unaddressable_tensors_are_saved_but_not_mapped() -> None:
    t = torch.arange(4, dtype=torch.float32)
    obj = {("tuple", "key"): t}
    data, layout = save(obj)
    assert layout.tensors == ()
    assert len(layout.storages) == 1
    assert data[layout.storages[0].offset : layout.storages[0].end] == storage_bytes(t)
    assert torch.equal(load(data)[("tuple", "key")], t)


# --- small records: sizes that collide with zip header / descriptor writes -------------------


@pytest.mark.parametrize("nbytes", [*range(1, 70), 4095, 4096, 4097])
def test_small_storage_gets_its_own_offset(nbytes: int) -> None:
    """torch's zip writer sends a 30-byte local header, the name, the alignment padding, the
    data and a 16-byte data descriptor as separate writes; a storage of any of those sizes must
    still be mapped to its data, not to the header or descriptor."""
    first = torch.arange(nbytes, dtype=torch.uint8)
    second = torch.full((nbytes,), 0xA5, dtype=torch.uint8)
    obj = {"first": first, "second": second}
    data, layout = save(obj)
    check_layout(obj, data, layout)
    spans = {spec.name: layout.storage(spec.storage_key) for spec in layout.tensors}
    assert data[spans["first"].offset : spans["first"].end] == bytes(first.tolist())
    assert data[spans["second"].offset : spans["second"].end] == b"\xa5" * nbytes


def test_thirty_byte_storage_after_thirty_byte_header() -> None:
    t = torch.arange(30, dtype=torch.uint8)
    data, layout = save({"t": t})
    (span,) = layout.storages
    assert span.nbytes == 30
    assert data[span.offset : span.end] == bytes(range(30))
    assert (span.offset, span.nbytes) == zip_records(data)["data/0"]


def test_sixteen_byte_storage_is_not_the_data_descriptor() -> None:
    """Regression: the 16-byte data descriptor after the data was taken for the data."""
    t = torch.tensor([1.0, 2.0, 3.0, 4.0])  # 16 bytes
    data, layout = save({"t": t})
    (span,) = layout.storages
    assert data[span.offset : span.offset + 4] != b"PK\x07\x08"
    assert data[span.offset : span.end] == t.numpy().tobytes()
    assert span.crc32c == crc32c(t.numpy().tobytes())


# --- compatibility with torch.save -----------------------------------------------------------


def _compat_obj() -> dict[str, Any]:
    base = random_tensor(torch.bfloat16, (8, 8), seed=3)
    return {
        "w": base,
        "wt": base.t(),
        "b": torch.arange(5, dtype=torch.int64),
        "p": torch.nn.Parameter(torch.ones(2, 2)),
        "meta": {"step": 9, "tags": ("a", None)},
    }


def test_with_zip_crc32_output_is_byte_identical_to_torch_save() -> None:
    obj = _compat_obj()
    reference = io.BytesIO()
    torch.save(obj, reference)
    data, layout = save(obj, zip_crc32=True)
    assert data == reference.getvalue()
    check_layout(obj, data, layout)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.testzip() is None  # every zip CRC32 is right


def test_without_zip_crc32_only_crc_fields_differ_from_torch_save() -> None:
    obj = _compat_obj()
    reference = io.BytesIO()
    torch.save(obj, reference)
    ref = reference.getvalue()
    data, _ = save(obj)
    assert len(data) == len(ref)
    ref_records, records = zip_records(ref), zip_records(data)
    assert list(records) == list(ref_records)
    assert records == ref_records  # same offsets and sizes
    for name, (offset, size) in records.items():
        if name == ".data/serialization_id":  # derived from the records' zip CRC32s
            continue
        assert data[offset : offset + size] == ref[offset : offset + size], name


# --- failures in the sink ----------------------------------------------------------------------


class Recorder:
    """A sink recording (offset, size) of every write."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.writes: list[tuple[int, int]] = []

    def write(self, data: memoryview) -> int:
        self.writes.append((len(self.buf), data.nbytes))
        self.buf += data
        return data.nbytes


class FailingSink(Recorder):
    """Raises ``error`` on the ``fail_at``-th write (0-based); records every call after."""

    def __init__(self, fail_at: int, error: BaseException) -> None:
        super().__init__()
        self.fail_at = fail_at
        self.error = error
        self.calls = 0

    def write(self, data: memoryview) -> int:
        call = self.calls
        self.calls += 1
        if call == self.fail_at:
            raise self.error
        return super().write(data)


def _failure_obj() -> dict[str, Any]:
    return {
        "big": torch.arange(1000, dtype=torch.float32),
        "small": torch.arange(30, dtype=torch.uint8),
        "step": 5,
    }


def _write_index(obj: dict[str, Any]) -> dict[str, int]:
    """Index of the write carrying the pickle, a storage's data, and the last write."""
    rec = Recorder()
    layout = serialize(obj, rec)
    index = {w: i for i, w in enumerate(rec.writes)}
    big = next(s for s in layout.storages if s.nbytes == 4000)
    return {
        "first": 0,
        "pickle": index[(layout.pickle.offset, layout.pickle.nbytes)],
        "storage": index[(big.offset, big.nbytes)],
        "end_of_file": len(rec.writes) - 1,
    }


FAILURE_POINTS = ["first", "pickle", "storage", "end_of_file"]


@pytest.mark.parametrize("where", FAILURE_POINTS)
@pytest.mark.parametrize("error_type", [OSError, KeyboardInterrupt])
def test_sink_error_propagates_unchanged(where: str, error_type: type[BaseException]) -> None:
    obj = _failure_obj()
    fail_at = _write_index(obj)[where]
    error = error_type("disk full")
    sink = FailingSink(fail_at, error)
    with pytest.raises(error_type) as excinfo:
        serialize(obj, sink)
    assert excinfo.value is error
    assert sink.calls == fail_at + 1
    assert len(sink.writes) == fail_at


def test_nothing_reaches_the_sink_after_a_failure_even_once_collected() -> None:
    """torch's writer finalizes the zip when it is destroyed; after a failure none of those
    writes may reach the sink (an aborted upload), whenever the writer is collected."""
    obj = _failure_obj()
    index = _write_index(obj)
    sinks = []
    for where in FAILURE_POINTS:
        for error_type in (OSError, KeyboardInterrupt):
            sink = FailingSink(index[where], error_type(where))
            with pytest.raises(error_type):
                serialize(obj, sink)
            sinks.append(sink)
    gc.collect()
    for sink in sinks:
        assert sink.calls == sink.fail_at + 1, sink.error
        assert len(sink.writes) == sink.fail_at


def test_failed_serialize_does_not_leak_the_state_dict() -> None:
    """Regression: after a failure, serialize's frame (kept by the traceback) held torch's
    writer, which holds the sink through C++, where the GC cannot see it; a sink that keeps
    its error (as uploads do) closed a cycle that leaked the whole state dict."""
    obj = _failure_obj()
    tensor_ref = weakref.ref(obj["big"])
    storage_ref = StorageWeakRef(obj["big"].untyped_storage())
    sink = FailingSink(_write_index(obj)["storage"], OSError("boom"))  # keeps its error
    with pytest.raises(OSError):
        serialize(obj, sink)
    del obj, sink
    gc.collect()
    assert tensor_ref() is None
    assert storage_ref.expired()


def test_successful_serialize_frees_storages_without_a_gc_pass() -> None:
    """Regression: the local pickler class kept the persistent_id closure, and with it every
    storage, alive until the next full GC pass (torch.save empties that cell; so do we)."""
    t = torch.ones(1000)
    storage_ref = StorageWeakRef(t.untyped_storage())
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        serialize({"t": t}, io.BytesIO())
        del t
        assert storage_ref.expired()
    finally:
        if was_enabled:
            gc.enable()


def test_pickling_failure_writes_nothing() -> None:
    """Regression: torch's writer, created before pickling, wrote an empty zip to ``out`` when
    it was collected after a pickling error (into an upload that was already aborted)."""
    sink = Recorder()
    with pytest.raises((pickle.PicklingError, AttributeError)):
        serialize({"t": torch.ones(2), "f": lambda: 1}, sink)
    refused = Recorder()
    t = torch.ones(4)
    with pytest.raises(RuntimeError, match="different types"):
        serialize({"a": t, "b": t.view(torch.int32)}, refused)
    gc.collect()
    assert sink.writes == []
    assert refused.writes == []


def test_the_interpreter_survives_a_failure_at_every_write() -> None:
    """An exception reaching torch's C++ zip writer aborts the process: fail every single
    write, with OSError and KeyboardInterrupt, in a child interpreter and check it lives on."""
    script = textwrap.dedent(
        """
        import gc, io, sys, torch
        from cloudckpt.format import serialize

        obj = {"big": torch.arange(1000, dtype=torch.float32),
               "small": torch.arange(16, dtype=torch.uint8), "step": 5}

        class Count:
            n = 0
            def write(self, data):
                self.n += 1
                return data.nbytes

        counter = Count()
        serialize(obj, counter)

        class Failing:
            def __init__(self, fail_at, error):
                self.fail_at, self.error, self.calls = fail_at, error, 0
            def write(self, data):
                self.calls += 1
                if self.calls - 1 == self.fail_at:
                    raise self.error
                return data.nbytes

        ok = 0
        sinks = []
        for fail_at in range(counter.n):
            for error_type in (OSError, KeyboardInterrupt):
                sink = Failing(fail_at, error_type("injected"))
                try:
                    serialize(obj, sink)
                except error_type as e:
                    assert str(e) == "injected"
                else:
                    raise SystemExit(f"no error for write {fail_at}")
                assert sink.calls == fail_at + 1, (fail_at, sink.calls)
                sinks.append(sink)
                ok += 1
        gc.collect()  # whatever torch's writers still had to write was dropped
        assert all(s.calls == s.fail_at + 1 for s in sinks)
        # the process is still healthy: a normal save works and loads
        out = io.BytesIO()
        serialize(obj, out)
        assert torch.equal(torch.load(io.BytesIO(out.getvalue()))["big"], obj["big"])
        print("survived", counter.n, ok)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, writes, cases = proc.stdout.split()
    assert int(writes) > 20
    assert int(cases) == 2 * int(writes)


def test_flush_is_called_once_at_the_end() -> None:
    class Flushing(Recorder):
        flushed_at: list[int]

        def __init__(self) -> None:
            super().__init__()
            self.flushed_at = []

        def flush(self) -> None:
            self.flushed_at.append(len(self.buf))

    sink = Flushing()
    layout = serialize({"t": torch.ones(3)}, sink)
    assert sink.flushed_at == [layout.size_bytes]


# --- small helpers -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64, torch.int32, torch.complex128])
def test_dtype_names_round_trip(dtype: torch.dtype) -> None:
    assert dtype_from_name(dtype_name(dtype)) is dtype
    assert "torch." not in dtype_name(dtype)


@pytest.mark.parametrize("name", ["notadtype", "Tensor", "nn", ""])
def test_dtype_from_name_rejects_non_dtypes(name: str) -> None:
    with pytest.raises(ValueError, match="unknown dtype"):
        dtype_from_name(name)


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ((), ""),
        (("a",), "a"),
        (("a", "b"), "a.b"),
        (("a", 0, "c"), "a[0].c"),
        ((0,), "[0]"),
        (("layers", 1, 2), "layers[1][2]"),
    ],
)
def test_key_path_name(path: tuple[str | int, ...], name: str) -> None:
    assert key_path_name(path) == name


def test_iter_tensors_walks_dicts_lists_tuples() -> None:
    t1, t2, t3 = torch.ones(1), torch.ones(2), torch.ones(3)
    found = list(iter_tensors({"a": [t1, (5, t2)], "b": {"c": t3}, ("x",): torch.ones(4)}))
    assert [(p, t.numel()) for p, t in found] == [(("a", 0), 1), (("a", 1, 1), 2), (("b", "c"), 3)]


def test_estimate_size_counts_each_storage_once() -> None:
    a = torch.ones(1000)
    small = estimate_size_bytes({"a": a})
    assert estimate_size_bytes({"a": a, "b": a, "c": a[10:]}) == small
    assert small >= 4000
    data, _ = save({"a": a})
    assert small >= len(data)


def test_rank_layout_storage_lookup() -> None:
    _, layout = save({"t": torch.ones(2)})
    assert layout.storage("0") == layout.storages[0]
    with pytest.raises(KeyError):
        layout.storage("missing")
