"""FsspecStorage over fsspec's in-process memory filesystem (and its deferred-commit path)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from cloudckpt.config import StorageConfig
from cloudckpt.errors import (
    CommitConflictError,
    NotFoundError,
    ObjectChangedError,
    PreconditionFailedError,
    StorageError,
)
from cloudckpt.storage.base import Upload
from cloudckpt.storage.fsspec_generic import FsspecStorage
from cloudckpt.storage.registry import get_storage

KiB, MiB = 1 << 10, 1 << 20
SIZES = [0, 1, 256 * KiB - 1, 256 * KiB, 5 * MiB + 3, 12 * MiB]
WRITE_PATTERN = [1, 7, 4093, 65_537, MiB + 5, 3 * MiB - 1]


def write_unevenly(upload: Upload, data: bytes) -> None:
    view = memoryview(data)
    pos, i = 0, 0
    while pos < len(view):
        n = WRITE_PATTERN[i % len(WRITE_PATTERN)]
        upload.write(view[pos : pos + n])
        pos += n
        i += 1
    assert upload.bytes_written == len(data)


@pytest.fixture
def storage() -> Iterator[FsspecStorage]:
    s = get_storage("memory://x", StorageConfig())
    assert isinstance(s, FsspecStorage)
    yield s
    s.close()


@pytest.fixture
def base(unique_prefix: str) -> Iterator[str]:
    """A fresh prefix in the (process-global) memory filesystem, removed afterwards."""
    url = f"memory://cloudckpt-tests/{unique_prefix}"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_uneven_writes(storage: FsspecStorage, base: str, size: int) -> None:
    url = f"{base}/rank-0/data.bin"
    data = os.urandom(size)
    upload = storage.open_upload(url)
    write_unevenly(upload, data)
    info = upload.commit()
    assert (info.url, info.size_bytes) == (url, size)
    assert storage.get_bytes(url) == data
    assert storage.head(url).version == info.version
    assert [i.url for i in storage.list(base)] == [url]


def test_upload_is_invisible_until_commit(storage: FsspecStorage, base: str) -> None:
    url = f"{base}/obj"
    upload = storage.open_upload(url)
    upload.write(b"x" * 1000)
    assert not fsspec.filesystem("memory").exists(url)
    assert storage.list(base) == []
    with pytest.raises(NotFoundError):
        storage.head(url)
    upload.commit()
    assert storage.get_bytes(url) == b"x" * 1000


def test_abort_leaves_nothing_and_keeps_previous(storage: FsspecStorage, base: str) -> None:
    fresh, existing = f"{base}/fresh", f"{base}/existing"
    storage.put_bytes(existing, b"previous")
    before = storage.head(existing)
    for url in (fresh, existing):
        upload = storage.open_upload(url)
        upload.write(os.urandom(MiB))
        upload.abort()
        upload.abort()  # idempotent
        with pytest.raises(ValueError, match="aborted"):
            upload.commit()
    with pytest.raises(NotFoundError):
        storage.head(fresh)
    assert storage.get_bytes(existing) == b"previous"
    assert storage.head(existing) == before
    assert [i.url for i in storage.list(base)] == [existing]


def test_put_if_absent_conflict(storage: FsspecStorage, base: str) -> None:
    url = f"{base}/manifest.json"
    storage.put_bytes(url, b"first", if_absent=True)
    with pytest.raises(CommitConflictError) as excinfo:
        storage.put_bytes(url, b"second", if_absent=True)
    assert isinstance(excinfo.value, PreconditionFailedError)
    assert storage.get_bytes(url) == b"first"
    storage.put_bytes(url, b"third")
    assert storage.get_bytes(url) == b"third"


def test_put_if_absent_has_one_winner(storage: FsspecStorage, base: str) -> None:
    url = f"{base}/manifest.json"
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def contend(i: int) -> None:
        barrier.wait()
        try:
            storage.put_bytes(url, f"writer-{i}".encode(), if_absent=True)
            outcomes.append(f"won-{i}")
        except CommitConflictError:
            outcomes.append("conflict")

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if o.startswith("won-")]
    assert len(winners) == 1 and outcomes.count("conflict") == 7
    assert storage.get_bytes(url) == f"writer-{winners[0][4:]}".encode()


@pytest.mark.parametrize(
    ("offset", "length"),
    [(0, 100), (MiB, 4096), (3 * MiB - 100, 100), (256 * KiB - 10, 20), (0, 3 * MiB)],
    ids=["start", "middle", "end", "crossing", "whole"],
)
def test_read_into_ranges(storage: FsspecStorage, base: str, offset: int, length: int) -> None:
    url = f"{base}/obj"
    data = os.urandom(3 * MiB)
    storage.put_bytes(url, data)
    buf = bytearray(length)
    storage.read_into(url, offset, memoryview(buf))
    assert buf == data[offset : offset + length]
    assert storage.get_bytes(url, offset, offset + length) == data[offset : offset + length]


def test_read_into_many_and_short_reads(storage: FsspecStorage, base: str) -> None:
    url = f"{base}/obj"
    data = os.urandom(10_000)
    storage.put_bytes(url, data)
    a, b = bytearray(10), bytearray(1000)
    storage.read_into_many(url, 5, [memoryview(a), 90, memoryview(b)])
    assert a == data[5:15] and b == data[105:1105]
    with pytest.raises(StorageError, match="short read") as excinfo:
        storage.read_into(url, 9_990, memoryview(bytearray(20)))
    assert not isinstance(excinfo.value, ObjectChangedError)


def test_version_pinning_detects_overwrite(storage: FsspecStorage, base: str) -> None:
    url = f"{base}/obj"
    storage.put_bytes(url, b"A" * 100)
    version = storage.head(url).version
    buf = bytearray(10)
    storage.read_into(url, 0, memoryview(buf), version=version)
    storage.put_bytes(url, b"B" * 100)  # same size: only the version tells them apart
    with pytest.raises(ObjectChangedError):
        storage.read_into(url, 0, memoryview(buf), version=version)
    with pytest.raises(ObjectChangedError):
        storage.get_bytes(url, version=version)
    assert buf == b"A" * 10


def test_head_list_delete(storage: FsspecStorage, base: str) -> None:
    urls = [f"{base}/step-1/b", f"{base}/step-1/a", f"{base}/step-1/sub/c"]
    for i, url in enumerate(urls):
        storage.put_bytes(url, b"x" * i)
    storage.put_bytes(f"{base}/step-10/other", b"not under step-1")
    listed = storage.list(f"{base}/step-1")
    assert [i.url for i in listed] == sorted(urls)
    assert [i.size_bytes for i in listed] == [1, 0, 2]
    assert storage.list(f"{base}/step-1/") == listed
    assert storage.list(f"{base}/nothing-here") == []
    storage.delete([urls[0], urls[2], f"{base}/step-1/never-existed"])
    assert [i.url for i in storage.list(f"{base}/step-1")] == [urls[1]]
    assert not storage.exists(urls[0])


def test_missing_object(storage: FsspecStorage, base: str) -> None:
    url = f"{base}/missing"
    for call in (
        lambda: storage.head(url),
        lambda: storage.get_bytes(url),
        lambda: storage.read_into(url, 0, memoryview(bytearray(1))),
    ):
        with pytest.raises(NotFoundError) as excinfo:
            call()
        assert isinstance(excinfo.value, FileNotFoundError)
        assert url in str(excinfo.value)
    storage.put_bytes(f"{base}/dir/obj", b"x")
    with pytest.raises(NotFoundError):
        storage.head(f"{base}/dir")  # a pseudo-directory is not an object


def test_deferred_commit_filesystem(storage: FsspecStorage, tmp_path: Path) -> None:
    """A filesystem whose files honour autocommit=False streams into them instead of RAM."""
    url = f"file://{tmp_path}/obj"
    storage.put_bytes(url, b"previous")
    upload = storage.open_upload(url)
    assert type(upload).__name__ == "_DeferredCommitUpload"
    upload.write(b"new bytes")
    assert storage.get_bytes(url) == b"previous"
    upload.abort()
    assert storage.get_bytes(url) == b"previous"
    upload = storage.open_upload(url)
    upload.write(b"new bytes")
    assert upload.commit().size_bytes == 9
    assert storage.get_bytes(url) == b"new bytes"
    assert sorted(os.listdir(tmp_path)) == ["obj"]
