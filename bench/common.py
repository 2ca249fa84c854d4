"""Shared machinery of the benchmarks: one SeaweedFS per run, one fresh process per measurement.

Method (the same for ``bench_save`` and ``bench_load``):

* The parent process starts ONE local SeaweedFS (fresh data directory, deleted at the end) and
  runs every measurement as ``python -m bench.<module> --measure NAME --spec JSON`` in a fresh
  child process, interleaved by rounds (A B C ..., A B C ..., ...). The child writes one JSON
  result; the parent takes medians over rounds and prints ratios, then exits 1 when a target
  is missed (after printing everything).
* In the child, :class:`Meter` wraps only the measured call. Outside it: imports, building the
  state dict, constructing clients (no request is sent before the meter starts: connections are
  opened inside it, as for a checkpoint taken after a long training step).
* Wall seconds: ``time.perf_counter``. Client CPU seconds: ``getrusage(RUSAGE_SELF)`` (all
  threads, native ones included) + ``RUSAGE_CHILDREN`` (waited-for subprocesses), user + system.
* Peak extra RSS: VmRSS just before the call is the baseline; ``/proc/self/clear_refs`` (5)
  resets VmHWM to it, VmHWM after the call is the peak (a 5 ms VmRSS sampler is the fallback
  when clear_refs is unavailable).
* Bytes on the wire are counted in a separate, untimed pass through a counting proxy
  (``tests/integration/faultproxy.py``, no faults): the proxy runs in the parent, so it must
  not sit in the timed path.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import importlib.util
import json
import os
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

MiB = 1 << 20
GiB = 1 << 30
REPO_ROOT = Path(__file__).resolve().parent.parent
BUCKET = "bench"
REGION = "us-east-1"
#: The state dict: ``model.layers.<i>.weight`` tensors of this size, one ``model.head.weight``
#: of PARTIAL_TENSOR_MIB (the partial-load target) and a few small tensors and scalars.
BIG_TENSOR_MIB = 32
PARTIAL_TENSOR_MIB = 16
PARTIAL_KEY = ("model", "head.weight")
DEFAULT_CHILD_TIMEOUT_SECS = 900.0

# --------------------------------------------------------------------------------------------
# The state dict


def state_dict_layout(size_mib: int) -> list[tuple[tuple[str, str], tuple[int, ...]]]:
    """``((group, name), shape)`` of every float32 tensor of a ~``size_mib`` MiB state dict."""
    n_big = max(1, round((size_mib - PARTIAL_TENSOR_MIB) / BIG_TENSOR_MIB))
    big_rows = BIG_TENSOR_MIB * MiB // 4 // 1024
    out: list[tuple[tuple[str, str], tuple[int, ...]]] = []
    for i in range(n_big):
        out.append((("model", f"layers.{i}.weight"), (big_rows, 1024)))
        out.append((("model", f"layers.{i}.bias"), (1024,)))
    out.append((PARTIAL_KEY, (PARTIAL_TENSOR_MIB * MiB // 4 // 1024, 1024)))
    out.append((("model", "norm.weight"), (1024,)))
    out.append((("optim", "exp_avg_scale"), (256,)))
    return out


def make_state_dict(size_mib: int, *, fill: bool = True, seed: int = 0) -> dict[str, Any]:
    """A deterministic ~``size_mib`` MiB state dict ``{"model": {...}, "optim": {...}, "step":
    int, "lr": float}``. Tensor bytes are pseudo-random (incompressible, every page touched);
    ``fill=False`` gives uninitialised tensors of the same shapes (a load target)."""
    import torch

    sd: dict[str, Any] = {"model": {}, "optim": {}, "step": 1000, "lr": 3e-4}
    for i, ((group, name), shape) in enumerate(state_dict_layout(size_mib)):
        numel = 1
        for s in shape:
            numel *= s
        if fill:
            # Knuth multiplicative hash of the element index: fast, deterministic, no zeros pages.
            t = torch.arange(numel, dtype=torch.int64)
            t.add_(seed * 1_000_003 + i * 7_919).mul_(2_654_435_761).bitwise_and_(0xFFFFFFFF)
            t = t.to(torch.int32).view(torch.float32).reshape(shape)
        else:
            t = torch.empty(shape, dtype=torch.float32)
        sd[group][name] = t
    return sd


def iter_tensors(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    import torch

    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from iter_tensors(v, f"{path}.{k}" if path else str(k))


def tensor_bytes(obj: Any) -> int:
    return sum(t.numel() * t.element_size() for _, t in iter_tensors(obj))


def tensor_crcs(obj: Any) -> dict[str, int]:
    """CRC32C of every tensor's bytes, by dotted key (to check loads are bit-exact)."""
    import crc32c

    out = {}
    for name, t in iter_tensors(obj):
        view = t.detach().contiguous().view(-1).view(dtype=_u8()).numpy()
        out[name] = int(crc32c.crc32c(view))
    return out


def _u8() -> Any:
    import torch

    return torch.uint8


def check_loaded(
    loaded: Any, expected_crcs: Mapping[str, int], *, scalars: bool = True
) -> str | None:
    """None if ``loaded`` holds exactly the expected tensors (and scalars), else what differs."""
    got = tensor_crcs(loaded)
    if set(got) != set(expected_crcs):
        return f"keys differ: missing {sorted(set(expected_crcs) - set(got))[:5]}, extra {sorted(set(got) - set(expected_crcs))[:5]}"
    bad = [k for k, v in got.items() if v != expected_crcs[k]]
    if bad:
        return f"{len(bad)} tensors differ, e.g. {bad[:3]}"
    if scalars and (loaded.get("step") != 1000 or loaded.get("lr") != 3e-4):
        return f"scalars differ: step={loaded.get('step')!r} lr={loaded.get('lr')!r}"
    return None


# --------------------------------------------------------------------------------------------
# Measuring one call in the child


def _status_kib(name: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise KeyError(name)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_secs() -> tuple[float, float]:
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + c.ru_utime, s.ru_stime + c.ru_stime


class _RssSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True, name="bench-rss")
        self.peak_kib = _status_kib("VmRSS")
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(0.005):
            self.peak_kib = max(self.peak_kib, _status_kib("VmRSS"))

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak_kib, _status_kib("VmRSS"))


class ThreadProfiler:
    """cProfile for the calling thread AND every thread started while it runs (plain cProfile
    sees one thread only; the uploads and ranged reads run in pools). The timer is each
    thread's CPU time (``time.thread_time``), so the profile says where CPU goes, not where
    threads wait."""

    def __init__(self) -> None:
        self._profiles: list[cProfile.Profile] = []
        self._lock = threading.Lock()

    def _hook(self, frame: Any, event: str, arg: Any) -> None:
        sys.setprofile(None)
        p = cProfile.Profile(time.thread_time)
        with self._lock:
            self._profiles.append(p)
        p.enable()

    def start(self) -> None:
        main = cProfile.Profile(time.thread_time)
        self._profiles.append(main)
        threading.setprofile(self._hook)
        main.enable()

    def stop(self, path: str) -> None:
        self._profiles[0].disable()
        threading.setprofile(None)  # type: ignore[arg-type]
        stats = pstats.Stats(self._profiles[0])
        with self._lock:
            for p in self._profiles[1:]:
                with contextlib.suppress(TypeError):  # a thread that never made a call
                    stats.add(p)
        stats.dump_stats(path)


class Meter:
    """Wall, client CPU and peak extra RSS of the ``with`` block (see the module docstring).

    When the parent asked for a profile (env ``BENCH_PROFILE``), the block is profiled too:
    ``cprofile:PATH`` (all threads) or ``perf:CTL_FIFO:ACK_FIFO`` (perf record, enabled only
    inside the block).
    """

    def __init__(self) -> None:
        self.wall_s = 0.0
        self.cpu_user_s = 0.0
        self.cpu_sys_s = 0.0
        self.peak_extra_bytes = 0
        self.baseline_rss_bytes = 0
        self.rss_method = ""
        self._profile = os.environ.get("BENCH_PROFILE", "")
        self._profiler: ThreadProfiler | None = None
        self._sampler: _RssSampler | None = None

    def __enter__(self) -> Meter:
        gc.collect()
        self._rss0 = _status_kib("VmRSS")
        if _reset_peak_rss() and _status_kib("VmHWM") <= self._rss0 + 1024:
            self.rss_method = "VmHWM (clear_refs)"
        else:
            self.rss_method = "VmRSS sampled every 5 ms"
            self._sampler = _RssSampler()
            self._sampler.start()
        self._profile_start()
        self._cpu0 = _cpu_secs()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        t1 = time.perf_counter()
        cpu1 = _cpu_secs()
        self._profile_stop()
        peak = self._sampler.stop() if self._sampler else _status_kib("VmHWM")
        self.wall_s = t1 - self._t0
        self.cpu_user_s = cpu1[0] - self._cpu0[0]
        self.cpu_sys_s = cpu1[1] - self._cpu0[1]
        self.baseline_rss_bytes = self._rss0 * 1024
        self.peak_extra_bytes = max(0, peak - self._rss0) * 1024

    def _profile_start(self) -> None:
        kind, _, rest = self._profile.partition(":")
        if kind == "cprofile":
            self._profiler = ThreadProfiler()
            self._profiler.start()
        elif kind == "perf":
            ctl, ack = rest.split(":")
            self._perf(ctl, ack, "enable")

    def _profile_stop(self) -> None:
        kind, _, rest = self._profile.partition(":")
        if kind == "cprofile" and self._profiler is not None:
            self._profiler.stop(rest)
        elif kind == "perf":
            ctl, ack = rest.split(":")
            self._perf(ctl, ack, "disable")

    @staticmethod
    def _perf(ctl: str, ack: str, command: str) -> None:
        with open(ctl, "w", encoding="ascii") as c:
            c.write(command + "\n")
        with open(ack, encoding="ascii") as a:
            a.readline()

    def result(self, **extra: Any) -> dict[str, Any]:
        return {
            "wall_s": self.wall_s,
            "cpu_s": self.cpu_user_s + self.cpu_sys_s,
            "cpu_user_s": self.cpu_user_s,
            "cpu_sys_s": self.cpu_sys_s,
            "peak_extra_bytes": self.peak_extra_bytes,
            "baseline_rss_bytes": self.baseline_rss_bytes,
            "rss_method": self.rss_method,
            **extra,
        }


# --------------------------------------------------------------------------------------------
# Child side


@dataclass(frozen=True)
class Spec:
    """What a measurement child gets from the parent (one JSON object on its command line)."""

    raw: Mapping[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.raw[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)

    @property
    def endpoint_url(self) -> str:
        return self.raw["endpoint_url"]

    @property
    def size_mib(self) -> int:
        return int(self.raw["size_mib"])

    def url(self, *parts: str) -> str:
        return "s3://" + "/".join([BUCKET, self.raw["prefix"], *parts]).replace("//", "/")

    def key(self, *parts: str) -> str:
        return self.url(*parts).removeprefix(f"s3://{BUCKET}/")

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs and cloudckpt storage_options."""
        return {
            "endpoint_url": self.endpoint_url,
            "key": self.raw["access_key"],
            "secret": self.raw["secret_key"],
        }

    def boto3_client(self, max_pool_connections: int = 10) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.raw["access_key"],
            aws_secret_access_key=self.raw["secret_key"],
            region_name=REGION,
            config=Config(
                s3={"addressing_style": "path"}, max_pool_connections=max_pool_connections
            ),
        )

    def s3fs(self) -> Any:
        import s3fs

        fs = s3fs.S3FileSystem(**self.storage_options, skip_instance_cache=True)
        return fs


def child_main(
    measures: Mapping[str, Callable[[Spec], dict[str, Any]]], argv: Sequence[str]
) -> bool:
    """Run ``--measure NAME --spec JSON`` if present in ``argv`` (True), else False."""
    if "--measure" not in argv:
        return False
    p = argparse.ArgumentParser()
    p.add_argument("--measure", required=True, choices=sorted(measures))
    p.add_argument("--spec", required=True)
    args, _ = p.parse_known_args(argv)
    spec = Spec(json.loads(args.spec))
    result = measures[args.measure](spec)
    result.setdefault("measure", args.measure)
    Path(spec["result_path"]).write_text(json.dumps(result))
    return True


# --------------------------------------------------------------------------------------------
# Parent side


def load_faultproxy() -> ModuleType:
    """``tests/integration/faultproxy.py`` (tests/ is no package), imported by path."""
    name = "bench_faultproxy"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, REPO_ROOT / "tests" / "integration" / "faultproxy.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def counting_proxy(upstream_port: int, bandwidth_bytes_per_sec: float | None = None) -> Any:
    """A started FaultProxy (no faults) that also counts request body bytes
    (``request_body_bytes``); response bytes are its own ``bytes_to_client()``."""
    fp = load_faultproxy()

    class CountingProxy(fp.FaultProxy):  # type: ignore[misc, name-defined]
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.request_body_bytes = 0

        def _decide(self, req: Any) -> Any:
            out = super()._decide(req)
            h = req.headers
            n = h.get("x-amz-decoded-content-length") or h.get("content-length") or "0"
            with self._lock:
                self.request_body_bytes += int(n)
            return out

        def reset_counters(self) -> None:
            super().reset_counters()
            with self._lock:
                self.request_body_bytes = 0

    proxy = CountingProxy("127.0.0.1", upstream_port).start()
    if bandwidth_bytes_per_sec:
        proxy.configure(bandwidth_bytes_per_sec=bandwidth_bytes_per_sec)
    return proxy


class BenchServer:
    """One SeaweedFS for the whole run (``localstack.servers.SeaweedServer``: fresh data dir,
    deleted by ``stop()``), with the bench bucket created."""

    def __init__(self) -> None:
        from localstack.servers import SeaweedServer

        self.server = SeaweedServer()

    def __enter__(self) -> BenchServer:
        t0 = time.monotonic()
        self.server.start()
        self.server.create_bucket(BUCKET)
        print(
            f"# SeaweedFS at {self.server.endpoint_url} (pid {self.server.pid}, data "
            f"{self.server.data_dir}), up in {time.monotonic() - t0:.1f} s",
            flush=True,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()

    @property
    def port(self) -> int:
        return self.server.port

    def spec(
        self, prefix: str, size_mib: int, endpoint_url: str | None = None, **extra: Any
    ) -> dict[str, Any]:
        return {
            "endpoint_url": endpoint_url or self.server.endpoint_url,
            "access_key": self.server.access_key,
            "secret_key": self.server.secret_key,
            "prefix": prefix,
            "size_mib": size_mib,
            **extra,
        }

    def child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(
            AWS_ACCESS_KEY_ID=self.server.access_key,  # s3torchconnector's CRT reads these
            AWS_SECRET_ACCESS_KEY=self.server.secret_key,
            AWS_REGION=REGION,
            AWS_DEFAULT_REGION=REGION,
            AWS_EC2_METADATA_DISABLED="true",
            PYTHONPATH=str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        )
        return env

    def prefix_bytes(self, prefix: str) -> tuple[int, int]:
        """(objects, bytes) stored under ``prefix``."""
        client = self.server.client()
        n = total = 0
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            for item in page.get("Contents", []):
                n += 1
                total += int(item["Size"])
        return n, total


def parent_cpu_secs() -> float:
    s = resource.getrusage(resource.RUSAGE_SELF)
    return s.ru_utime + s.ru_stime


@dataclass
class Runner:
    """Runs measurement children of one bench module, optionally under a profiler."""

    module: str
    server: BenchServer
    profile: set[str] = field(default_factory=set)
    profile_mode: str = "cprofile"
    profile_dir: Path = REPO_ROOT / "bench" / "profiles"
    verbose: bool = False
    timeout_s: float = DEFAULT_CHILD_TIMEOUT_SECS

    def run(
        self, measure: str, spec: Mapping[str, Any], *, label: str | None = None
    ) -> dict[str, Any]:
        label = label or measure
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            result_path = Path(tmp) / "result.json"
            full_spec = {**spec, "result_path": str(result_path)}
            cmd = [
                sys.executable,
                "-m",
                f"bench.{self.module}",
                "--measure",
                measure,
                "--spec",
                json.dumps(full_spec),
            ]
            env = self.server.child_env()
            profile_out = None
            if label in self.profile:
                self.profile_dir.mkdir(parents=True, exist_ok=True)
                if self.profile_mode == "cprofile":
                    profile_out = self.profile_dir / f"{self.module}.{label}.prof"
                    env["BENCH_PROFILE"] = f"cprofile:{profile_out}"
                else:
                    profile_out = self.profile_dir / f"{self.module}.{label}.perf.data"
                    ctl, ack = Path(tmp) / "perf.ctl", Path(tmp) / "perf.ack"
                    os.mkfifo(ctl)
                    os.mkfifo(ack)
                    env["BENCH_PROFILE"] = f"perf:{ctl}:{ack}"
                    cmd = [
                        "perf",
                        "record",
                        "-F",
                        "999",
                        "-g",
                        "-D",
                        "-1",
                        "--control",
                        f"fifo:{ctl},{ack}",
                        "-o",
                        str(profile_out),
                        "--",
                        *cmd,
                    ]
            t0 = time.monotonic()
            try:
                proc = subprocess.run(
                    cmd,
                    cwd=REPO_ROOT,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    timeout=self.timeout_s,
                    check=False,
                )
                output = proc.stdout.decode("utf-8", "replace")
                rc = proc.returncode
            except subprocess.TimeoutExpired as e:
                output = (e.stdout or b"").decode(
                    "utf-8", "replace"
                ) + f"\n[timed out after {self.timeout_s:.0f} s]"
                rc = -1
            elapsed = time.monotonic() - t0
            if self.verbose and output.strip():
                print(f"--- {label} output ---\n{output.rstrip()}\n---", flush=True)
            if rc != 0 or not result_path.exists():
                return {"measure": measure, "error": f"exit {rc}: " + _tail(output)}
            result = json.loads(result_path.read_text())
            result["process_s"] = elapsed
            if profile_out is not None:
                result["profile"] = str(profile_out)
            return result


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# --------------------------------------------------------------------------------------------
# Summaries, tables, targets


def median(values: Iterable[float]) -> float:
    vals = list(values)
    return statistics.median(vals) if vals else float("nan")


@dataclass
class Summary:
    """Medians over the rounds of one tool."""

    name: str
    payload_bytes: int
    runs: list[dict[str, Any]]
    errors: list[str]

    @property
    def ok(self) -> bool:
        return bool(self.runs)

    def med(self, key: str) -> float:
        return median(r[key] for r in self.runs)

    @property
    def wall_s(self) -> float:
        return self.med("wall_s")

    @property
    def mib_s(self) -> float:
        return self.payload_bytes / MiB / self.wall_s

    @property
    def cpu_s_per_gib(self) -> float:
        return self.med("cpu_s") / (self.payload_bytes / GiB)

    @property
    def peak_extra_mib(self) -> float:
        return self.med("peak_extra_bytes") / MiB

    def spread(self) -> str:
        walls = [self.payload_bytes / MiB / r["wall_s"] for r in self.runs]
        return f"{min(walls):.0f}-{max(walls):.0f}" if len(walls) > 1 else f"{walls[0]:.0f}"


def throughput(r: Mapping[str, Any]) -> float:
    return r["payload_bytes"] / r["wall_s"]


def cpu_per_byte(r: Mapping[str, Any]) -> float:
    return r["cpu_s"] / r["payload_bytes"]


def paired_ratio(a: Summary, b: Summary, metric: Callable[[Mapping[str, Any]], float]) -> float:
    """Median over rounds of ``metric(a's run) / metric(b's run in the same round)``.

    The machine is shared: its load drifts over minutes, which moves every tool's wall time in a
    round together. Pairing by round cancels that drift; a ratio of medians does not."""
    by_round = {r.get("round"): r for r in b.runs}
    vals = [
        metric(r) / metric(by_round[r.get("round")]) for r in a.runs if r.get("round") in by_round
    ]
    return median(vals)


def summarize(name: str, runs: list[dict[str, Any]], payload_key: str = "payload_bytes") -> Summary:
    good = [r for r in runs if "error" not in r]
    errors = [r["error"] for r in runs if "error" in r]
    payload = int(good[0][payload_key]) if good else 0
    return Summary(name, payload, good, errors)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, r in enumerate(cells):
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


@dataclass
class Targets:
    """Target checks; :meth:`report` prints them all and returns the exit code."""

    checks: list[tuple[str, bool | None, str]] = field(default_factory=list)

    def check(self, name: str, passed: bool | None, detail: str) -> None:
        """``passed=None``: could not be measured (counts as a miss)."""
        self.checks.append((name, passed, detail))

    def report(self) -> int:
        print("\n== targets ==")
        for name, passed, detail in self.checks:
            tag = "PASS" if passed else ("MISS" if passed is False else "N/A ")
            print(f"[{tag}] {name}: {detail}")
        missed = [n for n, p, _ in self.checks if not p]
        print(
            f"\n{len(self.checks) - len(missed)}/{len(self.checks)} targets met"
            + (f"; missed: {', '.join(missed)}" if missed else "")
        )
        return 1 if missed else 0


def add_common_args(p: argparse.ArgumentParser, *, default_rounds: int) -> None:
    p.add_argument("--size-mib", type=int, default=1024, help="state dict size (default 1024)")
    p.add_argument("--rounds", type=int, default=default_rounds, help="interleaved rounds (>= 2)")
    p.add_argument("--only", default="", help="comma-separated tool names to run (default all)")
    p.add_argument("--no-count-bytes", action="store_true", help="skip the byte-counting pass")
    p.add_argument("--json", default="", help="also write every raw result to this file")
    p.add_argument("--profile", default="", help="comma-separated measurement labels to profile")
    p.add_argument("--profile-mode", choices=("cprofile", "perf"), default="cprofile")
    p.add_argument("--verbose", action="store_true", help="print every child's output")


def add_patch_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--patch",
        default="",
        help="A/B a candidate change without touching the tree: a Python file run (runpy) in "
        "the child before cloudckpt is used; adds the row exp:cloudckpt+patch",
    )


def apply_patch(spec: Spec) -> None:
    """Child side of ``--patch``: run the file (it monkeypatches cloudckpt) if the row asks."""
    if spec.get("patch"):
        import runpy

        runpy.run_path(spec["patch"])


def cloudckpt_hash() -> str:
    """A hash of cloudckpt/*.py as they are now: other people edit the tree while a bench runs,
    and every measurement imports the code afresh."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted((REPO_ROOT / "cloudckpt").rglob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def tree_fingerprint() -> str:
    """HEAD and :func:`cloudckpt_hash`."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        head = "?"
    return f"HEAD {head or '?'}, cloudckpt/*.py sha256 {cloudckpt_hash()}"


def environment_note() -> str:
    import torch

    load = os.getloadavg()
    return (
        f"# python {sys.version.split()[0]}, torch {torch.__version__}, "
        f"{os.cpu_count()} cpus, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; "
        f"{tree_fingerprint()}"
    )


def check_torch_untouched() -> None:
    """The bench installs s3torchconnector with --no-deps: torch must stay the CPU build."""
    from importlib.metadata import version

    v = version("torch")
    if v != "2.13.0+cpu":
        print(f"# WARNING: torch is {v}, expected 2.13.0+cpu (did a pip install touch it?)")


def write_json(path: str, payload: Mapping[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=1, default=str))
        print(f"# raw results written to {path}")


def fmt_mib(nbytes: float) -> str:
    return f"{nbytes / MiB:.0f}"
