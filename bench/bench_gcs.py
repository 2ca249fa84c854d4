"""GCS benchmark (issue 5): cloudckpt save / load vs gcsfs's own ``pipe`` / ``cat_file``.

    python -m bench.bench_gcs                        # ~512 MiB state dict, 2 rounds
    python -m bench.bench_gcs --size-mib 256 --rounds 3
    python -m bench.bench_gcs --part-size-mib 32 --concurrency 1   # try other upload settings

One fake-gcs-server (``-backend filesystem``, fresh data directory, deleted at the end) for
the whole run; every measurement runs in a fresh process, interleaved by rounds (the order of
the two tools alternates between rounds), see ``bench/common.py`` for how wall, CPU and peak
RSS are measured. Tools:

* ``cloudckpt_save``: ``make_sync_checkpointer(...).save(url, sd)`` with the given
  UploadConfig (default: cloudckpt's defaults); the timed call includes serialization and the
  commit (manifest write).
* ``cloudckpt_save_resumable`` (reference, no target): the same save with the composite path
  switched off (``GCS_COMPOSITE_MIN_PARTS`` raised in the child), i.e. one resumable session
  of sequential chunks: what every GCS save did before composite uploads.
* ``gcsfs_pipe``: ``GCSFileSystem.pipe(path, data)`` of the bytes of ``torch.save(sd)``, built
  in memory BEFORE the meter starts (serialization excluded: the raw transport).
* ``cloudckpt_load``: ``make_sync_checkpointer(...).load(url)`` of that round's checkpoint
  (tensors rebuilt, CRC32C verified); checked bit-exact after the meter stops.
* ``gcsfs_cat``: ``GCSFileSystem.cat_file(path)`` of the object ``gcsfs_pipe`` wrote that round
  (bytes only, no tensors); its length and CRC32C are checked after the meter stops.

Ratios are cloudckpt/gcsfs throughput (higher is better); target >= 1.0x for save and load.
Exits 1 when a target is missed or a measurement failed (after printing everything).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from typing import Any

# Before anything imports gcsfs (see shared/README.md and cloudckpt.storage.gcs).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

from bench.common import (
    REPO_ROOT,
    Meter,
    MiB,
    Runner,
    Spec,
    Targets,
    check_loaded,
    child_main,
    environment_note,
    format_table,
    make_state_dict,
    median,
    tensor_bytes,
    tensor_crcs,
    write_json,
)

BUCKET = "bench-gcs"
PROJECT = "bench"
SAVE_TOOLS = ("cloudckpt_save", "gcsfs_pipe")
LOAD_TOOLS = ("cloudckpt_load", "gcsfs_cat")
REFERENCE_TOOLS = ("cloudckpt_save_resumable",)
TARGET_RATIO = 1.0

# --------------------------------------------------------------------------------------------
# Measurements (each runs in a fresh child process)


def _options(spec: Spec) -> dict[str, Any]:
    return {"endpoint_url": spec["endpoint_url"], "token": "anon", "project": PROJECT}


def _url(spec: Spec, name: str) -> str:
    return f"gs://{BUCKET}/{spec['prefix']}/{name}"


def _gcsfs(spec: Spec) -> Any:
    from gcsfs.core import GCSFileSystem

    return GCSFileSystem(**_options(spec), skip_instance_cache=True)


def _checkpointer(spec: Spec) -> Any:
    from cloudckpt import CheckpointerConfig, UploadConfig, make_sync_checkpointer

    upload = UploadConfig(**spec.get("upload", {}))
    return make_sync_checkpointer(
        CheckpointerConfig(storage_options=_options(spec), upload_config=upload)
    )


def m_cloudckpt_save(spec: Spec) -> dict[str, Any]:
    from dataclasses import asdict

    sd = make_state_dict(spec.size_mib)
    ckpt = _checkpointer(spec)
    url = _url(spec, "ckpt")
    ckpt._writer.storage(url)  # build the client now (no request): not timed
    with Meter() as m:
        ckpt.save(url, sd)
    metrics = ckpt.last_metrics
    ckpt.close()
    return m.result(
        payload_bytes=tensor_bytes(sd),
        object_bytes=metrics.bytes if metrics is not None else 0,
        save_metrics=asdict(metrics) if metrics is not None else None,
    )


def m_cloudckpt_save_resumable(spec: Spec) -> dict[str, Any]:
    from cloudckpt.storage import gcs

    gcs.GCS_COMPOSITE_MIN_PARTS = 1 << 40  # never composite: one resumable session
    return m_cloudckpt_save(Spec({**spec.raw, "prefix": spec["prefix"] + "-resumable"}))


def m_gcsfs_pipe(spec: Spec) -> dict[str, Any]:
    import torch

    sd = make_state_dict(spec.size_mib)
    payload = tensor_bytes(sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    del sd
    data = buf.getvalue()
    buf.close()
    fs = _gcsfs(spec)
    with Meter() as m:
        fs.pipe(_url(spec, "model.pt"), data)
    return m.result(payload_bytes=payload, object_bytes=len(data))


def m_cloudckpt_load(spec: Spec) -> dict[str, Any]:
    ckpt = _checkpointer(spec)
    url = _url(spec, "ckpt")
    ckpt._reader.storage(url)  # build the client now (no request): not timed
    with Meter() as m:
        sd = ckpt.load(url)
    fetched = ckpt._reader.last_bytes_fetched
    ckpt.close()
    expected = tensor_crcs(make_state_dict(spec.size_mib))
    return m.result(
        payload_bytes=tensor_bytes(sd), bytes_fetched=fetched, mismatch=check_loaded(sd, expected)
    )


def m_gcsfs_cat(spec: Spec) -> dict[str, Any]:
    from cloudckpt.checksum import crc32c

    fs = _gcsfs(spec)
    path = _url(spec, "model.pt")
    with Meter() as m:
        data = fs.cat_file(path)
    info = fs.info(path)
    mismatch = None
    if len(data) != int(info["size"]):
        mismatch = f"cat_file returned {len(data)} bytes, the object holds {info['size']}"
    elif info.get("crc32c"):
        import base64

        stored = int.from_bytes(base64.b64decode(info["crc32c"]), "big")
        if crc32c(data) != stored:
            mismatch = "cat_file bytes differ from the stored CRC32C"
    return m.result(payload_bytes=len(data), object_bytes=len(data), mismatch=mismatch)


MEASURES = {
    "cloudckpt_save": m_cloudckpt_save,
    "cloudckpt_save_resumable": m_cloudckpt_save_resumable,
    "gcsfs_pipe": m_gcsfs_pipe,
    "cloudckpt_load": m_cloudckpt_load,
    "gcsfs_cat": m_gcsfs_cat,
}

# --------------------------------------------------------------------------------------------
# Parent


class GCSBenchServer:
    """One fake-gcs-server (filesystem backend, fresh data dir removed by ``stop``) for the run;
    provides what :class:`bench.common.Runner` asks of a server (``child_env``)."""

    def __init__(self) -> None:
        from localstack.servers import FakeGCSServer

        self.server = FakeGCSServer(backend="filesystem")

    def __enter__(self) -> GCSBenchServer:
        t0 = time.monotonic()
        self.server.start()
        self.server.create_bucket(BUCKET)
        print(
            f"# fake-gcs-server (filesystem) at {self.server.endpoint_url} (pid "
            f"{self.server.pid}, data {self.server.data_dir}), up in {time.monotonic() - t0:.1f} s",
            flush=True,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()

    def spec(self, prefix: str, size_mib: int, upload: dict[str, int]) -> dict[str, Any]:
        return {
            "endpoint_url": self.server.endpoint_url,
            "prefix": prefix,
            "size_mib": size_mib,
            "upload": upload,
        }

    def child_env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("GOOGLE_", "STORAGE_EMULATOR_HOST"))
        }
        env["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        return env


def _one_line(r: dict[str, Any]) -> str:
    if "error" in r:
        return "ERROR " + r["error"].replace("\n", " | ")[:400]
    text = (
        f"{r['payload_bytes'] / MiB / r['wall_s']:7.1f} MiB/s  wall {r['wall_s']:6.2f} s  "
        f"cpu {r['cpu_s']:6.2f} s  peak +{r['peak_extra_bytes'] / MiB:5.0f} MiB"
    )
    if r.get("mismatch"):
        text += f"  MISMATCH {r['mismatch']}"
    return text


def main(argv: list[str]) -> int:
    if child_main(MEASURES, argv):
        return 0
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size-mib", type=int, default=512, help="state dict size (default 512)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (>= 2)")
    p.add_argument("--part-size-mib", type=int, default=0, help="cloudckpt part size (0: default)")
    p.add_argument(
        "--concurrency", type=int, default=0, help="cloudckpt parts in flight (0: default)"
    )
    p.add_argument(
        "--no-reference", action="store_true", help="skip the cloudckpt_save_resumable row"
    )
    p.add_argument("--json", default="", help="also write every raw result to this file")
    p.add_argument("--verbose", action="store_true", help="print every child's output")
    args = p.parse_args(argv)
    if args.rounds < 2:
        p.error("--rounds must be >= 2 (medians of one round say little)")
    upload: dict[str, int] = {}
    if args.part_size_mib:
        upload["part_size_bytes"] = args.part_size_mib * MiB
    if args.concurrency:
        upload["max_concurrency"] = args.concurrency
    print(environment_note())

    refs = () if args.no_reference else REFERENCE_TOOLS
    results: dict[str, list[dict[str, Any]]] = {t: [] for t in SAVE_TOOLS + refs + LOAD_TOOLS}
    with GCSBenchServer() as server:
        runner = Runner("bench_gcs", server, verbose=args.verbose)  # type: ignore[arg-type]
        for rnd in range(args.rounds):
            spec = server.spec(f"r{rnd}", args.size_mib, upload)
            step = -1 if rnd % 2 else 1  # alternate which tool goes first
            for tools in (SAVE_TOOLS[::step], refs, LOAD_TOOLS[::step]):
                for tool in tools:
                    r = runner.run(tool, spec, label=tool)
                    results[tool].append(r)
                    print(f"round {rnd + 1} {tool:15s} {_one_line(r)}", flush=True)
    write_json(args.json, {"args": vars(args), "rounds": results})
    print(environment_note())
    return report(results)


def report(results: dict[str, list[dict[str, Any]]]) -> int:
    """Print medians and ratios; return the exit code (1 on a miss or a failed run)."""
    rows: list[list[Any]] = []
    rate: dict[str, float | None] = {}
    for tool, runs in results.items():
        good = [r for r in runs if "error" not in r and not r.get("mismatch")]
        if not good or len(good) < len(runs):
            rate[tool] = None
            rows.append([tool, "-", "-", "-", "-", f"{len(runs) - len(good)} failed"])
            continue
        wall = median(r["wall_s"] for r in good)
        rate[tool] = good[0]["payload_bytes"] / MiB / wall
        rows.append(
            [
                tool,
                f"{rate[tool]:.1f}",
                f"{wall:.2f}",
                f"{median(r['cpu_s'] for r in good):.2f}",
                f"{median(r['peak_extra_bytes'] for r in good) / MiB:.0f}",
                ", ".join(f"{r['payload_bytes'] / MiB / r['wall_s']:.0f}" for r in good),
            ]
        )
    print("\n== medians (throughput of the state dict's tensor bytes) ==")
    print(format_table(["tool", "MiB/s", "wall s", "cpu s", "peak +MiB", "per round MiB/s"], rows))
    if rate.get("cloudckpt_save") and rate.get("cloudckpt_save_resumable"):
        gain = rate["cloudckpt_save"] / rate["cloudckpt_save_resumable"]  # type: ignore[operator]
        print(f"composite vs resumable save (reference): {gain:.2f}x")
    targets = Targets()
    for name, ours, theirs in (
        ("save", "cloudckpt_save", "gcsfs_pipe"),
        ("load", "cloudckpt_load", "gcsfs_cat"),
    ):
        a, b = rate[ours], rate[theirs]
        if a is None or b is None:
            targets.check(f"{name} ratio", None, f"{ours} or {theirs} failed")
            continue
        ratio = a / b
        print(f"ratio {name}: cloudckpt/gcsfs = {ratio:.2f}x ({a:.1f} vs {b:.1f} MiB/s)")
        targets.check(
            f"{name} >= {TARGET_RATIO:.1f}x gcsfs", ratio >= TARGET_RATIO, f"{ratio:.2f}x"
        )
    return targets.report()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
