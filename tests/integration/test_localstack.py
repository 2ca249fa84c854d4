"""The local servers and the ``python -m localstack`` launcher: start, answer, stop cleanly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from backends import ALL_BACKENDS, BACKEND_MARKERS, Backend

from localstack.servers import (
    FakeGCSServer,
    LocalServer,
    MotoServer,
    S3Server,
    SeaweedServer,
    ServerAlreadyRunningError,
    ServerStartError,
    find_free_ports,
    is_port_open,
    pid_alive,
    wait_until,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
S3_ENV_KEYS = {
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
}
GCS_ENV_KEYS = {"STORAGE_EMULATOR_HOST", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"}


def _bucket_name() -> str:
    return f"ls-test-{uuid.uuid4().hex[:12]}"


def _wait_gone(pid: int, timeout_secs: float = 15.0) -> None:
    wait_until(lambda: not pid_alive(pid), timeout_secs=timeout_secs, what=f"pid {pid} to exit")


def _assert_stopped(server: LocalServer, port: int, data_dir: Path, pid: int | None) -> None:
    assert not server.is_running
    assert not data_dir.exists(), f"{data_dir} was not deleted"
    assert not is_port_open(port), f"port {port} still open after stop()"
    if pid is not None and pid != os.getpid():
        assert not pid_alive(pid), f"server process {pid} still alive after stop()"


def _s3_roundtrip(server: S3Server) -> None:
    bucket = _bucket_name()
    server.create_bucket(bucket)
    server.create_bucket(bucket)  # idempotent
    client = server.client()
    client.put_object(Bucket=bucket, Key="dir/hello.txt", Body=b"hello world")
    body = client.get_object(Bucket=bucket, Key="dir/hello.txt")["Body"].read()
    assert body == b"hello world"
    assert bucket in {b["Name"] for b in client.list_buckets()["Buckets"]}


def _check_s3_descriptors(server: S3Server) -> None:
    assert server.endpoint_url == f"http://127.0.0.1:{server.port}"
    assert server.storage_options == {
        "endpoint_url": server.endpoint_url,
        "key": server.access_key,
        "secret": server.secret_key,
    }
    assert set(server.env) >= S3_ENV_KEYS
    assert server.env["AWS_ENDPOINT_URL"] == server.endpoint_url
    json.dumps(server.describe())


def test_find_free_ports_are_distinct_and_bindable() -> None:
    ports = find_free_ports(12)
    assert len(set(ports)) == 12
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


@pytest.mark.moto
def test_moto_server_lifecycle() -> None:
    before = tempfile.gettempdir()
    with MotoServer() as server:
        assert server.is_running
        assert server.data_dir is not None
        assert tempfile.gettempdir().startswith(str(server.data_dir))
        _check_s3_descriptors(server)
        _s3_roundtrip(server)
        port, data_dir = server.port, server.data_dir
    _assert_stopped(server, port, data_dir, pid=None)
    assert tempfile.gettempdir() == before
    server.stop()  # idempotent


@pytest.mark.seaweedfs
def test_seaweed_server_lifecycle_and_auth() -> None:
    from botocore.exceptions import ClientError

    started = time.monotonic()
    server = SeaweedServer().start()
    try:
        startup_secs = time.monotonic() - started
        print(f"seaweedfs answered after {startup_secs:.2f} s")
        assert server.pid is not None and pid_alive(server.pid)
        assert server.log_path is not None and server.log_path.is_file()
        assert server.data_dir is not None and server.log_path.parent == server.data_dir
        # Every port it opens was chosen free, none is a fixed default.
        assert set(server.ports.values()).isdisjoint({8333, 8888, 9333, 9340, 19333, 23646})
        _check_s3_descriptors(server)
        _s3_roundtrip(server)

        bad = server.client(secret_key="not-the-secret")
        with pytest.raises(ClientError) as excinfo:
            bad.list_buckets()
        assert excinfo.value.response["Error"]["Code"] == "SignatureDoesNotMatch"

        port, data_dir, pid = server.port, server.data_dir, server.pid
    finally:
        server.stop()
    _assert_stopped(server, port, data_dir, pid)


@pytest.mark.seaweedfs
def test_seaweed_pinned_port_in_use_is_reported() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = SeaweedServer(port=port)
        with pytest.raises(ServerAlreadyRunningError, match="already"):
            server.start()
        assert server.data_dir is None
        assert not server.is_running


def _gcs_call(server: FakeGCSServer, method: str, path: str, body: bytes | None = None) -> bytes:
    request = urllib.request.Request(server.endpoint_url + path, data=body, method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()


@pytest.mark.gcs
@pytest.mark.parametrize("storage", ["memory", "filesystem"])
def test_fake_gcs_server_lifecycle(storage: Any) -> None:
    server = FakeGCSServer(backend=storage).start()
    try:
        assert server.pid is not None and pid_alive(server.pid)
        assert server.endpoint_url == f"http://127.0.0.1:{server.port}"
        assert server.storage_options == {
            "endpoint_url": server.endpoint_url,
            "token": "anon",
            "project": "test",
        }
        assert set(server.env) >= GCS_ENV_KEYS
        assert server.env["STORAGE_EMULATOR_HOST"] == server.endpoint_url
        assert server.env["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] == "false"

        bucket = _bucket_name()
        server.create_bucket(bucket)
        server.create_bucket(bucket)  # idempotent
        names = [b["name"] for b in json.loads(_gcs_call(server, "GET", "/storage/v1/b"))["items"]]
        assert bucket in names
        query = urllib.parse.urlencode({"uploadType": "media", "name": "dir/hello.txt"})
        _gcs_call(server, "POST", f"/upload/storage/v1/b/{bucket}/o?{query}", b"hello gcs")
        key = urllib.parse.quote("dir/hello.txt", safe="")
        assert _gcs_call(server, "GET", f"/storage/v1/b/{bucket}/o/{key}?alt=media") == b"hello gcs"
        if storage == "filesystem":
            assert server.data_dir is not None
            assert any((server.data_dir / "storage").rglob("*"))
        assert server.data_dir is not None
        port, data_dir, pid = server.port, server.data_dir, server.pid
    finally:
        server.stop()
    _assert_stopped(server, port, data_dir, pid)


@pytest.mark.gcs
def test_start_failure_reports_log_tail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "broken-server"
    fake.write_text("#!/bin/sh\necho 'boom: cannot start' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("FAKE_GCS_SERVER_BINARY", str(fake))
    server = FakeGCSServer(base_dir=tmp_path / "scratch")
    with pytest.raises(ServerStartError, match=r"(?s)code 3.*boom: cannot start"):
        server.start(timeout_secs=10)
    assert not server.is_running
    assert list((tmp_path / "scratch").iterdir()) == []


@pytest.mark.gcs
def test_server_dies_with_its_parent(tmp_path: Path) -> None:
    """A parent killed without running atexit (os._exit) must not leave its server behind."""
    script = textwrap.dedent(
        """
        import os, sys
        from localstack.servers import FakeGCSServer
        server = FakeGCSServer(base_dir=sys.argv[1]).start()
        print(server.pid, flush=True)
        os._exit(0)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        check=True,
    )
    _wait_gone(int(out.stdout.strip()))


# --------------------------------------------------------------------------------------------
# The launcher


def _launcher(*args: str, check: bool = True, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "localstack", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=env,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"localstack {' '.join(args)} exited {result.returncode}:\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result


@pytest.fixture
def launcher_dir(tmp_path: Path) -> Iterator[Path]:
    """A working directory whose launcher state is torn down even when the test fails."""
    yield tmp_path
    if (tmp_path / ".localstack-data" / "state.json").exists():
        _launcher("down", cwd=tmp_path, check=False)


@pytest.mark.seaweedfs
@pytest.mark.gcs
def test_launcher_up_env_down_roundtrip(launcher_dir: Path) -> None:
    up = _launcher("up", "--s3", "seaweedfs", "--gcs", "--bucket", "demo-bucket", cwd=launcher_dir)
    assert "seaweedfs: http://127.0.0.1:" in up.stdout

    state_file = launcher_dir / ".localstack-data" / "state.json"
    state = json.loads(state_file.read_text())
    supervisor = state["pid"]
    servers = {s["name"]: s for s in state["servers"]}
    assert set(servers) == {"seaweedfs", "fake-gcs-server"}
    assert pid_alive(supervisor)

    again = _launcher("up", cwd=launcher_dir, check=False)
    assert again.returncode == 1
    assert "already running" in again.stderr

    exports = dict(
        line.removeprefix("export ").split("=", 1)
        for line in _launcher("env", cwd=launcher_dir).stdout.splitlines()
    )
    assert set(exports) >= S3_ENV_KEYS | GCS_ENV_KEYS
    s3 = servers["seaweedfs"]
    assert exports["AWS_ENDPOINT_URL"] == s3["endpoint_url"]
    assert exports["STORAGE_EMULATOR_HOST"] == servers["fake-gcs-server"]["endpoint_url"]

    # The servers answer with the published credentials, and the bucket exists.
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3["endpoint_url"],
        aws_access_key_id=s3["storage_options"]["key"],
        aws_secret_access_key=s3["storage_options"]["secret"],
        region_name="us-east-1",
    )
    assert "demo-bucket" in {b["Name"] for b in client.list_buckets()["Buckets"]}
    gcs_url = servers["fake-gcs-server"]["endpoint_url"]
    with urllib.request.urlopen(f"{gcs_url}/storage/v1/b", timeout=10) as response:
        assert "demo-bucket" in {b["name"] for b in json.loads(response.read())["items"]}
    assert json.loads(_launcher("status", cwd=launcher_dir).stdout)["pid"] == supervisor

    _launcher("down", cwd=launcher_dir)
    assert not state_file.exists()
    for pid in [supervisor, *(s["pid"] for s in servers.values())]:
        _wait_gone(pid)
    for server in servers.values():
        assert not Path(server["data_dir"]).exists()
        assert not is_port_open(urllib.parse.urlsplit(server["endpoint_url"]).port or 0)
    assert _launcher("env", cwd=launcher_dir, check=False).returncode == 1
    assert "nothing running" in _launcher("down", cwd=launcher_dir).stdout


@pytest.mark.moto
def test_launcher_moto_and_stale_state(launcher_dir: Path) -> None:
    """moto runs inside the supervisor; a killed supervisor leaves a state file `down` clears."""
    _launcher("up", "--s3", "moto", cwd=launcher_dir)
    state_file = launcher_dir / ".localstack-data" / "state.json"
    state = json.loads(state_file.read_text())
    (server,) = state["servers"]
    assert server["name"] == "moto" and server["pid"] == state["pid"]
    os.kill(state["pid"], 9)
    _wait_gone(state["pid"])
    assert state_file.exists()
    assert _launcher("env", cwd=launcher_dir, check=False).returncode == 1  # stale: removed
    assert not state_file.exists()
    assert not Path(server["data_dir"]).exists()


# --------------------------------------------------------------------------------------------
# The conftest fixtures themselves


@pytest.mark.parametrize("backend", ALL_BACKENDS, indirect=True)
def test_backend_fixture_gives_a_fresh_writable_prefix(
    backend: Backend, request: pytest.FixtureRequest
) -> None:
    import fsspec

    fs, root = fsspec.core.url_to_fs(backend.base_url, **backend.storage_options)
    assert not fs.exists(root) or fs.ls(root) == []
    url = backend.url("dir", "object.bin")
    with fsspec.open(url, "wb", **backend.storage_options) as f:
        f.write(b"payload")
    with fsspec.open(url, "rb", **backend.storage_options) as f:
        assert f.read() == b"payload"
    if backend.name in ("moto", "seaweedfs", "gcs"):
        assert request.node.get_closest_marker(BACKEND_MARKERS[backend.name])
        assert backend.server is not None
    else:
        assert backend.server is None and backend.storage_options == {}
