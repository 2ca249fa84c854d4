"""cloudckpt.config: frozen, validated, picklable configuration."""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import pytest
import torch

from cloudckpt import config as config_module
from cloudckpt.config import (
    S3_MAX_PART_SIZE_BYTES,
    S3_MAX_UPLOAD_PARTS,
    S3_MIN_PART_SIZE_BYTES,
    CheckpointerConfig,
    CheckpointReaderConfig,
    CheckpointWriterConfig,
    DownloadConfig,
    GiB,
    MiB,
    RetryConfig,
    StorageConfig,
    UploadConfig,
    default_staging_config,
    default_upload_concurrency,
)

CONFIG_CLASSES = [
    UploadConfig,
    DownloadConfig,
    RetryConfig,
    StorageConfig,
    CheckpointWriterConfig,
    CheckpointReaderConfig,
    CheckpointerConfig,
]


def test_units_and_s3_limits() -> None:
    assert MiB == 1024 * 1024
    assert GiB == 1024 * MiB
    assert 5 * MiB == S3_MIN_PART_SIZE_BYTES
    assert 5 * GiB == S3_MAX_PART_SIZE_BYTES
    assert S3_MAX_UPLOAD_PARTS == 10_000


# --- validation ----------------------------------------------------------------------------

INVALID: list[tuple[type, dict[str, Any], type[Exception], str]] = [
    (UploadConfig, {"part_size_bytes": S3_MIN_PART_SIZE_BYTES - 1}, ValueError, "part_size_bytes"),
    (UploadConfig, {"part_size_bytes": S3_MAX_PART_SIZE_BYTES + 1}, ValueError, "part_size_bytes"),
    (UploadConfig, {"part_size_bytes": 0}, ValueError, "part_size_bytes"),
    (UploadConfig, {"max_concurrency": 0}, ValueError, "max_concurrency"),
    (UploadConfig, {"max_concurrency": -3}, ValueError, "max_concurrency"),
    (DownloadConfig, {"range_size_bytes": 0}, ValueError, "range_size_bytes"),
    (DownloadConfig, {"range_size_bytes": -1}, ValueError, "range_size_bytes"),
    (DownloadConfig, {"max_concurrency": 0}, ValueError, "max_concurrency"),
    (DownloadConfig, {"coalesce_gap_bytes": -1}, ValueError, "coalesce_gap_bytes"),
    (RetryConfig, {"max_attempts": 0}, ValueError, "max_attempts"),
    (RetryConfig, {"max_attempts": -1}, ValueError, "max_attempts"),
    (RetryConfig, {"initial_backoff_secs": -0.1}, ValueError, "initial_backoff_secs"),
    (RetryConfig, {"max_backoff_secs": -1.0}, ValueError, "max_backoff_secs"),
    (RetryConfig, {"deadline_secs": 0}, ValueError, "deadline_secs"),
    (RetryConfig, {"deadline_secs": -5.0}, ValueError, "deadline_secs"),
    (RetryConfig, {"request_timeout_secs": 0}, ValueError, "request_timeout_secs"),
    (StorageConfig, {"storage_options": [("key", "K")]}, TypeError, "storage_options"),
    (StorageConfig, {"storage_options": "key=K"}, TypeError, "storage_options"),
    (StorageConfig, {"storage_options": None}, TypeError, "storage_options"),
    (
        CheckpointWriterConfig,
        {"write_barrier_timeout_secs": 0},
        ValueError,
        "write_barrier_timeout_secs",
    ),
    (CheckpointerConfig, {"storage_options": [("key", "K")]}, TypeError, "storage_options"),
    (CheckpointerConfig, {"storage_options": "key=K"}, TypeError, "storage_options"),
    (CheckpointerConfig, {"storage_options": 5}, TypeError, "storage_options"),
    (CheckpointerConfig, {"storage_options": None}, TypeError, "storage_options"),
]


@pytest.mark.parametrize(
    ("cls", "kwargs", "error", "field_name"),
    INVALID,
    ids=[f"{c.__name__}-{next(iter(kw))}={next(iter(kw.values()))!r}" for c, kw, _, _ in INVALID],
)
def test_invalid_values_are_refused_naming_the_field(
    cls: type, kwargs: dict[str, Any], error: type[Exception], field_name: str
) -> None:
    with pytest.raises(error, match=field_name):
        cls(**kwargs)


def _unit_fields() -> list[tuple[type, str]]:
    """Every numeric field with a unit or a count in its name, on every config class."""
    out = []
    for cls in CONFIG_CLASSES:
        for f in dataclasses.fields(cls):
            if f.name.endswith(("_bytes", "_secs", "_concurrency", "_attempts")):
                out.append((cls, f.name))
    return out


@pytest.mark.parametrize(
    ("cls", "field_name"), _unit_fields(), ids=[f"{c.__name__}.{n}" for c, n in _unit_fields()]
)
def test_every_negative_size_time_or_count_is_refused(cls: type, field_name: str) -> None:
    with pytest.raises(ValueError, match=field_name):
        cls(**{field_name: -1})


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (UploadConfig, {"part_size_bytes": S3_MIN_PART_SIZE_BYTES}),
        (UploadConfig, {"part_size_bytes": S3_MAX_PART_SIZE_BYTES}),
        (UploadConfig, {"max_concurrency": 1}),
        (DownloadConfig, {"range_size_bytes": 1, "coalesce_gap_bytes": 0, "max_concurrency": 1}),
        (RetryConfig, {"max_attempts": 1}),
        (RetryConfig, {"initial_backoff_secs": 0, "max_backoff_secs": 0}),
        (RetryConfig, {"deadline_secs": None}),
        (StorageConfig, {"storage_options": {}}),
        (CheckpointWriterConfig, {"write_barrier_timeout_secs": 1, "overwrite": True}),
        (CheckpointReaderConfig, {"allow_unmanifested": True}),
    ],
)
def test_boundary_values_are_accepted(cls: type, kwargs: dict[str, Any]) -> None:
    cfg = cls(**kwargs)
    for name, value in kwargs.items():
        assert getattr(cfg, name) == value


def test_defaults() -> None:
    up, down, retry = UploadConfig(), DownloadConfig(), RetryConfig()
    assert (up.part_size_bytes, up.send_checksums) == (32 * MiB, True)
    assert up.max_concurrency == default_upload_concurrency()
    assert down.range_size_bytes == 32 * MiB
    assert down.coalesce_gap_bytes == 1 * MiB
    assert down.verify_checksums is True
    assert retry.max_attempts == 6
    assert retry.deadline_secs == 300.0
    assert CheckpointWriterConfig().overwrite is False
    assert CheckpointReaderConfig().allow_unmanifested is False


# --- no shared mutable defaults ------------------------------------------------------------


def test_default_instances_are_independent() -> None:
    a, b = CheckpointerConfig(), CheckpointerConfig()
    assert a.storage_options == b.storage_options == {}
    assert a.storage_options is not b.storage_options
    assert a.barrier_config.barrier_args is not b.barrier_config.barrier_args
    a.storage_options["endpoint_url"] = "http://x"  # type: ignore[index]
    assert b.storage_options == {}
    assert CheckpointerConfig().storage_options == {}

    s1, s2 = StorageConfig(), StorageConfig()
    assert s1.storage_options is not s2.storage_options


def test_storage_config_copies_options() -> None:
    options = {"endpoint_url": "http://127.0.0.1:9000", "key": "K", "secret": "S"}
    cfg = CheckpointerConfig(storage_options=options)
    storage = cfg.storage_config()
    assert storage.storage_options == options
    assert storage.storage_options is not options
    assert cfg.storage_config().storage_options is not storage.storage_options


# --- frozen and picklable ------------------------------------------------------------------


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda c: c.__name__)
def test_configs_are_frozen(cls: type) -> None:
    cfg = cls()
    name = dataclasses.fields(cls)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cfg, name, getattr(cfg, name))


def _custom_checkpointer_config() -> CheckpointerConfig:
    return CheckpointerConfig(
        writer_config=CheckpointWriterConfig(write_barrier_timeout_secs=30, overwrite=True),
        reader_config=CheckpointReaderConfig(allow_unmanifested=True),
        storage_options={"endpoint_url": "http://127.0.0.1:8333", "key": "K", "secret": "S"},
        upload_config=UploadConfig(part_size_bytes=64 * MiB, max_concurrency=16),
        download_config=DownloadConfig(range_size_bytes=8 * MiB, coalesce_gap_bytes=0),
        retry_config=RetryConfig(max_attempts=3, deadline_secs=None),
    )


@pytest.mark.parametrize(
    "cfg",
    [
        UploadConfig(part_size_bytes=6 * MiB, max_concurrency=2, send_checksums=False),
        DownloadConfig(range_size_bytes=4096, max_concurrency=3, verify_checksums=False),
        RetryConfig(max_attempts=2, initial_backoff_secs=0.0, deadline_secs=None),
        StorageConfig(storage_options={"token": "anon"}, retry=RetryConfig(max_attempts=1)),
        CheckpointWriterConfig(overwrite=True),
        CheckpointReaderConfig(allow_unmanifested=True),
        CheckpointerConfig(),
        _custom_checkpointer_config(),
    ],
    ids=lambda c: type(c).__name__,
)
def test_configs_pickle_round_trip(cfg: Any) -> None:
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        copy = pickle.loads(pickle.dumps(cfg, protocol=protocol))
        assert copy == cfg
        assert type(copy) is type(cfg)


def test_storage_config_carries_the_fields() -> None:
    cfg = _custom_checkpointer_config()
    storage = cfg.storage_config()
    assert isinstance(storage, StorageConfig)
    assert dict(storage.storage_options) == {
        "endpoint_url": "http://127.0.0.1:8333",
        "key": "K",
        "secret": "S",
    }
    assert storage.upload is cfg.upload_config
    assert storage.download is cfg.download_config
    assert storage.retry is cfg.retry_config
    assert storage.upload.part_size_bytes == 64 * MiB
    assert storage.retry.deadline_secs is None
    assert pickle.loads(pickle.dumps(storage)) == storage


# --- staging defaults ----------------------------------------------------------------------


def test_default_staging_config_on_this_cpu_host() -> None:
    if torch.accelerator.is_available():
        pytest.skip("this host has an accelerator")
    staging = default_staging_config()
    assert staging.use_pinned_memory is False
    assert staging.use_non_blocking_copy is False
    assert staging.use_shared_memory is True
    assert staging.use_async_staging is True
    assert CheckpointerConfig().staging_config == staging


@pytest.mark.parametrize("available", [False, True])
def test_default_staging_config_follows_the_accelerator(
    monkeypatch: pytest.MonkeyPatch, available: bool
) -> None:
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: available)
    staging = default_staging_config()
    assert staging.use_pinned_memory is available
    assert staging.use_non_blocking_copy is available
    assert staging.use_shared_memory is True
    assert staging.use_async_staging is True
    assert CheckpointerConfig().staging_config.use_pinned_memory is available


def test_module_exports_no_mutable_singletons() -> None:
    """No module-level config instance that a default argument could share."""
    for name, value in vars(config_module).items():
        assert not isinstance(value, tuple(CONFIG_CLASSES)), name


@pytest.mark.parametrize(
    ("cpus", "local_ranks", "expected"),
    [
        (2, 1, 8),  # a lone rank keeps the full 8 streams
        (2, 4, 2),  # 4 ranks on 2 cores share 8 streams
        (2, 2, 4),
        (1, 1, 4),
        (1, 8, 2),  # never below 2
        (96, 8, 8),  # big hosts: capped at 8 per rank
        (16, 8, 8),
        (8, 8, 4),
    ],
)
def test_default_upload_concurrency_splits_the_host_among_local_ranks(
    cpus: int, local_ranks: int, expected: int
) -> None:
    assert default_upload_concurrency(cpus, local_ranks) == expected


def test_default_upload_concurrency_reads_torchrun_local_world_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_upload_concurrency(2) == 2
    assert UploadConfig().max_concurrency == default_upload_concurrency()
    assert UploadConfig(max_concurrency=6).max_concurrency == 6  # explicit wins
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "four")
    assert default_upload_concurrency(2) == 8  # unreadable: sized for one rank
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert default_upload_concurrency(2) == 8
