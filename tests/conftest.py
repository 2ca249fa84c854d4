"""Shared fixtures: local S3/GCS servers (started lazily, once per session) and backends.

Servers start only when a test asks for them. Point tests at servers you run yourself with:

* ``CLOUDCKPT_TEST_MOTO_ENDPOINT``: an S3 that stands in for moto (e.g. ``moto_server``).
* ``CLOUDCKPT_TEST_S3_ENDPOINT``: a signature-checking S3 that stands in for SeaweedFS (MinIO
  from ``localstack/docker-compose.yml``, or ``python -m localstack up``), with credentials
  from ``CLOUDCKPT_TEST_S3_KEY`` / ``CLOUDCKPT_TEST_S3_SECRET`` (default: localstack's).
* ``CLOUDCKPT_TEST_GCS_ENDPOINT``: a GCS emulator (fake-gcs-server) that stands in for ours.

Tests never reset a server: each one writes under its own unique prefix (``backend`` fixture,
``unique_prefix``). Tests that use a server backend get its marker (moto / seaweedfs / gcs)
automatically, so ``-m "not seaweedfs"`` deselects them.
"""

from __future__ import annotations

import os

# Before anything imports gcsfs: its default experimental mode makes every call against an
# emulator take 40-110 s (see shared/README.md).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
# Never wait for the EC2 metadata service when a client looks for credentials.
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

from collections.abc import Iterator
from pathlib import Path

import pytest
from backends import (
    ALL_BACKENDS,
    BACKEND_MARKERS,
    TEST_BUCKET,
    Backend,
    make_unique_prefix,
)

from localstack.servers import (
    DEFAULT_ACCESS_KEY,
    DEFAULT_SECRET_KEY,
    ExternalGCSServer,
    ExternalS3Server,
    FakeGCSServer,
    LocalServer,
    MotoServer,
    S3Server,
    SeaweedServer,
)

SERVER_START_TIMEOUT_SECS = 90.0

# backend name -> (server fixture, URL scheme)
_SERVER_FIXTURES: dict[str, tuple[str, str]] = {
    "moto": ("moto_server", "s3"),
    "seaweedfs": ("seaweed_server", "s3"),
    "gcs": ("gcs_server", "gs"),
}
_FIXTURE_MARKERS = {
    fixture: BACKEND_MARKERS[name] for name, (fixture, _) in _SERVER_FIXTURES.items()
}


def _external_s3(env_var: str) -> ExternalS3Server | None:
    url = os.environ.get(env_var)
    if not url:
        return None
    return ExternalS3Server(
        url,
        access_key=os.environ.get("CLOUDCKPT_TEST_S3_KEY", DEFAULT_ACCESS_KEY),
        secret_key=os.environ.get("CLOUDCKPT_TEST_S3_SECRET", DEFAULT_SECRET_KEY),
    )


def _serve(server: LocalServer) -> Iterator[LocalServer]:
    server.start(SERVER_START_TIMEOUT_SECS)
    try:
        server.create_bucket(TEST_BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3, in this process (or ``CLOUDCKPT_TEST_MOTO_ENDPOINT``); bucket ``cloudckpt-tests``.

    Checks no signatures: use ``seaweed_server`` for auth behaviour.
    """
    # MotoServer points tempfile at its spool dir while it runs: fix pytest's basetemp first.
    tmp_path_factory.getbasetemp()
    yield from _serve(_external_s3("CLOUDCKPT_TEST_MOTO_ENDPOINT") or MotoServer())  # type: ignore[misc]


@pytest.fixture(scope="session")
def seaweed_server() -> Iterator[S3Server]:
    """SeaweedFS (or ``CLOUDCKPT_TEST_S3_ENDPOINT``), signature-checking; bucket ``cloudckpt-tests``."""
    yield from _serve(_external_s3("CLOUDCKPT_TEST_S3_ENDPOINT") or SeaweedServer())  # type: ignore[misc]


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[FakeGCSServer]:
    """fake-gcs-server (or ``CLOUDCKPT_TEST_GCS_ENDPOINT``); bucket ``cloudckpt-tests``."""
    url = os.environ.get("CLOUDCKPT_TEST_GCS_ENDPOINT")
    server = ExternalGCSServer(url) if url else FakeGCSServer()
    yield from _serve(server)  # type: ignore[misc]


@pytest.fixture
def unique_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix that no other test or run uses: ``<test name>-<time>-<nonce>``."""
    return make_unique_prefix(request.node.name)


@pytest.fixture
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """A fresh, empty place in one store; parametrize indirectly with names from ALL_BACKENDS.

    ``memory`` is cleaned up afterwards (it lives in this process's RAM); ``local`` lives in
    ``tmp_path`` (the directory itself does not exist yet); server prefixes are left in place.
    Without parametrization the backend is ``memory``.
    """
    name = getattr(request, "param", "memory")
    if name not in ALL_BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {ALL_BACKENDS}")
    prefix = make_unique_prefix(request.node.name)
    if name == "memory":
        base_url = f"memory://{TEST_BUCKET}/{prefix}"
        yield Backend(name=name, base_url=base_url)
        import fsspec

        fs = fsspec.filesystem("memory")
        if fs.exists(base_url):
            fs.rm(base_url, recursive=True)
    elif name == "local":
        yield Backend(name=name, base_url=str(tmp_path / "store"))
    else:
        fixture_name, scheme = _SERVER_FIXTURES[name]
        server: LocalServer = request.getfixturevalue(fixture_name)
        yield Backend(
            name=name,
            base_url=f"{scheme}://{TEST_BUCKET}/{prefix}",
            storage_options=server.storage_options,
            server=server,
        )


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests by the server they need, before ``-m`` selection runs."""
    for item in items:
        wanted: set[str] = set()
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("backend") in BACKEND_MARKERS:
            wanted.add(BACKEND_MARKERS[callspec.params["backend"]])
        for fixture_name in getattr(item, "fixturenames", ()):
            if fixture_name in _FIXTURE_MARKERS:
                wanted.add(_FIXTURE_MARKERS[fixture_name])
        for marker in sorted(wanted):
            if item.get_closest_marker(marker) is None:
                item.add_marker(marker)
