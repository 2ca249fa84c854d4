"""``python -m localstack``: run local S3/GCS servers in the background for manual use.

Commands::

    python -m localstack up [--s3 seaweedfs|moto|none] [--gcs] [--bucket NAME]... [--state-file F]
    python -m localstack env [--state-file F]        # prints `export ...` lines: eval "$(...)"
    python -m localstack status [--state-file F]     # prints the state file (JSON)
    python -m localstack down [--state-file F]
    python -m localstack serve [same options as up]  # foreground; Ctrl-C stops

``up`` starts a detached supervisor (``serve``) that owns the servers, waits until the servers
answer, and returns. The supervisor writes a JSON state file (pids, endpoints, credentials,
environment) once everything is ready and removes it when it stops. ``down`` sends it SIGTERM;
it stops its servers and deletes their data. Server data and the supervisor's log live next to
the state file (default ``.localstack-data/`` under the current directory).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .servers import (
    DEFAULT_START_TIMEOUT_SECS,
    S3_SERVERS,
    FakeGCSServer,
    LocalServer,
    ServerError,
    pid_alive,
    read_log_tail,
    wait_until,
)

DEFAULT_STATE_FILE = Path(".localstack-data") / "state.json"
STATE_VERSION = 1
_SUPERVISOR_MARKER = "localstack"
# What a server's command line contains, by server name (moto runs inside the supervisor).
_SERVER_PROCESS_MARKERS = {"seaweedfs": "weed", "fake-gcs-server": "fake-gcs-server"}
_DOWN_TIMEOUT_SECS = 30.0
_HEALTH_CHECK_INTERVAL_SECS = 1.0


class LauncherError(RuntimeError):
    """A launcher command failed; the message is meant for the user."""


# --------------------------------------------------------------------------------------------
# State file


def read_state(state_file: Path) -> dict[str, Any] | None:
    """The state written by a running supervisor, or None when there is none (or it is torn)."""
    try:
        state = json.loads(state_file.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise LauncherError(f"cannot read state file {state_file}: {e}") from e
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise LauncherError(f"{state_file} is not a localstack state file (version 1)")
    return state


def _write_state(state_file: Path, state: dict[str, Any]) -> None:
    """Atomically replace the state file so readers never see half of it."""
    tmp = state_file.with_name(state_file.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, state_file)


def _process_matches(pid: int, *markers: str) -> bool:
    """Whether ``pid`` is alive and its command line contains every marker.

    Guards against signalling an unrelated process that reused a recorded pid.
    """
    if not pid_alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return True  # no /proc: trust the pid
    return all(marker.encode() in cmdline for marker in markers)


def _is_supervisor(pid: int) -> bool:
    """Whether ``pid`` is still a running ``python -m localstack serve``."""
    return _process_matches(pid, _SUPERVISOR_MARKER, "serve")


def _live_state(state_file: Path) -> dict[str, Any] | None:
    """The state of a supervisor that is still alive; a stale state file is removed."""
    state = read_state(state_file)
    if state is None:
        return None
    if _is_supervisor(int(state["pid"])):
        return state
    print(
        f"localstack: removing stale state file {state_file} (pid {state['pid']} is gone)",
        file=sys.stderr,
    )
    _cleanup_after_supervisor(state, state_file)
    return None


def _cleanup_after_supervisor(state: dict[str, Any], state_file: Path) -> None:
    """After the supervisor died without cleaning up: stop its servers, delete their data."""
    import shutil

    for server in state.get("servers", []):
        pid = server.get("pid")
        marker = _SERVER_PROCESS_MARKERS.get(server.get("name", ""))
        if pid and pid != state["pid"] and marker and _process_matches(int(pid), marker):
            _terminate_pid(int(pid), timeout_secs=10.0)
        data_dir = server.get("data_dir")
        if data_dir:
            shutil.rmtree(data_dir, ignore_errors=True)
    state_file.unlink(missing_ok=True)


def _terminate_pid(pid: int, timeout_secs: float) -> None:
    """SIGTERM ``pid``, wait for it to go, SIGKILL it after ``timeout_secs``."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        wait_until(
            lambda: not pid_alive(pid),
            timeout_secs=timeout_secs,
            what=f"pid {pid} to exit",
            on_timeout=LauncherError,
        )
    except LauncherError:
        print(f"localstack: pid {pid} ignored SIGTERM; killing it", file=sys.stderr)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        wait_until(
            lambda: not pid_alive(pid),
            timeout_secs=5.0,
            what=f"pid {pid} to die",
            on_timeout=LauncherError,
        )


# --------------------------------------------------------------------------------------------
# Commands


def _make_servers(args: argparse.Namespace, base_dir: Path) -> list[LocalServer]:
    servers: list[LocalServer] = []
    if args.s3 != "none":
        servers.append(S3_SERVERS[args.s3](base_dir=base_dir))
    if args.gcs:
        servers.append(FakeGCSServer(base_dir=base_dir, backend=args.gcs_backend))
    if not servers:
        raise LauncherError("nothing to start: pass --s3 seaweedfs|moto and/or --gcs")
    return servers


def merged_env(servers: Sequence[dict[str, Any]]) -> dict[str, str]:
    """The union of the servers' environment variables (S3 and GCS ones do not overlap)."""
    env: dict[str, str] = {}
    for server in servers:
        env.update(server["env"])
    return env


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the servers in the foreground until SIGTERM/SIGINT; own the state file meanwhile."""
    state_file: Path = args.state_file.resolve()
    state_file.parent.mkdir(parents=True, exist_ok=True)
    if _live_state(state_file) is not None:
        raise LauncherError(f"already running (see {state_file}): python -m localstack down")

    stop_requested = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        print(f"localstack: got signal {signum}, stopping", file=sys.stderr, flush=True)
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    servers = _make_servers(args, state_file.parent)
    exit_code = 0
    try:
        for server in servers:
            started = time.monotonic()
            server.start(args.timeout)
            print(
                f"localstack: {server.name} answers at {server.endpoint_url} "
                f"after {time.monotonic() - started:.2f} s",
                flush=True,
            )
            for bucket in args.bucket:
                server.create_bucket(bucket)
        described = [s.describe() for s in servers]
        _write_state(
            state_file,
            {
                "version": STATE_VERSION,
                "pid": os.getpid(),
                "started_at": time.time(),
                "buckets": list(args.bucket),
                "servers": described,
                "env": merged_env(described),
            },
        )
        print(f"localstack: ready; state in {state_file}", flush=True)
        while not stop_requested.wait(_HEALTH_CHECK_INTERVAL_SECS):
            dead = [s for s in servers if not s.is_running]
            if dead:
                names = ", ".join(s.name for s in dead)
                print(f"localstack: {names} died; stopping everything", file=sys.stderr)
                for s in dead:
                    print(read_log_tail(s.log_path), file=sys.stderr)
                exit_code = 1
                break
    finally:
        for server in reversed(servers):
            try:
                server.stop()
            except Exception as e:
                print(f"localstack: stopping {server.name} failed: {e!r}", file=sys.stderr)
                exit_code = 1
        state = read_state(state_file) if state_file.exists() else None
        if state is not None and state.get("pid") == os.getpid():
            state_file.unlink(missing_ok=True)
        print("localstack: stopped", flush=True)
    return exit_code


def _serve_argv(args: argparse.Namespace, state_file: Path) -> list[str]:
    argv = [sys.executable, "-m", "localstack", "serve", "--s3", args.s3]
    argv += ["--state-file", str(state_file), "--timeout", str(args.timeout)]
    if args.gcs:
        argv += ["--gcs", "--gcs-backend", args.gcs_backend]
    for bucket in args.bucket:
        argv += ["--bucket", bucket]
    return argv


def cmd_up(args: argparse.Namespace) -> int:
    """Start ``serve`` detached, wait for its state file, print where things are."""
    state_file: Path = args.state_file.resolve()
    state_file.parent.mkdir(parents=True, exist_ok=True)
    running = _live_state(state_file)
    if running is not None:
        raise LauncherError(
            f"already running (supervisor pid {running['pid']}, state {state_file}); "
            "stop it with: python -m localstack down"
        )
    log_path = state_file.with_name("localstack.log")
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            _serve_argv(args, state_file),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # survives this shell; Ctrl-C here does not reach it
        )

    def ready() -> bool:
        state = read_state(state_file)
        return state is not None and state.get("pid") == proc.pid

    def exited() -> str | None:
        if proc.poll() is None:
            return None
        return (
            f"exited with code {proc.returncode}; {log_path} ends with:\n{read_log_tail(log_path)}"
        )

    try:
        wait_until(
            ready,
            timeout_secs=args.timeout + 15.0,
            what="localstack supervisor",
            on_timeout=LauncherError,
            abort=exited,
        )
    except LauncherError as e:
        if proc.poll() is None:
            _terminate_pid(proc.pid, timeout_secs=_DOWN_TIMEOUT_SECS)
        raise LauncherError(f"{e}\n(log: {log_path})") from None
    state = read_state(state_file)
    assert state is not None
    for server in state["servers"]:
        print(f"{server['name']}: {server['endpoint_url']} (pid {server['pid']})")
    print(f"supervisor pid {state['pid']}; state {state_file}; log {log_path}")
    print(
        f'use it:  eval "$(python -m localstack env --state-file {shlex.quote(str(state_file))})"'
    )
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    """Stop the supervisor (and so its servers); tolerate an already-dead one."""
    state_file: Path = args.state_file.resolve()
    state = read_state(state_file)
    if state is None:
        print(f"localstack: nothing running (no {state_file})")
        return 0
    pid = int(state["pid"])
    if _is_supervisor(pid):
        _terminate_pid(pid, timeout_secs=_DOWN_TIMEOUT_SECS)
    # Whatever the supervisor could not clean up (it was killed, or died), clean up here.
    _cleanup_after_supervisor(state, state_file)
    print("localstack: stopped")
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    """Print ``export K=V`` lines for the running servers."""
    state = _live_state(args.state_file.resolve())
    if state is None:
        raise LauncherError("not running: start it with python -m localstack up")
    for key, value in sorted(state["env"].items()):
        print(f"export {key}={shlex.quote(str(value))}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print the state file; exit 1 when nothing runs."""
    state = _live_state(args.state_file.resolve())
    if state is None:
        print("localstack: not running", file=sys.stderr)
        return 1
    print(json.dumps(state, indent=2, sort_keys=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m localstack", description="Local S3/GCS servers without Docker."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add_state_file(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--state-file",
            type=Path,
            default=DEFAULT_STATE_FILE,
            help=f"where the running servers are recorded (default: {DEFAULT_STATE_FILE})",
        )

    for name, func, help_text in (
        ("up", cmd_up, "start servers in the background"),
        ("serve", cmd_serve, "run servers in the foreground (what `up` runs)"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--s3", choices=[*S3_SERVERS, "none"], default="seaweedfs")
        p.add_argument("--gcs", action="store_true", help="also start fake-gcs-server")
        p.add_argument("--gcs-backend", choices=["memory", "filesystem"], default="memory")
        p.add_argument(
            "--bucket", action="append", default=[], help="create this bucket (repeatable)"
        )
        p.add_argument(
            "--timeout",
            type=float,
            default=DEFAULT_START_TIMEOUT_SECS,
            help="seconds each server may take to answer",
        )
        add_state_file(p)
        p.set_defaults(func=func)
    for name, func, help_text in (
        ("down", cmd_down, "stop the background servers and delete their data"),
        ("env", cmd_env, "print export lines for the running servers"),
        ("status", cmd_status, "print the state of the running servers"),
    ):
        p = sub.add_parser(name, help=help_text)
        add_state_file(p)
        p.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (LauncherError, ServerError) as e:
        print(f"localstack: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
