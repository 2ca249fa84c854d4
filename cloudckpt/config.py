"""Frozen, validated configuration dataclasses. Units are in the field names.

Every config validates itself in ``__post_init__`` so that a bad value fails at construction,
before any I/O. All of them are picklable: they travel to the async writer subprocess.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._upstream import (
    BarrierConfig,
    CheckpointProcessConfig,
    CheckpointStagerConfig,
)

logger = logging.getLogger(__name__)

MiB = 1 << 20
GiB = 1 << 30

# S3 multipart limits (https://docs.aws.amazon.com/AmazonS3/latest/userguide/qfacts.html).
S3_MIN_PART_SIZE_BYTES = 5 * MiB
S3_MAX_PART_SIZE_BYTES = 5 * GiB
S3_MAX_UPLOAD_PARTS = 10_000


def default_staging_config() -> CheckpointStagerConfig:
    """Upstream's staging defaults, with the accelerator-only features off on CPU-only hosts."""
    import torch

    on_accelerator = torch.accelerator.is_available()
    return CheckpointStagerConfig(
        use_pinned_memory=on_accelerator,
        use_shared_memory=True,
        use_async_staging=True,
        use_non_blocking_copy=on_accelerator,
    )


def default_upload_concurrency(
    cpus: int | None = None, local_world_size: int | None = None
) -> int:
    """Parts in flight per rank when ``UploadConfig.max_concurrency`` is not given.

    Every upload stream costs client CPU (checksums, TLS/HTTP) and ranks on one host share it,
    so the host's budget of about four streams per core is split among its local ranks
    (``LOCAL_WORLD_SIZE``, set by torchrun), capped at 8 and never below 2. On a 2-core host
    one rank gets 8 and each of 4 ranks gets 2; on a 96-core, 8-rank host every rank gets 8.
    """
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if local_world_size is None:
        raw = os.environ.get("LOCAL_WORLD_SIZE", "1")
        try:
            local_world_size = max(1, int(raw))
        except ValueError:
            logger.warning("LOCAL_WORLD_SIZE=%r is not an int; sizing uploads for 1 rank", raw)
            local_world_size = 1
    return max(2, min(8, 4 * (cpus or 1) // local_world_size))


def _number(name: str, value: object) -> float:
    """``value`` as a finite real number (bools, NaN and infinities are refused)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _positive(name: str, value: object) -> None:
    if _number(name, value) <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _non_negative(name: str, value: object) -> None:
    if _number(name, value) < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def _int_at_least(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def _flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _instance(name: str, value: object, cls: type) -> None:
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be a {cls.__name__}, got {type(value).__name__}")


@dataclass(frozen=True)
class UploadConfig:
    """How rank objects are streamed to the store.

    Attributes:
        part_size_bytes: size of each multipart part (S3) / upload chunk (other stores). Grown
            automatically when the known object size would need more than 10 000 parts.
        max_concurrency: parts in flight at once; at most ``max_concurrency + 1`` part
            buffers exist, so peak upload memory is about ``part_size_bytes * (max_concurrency + 1)``.
            None (default): :func:`default_upload_concurrency`, fixed at construction from the
            host's CPUs and the local rank count (8 for a lone rank on 2+ cores).
        send_checksums: send a CRC32C per part so the store rejects a part corrupted in transit.
    """

    part_size_bytes: int = 32 * MiB
    max_concurrency: int = None  # type: ignore[assignment]  # None: resolved below
    send_checksums: bool = True

    def __post_init__(self) -> None:
        if self.max_concurrency is None:
            object.__setattr__(self, "max_concurrency", default_upload_concurrency())
        _int_at_least("part_size_bytes", self.part_size_bytes, 1)
        _int_at_least("max_concurrency", self.max_concurrency, 1)
        _flag("send_checksums", self.send_checksums)
        if not S3_MIN_PART_SIZE_BYTES <= self.part_size_bytes <= S3_MAX_PART_SIZE_BYTES:
            raise ValueError(
                f"part_size_bytes must be within [{S3_MIN_PART_SIZE_BYTES}, "
                f"{S3_MAX_PART_SIZE_BYTES}] (S3 limits), got {self.part_size_bytes}"
            )


@dataclass(frozen=True)
class DownloadConfig:
    """How checkpoints are read back.

    Attributes:
        range_size_bytes: largest single ranged GET; bigger tensors are split.
        max_concurrency: ranged GETs in flight at once.
        coalesce_gap_bytes: neighbouring ranges closer than this are fetched as one GET.
        verify_checksums: check every tensor's CRC32C against the manifest while reading.
    """

    range_size_bytes: int = 32 * MiB
    max_concurrency: int = 8
    coalesce_gap_bytes: int = 1 * MiB
    verify_checksums: bool = True

    def __post_init__(self) -> None:
        _int_at_least("range_size_bytes", self.range_size_bytes, 1)
        _int_at_least("max_concurrency", self.max_concurrency, 1)
        _int_at_least("coalesce_gap_bytes", self.coalesce_gap_bytes, 0)
        _flag("verify_checksums", self.verify_checksums)


@dataclass(frozen=True)
class RetryConfig:
    """The retry policy applied to every remote call (see ``cloudckpt.retry``).

    Attributes:
        max_attempts: total attempts per request, the first one included (1 = no retry).
        initial_backoff_secs: first backoff; doubles per attempt, with full jitter.
        max_backoff_secs: cap of one backoff sleep.
        deadline_secs: give up retrying a request once this much time passed since its first
            attempt (None = attempts only).
        request_timeout_secs: connect/read timeout of a single request.
    """

    max_attempts: int = 6
    initial_backoff_secs: float = 0.2
    max_backoff_secs: float = 10.0
    deadline_secs: float | None = 300.0
    request_timeout_secs: float = 60.0

    def __post_init__(self) -> None:
        _int_at_least("max_attempts", self.max_attempts, 1)
        _non_negative("initial_backoff_secs", self.initial_backoff_secs)
        _non_negative("max_backoff_secs", self.max_backoff_secs)
        if self.deadline_secs is not None:
            _positive("deadline_secs", self.deadline_secs)
        _positive("request_timeout_secs", self.request_timeout_secs)


@dataclass(frozen=True)
class StorageConfig:
    """Everything a backend needs to talk to the store: credentials, transfer and retry knobs.

    ``storage_options`` are fsspec keyword arguments for the URL's filesystem, e.g.
    ``{"endpoint_url": ..., "key": ..., "secret": ...}`` for S3 or ``{"token": ...}`` for GCS.
    """

    storage_options: Mapping[str, Any] = field(default_factory=dict)
    upload: UploadConfig = field(default_factory=UploadConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.storage_options, Mapping):
            raise TypeError(
                f"storage_options must be a mapping, got {type(self.storage_options).__name__}"
            )
        _instance("upload", self.upload, UploadConfig)
        _instance("download", self.download, DownloadConfig)
        _instance("retry", self.retry, RetryConfig)


@dataclass(frozen=True)
class CheckpointWriterConfig:
    """Options of :class:`cloudckpt.CheckpointWriter` (upstream's, plus commit policy).

    Attributes:
        write_barrier_timeout_secs: how long a rank waits for the others at the commit barrier.
        overwrite: replace a committed checkpoint already at the path (default: refuse).
        commit_timeout_secs: multi-rank saves: how long a rank whose part is durable waits
            for the other ranks' outcome (and for rank 0's commit) before failing the save.
        poll_interval_secs: how often a waiting rank looks at the store for that outcome.
    """

    write_barrier_timeout_secs: int = 600
    overwrite: bool = False
    commit_timeout_secs: float = 300.0
    poll_interval_secs: float = 0.1

    def __post_init__(self) -> None:
        _positive("write_barrier_timeout_secs", self.write_barrier_timeout_secs)
        _flag("overwrite", self.overwrite)
        _positive("commit_timeout_secs", self.commit_timeout_secs)
        _positive("poll_interval_secs", self.poll_interval_secs)


@dataclass(frozen=True)
class CheckpointReaderConfig:
    """Options of :class:`cloudckpt.CheckpointReader`.

    Attributes:
        allow_unmanifested: also read checkpoints without a manifest (written by upstream
            torch), through a slower whole-object path.
        weights_only: unpickle with torch's weights-only allow-list, as ``torch.load`` does by
            default. Turn off only for checkpoints from a trusted source that hold other
            Python objects (unpickling can run arbitrary code).
    """

    allow_unmanifested: bool = False
    weights_only: bool = True

    def __post_init__(self) -> None:
        _flag("allow_unmanifested", self.allow_unmanifested)
        _flag("weights_only", self.weights_only)


@dataclass(frozen=True)
class CheckpointerConfig:
    """All options of a checkpointer: upstream's component configs plus storage.

    Example::

        CheckpointerConfig(
            storage_options={"endpoint_url": "http://127.0.0.1:8333", "key": "K", "secret": "S"},
            upload_config=UploadConfig(part_size_bytes=64 * MiB, max_concurrency=16),
        )
    """

    writer_config: CheckpointWriterConfig = field(default_factory=CheckpointWriterConfig)
    reader_config: CheckpointReaderConfig = field(default_factory=CheckpointReaderConfig)
    barrier_config: BarrierConfig = field(default_factory=BarrierConfig)
    staging_config: CheckpointStagerConfig = field(default_factory=default_staging_config)
    process_config: CheckpointProcessConfig = field(default_factory=CheckpointProcessConfig)
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    upload_config: UploadConfig = field(default_factory=UploadConfig)
    download_config: DownloadConfig = field(default_factory=DownloadConfig)
    retry_config: RetryConfig = field(default_factory=RetryConfig)

    def __post_init__(self) -> None:
        # Before storage_config(): dict() would accept a list of pairs and fail on other
        # types with a message that does not name the field.
        if not isinstance(self.storage_options, Mapping):
            raise TypeError(
                f"storage_options must be a mapping, got {type(self.storage_options).__name__}"
            )
        for name, cls in (
            ("writer_config", CheckpointWriterConfig),
            ("reader_config", CheckpointReaderConfig),
            ("barrier_config", BarrierConfig),
            ("staging_config", CheckpointStagerConfig),
            ("process_config", CheckpointProcessConfig),
            ("upload_config", UploadConfig),
            ("download_config", DownloadConfig),
            ("retry_config", RetryConfig),
        ):
            _instance(name, getattr(self, name), cls)
        self.storage_config()

    def storage_config(self) -> StorageConfig:
        """The storage part of this config, as one picklable object for writer and reader."""
        return StorageConfig(
            storage_options=dict(self.storage_options),
            upload=self.upload_config,
            download=self.download_config,
            retry=self.retry_config,
        )
