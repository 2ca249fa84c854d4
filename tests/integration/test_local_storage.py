"""LocalStorage against a real directory: atomic uploads, exclusive puts, pinned reads."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudckpt.config import StorageConfig
from cloudckpt.errors import (
    CommitConflictError,
    NotFoundError,
    ObjectChangedError,
    PermissionDeniedError,
    PreconditionFailedError,
    StorageError,
    UnsupportedURLError,
)
from cloudckpt.storage.base import Upload
from cloudckpt.storage.local import LocalStorage, is_temp_name
from cloudckpt.storage.registry import get_storage

KiB, MiB = 1 << 10, 1 << 20
SIZES = [0, 1, 256 * KiB - 1, 256 * KiB, 5 * MiB + 3, 12 * MiB]
# Uneven write sizes, cycled: odd lengths that never line up with any buffer boundary.
WRITE_PATTERN = [1, 7, 4093, 65_537, MiB + 5, 3 * MiB - 1]


def payload(size: int) -> bytes:
    """Random bytes: no period, so data at a wrong offset can never compare equal."""
    return os.urandom(size)


def write_unevenly(upload: Upload, data: bytes) -> None:
    view = memoryview(data)
    pos, i = 0, 0
    while pos < len(view):
        n = WRITE_PATTERN[i % len(WRITE_PATTERN)]
        assert upload.write(view[pos : pos + n]) == len(view[pos : pos + n])
        pos += n
        i += 1
    assert upload.bytes_written == len(data) == upload.tell()


@pytest.fixture
def storage() -> Iterator[LocalStorage]:
    s = get_storage("/", StorageConfig())
    assert isinstance(s, LocalStorage)
    yield s
    s.close()


@pytest.fixture(params=["plain", "file-url"])
def base(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh directory, spelled as a plain path or as a file:// URL."""
    root = str(tmp_path / "ckpt")
    return root if request.param == "plain" else f"file://{root}"


def visible_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*"))


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_uneven_writes(storage: LocalStorage, base: str, size: int) -> None:
    url = f"{base}/rank-0/data.bin"
    data = payload(size)
    upload = storage.open_upload(url, size_hint_bytes=size)
    write_unevenly(upload, data)
    info = upload.commit()
    assert info.size_bytes == size
    assert info.url == url
    assert storage.get_bytes(url) == data
    head = storage.head(url)
    assert (head.size_bytes, head.version) == (size, info.version)
    assert [i.url for i in storage.list(base)] == [url]


def test_upload_is_invisible_until_commit(storage: LocalStorage, tmp_path: Path) -> None:
    url = str(tmp_path / "deep" / "er" / "obj")  # parents do not exist yet: created
    upload = storage.open_upload(url)
    upload.write(b"x" * 1000)
    assert not os.path.exists(url)
    temps = os.listdir(tmp_path / "deep" / "er")
    assert len(temps) == 1 and is_temp_name(temps[0]) and temps[0].startswith(".obj.tmp-")
    assert storage.list(str(tmp_path)) == []  # temp files are never listed
    with pytest.raises(NotFoundError):
        storage.head(url)
    upload.commit()
    assert os.listdir(tmp_path / "deep" / "er") == ["obj"]


def test_abort_leaves_nothing_and_keeps_previous(storage: LocalStorage, tmp_path: Path) -> None:
    fresh, existing = str(tmp_path / "fresh"), str(tmp_path / "existing")
    storage.put_bytes(existing, b"previous")
    before = storage.head(existing)
    for url in (fresh, existing):
        upload = storage.open_upload(url)
        upload.write(payload(3 * MiB))
        upload.abort()
        upload.abort()  # idempotent
        with pytest.raises(ValueError, match="aborted"):
            upload.write(b"more")
    with pytest.raises(NotFoundError):
        storage.head(fresh)
    assert storage.get_bytes(existing) == b"previous"
    assert storage.head(existing) == before
    assert visible_names(tmp_path) == ["existing"]  # no temp file left behind


def test_abort_after_commit_is_a_no_op(storage: LocalStorage, tmp_path: Path) -> None:
    url = str(tmp_path / "obj")
    upload = storage.open_upload(url)
    upload.write(b"data")
    upload.commit()
    upload.abort()
    assert storage.get_bytes(url) == b"data"


def test_put_if_absent_conflict(storage: LocalStorage, base: str, tmp_path: Path) -> None:
    url = f"{base}/manifest.json"
    info = storage.put_bytes(url, b"first", if_absent=True)
    assert info.size_bytes == 5
    with pytest.raises(CommitConflictError) as excinfo:
        storage.put_bytes(url, b"second", if_absent=True)
    assert isinstance(excinfo.value, PreconditionFailedError)
    assert url in str(excinfo.value)
    assert storage.get_bytes(url) == b"first"
    storage.put_bytes(url, b"third")  # unconditional overwrite
    assert storage.get_bytes(url) == b"third"
    assert visible_names(tmp_path) == ["ckpt", "manifest.json"]


@pytest.mark.parametrize(
    ("offset", "length"),
    [(0, 100), (MiB, 4096), (3 * MiB - 100, 100), (256 * KiB - 10, 20), (0, 3 * MiB)],
    ids=["start", "middle", "end", "crossing", "whole"],
)
def test_read_into_ranges(storage: LocalStorage, tmp_path: Path, offset: int, length: int) -> None:
    url = str(tmp_path / "obj")
    data = payload(3 * MiB)
    storage.put_bytes(url, data)
    buf = bytearray(length)
    storage.read_into(url, offset, memoryview(buf))
    assert buf == data[offset : offset + length]
    assert storage.get_bytes(url, offset, offset + length) == data[offset : offset + length]


def test_read_into_many_scatters(storage: LocalStorage, tmp_path: Path) -> None:
    url = str(tmp_path / "obj")
    data = payload(MiB)
    storage.put_bytes(url, data)
    a, b = bytearray(10), bytearray(1000)
    storage.read_into_many(url, 5, [memoryview(a), 90, memoryview(b)])
    assert a == data[5:15] and b == data[105:1105]


def test_short_read_names_the_url(storage: LocalStorage, tmp_path: Path) -> None:
    url = str(tmp_path / "obj")
    storage.put_bytes(url, b"0123456789")
    with pytest.raises(StorageError, match="short read") as excinfo:
        storage.read_into(url, 5, memoryview(bytearray(10)))
    assert not isinstance(excinfo.value, ObjectChangedError)
    assert excinfo.value.url == url


def test_version_pinning_detects_overwrite(storage: LocalStorage, tmp_path: Path) -> None:
    url = str(tmp_path / "obj")
    storage.put_bytes(url, b"A" * 100)
    version = storage.head(url).version
    buf = bytearray(10)
    storage.read_into(url, 0, memoryview(buf), version=version)
    # Same size, written right away: only a fine-grained mtime tells the versions apart.
    storage.put_bytes(url, b"B" * 100)
    assert storage.head(url).version != version
    with pytest.raises(ObjectChangedError):
        storage.read_into(url, 0, memoryview(buf), version=version)
    with pytest.raises(ObjectChangedError):
        storage.get_bytes(url, version=version)
    upload = storage.open_upload(url)
    upload.write(b"C" * 100)
    committed = upload.commit()
    assert committed.version == storage.head(url).version
    assert storage.get_bytes(url, version=committed.version) == b"C" * 100


def test_head_list_delete(storage: LocalStorage, base: str) -> None:
    urls = [f"{base}/step-1/b", f"{base}/step-1/a", f"{base}/step-1/sub/c"]
    for i, url in enumerate(urls):
        storage.put_bytes(url, b"x" * i)
    storage.put_bytes(f"{base}/step-10/other", b"not under step-1")
    listed = storage.list(f"{base}/step-1")
    assert [i.url for i in listed] == sorted(urls)
    assert [i.size_bytes for i in listed] == [1, 0, 2]
    assert storage.list(f"{base}/step-1/") == listed
    assert storage.list(f"{base}/no-such-dir") == []
    assert storage.exists(urls[0])
    storage.delete([urls[0], urls[2], f"{base}/step-1/never-existed"])
    assert [i.url for i in storage.list(f"{base}/step-1")] == [urls[1]]
    assert not storage.exists(urls[0])


def test_missing_object(storage: LocalStorage, tmp_path: Path) -> None:
    url = str(tmp_path / "missing")
    for call in (
        lambda: storage.head(url),
        lambda: storage.get_bytes(url),
        lambda: storage.read_into(url, 0, memoryview(bytearray(1))),
    ):
        with pytest.raises(NotFoundError) as excinfo:
            call()
        assert isinstance(excinfo.value, FileNotFoundError)
        assert url in str(excinfo.value)
    with pytest.raises(NotFoundError):
        storage.head(str(tmp_path))  # a directory is not an object


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_permission_denied(storage: LocalStorage, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(PermissionDeniedError) as excinfo:
        storage.open_upload(str(locked / "obj"))
    assert isinstance(excinfo.value, PermissionError)
    with pytest.raises(PermissionDeniedError):
        storage.put_bytes(str(locked / "obj"), b"x")


def test_eacces_is_permission_denied(
    storage: LocalStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The translation itself, also when running as root (where chmod cannot deny access)."""

    def denied(*args: object, **kwargs: object) -> int:
        raise PermissionError(errno.EACCES, "Permission denied", args[0])

    with monkeypatch.context() as m:
        m.setattr("cloudckpt.storage.local.os.open", denied)
        with pytest.raises(PermissionDeniedError) as excinfo:
            storage.open_upload(str(tmp_path / "obj"))
    assert isinstance(excinfo.value, PermissionError)
    assert isinstance(excinfo.value.__cause__, PermissionError)


def test_rejects_foreign_urls(storage: LocalStorage) -> None:
    with pytest.raises(UnsupportedURLError):
        storage.head("s3://bucket/key")
    with pytest.raises(UnsupportedURLError):
        storage.head("file://host/relative")
