"""cloudckpt: PyTorch checkpoints on S3, GCS and any fsspec store, with torch's experimental
checkpointer interface (``make_sync_checkpointer`` / ``make_async_checkpointer``)."""

from ._upstream import BarrierConfig, RankInfo, WriterHook
from ._upstream import UpstreamCheckpointer as Checkpointer
from ._version import __version__
from .builder import make_async_checkpointer, make_sync_checkpointer
from .checkpointer import AsyncCheckpointer, SyncCheckpointer
from .config import (
    CheckpointerConfig,
    CheckpointReaderConfig,
    CheckpointWriterConfig,
    DownloadConfig,
    RetryConfig,
    StorageConfig,
    UploadConfig,
)
from .errors import (
    BucketNotFoundError,
    CheckpointError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CloudCkptError,
    CommitConflictError,
    CorruptCheckpointError,
    NotFoundError,
    PermissionDeniedError,
    RetriesExhaustedError,
    SaveFailedError,
    StateDictMismatchError,
    StorageError,
    UnsupportedURLError,
)
from .manager import CheckpointInfo, CheckpointManager
from .reader import CheckpointReader
from .writer import CheckpointWriter, SaveMetrics

__all__ = [
    "AsyncCheckpointer",
    "BarrierConfig",
    "BucketNotFoundError",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointReader",
    "CheckpointReaderConfig",
    "CheckpointWriter",
    "CheckpointWriterConfig",
    "Checkpointer",
    "CheckpointerConfig",
    "ChecksumMismatchError",
    "CloudCkptError",
    "CommitConflictError",
    "CorruptCheckpointError",
    "DownloadConfig",
    "NotFoundError",
    "PermissionDeniedError",
    "RankInfo",
    "RetriesExhaustedError",
    "RetryConfig",
    "SaveFailedError",
    "SaveMetrics",
    "StateDictMismatchError",
    "StorageConfig",
    "StorageError",
    "SyncCheckpointer",
    "UnsupportedURLError",
    "UploadConfig",
    "WriterHook",
    "__version__",
    "make_async_checkpointer",
    "make_sync_checkpointer",
]
