"""Storage backends: the only package that imports fsspec, s3fs, gcsfs or boto clients."""

from .base import ObjectInfo, PendingUpload, Storage, Upload, UploadMetrics
from .registry import get_storage, is_process_local, join_url, normalize_url, split_url

__all__ = [
    "ObjectInfo",
    "PendingUpload",
    "Storage",
    "Upload",
    "UploadMetrics",
    "get_storage",
    "is_process_local",
    "join_url",
    "normalize_url",
    "split_url",
]
