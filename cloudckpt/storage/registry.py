"""URL scheme -> storage backend, imported lazily, with an install hint when a client is missing."""

from __future__ import annotations

import importlib
import os
from urllib.parse import urlsplit

from ..config import StorageConfig
from ..errors import UnsupportedURLError
from .base import Storage

# scheme -> (module, class, pip requirement that provides its client)
_BACKENDS: dict[str, tuple[str, str, str]] = {
    "s3": ("cloudckpt.storage.s3", "S3Storage", "boto3"),
    "s3a": ("cloudckpt.storage.s3", "S3Storage", "boto3"),
    "gs": ("cloudckpt.storage.gcs", "GCSStorage", "gcsfs"),
    "gcs": ("cloudckpt.storage.gcs", "GCSStorage", "gcsfs"),
    "file": ("cloudckpt.storage.local", "LocalStorage", ""),
    "memory": ("cloudckpt.storage.fsspec_generic", "FsspecStorage", "fsspec"),
}


def split_url(url: str) -> tuple[str, str]:
    """``(scheme, rest)``; plain paths are ``("file", absolute_path)``."""
    if not isinstance(url, str | os.PathLike):
        raise TypeError(f"checkpoint path must be a str or os.PathLike, got {type(url).__name__}")
    url = os.fspath(url)
    if not url:
        raise UnsupportedURLError("empty checkpoint path", hint="pass s3://bucket/prefix or a dir")
    if "://" not in url:  # a local path, even with a colon in a name ("my:dir")
        head, sep, tail = url.partition(":")
        if sep and head.lower() in _BACKENDS and tail.startswith("/"):
            raise UnsupportedURLError(
                f"malformed URL {url!r}",
                url=url,
                hint=f"write {head}://{tail.lstrip('/')} (two slashes); a local path starting "
                f"with '{head}:' can be given as ./{url}",
            )
        return "file", os.path.abspath(url)
    scheme = urlsplit(url).scheme.lower()
    if not scheme or not url.lower().startswith(f"{scheme}://"):
        raise UnsupportedURLError(
            f"malformed URL {url!r}", url=url, hint="write it as scheme://bucket/prefix"
        )
    rest = url[len(scheme) + 3 :]
    if scheme in _BUCKET_SCHEMES:
        segments = rest.rstrip("/").split("/")
        if not segments[0]:
            raise UnsupportedURLError(
                f"URL {url!r} names no bucket", url=url, hint=f"write {scheme}://bucket/prefix"
            )
        if any(seg in (".", "..") for seg in segments[1:]):
            raise UnsupportedURLError(
                f"URL {url!r} has '.' or '..' segments, which object stores keep literally",
                url=url,
                hint="write the resolved path",
            )
    if scheme == "file":
        if not rest.startswith("/"):
            raise UnsupportedURLError(
                f"file URL {url!r} has a host part or a relative path",
                url=url,
                hint="use file:///absolute/path or a plain path",
            )
        return "file", os.path.abspath(rest)
    return scheme, rest


def normalize_url(url: str) -> str:
    """Canonical form: ``scheme://rest`` without trailing slash; local paths become absolute."""
    scheme, rest = split_url(url)
    if scheme == "file":
        return rest
    return f"{scheme}://{rest.rstrip('/')}"


def join_url(base: str, *names: str) -> str:
    """Join path components with ``/`` (URLs and POSIX paths alike); empty names are skipped."""
    out = base.rstrip("/")
    for name in names:
        if name.strip("/"):
            out = f"{out}/{name.strip('/')}"
    return out


# Schemes whose URLs start with a bucket name.
_BUCKET_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs"})

# Schemes whose data lives inside one process (an async writer subprocess cannot share it).
_PROCESS_LOCAL_SCHEMES = frozenset({"memory"})


def is_process_local(url: str) -> bool:
    """Whether ``url``'s store is private to the process that writes it (``memory://``)."""
    return split_url(url)[0] in _PROCESS_LOCAL_SCHEMES


def get_storage(url: str, config: StorageConfig | None = None) -> Storage:
    """The backend serving ``url``, configured by ``config`` (default: anonymous defaults)."""
    scheme, _ = split_url(url)
    try:
        module_name, class_name, requirement = _BACKENDS[scheme]
    except KeyError:
        raise UnsupportedURLError(
            f"unsupported URL scheme {scheme!r} in {url!r}",
            url=url,
            hint=f"use one of {sorted(set(_BACKENDS))} or a local path",
        ) from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UnsupportedURLError(
            f"the client for {scheme}:// URLs is not installed ({e})",
            url=url,
            hint=f"pip install {requirement}",
        ) from e
    backend_cls: type[Storage] = getattr(module, class_name)
    return backend_cls(config or StorageConfig())
