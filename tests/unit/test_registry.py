"""cloudckpt.storage.registry: URL parsing and scheme -> backend resolution (no I/O)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cloudckpt.config import StorageConfig
from cloudckpt.errors import UnsupportedURLError
from cloudckpt.storage.base import Storage
from cloudckpt.storage.registry import get_storage, join_url, normalize_url, split_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://bucket/prefix/step_1", ("s3", "bucket/prefix/step_1")),
        ("s3://bucket", ("s3", "bucket")),
        ("s3a://bucket/k", ("s3a", "bucket/k")),
        ("S3://Bucket/Key", ("s3", "Bucket/Key")),
        ("gs://bucket/a/b/", ("gs", "bucket/a/b/")),
        ("gcs://bucket/a", ("gcs", "bucket/a")),
        ("memory://bucket/x", ("memory", "bucket/x")),
        ("file:///x", ("file", "/x")),
        ("file:///tmp/ckpt/step_2", ("file", "/tmp/ckpt/step_2")),
        ("/abs/path/ckpt", ("file", "/abs/path/ckpt")),
        ("ftp://host/dir", ("ftp", "host/dir")),
    ],
)
def test_split_url(url: str, expected: tuple[str, str]) -> None:
    assert split_url(url) == expected


def test_split_relative_local_paths_become_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert split_url("ckpt/step_1") == ("file", str(tmp_path / "ckpt" / "step_1"))
    assert split_url("./ckpt") == ("file", str(tmp_path / "ckpt"))
    assert split_url("../up") == ("file", str(tmp_path.parent / "up"))
    assert split_url(Path("rel")) == ("file", str(tmp_path / "rel"))
    assert split_url(tmp_path / "abs") == ("file", str(tmp_path / "abs"))


def test_windows_drive_letter_is_a_local_path() -> None:
    scheme, _ = split_url("C:/checkpoints/step_1")
    assert scheme == "file"


@pytest.mark.parametrize("bad", [None, 42, b"s3://bucket/key", ["s3://b"]])
def test_split_url_rejects_non_paths(bad: object) -> None:
    with pytest.raises(TypeError, match=r"str or os\.PathLike"):
        split_url(bad)  # type: ignore[arg-type]


def test_empty_path_is_unsupported() -> None:
    with pytest.raises(UnsupportedURLError, match="empty checkpoint path") as excinfo:
        split_url("")
    assert isinstance(excinfo.value, ValueError)
    assert excinfo.value.hint


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://bucket/prefix/", "s3://bucket/prefix"),
        ("s3://bucket/prefix///", "s3://bucket/prefix"),
        ("S3://bucket/prefix", "s3://bucket/prefix"),
        ("gs://bucket/a/b", "gs://bucket/a/b"),
        ("memory://bucket/x/", "memory://bucket/x"),
        ("file:///x", "/x"),
        ("file:///x/y/", "/x/y"),
        ("/abs/path/", "/abs/path"),
        ("/abs/./path/../other", "/abs/other"),
    ],
)
def test_normalize_url(url: str, expected: str) -> None:
    assert normalize_url(url) == expected
    assert normalize_url(normalize_url(url)) == expected  # idempotent


def test_normalize_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert normalize_url("ckpt/step_1/") == str(tmp_path / "ckpt" / "step_1")
    assert os.path.isabs(normalize_url("x"))


@pytest.mark.parametrize(
    ("base", "names", "expected"),
    [
        ("s3://bucket/run", ("checkpoint_0.pt",), "s3://bucket/run/checkpoint_0.pt"),
        ("s3://bucket/run/", ("checkpoint_0.pt",), "s3://bucket/run/checkpoint_0.pt"),
        ("gs://b/run", (".cloudckpt", "rank_3.json"), "gs://b/run/.cloudckpt/rank_3.json"),
        ("gs://b/run", ("/nested/", "x"), "gs://b/run/nested/x"),
        ("memory://b", ("k",), "memory://b/k"),
        ("/tmp/ckpt", ("cloudckpt.manifest.json",), "/tmp/ckpt/cloudckpt.manifest.json"),
        ("/tmp/ckpt/", ("a", "b"), "/tmp/ckpt/a/b"),
        ("/", ("a",), "/a"),
        ("s3://bucket/run", (), "s3://bucket/run"),
    ],
)
def test_join_url(base: str, names: tuple[str, ...], expected: str) -> None:
    assert join_url(base, *names) == expected


def test_join_then_split_round_trips() -> None:
    url = join_url(normalize_url("s3://bucket/run/"), "checkpoint_1.pt")
    assert split_url(url) == ("s3", "bucket/run/checkpoint_1.pt")


@pytest.mark.parametrize(
    ("url", "scheme"),
    [
        ("ftp://x/y", "ftp"),
        ("hdfs://namenode:8020/ckpt", "hdfs"),
        ("HTTP://example.com/ckpt", "http"),
        ("az://container/blob", "az"),
    ],
)
def test_unknown_scheme_is_unsupported(url: str, scheme: str) -> None:
    with pytest.raises(UnsupportedURLError) as excinfo:
        get_storage(url)
    err = excinfo.value
    assert isinstance(err, ValueError)
    text = str(err)
    assert repr(scheme) in text
    assert url in text
    for supported in ("s3", "gs", "memory", "file"):
        assert supported in (err.hint or "")


def test_get_storage_empty_path_is_unsupported() -> None:
    with pytest.raises(UnsupportedURLError, match="empty"):
        get_storage("")


def test_get_storage_local_path_uses_the_given_config(tmp_path: Path) -> None:
    config = StorageConfig(storage_options={"auto_mkdir": True})
    storage = get_storage(str(tmp_path / "ckpt"), config)
    assert isinstance(storage, Storage)
    assert storage.config is config
    assert "file" in storage.schemes
    default = get_storage(f"file://{tmp_path}")
    assert isinstance(default.config, StorageConfig)
    assert type(default) is type(storage)
