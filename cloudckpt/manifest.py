"""The commit record of a checkpoint: versioned, validated JSON, written last by rank 0.

Layout of a checkpoint at ``<path>``::

    <path>/checkpoint_<rank>.pt                  one torch.save-format object per rank
    <path>/.cloudckpt/<save_id>/rank_<rank>.json  that rank's byte map, before the barrier
    <path>/cloudckpt.manifest.json                the commit: every rank's object, checksums

A path without ``cloudckpt.manifest.json`` is not a (committed) checkpoint.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from ._version import __version__
from .checksum import ALGORITHM
from .errors import ManifestError
from .format import RankLayout, Span, StorageSpan, TensorSpec

MANIFEST_NAME = "cloudckpt.manifest.json"
RANK_RECORD_DIR = ".cloudckpt"
FORMAT_NAME = "cloudckpt"
FORMAT_VERSION = 1


def rank_object_name(rank: int) -> str:
    """The per-rank object name, identical to upstream's local layout."""
    return f"checkpoint_{rank}.pt"


@dataclass(frozen=True)
class RankEntry:
    """One rank's object as committed."""

    rank: int
    object_name: str
    version: str | None  # store version at commit (ETag / generation); informational
    layout: RankLayout

    @property
    def size_bytes(self) -> int:
        return self.layout.size_bytes


@dataclass(frozen=True)
class Manifest:
    """Everything a reader needs to fetch, place and verify a checkpoint's bytes."""

    world_size: int
    ranks: tuple[RankEntry, ...]
    created_secs: float = field(default_factory=time.time)
    checksum_algorithm: str = ALGORITHM
    tool_version: str = __version__
    torch_version: str = ""
    user_metadata: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    save_id: str | None = None  # the save that committed it (optional: older manifests lack it)

    @property
    def total_bytes(self) -> int:
        return sum(r.size_bytes for r in self.ranks)

    def rank(self, rank: int) -> RankEntry:
        for r in self.ranks:
            if r.rank == rank:
                return r
        raise ManifestError(
            f"manifest has no rank {rank} (world size {self.world_size})",
            hint="load with a rank between 0 and world_size - 1",
        )

    # --- JSON ------------------------------------------------------------------------------
    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "tool_version": self.tool_version,
            "torch_version": self.torch_version,
            "created_secs": self.created_secs,
            "checksum_algorithm": self.checksum_algorithm,
            "world_size": self.world_size,
            "user_metadata": self.user_metadata,
            "ranks": [rank_entry_to_dict(r) for r in self.ranks],
        }
        if self.save_id is not None:
            doc["save_id"] = self.save_id
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes, *, url: str) -> Manifest:
        """Parse and validate; any problem is a ManifestError naming ``url``."""
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
                raise ValueError("not a cloudckpt manifest")
            version = doc["format_version"]
            if version != FORMAT_VERSION:
                raise ValueError(
                    f"format version {version} is not supported by cloudckpt {__version__} "
                    f"(supports {FORMAT_VERSION}); upgrade cloudckpt"
                )
            if doc["checksum_algorithm"] != ALGORITHM:
                raise ValueError(f"unknown checksum algorithm {doc['checksum_algorithm']!r}")
            world_size = int(doc["world_size"])
            ranks = tuple(rank_entry_from_dict(r) for r in doc["ranks"])
            if sorted(r.rank for r in ranks) != list(range(world_size)):
                raise ValueError(
                    f"ranks {[r.rank for r in ranks]} do not match world size {world_size}"
                )
            return cls(
                world_size=world_size,
                ranks=ranks,
                created_secs=float(doc["created_secs"]),
                checksum_algorithm=doc["checksum_algorithm"],
                tool_version=str(doc["tool_version"]),
                torch_version=str(doc.get("torch_version", "")),
                user_metadata=dict(doc.get("user_metadata") or {}),
                format_version=version,
                save_id=str(doc["save_id"]) if doc.get("save_id") is not None else None,
            )
        except ManifestError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise ManifestError(
                f"invalid manifest at {url}: {e}",
                url=url,
                hint="the checkpoint is corrupt or was written by an incompatible tool",
            ) from e


def layout_to_dict(layout: RankLayout) -> dict[str, Any]:
    return {
        "size_bytes": layout.size_bytes,
        "crc32c": layout.crc32c,
        "pickle": [layout.pickle.offset, layout.pickle.nbytes, layout.pickle.crc32c],
        "storages": [[s.key, s.dtype, s.offset, s.nbytes, s.crc32c] for s in layout.storages],
        "tensors": [
            {
                "path": list(t.path),
                "dtype": t.dtype,
                "shape": list(t.shape),
                "stride": list(t.stride),
                "storage_offset": t.storage_offset,
                "storage": t.storage_key,
            }
            for t in layout.tensors
        ],
    }


def layout_from_dict(doc: dict[str, Any]) -> RankLayout:
    size = int(doc["size_bytes"])
    p_off, p_n, p_crc = (int(x) for x in doc["pickle"])
    storages = tuple(
        StorageSpan(int(off), int(n), int(crc), str(key), str(dtype))
        for key, dtype, off, n, crc in doc["storages"]
    )
    for span in (Span(p_off, p_n, p_crc), *storages):
        if span.offset < 0 or span.nbytes < 0 or span.end > size:
            raise ValueError(f"record span {span} lies outside the {size}-byte object")
    keys = {s.key for s in storages}
    tensors = tuple(
        TensorSpec(
            path=tuple(p if isinstance(p, int) else str(p) for p in t["path"]),
            dtype=str(t["dtype"]),
            shape=tuple(int(x) for x in t["shape"]),
            stride=tuple(int(x) for x in t["stride"]),
            storage_offset=int(t["storage_offset"]),
            storage_key=str(t["storage"]),
        )
        for t in doc["tensors"]
    )
    for t in tensors:
        if t.storage_key not in keys:
            raise ValueError(f"tensor {t.name} refers to unknown storage {t.storage_key}")
    return RankLayout(
        size_bytes=size,
        crc32c=int(doc["crc32c"]),
        pickle=Span(p_off, p_n, p_crc),
        storages=storages,
        tensors=tensors,
    )


def rank_entry_to_dict(entry: RankEntry) -> dict[str, Any]:
    return {
        "rank": entry.rank,
        "object": entry.object_name,
        "version": entry.version,
        **layout_to_dict(entry.layout),
    }


def rank_entry_from_dict(doc: dict[str, Any]) -> RankEntry:
    rank = int(doc["rank"])
    object_name = str(doc["object"])
    if object_name != rank_object_name(rank):
        # Never follow a name out of the checkpoint (``../x``): the layout is fixed.
        raise ValueError(
            f"rank {rank}'s object is named {object_name!r}, expected {rank_object_name(rank)!r}"
        )
    return RankEntry(
        rank=rank,
        object_name=object_name,
        version=doc.get("version"),
        layout=layout_from_dict(doc),
    )


def parse_rank_record(data: bytes, *, url: str) -> RankEntry:
    try:
        return rank_entry_from_dict(json.loads(data))
    except (ValueError, KeyError, TypeError) as e:
        raise ManifestError(f"invalid rank record at {url}: {e}", url=url) from e
