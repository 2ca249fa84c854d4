"""cloudckpt.manifest: JSON round trip and validation of the commit record."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import pytest
import torch

from cloudckpt.checksum import ALGORITHM
from cloudckpt.errors import CorruptCheckpointError, ManifestError
from cloudckpt.format import RankLayout, Span, StorageSpan, TensorSpec, serialize
from cloudckpt.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    Manifest,
    RankEntry,
    layout_from_dict,
    layout_to_dict,
    parse_rank_record,
    rank_entry_from_dict,
    rank_entry_to_dict,
    rank_object_name,
)

URL = "s3://bucket/run/step_100/cloudckpt.manifest.json"


def real_layout(seed: int) -> RankLayout:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 6, generator=gen)
    obj = {
        "model": {"layers": [{"w": w, "wt": w.t()}], "b": torch.zeros(3, dtype=torch.bfloat16)},
        "step": seed,
    }
    return serialize(obj, io.BytesIO())


def make_manifest(world_size: int = 2, **kwargs: Any) -> Manifest:
    ranks = tuple(
        RankEntry(
            rank=r,
            object_name=rank_object_name(r),
            version=f'"etag-{r}"' if r % 2 == 0 else None,
            layout=real_layout(r),
        )
        for r in range(world_size)
    )
    defaults: dict[str, Any] = {
        "created_secs": 1_700_000_000.125,
        "torch_version": "2.13.0",
        "user_metadata": {"step": 100, "tags": ["a", "b"], "nested": {"lr": 0.001}},
    }
    defaults.update(kwargs)
    return Manifest(world_size=world_size, ranks=ranks, **defaults)


def doc_of(manifest: Manifest) -> dict[str, Any]:
    return json.loads(manifest.to_json())


def encode(doc: Any) -> bytes:
    return json.dumps(doc).encode()


# --- round trip ----------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 5])
def test_json_round_trip(world_size: int) -> None:
    manifest = make_manifest(world_size)
    data = manifest.to_json()
    assert isinstance(data, bytes)
    back = Manifest.from_json(data, url=URL)
    assert back == manifest
    assert back.to_json() == data
    assert back.total_bytes == sum(r.layout.size_bytes for r in manifest.ranks)


def test_round_trip_keeps_key_paths_with_ints_and_strs() -> None:
    back = Manifest.from_json(make_manifest(1).to_json(), url=URL)
    paths = {t.path for t in back.rank(0).layout.tensors}
    assert paths == {
        ("model", "layers", 0, "w"),
        ("model", "layers", 0, "wt"),
        ("model", "b"),
    }
    wt = next(t for t in back.rank(0).layout.tensors if t.path[-1] == "wt")
    assert wt.stride == (1, 6)
    assert wt.shape == (6, 4)
    assert isinstance(wt.path[2], int)


def test_document_fields() -> None:
    doc = doc_of(make_manifest(2))
    assert doc["format"] == FORMAT_NAME == "cloudckpt"
    assert doc["format_version"] == FORMAT_VERSION == 1
    assert doc["checksum_algorithm"] == ALGORITHM == "crc32c"
    assert doc["world_size"] == 2
    assert [r["rank"] for r in doc["ranks"]] == [0, 1]
    assert [r["object"] for r in doc["ranks"]] == ["checkpoint_0.pt", "checkpoint_1.pt"]
    assert doc["ranks"][0]["version"] == '"etag-0"'
    assert doc["ranks"][1]["version"] is None
    assert doc["user_metadata"]["nested"] == {"lr": 0.001}


def test_defaults_of_a_new_manifest() -> None:
    a = Manifest(world_size=1, ranks=(RankEntry(0, "checkpoint_0.pt", None, real_layout(0)),))
    b = Manifest(world_size=1, ranks=a.ranks)
    assert a.created_secs > 0
    assert a.checksum_algorithm == ALGORITHM
    assert a.format_version == FORMAT_VERSION
    assert a.user_metadata is not b.user_metadata


def test_rank_lookup() -> None:
    manifest = make_manifest(3)
    assert manifest.rank(2).object_name == "checkpoint_2.pt"
    assert manifest.rank(0).size_bytes == manifest.ranks[0].layout.size_bytes


@pytest.mark.parametrize("missing", [3, -1, 100])
def test_rank_missing_raises_manifest_error(missing: int) -> None:
    with pytest.raises(ManifestError, match=f"no rank {missing}") as excinfo:
        make_manifest(3).rank(missing)
    assert "world size 3" in str(excinfo.value)
    assert excinfo.value.hint


def test_names() -> None:
    assert MANIFEST_NAME == "cloudckpt.manifest.json"
    assert rank_object_name(0) == "checkpoint_0.pt"
    assert rank_object_name(17) == "checkpoint_17.pt"


def test_layout_dict_round_trip() -> None:
    layout = real_layout(7)
    assert layout_from_dict(json.loads(json.dumps(layout_to_dict(layout)))) == layout
    entry = RankEntry(3, "checkpoint_3.pt", "gen-5", layout)
    assert rank_entry_from_dict(json.loads(json.dumps(rank_entry_to_dict(entry)))) == entry


def test_rank_record_round_trip_and_garbage() -> None:
    entry = RankEntry(1, "checkpoint_1.pt", "v1", real_layout(1))
    record_url = "gs://b/run/.cloudckpt/rank_1.json"
    data = json.dumps(rank_entry_to_dict(entry)).encode()
    assert parse_rank_record(data, url=record_url) == entry
    for garbage in (b"", b"{", b"[]", b'{"rank": 1}', b"\xff\xfe"):
        with pytest.raises(ManifestError) as excinfo:
            parse_rank_record(garbage, url=record_url)
        assert record_url in str(excinfo.value)
        assert excinfo.value.url == record_url


# --- validation ----------------------------------------------------------------------------


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        target = doc
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value

    return edit


def _delete(key: str) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        del doc[key]

    return edit


def _storage_past_the_end(doc: dict[str, Any]) -> None:
    rank = doc["ranks"][0]
    rank["storages"][0][2] = rank["size_bytes"] - rank["storages"][0][3] + 1  # offset


def _pickle_past_the_end(doc: dict[str, Any]) -> None:
    rank = doc["ranks"][0]
    rank["pickle"][1] = rank["size_bytes"]  # nbytes


def _negative_offset(doc: dict[str, Any]) -> None:
    doc["ranks"][1]["storages"][0][2] = -1


def _negative_size(doc: dict[str, Any]) -> None:
    doc["ranks"][1]["storages"][0][3] = -8


def _unknown_storage(doc: dict[str, Any]) -> None:
    doc["ranks"][0]["tensors"][0]["storage"] = "99"


def _duplicate_rank(doc: dict[str, Any]) -> None:
    doc["ranks"][1]["rank"] = 0


INVALID: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("wrong format name", _set(("format",), "torch"), "not a cloudckpt manifest"),
    ("no format name", _delete("format"), "not a cloudckpt manifest"),
    ("unknown version", _set(("format_version",), 2), "format version 2"),
    ("version as text", _set(("format_version",), "1"), "format version 1"),
    ("unknown checksum", _set(("checksum_algorithm",), "md5"), "md5"),
    ("more ranks than world", _set(("world_size",), 1), "world size 1"),
    ("fewer ranks than world", _set(("world_size",), 3), "world size 3"),
    ("duplicate rank", _duplicate_rank, "rank 0"),
    ("storage past the end", _storage_past_the_end, "outside"),
    ("pickle past the end", _pickle_past_the_end, "outside"),
    ("negative offset", _negative_offset, "outside"),
    ("negative size", _negative_size, "outside"),
    ("unknown storage", _unknown_storage, "unknown storage 99"),
    ("missing world size", _delete("world_size"), "world_size"),
    ("missing ranks", _delete("ranks"), "ranks"),
    ("ranks not a list of objects", _set(("ranks",), [1, 2]), ""),
    ("world size not a number", _set(("world_size",), "two"), ""),
    ("storage entry too short", _set(("ranks", 0, "storages", 0), ["0", "float32"]), ""),
    ("tensor without shape", _set(("ranks", 0, "tensors", 0, "shape"), None), ""),
    ("user metadata not a dict", _set(("user_metadata",), [1, 2, 3]), ""),
]


@pytest.mark.parametrize(
    ("edit", "expected"), [(e, x) for _, e, x in INVALID], ids=[n for n, _, _ in INVALID]
)
def test_invalid_manifest_raises_manifest_error_naming_the_url(
    edit: Callable[[dict[str, Any]], None], expected: str
) -> None:
    doc = doc_of(make_manifest(2))
    edit(doc)
    with pytest.raises(ManifestError) as excinfo:
        Manifest.from_json(encode(doc), url=URL)
    err = excinfo.value
    assert isinstance(err, CorruptCheckpointError)
    assert err.url == URL
    assert URL in str(err)
    assert expected in str(err)
    assert err.hint
    assert err.__cause__ is not None


@pytest.mark.parametrize(
    "data",
    [b"", b"not json", b"{", b"\xff\xfe\x00", b"[]", b"null", b"42", b'"cloudckpt"', b"{}"],
    ids=repr,
)
def test_garbage_raises_manifest_error(data: bytes) -> None:
    with pytest.raises(ManifestError) as excinfo:
        Manifest.from_json(data, url=URL)
    assert excinfo.value.url == URL
    assert URL in str(excinfo.value)


def test_unknown_version_message_says_what_to_do() -> None:
    doc = doc_of(make_manifest(1))
    doc["format_version"] = 99
    with pytest.raises(ManifestError, match="upgrade cloudckpt"):
        Manifest.from_json(encode(doc), url=URL)


def test_hand_built_layout_validation() -> None:
    layout = RankLayout(
        size_bytes=100,
        crc32c=1,
        pickle=Span(0, 10, 2),
        storages=(StorageSpan(64, 36, 3, "0", "float32"),),
        tensors=(TensorSpec(("w",), "float32", (9,), (1,), 0, "0"),),
    )
    doc = layout_to_dict(layout)
    assert layout_from_dict(doc) == layout
    doc["storages"][0][3] = 37  # one byte past the object
    with pytest.raises(ValueError, match="outside the 100-byte object"):
        layout_from_dict(doc)


def test_optional_fields_may_be_missing() -> None:
    doc = doc_of(make_manifest(1))
    del doc["torch_version"]
    del doc["user_metadata"]
    del doc["ranks"][0]["version"]
    back = Manifest.from_json(encode(doc), url=URL)
    assert back.torch_version == ""
    assert back.user_metadata == {}
    assert back.rank(0).version is None
