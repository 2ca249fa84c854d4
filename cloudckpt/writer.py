"""CheckpointWriter: upstream's writer interface, streaming each rank's object to any store.

Lifecycle of one ``write(path, state_dict)`` (every rank runs it; rank 0 also commits)::

    1. every rank: refuse early if a committed checkpoint is at ``path`` (unless overwrite;
       then the old manifest is deleted first, so a crash leaves no stale commit behind)
    2. every rank: stream ``checkpoint_<rank>.pt`` (torch.save format) into an upload;
       any failure aborts the upload: nothing appears at the key
    3. every rank: commit hook ``pre_commit``
    4. every rank: write ``.cloudckpt/<save_id>/rank_<rank>.json`` (byte map, checksums), or
       ``failed_<rank>.json`` if steps 1-4 failed; multi-rank saves then wait until every
       rank succeeded, raising within ``commit_timeout_secs`` if one failed or vanished
       (see ``cloudckpt.barriers``); then the configured upstream barrier, if any
    5. rank 0: read every rank record, check each object's size, claim the commit (a rank
       that gave up waiting claims the abort instead; only one claim takes effect), write the
       manifest last, conditionally (If-None-Match / ifGenerationMatch=0) unless overwrite:
       the commit. The other ranks wait for the manifest (or rank 0's failure record)
    6. every rank: commit hook ``post_commit``
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ._upstream import STATE_DICT, Barrier, RankInfo, UpstreamCheckpointWriter, WriterHook
from .barriers import StoreRendezvous, agree_run_id, rank_record_url
from .config import CheckpointWriterConfig, StorageConfig
from .errors import (
    CommitConflictError,
    CorruptCheckpointError,
    NotFoundError,
    SaveFailedError,
    StorageError,
    name_rank,
)
from .format import estimate_size_bytes, serialize
from .manifest import (
    MANIFEST_NAME,
    Manifest,
    RankEntry,
    parse_rank_record,
    rank_entry_to_dict,
    rank_object_name,
)
from .storage import Storage, UploadMetrics, get_storage, join_url, normalize_url, split_url

logger = logging.getLogger(__name__)

COMMIT_CHECK_THREADS = 16


@dataclass
class SaveMetrics:
    """What one rank's save cost.

    ``upload_secs``/``total_secs`` are measured by the writer (streaming the object; the whole
    write including barrier and commit). The checkpointer adds the caller's view:
    ``blocked_secs`` from ``save()`` entry until the caller may mutate its tensors again, and
    ``commit_secs`` from ``save()`` entry until the checkpoint is durably committed.
    """

    path: str
    rank: int
    bytes: int = 0
    parts: int = 0
    retries: int = 0
    throttles: int = 0
    upload_secs: float = 0.0
    total_secs: float = 0.0
    blocked_secs: float | None = None
    commit_secs: float | None = None
    committed: bool = False
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def mib_per_sec(self) -> float:
        return self.bytes / (1 << 20) / self.upload_secs if self.upload_secs > 0 else 0.0

    @classmethod
    def from_upload(cls, path: str, rank: int, m: UploadMetrics) -> SaveMetrics:
        return cls(
            path=path,
            rank=rank,
            bytes=m.bytes_sent,
            parts=m.parts,
            retries=m.retries,
            throttles=m.throttles,
            upload_secs=m.seconds,
        )


class CheckpointWriter(UpstreamCheckpointWriter):
    """Writes one rank's part of a checkpoint to ``path`` (any supported URL); see module doc.

    Same constructor as upstream's, plus ``storage_config`` (credentials, upload and retry
    policy). ``write`` returns None like upstream's; ``last_metrics`` holds the save's metrics.
    The keyword ``metadata`` (a JSON-serializable dict) given to ``save``/``write`` is stored in
    the manifest's ``user_metadata``; all keywords also reach the commit hooks.
    """

    def __init__(
        self,
        config: CheckpointWriterConfig | None = None,
        rank_info: RankInfo | None = None,
        barrier: Barrier | None = None,
        commit_hook: WriterHook | None = None,
        *,
        storage_config: StorageConfig | None = None,
        run_id: str | None = None,
    ) -> None:
        config = config or CheckpointWriterConfig()
        super().__init__(
            config=config,  # type: ignore[arg-type]
            rank_info=rank_info or RankInfo(global_rank=0, global_world_size=1),
            barrier=barrier,
            commit_hook=commit_hook,
        )
        self._config: CheckpointWriterConfig = config
        self._storage_config = storage_config or StorageConfig()
        self._storages: dict[str, Storage] = {}
        self.last_metrics: SaveMetrics | None = None
        self._run_id = run_id or agree_run_id(self._rank_info)
        self._save_seq = 0

    def storage(self, url: str) -> Storage:
        """The (cached) backend for ``url``'s scheme."""
        scheme, _ = split_url(url)
        if scheme not in self._storages:
            self._storages[scheme] = get_storage(url, self._storage_config)
        return self._storages[scheme]

    def write(self, path: str, state_dict: STATE_DICT, **kwargs: Any) -> None:
        url = normalize_url(path)
        rank = self._rank_info.global_rank
        save_id = str(kwargs.pop("save_id", None) or self._next_save_id())
        storage = self.storage(url)
        started = time.perf_counter()
        manifest_url = join_url(url, MANIFEST_NAME)
        rendezvous = StoreRendezvous(
            storage,
            url,
            save_id,
            self._rank_info,
            timeout_secs=self._config.commit_timeout_secs,
            poll_interval_secs=self._config.poll_interval_secs,
        )
        multi_rank = self._rank_info.global_world_size > 1
        try:
            if self._config.overwrite:
                storage.delete([manifest_url])
            else:
                self._refuse_if_committed(storage, url)
            entry, metrics = self._upload_rank_object(storage, url, state_dict)
            if self._commit_hook is not None:
                # As upstream: after this rank's part is written, before the barrier. Here a
                # refusal is this rank's failure, so no rank commits.
                self._commit_hook.pre_commit(url, **kwargs)
            storage.put_bytes(
                rank_record_url(url, save_id, rank),
                json.dumps(rank_entry_to_dict(entry)).encode(),
            )
        except BaseException as e:
            name_rank(e, rank)
            if multi_rank:
                rendezvous.report_failure(e)
            raise
        if multi_rank:
            rendezvous.wait_all_ranks()
        if rank == 0:
            try:
                self._execute_barrier(url, save_id, metrics)
                manifest = self._checked_manifest(storage, url, save_id, entry, kwargs)
                if multi_rank:
                    rendezvous.claim_commit()
                self._put_manifest(storage, url, manifest)
            except BaseException as e:
                if multi_rank:
                    rendezvous.report_commit_failure(e)
                raise
            if multi_rank:
                rendezvous.report_committed()
            logger.info(
                "committed %s (%d ranks, %d bytes)", url, manifest.world_size, manifest.total_bytes
            )
        else:
            try:
                self._execute_barrier(url, save_id, metrics)
            except SaveFailedError as e:
                rendezvous.give_up_after(e)
            rendezvous.wait_commit()
        metrics.committed = True
        metrics.total_secs = time.perf_counter() - started
        self.last_metrics = metrics
        if self._commit_hook is not None:
            self._commit_hook.post_commit(url, **kwargs)
        logger.info(
            "rank %d saved %s: %d bytes in %.2fs (%.1f MiB/s, %d retries)",
            rank,
            url,
            metrics.bytes,
            metrics.total_secs,
            metrics.mib_per_sec,
            metrics.retries,
        )

    def _execute_barrier(self, url: str, save_id: str, metrics: SaveMetrics) -> None:
        """The configured upstream barrier (none by default), its failure named as the save's;
        its wait goes into ``metrics.extra["barrier_secs"]``."""
        if self._barrier is None:
            return
        rank = self._rank_info.global_rank
        logger.debug("rank %d waiting at the commit barrier for %s", rank, url)
        scoped = getattr(self._barrier, "execute_barrier_for", None)
        started = time.perf_counter()
        try:
            scoped(save_id) if scoped is not None else self._barrier.execute_barrier()
            metrics.extra["barrier_secs"] = time.perf_counter() - started
        except Exception as e:
            raise SaveFailedError(
                f"save to {url} failed at the commit barrier ({type(self._barrier).__name__}) on "
                f"rank {rank}: {type(e).__name__}: {e}",
                url=url,
                rank=rank,
                hint="a rank crashed or hangs after its part was durable; nothing was committed",
            ) from e

    def _refuse_if_committed(self, storage: Storage, url: str) -> None:
        if storage.exists(join_url(url, MANIFEST_NAME)):
            raise CommitConflictError(
                f"a committed checkpoint already exists at {url}",
                url=url,
                rank=self._rank_info.global_rank,
                hint="save to a new path (e.g. per step) or set "
                "CheckpointWriterConfig(overwrite=True)",
            )

    def _put_manifest(self, storage: Storage, url: str, manifest: Manifest) -> None:
        """The commit: a conditional put unless overwrite, so of two saves racing to commit the
        same path, the second fails."""
        manifest_url = join_url(url, MANIFEST_NAME)
        data = manifest.to_json()
        try:
            storage.put_bytes(manifest_url, data, if_absent=not self._config.overwrite)
        except CommitConflictError as e:
            raise CommitConflictError(
                f"another save committed {url} first; this save was not committed",
                url=url,
                rank=self._rank_info.global_rank,
                hint="two jobs are saving the same path: give each its own run prefix. This "
                "save's rank objects may have replaced some of the other's: check that "
                "checkpoint with `cloudckpt verify` before relying on it",
            ) from e
        except StorageError:
            # The last attempt may have landed with its answer lost: then this save committed.
            try:
                landed = storage.get_bytes(manifest_url) == data
            except StorageError:
                landed = False
            if not landed:
                raise
            logger.warning("the manifest put for %s failed, but the stored one is this save's", url)

    def _next_save_id(self) -> str:
        self._save_seq += 1
        return f"{self._run_id}-{self._save_seq}"

    def _upload_rank_object(
        self, storage: Storage, url: str, state_dict: STATE_DICT
    ) -> tuple[RankEntry, SaveMetrics]:
        rank = self._rank_info.global_rank
        name = rank_object_name(rank)
        obj_url = join_url(url, name)
        upload = storage.open_upload(obj_url, size_hint_bytes=estimate_size_bytes(state_dict))
        try:
            layout = serialize(state_dict, upload)
            if not self._config.overwrite:
                # Another job may have committed here while we serialized: publishing our
                # object now would corrupt its checkpoint. (The window left is this check.)
                self._refuse_if_committed(storage, url)
            info = upload.commit()
        except BaseException:
            upload.abort()
            raise
        if info.size_bytes != layout.size_bytes:
            raise CorruptCheckpointError(
                f"{obj_url} is {info.size_bytes} bytes after upload, {layout.size_bytes} were sent",
                url=obj_url,
                rank=rank,
                hint="the store lost data; retry the save",
            )
        metrics = SaveMetrics.from_upload(url, rank, upload.metrics)
        return RankEntry(rank, name, info.version, layout), metrics

    def _checked_manifest(
        self, storage: Storage, url: str, save_id: str, own: RankEntry, kwargs: dict[str, Any]
    ) -> Manifest:
        """Rank 0: the manifest of this save, once every rank's object is checked present."""
        world = self._rank_info.global_world_size
        entries = [own]
        if world > 1:
            # One GET + HEAD per rank: concurrent, so the commit does not grow with the world.
            with ThreadPoolExecutor(
                min(world - 1, COMMIT_CHECK_THREADS), thread_name_prefix="cloudckpt-commit"
            ) as pool:
                entries += pool.map(
                    lambda r: self._checked_rank_entry(storage, url, save_id, r), range(1, world)
                )
        return Manifest(
            world_size=world,
            ranks=tuple(entries),
            torch_version=torch.__version__,
            user_metadata=dict(kwargs.get("metadata") or {}),
            save_id=save_id,
        )

    @staticmethod
    def _checked_rank_entry(storage: Storage, url: str, save_id: str, r: int) -> RankEntry:
        """Rank ``r``'s record, once its object is confirmed present with the recorded size."""
        record_url = rank_record_url(url, save_id, r)
        try:
            entry = parse_rank_record(storage.get_bytes(record_url), url=record_url)
            info = storage.head(join_url(url, entry.object_name))
        except NotFoundError as e:
            raise SaveFailedError(
                f"rank {r}'s part of {url} is missing at commit time",
                url=url,
                rank=r,
                hint="that rank failed or its barrier was skipped; nothing was committed",
            ) from e
        if info.size_bytes != entry.size_bytes or (
            entry.version is not None and info.version is not None and info.version != entry.version
        ):
            raise SaveFailedError(
                f"rank {r}'s object at {url} does not match its record (stale or replaced)",
                url=url,
                rank=r,
                hint="another save may be writing the same path; nothing was committed",
            )
        return entry

    def close(self) -> None:
        for s in self._storages.values():
            s.close()
        self._storages.clear()
