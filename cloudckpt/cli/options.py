"""Argument values of the command line: storage options (flags and environment), durations,
sizes. Pure functions: no I/O, so they are cheap to test and fail before anything runs."""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import StorageConfig
from ..storage import split_url

_S3_SCHEMES = frozenset({"s3", "s3a"})
_GCS_SCHEMES = frozenset({"gs", "gcs"})
#: Prefixes that limit ``--storage-option`` to one kind of store: ``s3.endpoint_url=...``.
_SCOPES = {"s3": _S3_SCHEMES, "gs": _GCS_SCHEMES, "gcs": _GCS_SCHEMES}

_DURATION_UNITS_SECS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 1000**3,
    "gib": 1 << 30,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_option_value(text: str) -> Any:
    """JSON when it parses (``true``, ``3``, ``{"a": 1}``), else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_storage_option(text: str) -> tuple[str | None, str, Any]:
    """``[SCOPE.]KEY=VALUE`` -> ``(scope or None, key, value)``; argparse type function."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE (e.g. endpoint_url=http://127.0.0.1:9000), got {text!r}"
        )
    scope, dot, rest = key.partition(".")
    if dot and scope in _SCOPES and rest:
        return scope, rest, parse_option_value(value)
    return None, key, parse_option_value(value)


def parse_duration_secs(text: str) -> float:
    """``90s``, ``30m``, ``2h``, ``7d``, ``1w``, ``1h30m`` or bare seconds -> seconds."""
    raw = text.strip().lower()
    try:
        value = float(raw)
    except ValueError:
        pos, total = 0, 0.0
        for match in _DURATION_RE.finditer(raw):
            if match.start() != pos:
                break
            total += float(match.group(1)) * _DURATION_UNITS_SECS[match.group(2)]
            pos = match.end()
        if pos != len(raw) or not raw:
            raise argparse.ArgumentTypeError(
                f"invalid duration {text!r}: use e.g. 90s, 30m, 2h, 7d or 1h30m"
            ) from None
        return total
    if value < 0:
        raise argparse.ArgumentTypeError(f"duration must be >= 0, got {text!r}")
    return value


def parse_size_bytes(text: str) -> int:
    """``256MiB``, ``1GiB``, ``100MB``, ``512k`` or bare bytes -> bytes (K/M/G are binary)."""
    match = _SIZE_RE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use e.g. 256MiB, 1GiB, 100MB")
    size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be > 0, got {text!r}")
    return size


def parse_positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def parse_rank(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a rank number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"rank must be >= 0, got {value}")
    return value


def _env_options(
    scheme: str, explicit: Mapping[str, Any], env: Mapping[str, str]
) -> dict[str, Any]:
    """Options the usual environment variables imply for ``scheme``'s stores."""
    out: dict[str, Any] = {}
    if scheme in _S3_SCHEMES:
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        if endpoint:
            out["endpoint_url"] = endpoint
        if "profile" not in explicit and env.get("AWS_ACCESS_KEY_ID"):
            out["key"] = env["AWS_ACCESS_KEY_ID"]
            if env.get("AWS_SECRET_ACCESS_KEY"):
                out["secret"] = env["AWS_SECRET_ACCESS_KEY"]
            if env.get("AWS_SESSION_TOKEN"):
                out["token"] = env["AWS_SESSION_TOKEN"]
    elif scheme in _GCS_SCHEMES:
        emulator = env.get("STORAGE_EMULATOR_HOST")
        if emulator:
            out["endpoint_url"] = emulator if "://" in emulator else f"http://{emulator}"
            out["token"] = "anon"  # emulators take no credentials
        if env.get("GOOGLE_CLOUD_PROJECT"):
            out["project"] = env["GOOGLE_CLOUD_PROJECT"]
    return out


@dataclass(frozen=True)
class StorageOptions:
    """``--storage-option`` flags plus the environment, resolved per URL.

    Precedence, highest first: scoped flags (``s3.key=...`` / ``gs.token=...``), unscoped flags
    (``key=...``, for every remote store), then the environment: ``AWS_ENDPOINT_URL[_S3]``,
    ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` for s3://,
    ``STORAGE_EMULATOR_HOST`` (endpoint, anonymous) and ``GOOGLE_CLOUD_PROJECT`` for gs://.
    Local paths take no options.
    """

    unscoped: Mapping[str, Any] = field(default_factory=dict)
    scoped: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))

    @classmethod
    def from_flags(
        cls, flags: Iterable[tuple[str | None, str, Any]], env: Mapping[str, str] | None = None
    ) -> StorageOptions:
        unscoped: dict[str, Any] = {}
        scoped: dict[str, dict[str, Any]] = {}
        for scope, key, value in flags:
            if scope is None:
                unscoped[key] = value
            else:
                scoped.setdefault("gs" if scope == "gcs" else scope, {})[key] = value
        return cls(unscoped, scoped, dict(os.environ) if env is None else dict(env))

    def options_for(self, url: str) -> dict[str, Any]:
        """The fsspec-style storage options for ``url``'s store."""
        scheme, _ = split_url(url)
        if scheme in ("file", "memory"):
            return {}
        scope = "s3" if scheme in _S3_SCHEMES else "gs" if scheme in _GCS_SCHEMES else scheme
        explicit = {**self.unscoped, **self.scoped.get(scope, {})}
        return {**_env_options(scheme, explicit, self.env), **explicit}

    def config_for(self, url: str) -> StorageConfig:
        return StorageConfig(storage_options=self.options_for(url))
