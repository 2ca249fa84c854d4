"""State dicts that cover every dtype and shape case, and a bitwise comparison."""

from __future__ import annotations

from typing import Any

import torch

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int8,
    torch.uint8,
    torch.int64,
    torch.bool,
    torch.complex64,
]


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype in (torch.int8, torch.uint8, torch.int64):
        info = torch.iinfo(dtype)
        return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g).to(dtype)
    if dtype == torch.complex64:
        return torch.complex(torch.randn(shape, generator=g), torch.randn(shape, generator=g))
    return torch.randn(shape, generator=g).to(dtype)


def all_cases_state_dict() -> dict[str, Any]:
    """Nested containers, scalars, None, every dtype, 0-dim/empty, views and shared storage."""
    base = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    tensors = {
        str(dtype).removeprefix("torch."): _tensor(dtype, (5, 3), i)
        for i, dtype in enumerate(DTYPES)
    }
    return {
        "tensors": tensors,
        "scalar_0d": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "transposed": base.t(),
        "strided_slice": base[::2, 1::3],
        "shared_a": base,
        "shared_b": base[2:5],
        "nested": {"list": [torch.arange(4), 7, {"deep": torch.ones(2, 2, dtype=torch.bfloat16)}]},
        "int": 42,
        "float": 0.125,
        "string": "hello",
        "none": None,
        "tuple": (1, "two", torch.zeros(3)),
    }


def assert_bitwise_equal(actual: Any, expected: Any, path: str = "") -> None:
    """Same structure, dtypes, shapes, strides and bytes (NaN payloads included)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{path}: {type(actual)} is not a tensor"
        assert actual.dtype == expected.dtype, f"{path}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{path}: shape {actual.shape} != {expected.shape}"
        assert actual.stride() == expected.stride(), f"{path}: stride differs"
        a = actual.detach().cpu().contiguous().view(-1).view(torch.uint8)
        e = expected.detach().cpu().contiguous().view(-1).view(torch.uint8)
        assert torch.equal(a, e), f"{path}: bytes differ"
        return
    assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
    if isinstance(expected, dict):
        assert list(actual) == list(expected), f"{path}: keys {list(actual)} != {list(expected)}"
        for k in expected:
            assert_bitwise_equal(actual[k], expected[k], f"{path}.{k}")
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), f"{path}: length differs"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_bitwise_equal(a, e, f"{path}[{i}]")
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
