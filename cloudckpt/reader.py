"""CheckpointReader: upstream's reader interface over any store, with ranged, verified reads.

A load reads the manifest (one small GET), HEADs the rank object (its size must match, its
version is pinned for the rest of the load), fetches the pickle record and then only the
storages it needs, concurrently, straight into the memory of the tensors it returns. Every
storage's CRC32C is checked against the manifest before anything is returned.
"""

from __future__ import annotations

import io
import logging
import pickle
from collections.abc import Callable
from itertools import zip_longest
from typing import Any

import torch
from torch import _weights_only_unpickler
from torch.serialization import _load as _torch_zip_load  # the unpickling half of torch.load

from ._upstream import STATE_DICT, RankInfo, UpstreamCheckpointReader
from .checksum import crc32c
from .config import CheckpointReaderConfig, StorageConfig
from .errors import (
    BucketNotFoundError,
    CheckpointError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    NotFoundError,
    StateDictMismatchError,
)
from .fetch import RangeRead, fetch, tensor_memoryview
from .format import PICKLE_RECORD, RankLayout, StorageSpan
from .manifest import MANIFEST_NAME, Manifest, RankEntry, rank_object_name
from .storage import Storage, get_storage, join_url, normalize_url, split_url

logger = logging.getLogger(__name__)


class _FetchedZip:
    """Duck-types the slice of ``torch._C.PyTorchFileReader`` that ``torch.serialization._load``
    uses, serving records that were fetched by range (or nothing, for meta loads)."""

    def __init__(self, pickle_bytes: bytes, layout: RankLayout, storages: dict[str, Any]) -> None:
        self._records = {
            PICKLE_RECORD: pickle_bytes,
            ".format_version": b"1",
            ".storage_alignment": b"64",
            "byteorder": b"little",
        }
        self._offsets = {f"data/{s.key}": s.offset for s in layout.storages}
        self._storages = storages

    def has_record(self, name: str) -> bool:
        return name in self._records

    def get_record(self, name: str) -> bytes:
        return self._records[name]

    def get_record_offset(self, name: str) -> int:
        return self._offsets[name]

    def get_record_header_offset(self, name: str) -> int:
        return self._offsets[name]

    def get_record_offset_no_read(self, _cur: int, name: str, _numel: int, _align: int) -> int:
        return self._offsets[name]

    def get_storage_from_record(self, name: str, nbytes: int, _cls: type) -> torch.Tensor:
        storage = self._storages[name.removeprefix("data/")]
        return torch.empty(0, dtype=torch.uint8).set_(storage)

    def serialization_id(self) -> str:
        return ""


class CheckpointReader(UpstreamCheckpointReader):
    """Reads checkpoints written by :class:`cloudckpt.CheckpointWriter` from any URL.

    ``read(path, state_dict=None, *, map_location=None, rank=None)`` returns
    ``(state_dict, missing_keys)`` like upstream's reader. ``rank`` defaults to this process's
    rank; a process may read any rank's object of a checkpoint (restore scripts).
    """

    def __init__(
        self,
        rank_info: RankInfo | None = None,
        config: CheckpointReaderConfig | None = None,
        *,
        storage_config: StorageConfig | None = None,
    ) -> None:
        super().__init__(rank_info=rank_info or RankInfo(global_rank=0, global_world_size=1))
        self._config = config or CheckpointReaderConfig()
        self._storage_config = storage_config or StorageConfig()
        self._storages: dict[str, Storage] = {}
        self.last_bytes_fetched = 0

    def storage(self, url: str) -> Storage:
        """The (cached) backend for ``url``'s scheme."""
        scheme, _ = split_url(url)
        if scheme not in self._storages:
            self._storages[scheme] = get_storage(url, self._storage_config)
        return self._storages[scheme]

    def read_manifest(self, path: str) -> Manifest:
        """The validated manifest of the checkpoint at ``path`` (CheckpointNotFoundError if none)."""
        url = normalize_url(path)
        manifest_url = join_url(url, MANIFEST_NAME)
        try:
            data = self.storage(url).get_bytes(manifest_url)
        except BucketNotFoundError:
            raise
        except NotFoundError as e:
            raise CheckpointNotFoundError(
                f"no committed checkpoint at {url} (no {MANIFEST_NAME})",
                url=url,
                rank=self._rank_info.global_rank,
                hint="the save did not finish, or the path is wrong; list checkpoints with "
                "`cloudckpt ls <run prefix>`; pass allow_unmanifested=True to read a checkpoint "
                "written by upstream torch",
            ) from e
        return Manifest.from_json(data, url=manifest_url)

    def read(
        self,
        path: str,
        state_dict: STATE_DICT | None = None,
        *,
        map_location: Any = None,
        rank: int | None = None,
        verify_checksums: bool | None = None,
        **kwargs: Any,
    ) -> tuple[STATE_DICT, list[str]]:
        url = normalize_url(path)
        implicit_rank = rank is None
        rank = self._rank_info.global_rank if rank is None else rank
        try:
            manifest = self.read_manifest(url)
        except CheckpointNotFoundError:
            if not self._config.allow_unmanifested:
                raise
            return self._read_unmanifested(url, rank, state_dict, map_location)
        world = self._rank_info.global_world_size
        if implicit_rank and world > 1 and world != manifest.world_size:
            raise StateDictMismatchError(
                f"checkpoint at {url} was saved by {manifest.world_size} rank(s); this job has "
                f"{world}, so rank {rank}'s part is not this rank's state",
                url=url,
                rank=rank,
                hint="resume with the same world size, or pass rank= to choose the part to load "
                "(e.g. rank=0 when every rank saved the same replicated state)",
            )
        if rank >= manifest.world_size or rank < 0:
            raise CheckpointError(
                f"checkpoint at {url} has {manifest.world_size} rank(s); there is no rank {rank}",
                url=url,
                rank=rank,
                hint="pass rank=<0..world_size-1> to read another rank's part",
            )
        verify = (
            self._storage_config.download.verify_checksums
            if verify_checksums is None
            else verify_checksums
        )
        return self.read_rank(url, manifest.rank(rank), state_dict, map_location, verify)

    def read_all_ranks(
        self, path: str, *, map_location: Any = "cpu"
    ) -> dict[int, STATE_DICT]:
        """Every rank's state dict of one checkpoint, from a single process."""
        url = normalize_url(path)
        manifest = self.read_manifest(url)
        verify = self._storage_config.download.verify_checksums
        return {
            e.rank: self.read_rank(url, e, None, map_location, verify)[0] for e in manifest.ranks
        }

    # --- one rank object ----------------------------------------------------------------
    def read_rank(
        self,
        url: str,
        entry: RankEntry,
        state_dict: STATE_DICT | None,
        map_location: Any,
        verify: bool,
    ) -> tuple[STATE_DICT, list[str]]:
        storage = self.storage(url)
        obj_url = join_url(url, entry.object_name)
        layout = entry.layout
        try:
            info = storage.head(obj_url)
        except BucketNotFoundError:
            raise
        except NotFoundError as e:
            raise CorruptCheckpointError(
                f"rank object {obj_url} listed in the manifest is missing",
                url=obj_url,
                rank=entry.rank,
                hint="the checkpoint is incomplete; restore an older step",
            ) from e
        if info.size_bytes != layout.size_bytes:
            raise CorruptCheckpointError(
                f"rank object {obj_url} is {info.size_bytes} bytes but the manifest says "
                f"{layout.size_bytes} (truncated or replaced)",
                url=obj_url,
                rank=entry.rank,
                hint="the checkpoint is damaged; restore an older step",
            )
        version = info.version
        self.last_bytes_fetched = 0

        pkl_span = layout.pickle
        pickle_bytes = storage.get_bytes(obj_url, pkl_span.offset, pkl_span.end, version=version)
        self.last_bytes_fetched += len(pickle_bytes)
        if len(pickle_bytes) != pkl_span.nbytes or (
            verify and crc32c(pickle_bytes) != pkl_span.crc32c
        ):
            raise ChecksumMismatchError(
                f"the pickle record of {obj_url} does not match its manifest checksum",
                url=obj_url,
                rank=entry.rank,
                hint="the object is corrupt; restore an older step",
            )

        def fetch_storages(keys: list[str]) -> dict[str, torch.UntypedStorage]:
            """Fetch storages straight into new memory, each verified by the thread that
            receives its last byte (overlapping the checksums with the other requests)."""
            out = {k: torch.empty(layout.storage(k).nbytes, dtype=torch.uint8) for k in keys}
            order = list(out)
            views = [tensor_memoryview(out[k]) for k in order]
            reads = [RangeRead(layout.storage(k).offset, v) for k, v in zip(order, views, strict=True)]
            verified: set[int] = set()

            def check(i: int) -> None:
                _verify(layout.storage(order[i]), views[i], obj_url, entry.rank, layout)
                verified.add(i)

            self.last_bytes_fetched += fetch(
                storage,
                obj_url,
                reads,
                self._storage_config.download,
                version=version,
                on_read_done=check if verify else None,
            )
            if verify:
                for i in range(len(order)):
                    if i not in verified:  # empty storages: no bytes, no callback
                        check(i)
            return {k: t.untyped_storage() for k, t in out.items()}

        is_meta = _is_meta(map_location)
        if state_dict is None:
            storages = {} if is_meta else fetch_storages([s.key for s in layout.storages])
            return _unpickle(
                pickle_bytes, layout, storages, map_location, obj_url, self._config.weights_only
            ), []

        weights_only = self._config.weights_only
        source = _unpickle(pickle_bytes, layout, {}, "meta", obj_url, weights_only)

        def load_whole() -> Any:
            storages = fetch_storages([s.key for s in layout.storages])
            return _unpickle(pickle_bytes, layout, storages, "cpu", obj_url, weights_only)

        return _PartialRead(
            source, layout, fetch_storages, map_location, obj_url, entry.rank, is_meta, load_whole
        ).run(state_dict)

    def _read_unmanifested(
        self, url: str, rank: int, state_dict: STATE_DICT | None, map_location: Any
    ) -> tuple[STATE_DICT, list[str]]:
        """Slow path for checkpoints without a manifest (written by upstream torch)."""
        obj_url = join_url(url, rank_object_name(rank))
        try:
            data = self.storage(url).get_bytes(obj_url)
        except BucketNotFoundError:
            raise
        except NotFoundError as e:
            raise CheckpointNotFoundError(
                f"no checkpoint at {url}: neither a manifest nor {rank_object_name(rank)}",
                url=url,
                rank=rank,
            ) from e
        logger.warning("reading %s without a manifest: no checksums, whole-object read", obj_url)
        loaded = torch.load(
            io.BytesIO(data), map_location=map_location, weights_only=self._config.weights_only
        )
        if state_dict is None:
            return loaded, []
        missing: list[str] = []
        return _merge_into(state_dict, loaded, "", missing), missing

    def close(self) -> None:
        for s in self._storages.values():
            s.close()
        self._storages.clear()


def _is_meta(map_location: Any) -> bool:
    return (isinstance(map_location, str) and map_location == "meta") or (
        isinstance(map_location, torch.device) and map_location.type == "meta"
    )


def _verify(span: StorageSpan, data: memoryview, obj_url: str, rank: int, layout: RankLayout) -> None:
    actual = crc32c(data)
    if actual != span.crc32c:
        names = [t.name for t in layout.tensors if t.storage_key == span.key] or [f"data/{span.key}"]
        raise ChecksumMismatchError(
            f"checksum mismatch for key {', '.join(names)} in {obj_url} (bytes "
            f"{span.offset}-{span.end}): expected crc32c {span.crc32c:#010x}, got {actual:#010x}",
            url=obj_url,
            rank=rank,
            hint="the stored object is corrupt; restore an older step or re-save",
        )


def _unpickle(
    pickle_bytes: bytes,
    layout: RankLayout,
    storages: dict[str, Any],
    map_location: Any,
    obj_url: str,
    weights_only: bool = True,
) -> Any:
    zip_reader = _FetchedZip(pickle_bytes, layout, storages)
    try:
        return _torch_zip_load(
            zip_reader, map_location, _weights_only_unpickler if weights_only else pickle,
            encoding="utf-8",
        )
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{obj_url} holds Python objects that weights-only loading refuses: {e}",
            url=obj_url,
            hint="if you trust the checkpoint's source, load it with "
            "CheckpointReaderConfig(weights_only=False)",
        ) from e


class _PartialRead:
    """Upstream's partial-read walk (same semantics and missing-key names), fetching only the
    storages of the keys present in the target state dict."""

    def __init__(
        self,
        source: Any,
        layout: RankLayout,
        fetch_storages: Callable[[list[str]], dict[str, torch.UntypedStorage]],
        map_location: Any,
        obj_url: str,
        rank: int,
        is_meta: bool,
        load_whole: Callable[[], Any],
    ) -> None:
        self._source = source
        self._by_offset = {s.offset: s for s in layout.storages}
        self._fetch_storages = fetch_storages
        self._map_location = map_location
        self._obj_url = obj_url
        self._rank = rank
        self._is_meta = is_meta
        self.missing: list[str] = []
        self._load_whole = load_whole
        self._whole_value: Any = None

    def run(self, state_dict: STATE_DICT) -> tuple[STATE_DICT, list[str]]:
        # Pass 1: walk, check types/shapes, collect the tensors wanted. Pass 2: fetch them all
        # at once (one parallel plan), then fill.
        placeholders: dict[int, tuple[torch.Tensor | None, torch.Tensor, str, tuple[Any, ...]]] = {}
        result = self._walk(state_dict, self._source, "", placeholders)
        if self._is_meta:
            return self._fill(result, placeholders, {}), self.missing
        spans = {
            k: self._span_of(src, name)
            for k, (_, src, name, _) in placeholders.items()
            if src.layout == torch.strided
        }
        # Caller-owned tensors are written only after every byte was fetched and verified:
        # a failed load leaves the target state dict exactly as it was.
        fetched = self._fetch_storages(sorted({span.key for span in spans.values()}))
        return self._fill(result, placeholders, fetched), self.missing

    def _whole(self) -> Any:
        """The fully unpickled rank object, for values that cannot be fetched by range."""
        if self._whole_value is None:
            self._whole_value = self._load_whole()
        return self._whole_value

    def _span_of(self, src: torch.Tensor, name: str) -> StorageSpan:
        offset = src.untyped_storage()._checkpoint_offset
        span = self._by_offset.get(offset)
        if span is None:
            raise CorruptCheckpointError(
                f"key {name} points at byte {offset}, which is no storage in the manifest",
                url=self._obj_url,
                rank=self._rank,
            )
        return span

    def _walk(
        self,
        target: Any,
        source: Any,
        key_path: str,
        ph: dict[int, Any],
        keys: tuple[Any, ...] = (),
    ) -> Any:
        """Pass 1: check ``target`` against ``source`` and return a plan; mutates nothing, so a
        mismatch or a failed fetch leaves the caller's state dict as it was."""
        if target is not None and not _same_kind(target, source):
            raise StateDictMismatchError(
                f"key {key_path} is a {type(target).__name__} in the target state dict but a "
                f"{type(source).__name__} in the checkpoint",
                url=self._obj_url,
                rank=self._rank,
            )
        if isinstance(source, torch.Tensor):
            if target is not None and (target.shape != source.shape or target.dtype != source.dtype):
                raise StateDictMismatchError(
                    f"key {key_path}: target has shape {tuple(target.shape)} dtype {target.dtype}, "
                    f"checkpoint has shape {tuple(source.shape)} dtype {source.dtype}",
                    url=self._obj_url,
                    rank=self._rank,
                    hint="the model's architecture differs from the one that was saved",
                )
            key = len(ph)
            ph[key] = (target, source, key_path, keys)
            return _Placeholder(key)
        if isinstance(source, dict):
            container = type(source).fromkeys(source) if target is None else target
            items = []
            for key in list(container.keys()):
                path = f"{key_path}.{key}" if key_path else str(key)
                if key in source:
                    sub = self._walk(container[key], source[key], path, ph, (*keys, key))
                    items.append((key, sub))
                else:
                    self.missing.append(path)
            return _DictPlan(container, items)
        if isinstance(source, list | tuple):
            targets = [None] * len(source) if target is None else list(target)
            subs = [
                self._walk(t, s, f"{key_path}[{i}]" if key_path else f"[{i}]", ph, (*keys, i))
                for i, (t, s) in enumerate(zip_longest(targets, source, fillvalue=None))
            ]
            return _SeqPlan(type(source), subs)
        return source

    def _fill(self, obj: Any, ph: dict[int, Any], fetched: dict[str, torch.UntypedStorage]) -> Any:
        """Pass 2: build the result, writing into the caller's containers and tensors."""
        if isinstance(obj, _Placeholder):
            target, src, name, keys = ph[obj.key]
            if self._is_meta:
                if src.layout != torch.strided:
                    return src
                return torch.empty_strided(src.shape, src.stride(), dtype=src.dtype, device="meta")
            if src.layout != torch.strided:
                value = _dig(self._whole(), keys)  # sparse & co: from a full unpickle
            else:
                storage = fetched[self._span_of(src, name).key]
                value = torch.empty(0, dtype=src.dtype).set_(
                    storage, src.storage_offset(), src.shape, src.stride()
                )
            if target is None:
                if self._map_location not in (None, "cpu"):
                    value = _relocate(value, self._map_location)
                return value
            with torch.no_grad():
                target.copy_(value)
            return target
        if isinstance(obj, _DictPlan):
            for k, sub in obj.items:
                obj.container[k] = self._fill(sub, ph, fetched)
            return obj.container
        if isinstance(obj, _SeqPlan):
            return obj.kind(self._fill(v, ph, fetched) for v in obj.items)
        return obj


class _DictPlan:
    """A dict to fill: the caller's (or a new one of the checkpoint's type) and its entries."""

    __slots__ = ("container", "items")

    def __init__(self, container: Any, items: list[tuple[Any, Any]]) -> None:
        self.container = container
        self.items = items


class _SeqPlan:
    """A list or tuple to rebuild from its entries' plans."""

    __slots__ = ("items", "kind")

    def __init__(self, kind: type, items: list[Any]) -> None:
        self.kind = kind
        self.items = items


def _dig(obj: Any, keys: tuple[Any, ...]) -> Any:
    for k in keys:
        obj = obj[k]
    return obj


def _same_kind(target: Any, source: Any) -> bool:
    """Whether ``target`` may receive ``source``: tensors, dicts and sequences match loosely
    (an OrderedDict target takes a dict, a list takes a tuple); other values by type."""
    for kind in (torch.Tensor, dict, list | tuple):
        if isinstance(source, kind):
            return isinstance(target, kind)
    return isinstance(target, type(source))


class _Placeholder:
    """Marks where a tensor goes while the walk collects what to fetch."""

    __slots__ = ("key",)

    def __init__(self, key: int) -> None:
        self.key = key


def _relocate(t: torch.Tensor, map_location: Any) -> torch.Tensor:
    if callable(map_location) or isinstance(map_location, dict):
        return t  # torch.load-style remapping applies to full loads; partial loads keep CPU
    return t.to(map_location)


def _merge_into(target: Any, source: Any, key_path: str, missing: list[str]) -> Any:
    """Fill ``target``'s keys from a fully loaded ``source`` (the unmanifested slow path)."""
    if isinstance(source, torch.Tensor):
        if target is None:
            return source
        if target.shape != source.shape or target.dtype != source.dtype:
            raise StateDictMismatchError(
                f"key {key_path}: target has shape {tuple(target.shape)} dtype {target.dtype}, "
                f"checkpoint has shape {tuple(source.shape)} dtype {source.dtype}"
            )
        with torch.no_grad():
            target.copy_(source)
        return target
    if isinstance(source, dict) and isinstance(target, dict):
        for key in list(target.keys()):
            path = f"{key_path}.{key}" if key_path else str(key)
            if key in source:
                target[key] = _merge_into(target[key], source[key], path, missing)
            else:
                missing.append(path)
        return target
    return source
