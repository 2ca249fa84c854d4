"""CheckpointManager: what is under a run prefix, the newest committed step, retention, clean-up,
and whole-checkpoint verification and copies.

A run prefix holds one "directory" per checkpoint (``<prefix>/step-100/...``, see
:mod:`cloudckpt.manifest` for what is inside one). Everything here derives from ONE uncached
recursive listing of the prefix plus a manifest GET per committed-looking checkpoint, so a step
committed a moment ago shows up at once; there is no listing cache to go stale.

Typical training loop (call retention only once the newer save is committed)::

    manager = CheckpointManager("s3://bucket/run-7", storage_options=opts)
    resumed = manager.load_latest(checkpointer, model.state_dict())
    ...
    stage_future, write_future = checkpointer.save(manager.path_for(step), state_dict)
    ...
    write_future.result()                       # step is committed from here on
    manager.apply_retention(keep_last=3, keep_every=1000, protect=[resumed[0].name])

Nothing here deletes an uncommitted checkpoint except :meth:`CheckpointManager.gc`, and only
when its newest object is older than the age it is given.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .checksum import crc32c
from .config import StorageConfig
from .errors import (
    BucketNotFoundError,
    CheckpointError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CommitConflictError,
    CorruptCheckpointError,
    ManifestError,
    NotFoundError,
    StorageError,
)
from .format import RankLayout
from .manifest import MANIFEST_NAME, RANK_RECORD_DIR, Manifest, RankEntry
from .storage import ObjectInfo, PendingUpload, Storage, get_storage, join_url, normalize_url
from .storage import split_url as _split_url

logger = logging.getLogger(__name__)

#: A step number at the end of a checkpoint's name: ``step-100``, ``step_100``, ``step100``,
#: ``100``, ``ckpt-000100``, ``global_step=100``. ``ckpt-v2`` has no step.
_STEP_RE = re.compile(r"(?:^|[-_.=]|step)(\d+)$", re.IGNORECASE)
_RANK_OBJECT_RE = re.compile(r"^checkpoint_(\d+)\.pt$")
_MANIFEST_CACHE_ENTRIES = 4096

#: ``progress(nbytes)``: called with the bytes just processed (for progress bars).
ProgressFn = Callable[[int], None]


def parse_step(name: str) -> int | None:
    """The training step a checkpoint name ends with, or None (see ``_STEP_RE``)."""
    match = _STEP_RE.search(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint directly under a run prefix, as one listing saw it.

    Attributes:
        name: the child "directory" name, e.g. ``step-100``.
        url: its full URL (``<prefix>/<name>``).
        step: the step parsed from ``name`` (None if it carries none).
        committed: a valid manifest is present and every rank object it names is listed with
            the size it records. Only committed checkpoints are loaded, kept or pruned.
        size_bytes: all objects under it (rank objects, records, manifest).
        ranks: world size from the manifest, else the number of rank objects present.
        time_secs: the manifest's ``created_secs``, else the newest object's modification time.
        problem: why it is not committed (``"no manifest"``, ...); None when committed.
    """

    name: str
    url: str
    step: int | None
    committed: bool
    size_bytes: int
    ranks: int
    time_secs: float | None
    problem: str | None = None
    manifest: Manifest | None = field(default=None, repr=False, compare=False)
    objects: tuple[ObjectInfo, ...] = field(default=(), repr=False, compare=False)

    @property
    def newest_object_secs(self) -> float | None:
        """Modification time of its most recently written object (what gc ages by)."""
        times = [o.mtime_secs for o in self.objects if o.mtime_secs is not None]
        return max(times) if times else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (what ``cloudckpt ls --json`` prints)."""
        return {
            "name": self.name,
            "url": self.url,
            "step": self.step,
            "committed": self.committed,
            "size_bytes": self.size_bytes,
            "ranks": self.ranks,
            "time_secs": self.time_secs,
            "problem": self.problem,
        }


@dataclass
class GCReport:
    """What :meth:`CheckpointManager.gc` aborted and deleted (or would have, with dry_run)."""

    dry_run: bool
    aborted_uploads: list[PendingUpload] = field(default_factory=list)
    deleted_checkpoints: list[CheckpointInfo] = field(default_factory=list)
    deleted_objects: int = 0
    freed_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "aborted_uploads": [
                {"url": p.url, "upload_id": p.upload_id, "initiated_secs": p.initiated_secs}
                for p in self.aborted_uploads
            ],
            "deleted_checkpoints": [c.to_dict() for c in self.deleted_checkpoints],
            "deleted_objects": self.deleted_objects,
            "freed_bytes": self.freed_bytes,
        }


@dataclass(frozen=True)
class VerifyProblem:
    """One thing wrong with a checkpoint.

    ``kind`` is one of ``missing`` (a rank object is absent), ``size`` (its size differs from
    the manifest), ``checksum`` (a tensor storage), ``pickle_checksum``, ``object_checksum``
    (the whole object) or ``read_error`` (the store failed while reading it).
    """

    rank: int
    object_url: str
    kind: str
    message: str
    key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class VerifyReport:
    """The outcome of :func:`verify_checkpoint`: every problem found, not only the first."""

    url: str
    world_size: int
    objects_checked: int = 0
    bytes_checked: int = 0
    problems: list[VerifyProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "ok": self.ok,
            "world_size": self.world_size,
            "objects_checked": self.objects_checked,
            "bytes_checked": self.bytes_checked,
            "problems": [p.to_dict() for p in self.problems],
        }


@dataclass(frozen=True)
class CopyReport:
    """What :func:`copy_checkpoint` wrote."""

    src_url: str
    dst_url: str
    ranks: int
    bytes_copied: int
    seconds: float


def _as_storage_config(storage_options: Mapping[str, Any] | StorageConfig | None) -> StorageConfig:
    if storage_options is None:
        return StorageConfig()
    if isinstance(storage_options, StorageConfig):
        return storage_options
    if not isinstance(storage_options, Mapping):
        raise TypeError(
            "storage_options must be a mapping or a StorageConfig, got "
            f"{type(storage_options).__name__}"
        )
    return StorageConfig(storage_options=dict(storage_options))


class CheckpointManager:
    """Lists, finds, prunes and cleans up the checkpoints under one run prefix.

    Args:
        prefix_url: the run prefix (``s3://bucket/run-7``, ``gs://...``, a local directory).
        storage_options: fsspec-style options, or a full :class:`~cloudckpt.StorageConfig`.
        step_digits: zero-pad steps in :meth:`path_for` to this many digits (None: no padding).

    Thread-safe for concurrent calls; holds one storage client, released by :meth:`close`.
    """

    def __init__(
        self,
        prefix_url: str,
        *,
        storage_options: Mapping[str, Any] | StorageConfig | None = None,
        step_digits: int | None = None,
    ) -> None:
        if step_digits is not None and not 1 <= step_digits <= 20:
            raise ValueError(f"step_digits must be within [1, 20] or None, got {step_digits}")
        self.prefix_url = normalize_url(prefix_url)
        self.storage_config = _as_storage_config(storage_options)
        self.step_digits = step_digits
        self._storage = get_storage(self.prefix_url, self.storage_config)
        self._manifests: collections.OrderedDict[tuple[str, str], Manifest] = (
            collections.OrderedDict()
        )
        self._manifests_lock = threading.Lock()

    @property
    def storage(self) -> Storage:
        """The backend serving the prefix."""
        return self._storage

    def close(self) -> None:
        self._storage.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- naming -------------------------------------------------------------------------------
    def path_for(self, step: int) -> str:
        """Where the checkpoint of ``step`` goes: ``<prefix>/step-<step>`` (zero-padded to
        ``step_digits`` when set)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        digits = f"{step:0{self.step_digits}d}" if self.step_digits else str(step)
        return join_url(self.prefix_url, f"step-{digits}")

    # --- listing ------------------------------------------------------------------------------
    def list(self) -> list[CheckpointInfo]:
        """Every checkpoint directly under the prefix, sorted by step then name (checkpoints
        without a step first). One uncached listing plus a manifest GET where one is present."""
        objects = self._storage.list(self.prefix_url)
        groups = _group_by_child(self.prefix_url, objects)
        candidates = {
            name: objs
            for name, objs in groups.items()
            if any(_marks_checkpoint(r) for r, _ in objs)
        }
        manifests = self._read_manifests(
            {
                name: next(o for r, o in objs if r == MANIFEST_NAME)
                for name, objs in candidates.items()
                if any(r == MANIFEST_NAME for r, _ in objs)
            }
        )
        infos = [
            _make_info(
                name, join_url(self.prefix_url, name), objs, manifests.get(name, "no manifest")
            )
            for name, objs in candidates.items()
        ]
        return sorted(infos, key=_sort_key)

    def latest(self) -> CheckpointInfo | None:
        """The committed checkpoint with the highest step (among committed checkpoints without
        a step, the newest by time, only if none has a step); None if nothing is committed."""
        return newest_committed(self.list())

    def load_latest(
        self, checkpointer_or_reader: Any, state_dict: Any = None, **kwargs: Any
    ) -> tuple[CheckpointInfo, Any] | None:
        """Load the newest committed checkpoint with a checkpointer (``.load``) or a reader
        (``.read``); returns ``(info, state_dict)``, or None when there is nothing to resume."""
        info = self.latest()
        if info is None:
            return None
        if hasattr(checkpointer_or_reader, "load"):
            loaded = checkpointer_or_reader.load(info.url, state_dict, **kwargs)
        elif hasattr(checkpointer_or_reader, "read"):
            loaded, _missing = checkpointer_or_reader.read(info.url, state_dict, **kwargs)
        else:
            raise TypeError(
                "load_latest needs a checkpointer (with .load) or a reader (with .read), got "
                f"{type(checkpointer_or_reader).__name__}"
            )
        logger.info("resumed from %s (step %s)", info.url, info.step)
        return info, loaded

    # --- retention ----------------------------------------------------------------------------
    def apply_retention(
        self,
        keep_last: int,
        keep_every: int | None = None,
        protect: Iterable[str] = (),
        *,
        dry_run: bool = False,
    ) -> list[CheckpointInfo]:
        """Delete committed checkpoints beyond the newest ``keep_last`` committed ones.

        Kept as well: every step divisible by ``keep_every``, everything named (or whose URL
        is given) in ``protect`` (e.g. the checkpoint being resumed from), every checkpoint
        without a step, and every uncommitted one (it may be a save in progress). Call it
        only after the newest save is committed (``write_future.result()``), so the newest
        ``keep_last`` are really durable. Each victim's manifest is deleted first, so a
        deletion that stops halfway never leaves something that lists as committed.

        Returns the checkpoints deleted (with ``dry_run``: that would be deleted).
        """
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")
        if keep_every is not None and (
            isinstance(keep_every, bool) or not isinstance(keep_every, int) or keep_every < 1
        ):
            raise ValueError(f"keep_every must be an int >= 1 or None, got {keep_every!r}")
        if isinstance(protect, str):
            raise TypeError("protect must be an iterable of names or URLs, not one string")
        protected = {self._child_name(p) for p in protect}
        listed = self.list()
        unknown = sorted(protected - {c.name for c in listed})
        if unknown:
            raise ValueError(
                f"protect names {unknown}, which are not checkpoints under {self.prefix_url}; "
                "nothing was deleted (a typo here would delete the checkpoint meant to be kept)"
            )
        stepped = [c for c in listed if c.committed and c.step is not None]
        newest_first = sorted(stepped, key=lambda c: (c.step, c.name), reverse=True)
        victims = [
            c
            for c in newest_first[keep_last:]
            if c.name not in protected and not (keep_every and c.step % keep_every == 0)  # type: ignore[operator]
        ]
        victims.reverse()
        for victim in victims:
            logger.info(
                "retention: %sdeleting %s (step %s)",
                "not " if dry_run else "",
                victim.url,
                victim.step,
            )
            if not dry_run:
                self._delete_checkpoint(victim)
        return victims

    # --- clean-up -----------------------------------------------------------------------------
    def gc(self, older_than_secs: float, *, dry_run: bool = False) -> GCReport:
        """Abort unfinished uploads under the prefix started more than ``older_than_secs`` ago
        and delete uncommitted checkpoints whose newest object (or unfinished upload) is older
        than that. Pick an age longer than your slowest save: a save in progress looks exactly
        like an abandoned one. ``older_than_secs=0`` takes everything uncommitted.
        """
        if isinstance(older_than_secs, bool) or not isinstance(older_than_secs, int | float):
            raise TypeError(
                f"older_than_secs must be a number of seconds (e.g. 7200), got "
                f"{older_than_secs!r}; the CLI's `cloudckpt gc --older-than 2h` parses units"
            )
        if older_than_secs < 0:
            raise ValueError(f"older_than_secs must be >= 0, got {older_than_secs!r}")
        now = time.time()
        report = GCReport(dry_run=dry_run)

        def is_old(stamp: float | None) -> bool:
            if older_than_secs == 0:
                return True
            return stamp is not None and stamp <= now - older_than_secs

        pending = self._storage.list_pending_uploads(self.prefix_url)
        activity: dict[str, float] = {}
        for p in pending:
            child = _child_of(self.prefix_url, p.url)
            if child is not None and p.initiated_secs is not None:
                activity[child] = max(activity.get(child, 0.0), p.initiated_secs)
        # Uploads without a start time are left alone (like multipart.abort_stale_uploads).
        report.aborted_uploads = [
            p for p in pending if p.initiated_secs is not None and is_old(p.initiated_secs)
        ]

        for ckpt in self.list():
            if ckpt.committed:
                continue
            if ckpt.manifest is not None or (ckpt.problem or "").startswith("invalid manifest"):
                # Committed once, damaged since (a rank object missing or resized, a corrupt
                # manifest): keep what is left for inspection; delete it on purpose.
                logger.warning("gc: keeping damaged checkpoint %s (%s)", ckpt.url, ckpt.problem)
                continue
            newest = max(
                (t for t in (ckpt.newest_object_secs, activity.get(ckpt.name)) if t is not None),
                default=None,
            )
            if is_old(newest):
                report.deleted_checkpoints.append(ckpt)
                report.deleted_objects += len(ckpt.objects)
                report.freed_bytes += ckpt.size_bytes

        if not dry_run:
            for p in report.aborted_uploads:
                logger.info("gc: aborting upload %s of %s", p.upload_id, p.url)
                self._storage.abort_pending_upload(p)
            for ckpt in report.deleted_checkpoints:
                logger.info("gc: deleting uncommitted %s", ckpt.url)
                self._delete_checkpoint(ckpt)
        return report

    # --- verification -------------------------------------------------------------------------
    def verify(self, ckpt_url: str, *, progress: ProgressFn | None = None) -> VerifyReport:
        """Fetch and check every rank object of ``ckpt_url``; see :func:`verify_checkpoint`."""
        url = self._resolve(ckpt_url)
        return verify_checkpoint(url, self.storage_config, progress=progress, storage=self._storage)

    # --- internals ----------------------------------------------------------------------------
    def _resolve(self, name_or_url: str) -> str:
        """A checkpoint URL from a name under the prefix or a full URL/path."""
        if "/" not in name_or_url and "://" not in name_or_url and os.sep not in name_or_url:
            return join_url(self.prefix_url, name_or_url)
        return normalize_url(name_or_url)

    def _child_name(self, name_or_url: str) -> str:
        """The checkpoint name under the prefix that ``name_or_url`` designates."""
        url = self._resolve(name_or_url)
        base = self.prefix_url.rstrip("/") + "/"
        return url[len(base) :].split("/", 1)[0] if url.startswith(base) else name_or_url

    def _read_manifests(self, found: Mapping[str, ObjectInfo]) -> dict[str, Manifest | str]:
        """Each named manifest object, parsed (a string says why it is unusable), in parallel;
        a manifest already seen with the same version is not fetched again."""
        out: dict[str, Manifest | str] = {}
        todo: dict[str, ObjectInfo] = {}
        with self._manifests_lock:
            for name, obj in found.items():
                cached = self._manifests.get((obj.url, obj.version)) if obj.version else None
                if cached is None:
                    todo[name] = obj
                else:
                    out[name] = cached
        if not todo:
            return out

        def read(obj: ObjectInfo) -> Manifest | str:
            try:
                data = self._storage.get_bytes(obj.url)
            except NotFoundError:
                return "manifest vanished while listing (being deleted?)"
            try:
                return Manifest.from_json(data, url=obj.url)
            except ManifestError as e:
                return f"invalid manifest: {e}"

        workers = max(1, min(len(todo), self.storage_config.download.max_concurrency))
        with ThreadPoolExecutor(workers, thread_name_prefix="cloudckpt-manifests") as pool:
            results = dict(zip(todo, pool.map(read, todo.values()), strict=True))
        with self._manifests_lock:
            for name, result in results.items():
                obj = todo[name]
                if obj.version and isinstance(result, Manifest):
                    self._manifests[(obj.url, obj.version)] = result
                    while len(self._manifests) > _MANIFEST_CACHE_ENTRIES:
                        self._manifests.popitem(last=False)
        out.update(results)
        return out

    def _delete_checkpoint(self, ckpt: CheckpointInfo) -> None:
        """Manifest first, then everything else found under the checkpoint right now."""
        self._storage.delete([join_url(ckpt.url, MANIFEST_NAME)])
        inside = ckpt.url.rstrip("/") + "/"
        objects = self._storage.list(ckpt.url)
        outside = [o.url for o in objects if not o.url.startswith(inside)]
        if outside:
            raise CheckpointError(
                f"listing {ckpt.url} returned objects outside it ({outside[:3]}); nothing more "
                "was deleted",
                url=ckpt.url,
                hint="this is a storage backend bug; please report it",
            )
        self._storage.delete([o.url for o in objects])
        if _split_url(ckpt.url)[0] == "file":
            _remove_empty_dirs(ckpt.url)


# --- listing helpers ----------------------------------------------------------------------------


def _child_of(prefix_url: str, url: str) -> str | None:
    """The first path component of ``url`` below ``prefix_url`` (None if not below it)."""
    base = prefix_url.rstrip("/") + "/"
    if not url.startswith(base):
        return None
    rest = url[len(base) :]
    child, sep, _ = rest.partition("/")
    return child if sep and child else None


def _group_by_child(
    prefix_url: str, objects: Iterable[ObjectInfo]
) -> dict[str, list[tuple[str, ObjectInfo]]]:
    """``{child name: [(path relative to the child, object), ...]}`` for nested objects."""
    base = prefix_url.rstrip("/") + "/"
    groups: dict[str, list[tuple[str, ObjectInfo]]] = {}
    for obj in objects:
        if not obj.url.startswith(base):
            continue
        child, sep, rel = obj.url[len(base) :].partition("/")
        if sep and child and rel:
            groups.setdefault(child, []).append((rel, obj))
    return groups


def _marks_checkpoint(rel: str) -> bool:
    """Whether an object at ``rel`` (relative to a child) makes the child a checkpoint."""
    return (
        rel == MANIFEST_NAME
        or rel.startswith(RANK_RECORD_DIR + "/")
        or _RANK_OBJECT_RE.match(rel) is not None
    )


def _make_info(
    name: str, url: str, objs: list[tuple[str, ObjectInfo]], manifest: Manifest | str
) -> CheckpointInfo:
    objects = tuple(o for _, o in objs)
    by_rel = {rel: o for rel, o in objs}
    rank_objects = [rel for rel in by_rel if _RANK_OBJECT_RE.match(rel)]
    mtimes = [o.mtime_secs for o in objects if o.mtime_secs is not None]
    newest = max(mtimes) if mtimes else None
    size = sum(o.size_bytes for o in objects)
    if isinstance(manifest, str):
        return CheckpointInfo(
            name=name,
            url=url,
            step=parse_step(name),
            committed=False,
            size_bytes=size,
            ranks=len(rank_objects),
            time_secs=newest,
            problem=manifest,
            objects=objects,
        )
    problem = _missing_rank_objects(manifest, by_rel)
    return CheckpointInfo(
        name=name,
        url=url,
        step=parse_step(name),
        committed=problem is None,
        size_bytes=size,
        ranks=manifest.world_size,
        time_secs=manifest.created_secs,
        problem=problem,
        manifest=manifest,
        objects=objects,
    )


def _missing_rank_objects(manifest: Manifest, by_rel: Mapping[str, ObjectInfo]) -> str | None:
    for entry in manifest.ranks:
        obj = by_rel.get(entry.object_name)
        if obj is None:
            return f"rank {entry.rank} object {entry.object_name} is missing"
        if obj.size_bytes != entry.size_bytes:
            return (
                f"rank {entry.rank} object {entry.object_name} is {obj.size_bytes} bytes, the "
                f"manifest says {entry.size_bytes}"
            )
    return None


def _sort_key(c: CheckpointInfo) -> tuple[bool, int, str]:
    return (c.step is not None, c.step if c.step is not None else -1, c.name)


def newest_committed(checkpoints: Iterable[CheckpointInfo]) -> CheckpointInfo | None:
    """What :meth:`CheckpointManager.latest` picks from a listing: the committed checkpoint
    with the highest step, else (none has a step) the newest committed one by time."""
    committed = [c for c in checkpoints if c.committed]
    stepped = [c for c in committed if c.step is not None]
    if stepped:
        return max(stepped, key=lambda c: (c.step, c.name))
    timed = [c for c in committed if c.time_secs is not None]
    return max(timed, key=lambda c: (c.time_secs, c.name)) if timed else None


def _remove_empty_dirs(root: str) -> None:
    """Local stores only: remove the directories a deleted checkpoint leaves behind (a
    directory that gained a file meanwhile is left alone)."""
    for dirpath, _dirs, _files in os.walk(root, topdown=False):
        try:
            os.rmdir(dirpath)
        except FileNotFoundError:
            continue
        except OSError as e:
            logger.debug("leaving %s in place: %s", dirpath, e)


# --- streaming whole objects (verify, copy) -----------------------------------------------------


def _stream_object(
    storage: Storage,
    url: str,
    size_bytes: int,
    consume: Callable[[memoryview], None],
    *,
    version: str | None,
    chunk_bytes: int,
    max_in_flight: int,
) -> None:
    """Pass an object's bytes to ``consume`` in order, chunk by chunk, fetched by parallel
    ranged reads pinned to ``version``. At most ``max_in_flight`` chunks are in memory (or
    being read) at once. A failure (of a read or of ``consume``) cancels what has not started,
    waits for the reads in flight, and propagates."""
    offsets = iter(range(0, size_bytes, chunk_bytes))

    def read(offset: int) -> memoryview:
        buf = memoryview(bytearray(min(chunk_bytes, size_bytes - offset)))
        storage.read_into(url, offset, buf, version=version)
        return buf

    pending: collections.deque[Future[memoryview]] = collections.deque()
    with ThreadPoolExecutor(max_in_flight, thread_name_prefix="cloudckpt-stream") as pool:
        try:
            for offset in offsets:
                pending.append(pool.submit(read, offset))
                if len(pending) >= max_in_flight:
                    break
            while pending:
                chunk = pending.popleft().result()
                nxt = next(offsets, None)
                if nxt is not None:
                    pending.append(pool.submit(read, nxt))
                consume(chunk)
        finally:
            for f in pending:
                f.cancel()


class _LayoutChecker:
    """CRC32C of the whole object, its pickle record and each storage, fed in order."""

    def __init__(self, layout: RankLayout) -> None:
        self.layout = layout
        self.object_crc = 0
        self.position = 0
        # (offset, end, index) sorted by offset; index -1 is the pickle record
        spans = [(layout.pickle.offset, layout.pickle.end, -1)]
        spans += [(s.offset, s.end, i) for i, s in enumerate(layout.storages)]
        self._spans = sorted(spans)
        self._crcs = dict.fromkeys((i for *_, i in spans), 0)
        self._first = 0  # first span that may still get bytes

    def feed(self, data: memoryview) -> None:
        start, end = self.position, self.position + data.nbytes
        self.object_crc = crc32c(data, self.object_crc)
        while self._first < len(self._spans) and self._spans[self._first][1] <= start:
            self._first += 1
        for s_off, s_end, index in self._spans[self._first :]:
            if s_off >= end:
                break
            lo, hi = max(s_off, start), min(s_end, end)
            if lo < hi:
                self._crcs[index] = crc32c(data[lo - start : hi - start], self._crcs[index])
        self.position = end

    def problems(self, entry: RankEntry, obj_url: str) -> list[VerifyProblem]:
        """Every checksum that differs from the manifest (call after the last byte)."""
        layout, out = self.layout, []
        if self._crcs[-1] != layout.pickle.crc32c:
            out.append(
                VerifyProblem(
                    entry.rank,
                    obj_url,
                    "pickle_checksum",
                    f"pickle record of {obj_url} (rank {entry.rank}): expected crc32c "
                    f"{layout.pickle.crc32c:#010x}, got {self._crcs[-1]:#010x}",
                )
            )
        for i, span in enumerate(layout.storages):
            if self._crcs[i] == span.crc32c:
                continue
            names = [t.name for t in layout.tensors if t.storage_key == span.key]
            key = ", ".join(names) if names else f"data/{span.key}"
            out.append(
                VerifyProblem(
                    entry.rank,
                    obj_url,
                    "checksum",
                    f"checksum mismatch for key {key} in {obj_url} (rank {entry.rank}, bytes "
                    f"{span.offset}-{span.end}): expected crc32c {span.crc32c:#010x}, got "
                    f"{self._crcs[i]:#010x}",
                    key=key,
                )
            )
        if self.object_crc != layout.crc32c:
            out.append(
                VerifyProblem(
                    entry.rank,
                    obj_url,
                    "object_checksum",
                    f"{obj_url} (rank {entry.rank}): whole-object crc32c {self.object_crc:#010x}"
                    f" differs from the manifest's {layout.crc32c:#010x}",
                )
            )
        return out


def read_manifest(storage: Storage, url: str) -> Manifest:
    """The validated manifest of the checkpoint at ``url`` (CheckpointNotFoundError if none)."""
    manifest_url = join_url(url, MANIFEST_NAME)
    try:
        data = storage.get_bytes(manifest_url)
    except BucketNotFoundError:
        raise  # says more than "no checkpoint here"
    except NotFoundError as e:
        raise CheckpointNotFoundError(
            f"no committed checkpoint at {url} (no {MANIFEST_NAME})",
            url=url,
            hint="list the run's checkpoints with `cloudckpt ls <run prefix>`",
        ) from e
    return Manifest.from_json(data, url=manifest_url)


def _stream_params(config: StorageConfig) -> tuple[int, int]:
    return config.download.range_size_bytes, config.download.max_concurrency


def verify_checkpoint(
    url: str,
    storage_config: StorageConfig | None = None,
    *,
    progress: ProgressFn | None = None,
    storage: Storage | None = None,
) -> VerifyReport:
    """Read every rank object of the committed checkpoint at ``url`` in full and check its size
    and every CRC32C the manifest records: each storage, the pickle record and the whole
    object. Every problem is reported, not only the first; raises only when there is no valid
    manifest (CheckpointNotFoundError, ManifestError) or no bucket.

    Rank objects are read concurrently, each by parallel ranged reads; together at most
    ``download.max_concurrency`` chunks of ``download.range_size_bytes`` are in memory.
    ``progress`` may be called from several threads.
    """
    url = normalize_url(url)
    config = storage_config or StorageConfig()
    own = storage is None
    store = storage or get_storage(url, config)
    try:
        manifest = read_manifest(store, url)
        report = VerifyReport(url=url, world_size=manifest.world_size)
        chunk_bytes, budget = _stream_params(config)
        entries = sorted(manifest.ranks, key=lambda e: e.rank)
        rank_workers = max(1, min(len(entries), budget))
        in_flight = max(1, budget // rank_workers)
        lock = threading.Lock()

        def verify_rank(entry: RankEntry) -> list[VerifyProblem]:
            obj_url = join_url(url, entry.object_name)
            problems: list[VerifyProblem] = []
            info = _head_rank_object(store, obj_url, entry, problems)
            if info is None:
                return problems
            checker = _LayoutChecker(entry.layout)

            def check(data: memoryview) -> None:
                checker.feed(data)
                with lock:
                    report.bytes_checked += data.nbytes
                if progress is not None:
                    progress(data.nbytes)

            try:
                _stream_object(
                    store,
                    obj_url,
                    info.size_bytes,
                    check,
                    version=info.version,
                    chunk_bytes=chunk_bytes,
                    max_in_flight=in_flight,
                )
            except StorageError as e:
                return [VerifyProblem(entry.rank, obj_url, "read_error", f"reading failed: {e}")]
            with lock:
                report.objects_checked += 1
            return checker.problems(entry, obj_url)

        with ThreadPoolExecutor(rank_workers, thread_name_prefix="cloudckpt-verify") as pool:
            for problems in pool.map(verify_rank, entries):
                report.problems.extend(problems)
        return report
    finally:
        if own:
            store.close()


def _head_rank_object(
    storage: Storage, obj_url: str, entry: RankEntry, problems: list[VerifyProblem]
) -> ObjectInfo | None:
    """HEAD a rank object, recording a missing object or a size mismatch as a problem."""
    try:
        info = storage.head(obj_url)
    except NotFoundError:
        problems.append(
            VerifyProblem(
                entry.rank,
                obj_url,
                "missing",
                f"rank {entry.rank} object {obj_url} listed in the manifest is missing",
            )
        )
        return None
    if info.size_bytes != entry.size_bytes:
        problems.append(
            VerifyProblem(
                entry.rank,
                obj_url,
                "size",
                f"rank {entry.rank} object {obj_url} is {info.size_bytes} bytes, the manifest "
                f"says {entry.size_bytes} (truncated or replaced)",
            )
        )
        return None
    return info


def copy_checkpoint(
    src_url: str,
    dst_url: str,
    *,
    src_config: StorageConfig | None = None,
    dst_config: StorageConfig | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> CopyReport:
    """Copy the committed checkpoint at ``src_url`` to ``dst_url`` (any two stores, e.g. s3://
    to gs:// or to a local directory).

    Each rank object streams through bounded memory (parallel ranged reads into a streamed
    upload); its checksums are checked on the way and a mismatch aborts that upload before
    anything appears. The destination manifest is written last (conditionally, unless
    ``overwrite``), with the destination's object versions: the copy is a committed checkpoint
    only once everything else is in place. An existing committed destination is refused with
    CommitConflictError unless ``overwrite`` (then its manifest is deleted first).
    """
    src, dst = normalize_url(src_url), normalize_url(dst_url)
    if src == dst:
        raise ValueError(f"source and destination are the same checkpoint: {src}")
    src_config = src_config or StorageConfig()
    dst_config = dst_config or StorageConfig()
    started = time.perf_counter()
    src_store = get_storage(src, src_config)
    dst_store = get_storage(dst, dst_config)
    try:
        manifest = read_manifest(src_store, src)
        manifest_url = join_url(dst, MANIFEST_NAME)
        if overwrite:
            dst_store.delete([manifest_url])
        elif dst_store.exists(manifest_url):
            raise CommitConflictError(
                f"a committed checkpoint already exists at {dst}",
                url=dst,
                hint="choose another destination or pass --overwrite (overwrite=True)",
            )
        chunk_bytes, in_flight = _stream_params(src_config)
        entries = []
        for entry in sorted(manifest.ranks, key=lambda e: e.rank):
            entries.append(
                _copy_rank_object(
                    src_store, dst_store, src, dst, entry, chunk_bytes, in_flight, progress
                )
            )
        copied = dataclasses.replace(manifest, ranks=tuple(entries))
        dst_store.put_bytes(manifest_url, copied.to_json(), if_absent=not overwrite)
        logger.info("copied %s to %s (%d bytes)", src, dst, manifest.total_bytes)
        return CopyReport(
            src, dst, manifest.world_size, manifest.total_bytes, time.perf_counter() - started
        )
    finally:
        src_store.close()
        dst_store.close()


def _copy_rank_object(
    src_store: Storage,
    dst_store: Storage,
    src: str,
    dst: str,
    entry: RankEntry,
    chunk_bytes: int,
    in_flight: int,
    progress: ProgressFn | None,
) -> RankEntry:
    src_obj, dst_obj = join_url(src, entry.object_name), join_url(dst, entry.object_name)
    problems: list[VerifyProblem] = []
    info = _head_rank_object(src_store, src_obj, entry, problems)
    if info is None:
        raise CorruptCheckpointError(
            problems[0].message,
            url=src_obj,
            rank=entry.rank,
            hint="the source checkpoint is damaged; copy an older step",
        )
    checker = _LayoutChecker(entry.layout)
    upload = dst_store.open_upload(dst_obj, size_hint_bytes=entry.size_bytes)

    def forward(data: memoryview) -> None:
        checker.feed(data)
        upload.write(data)
        if progress is not None:
            progress(data.nbytes)

    try:
        _stream_object(
            src_store,
            src_obj,
            info.size_bytes,
            forward,
            version=info.version,
            chunk_bytes=chunk_bytes,
            max_in_flight=in_flight,
        )
        problems = checker.problems(entry, src_obj)
        if problems:
            raise ChecksumMismatchError(
                problems[0].message
                + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""),
                url=src_obj,
                rank=entry.rank,
                hint="the source checkpoint is corrupt; nothing was committed at the destination",
            )
        written = upload.commit()
    except BaseException:
        upload.abort()
        raise
    if written.size_bytes != entry.size_bytes:
        raise CorruptCheckpointError(
            f"{dst_obj} is {written.size_bytes} bytes after the copy, {entry.size_bytes} were sent",
            url=dst_obj,
            rank=entry.rank,
            hint="the destination store lost data; copy again",
        )
    return dataclasses.replace(entry, version=written.version)


__all__ = [
    "CheckpointInfo",
    "CheckpointManager",
    "CopyReport",
    "GCReport",
    "VerifyProblem",
    "VerifyReport",
    "copy_checkpoint",
    "newest_committed",
    "parse_step",
    "read_manifest",
    "verify_checkpoint",
]
