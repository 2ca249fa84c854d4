"""Which stores tests can run against, and how a test gets a fresh place in one.

Import from tests as ``from backends import ALL_BACKENDS`` (``tests/`` is on ``sys.path``
through its conftest). Select backends with::

    @pytest.mark.parametrize("backend", ["memory", "local", "moto"], indirect=True)
    def test_roundtrip(backend: Backend) -> None:
        url = backend.url("step-1")
        ...
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

#: Every backend the ``backend`` fixture can give.
ALL_BACKENDS: list[str] = ["memory", "local", "moto", "seaweedfs", "gcs"]
#: Backends that need no server process (in-process moto counts as cheap).
FAST_BACKENDS: list[str] = ["memory", "local", "moto"]
#: Object-store backends served by a real (local) server.
SERVER_BACKENDS: list[str] = ["moto", "seaweedfs", "gcs"]
#: The pytest marker applied to tests that use each server backend (declared in pyproject).
BACKEND_MARKERS: dict[str, str] = {"moto": "moto", "seaweedfs": "seaweedfs", "gcs": "gcs"}
#: Bucket created once per session on each server.
TEST_BUCKET = "cloudckpt-tests"

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def make_unique_prefix(name: str) -> str:
    """``<name>-<UTC time>-<nonce>``: a prefix no other test or run uses, so no server resets.

    ``name`` (usually the test's name, parameters included) is reduced to characters that are
    safe in S3/GCS keys and local paths, and shortened to keep keys readable.
    """
    safe = _UNSAFE.sub("-", name).strip("-.")[:60] or "test"
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    return f"{safe}-{stamp}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Backend:
    """A fresh, empty place in one store for one test.

    Attributes:
        name: one of :data:`ALL_BACKENDS`.
        base_url: where the test may write: ``memory://cloudckpt-tests/<unique>``, a local
            directory, ``s3://cloudckpt-tests/<unique>`` or ``gs://cloudckpt-tests/<unique>``.
        storage_options: fsspec/cloudckpt options to reach it (``{}`` for memory and local).
        server: the server object (``localstack`` server or external) or None.
    """

    name: str
    base_url: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    server: object | None = None

    def url(self, *names: str) -> str:
        """``base_url`` joined with ``names`` by ``/``."""
        out = self.base_url.rstrip("/")
        for name in names:
            out = f"{out}/{name.strip('/')}"
        return out

    @property
    def is_remote(self) -> bool:
        """Whether a server stands behind this backend."""
        return self.server is not None
