"""Save benchmark (issue 3): cloudckpt vs the other ways to put a state dict on S3.

    python -m bench.bench_save                      # ~1 GiB state dict, 2 rounds
    python -m bench.bench_save --size-mib 512 --rounds 3
    python -m bench.bench_save --only cloudckpt,boto3 --profile cloudckpt --profile-mode perf

Against one local SeaweedFS, interleaved by rounds, each measurement in a fresh process
(see ``bench/common.py`` for how wall, CPU and peak RSS are measured). Tools:

* ``cloudckpt``: ``make_sync_checkpointer(...).save(url, sd)``, default UploadConfig
  (32 MiB parts, 8 in flight); the timed call includes the commit (manifest write).
* ``boto3``: ``upload_fileobj`` of the bytes of ``torch.save(sd)`` (TransferConfig: 32 MiB
  parts, 8 threads). The buffer is built BEFORE the meter starts: this row is the raw transport,
  serialization excluded (``torch_save_mem`` shows what serialization costs on its own).
* ``s3fs``: ``torch.save(sd, s3fs.S3FileSystem(...).open(url, "wb"))``, s3fs defaults.
* ``dcp_fsspec``: ``torch.distributed.checkpoint.save(sd, storage_writer=FsspecWriter(url,
  **s3fs options))`` (no process group: single rank), torch defaults.
* ``s3tc``: s3torchconnector ``S3Checkpoint(region, endpoint, S3ClientConfig(
  force_path_style=True)).writer(url)`` + ``torch.save`` (AWS CRT client; install it for the
  bench only: ``pip install --no-deps s3torchconnector s3torchconnectorclient``).
* ``torch_save_mem`` (reference, not a competitor): ``torch.save`` into a BytesIO.

Then the shaping-proxy figure: through a FaultProxy capping every TCP connection at 10 MiB/s
(it runs in this parent process; its CPU share is printed), cloudckpt with max_concurrency=8 vs
max_concurrency=1 on a smaller state dict (``--shaped-size-mib``, default 256).

Targets (issue 3): wall throughput >= 0.9x the best other tool; client CPU s/GiB <= the lowest
other tool's; peak extra RSS <= part_size x (concurrency + 2) + 64 MiB; shaped c8 >= 5x c1.
Exits 1 when a target is missed (after printing everything).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    BUCKET,
    REGION,
    BenchServer,
    Meter,
    MiB,
    Runner,
    Spec,
    Targets,
    add_common_args,
    add_patch_arg,
    apply_patch,
    check_torch_untouched,
    child_main,
    cloudckpt_hash,
    counting_proxy,
    cpu_per_byte,
    environment_note,
    fmt_mib,
    format_table,
    make_state_dict,
    median,
    paired_ratio,
    parent_cpu_secs,
    summarize,
    tensor_bytes,
    throughput,
    write_json,
)

TOOLS = ("cloudckpt", "boto3", "s3fs", "dcp_fsspec", "s3tc")
REFERENCE_TOOLS = ("torch_save_mem",)
#: ``--experiments``: extra rows (no target uses them) that size what a change would buy.
EXPERIMENTS: dict[str, tuple[str, dict[str, Any]]] = {
    # botocore SHA-256-hashes every part body for SigV4 unless payload signing is off (with
    # cloudckpt's client config it does so on https too); the part's CRC32C header, which the
    # store checks and the signature covers, already protects the body.
    "exp:cloudckpt_unsigned": (
        "cloudckpt",
        {
            "extra_storage_options": {
                "config_kwargs": {
                    "s3": {"addressing_style": "path", "payload_signing_enabled": False}
                }
            }
        },
    ),
}
SHAPED_BANDWIDTH = 10 * MiB
PART_SIZE = 32 * MiB
CONCURRENCY = 8

# --------------------------------------------------------------------------------------------
# Measurements (each runs in a fresh child process)


def m_cloudckpt(spec: Spec) -> dict[str, Any]:
    from dataclasses import asdict

    from cloudckpt import CheckpointerConfig, UploadConfig, make_sync_checkpointer

    apply_patch(spec)
    sd = make_state_dict(spec.size_mib)
    upload = UploadConfig(**spec.get("upload", {}))
    options = {**spec.storage_options, **spec.get("extra_storage_options", {})}
    ckpt = make_sync_checkpointer(CheckpointerConfig(storage_options=options, upload_config=upload))
    url = spec.url("ckpt")
    ckpt._writer.storage(url)  # build the boto3 client now (no request): not timed
    with Meter() as m:
        ckpt.save(url, sd)
    metrics = ckpt.last_metrics
    return m.result(
        payload_bytes=tensor_bytes(sd),
        part_size_bytes=upload.part_size_bytes,
        max_concurrency=upload.max_concurrency,
        save_metrics=asdict(metrics) if metrics is not None else None,
    )


def m_boto3(spec: Spec) -> dict[str, Any]:
    import torch
    from boto3.s3.transfer import TransferConfig

    sd = make_state_dict(spec.size_mib)
    payload = tensor_bytes(sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    del sd
    size = buf.tell()
    buf.seek(0)
    client = spec.boto3_client(max_pool_connections=CONCURRENCY + 2)
    config = TransferConfig(
        multipart_threshold=PART_SIZE,
        multipart_chunksize=PART_SIZE,
        max_concurrency=CONCURRENCY,
        use_threads=True,
    )
    with Meter() as m:
        client.upload_fileobj(buf, BUCKET, spec.key("model.pt"), Config=config)
    return m.result(payload_bytes=payload, object_bytes=size)


def m_s3fs(spec: Spec) -> dict[str, Any]:
    import torch

    sd = make_state_dict(spec.size_mib)
    fs = spec.s3fs()
    fs.connect()  # session + client, no request: not timed
    with Meter() as m, fs.open(spec.url("model.pt"), "wb") as f:
        torch.save(sd, f)
    return m.result(
        payload_bytes=tensor_bytes(sd), block_size=getattr(fs, "default_block_size", None)
    )


def m_dcp_fsspec(spec: Spec) -> dict[str, Any]:
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    warnings.filterwarnings("ignore")
    sd = make_state_dict(spec.size_mib)
    writer = FsspecWriter(spec.url("dcp"), **spec.storage_options)
    with Meter() as m:
        dcp.save(sd, storage_writer=writer)
    return m.result(payload_bytes=tensor_bytes(sd))


def s3tc_client_config() -> Any:
    from s3torchconnector import S3ClientConfig

    return S3ClientConfig(force_path_style=True)


def m_s3tc(spec: Spec) -> dict[str, Any]:
    import torch
    from s3torchconnector import S3Checkpoint

    sd = make_state_dict(spec.size_mib)
    checkpoint = S3Checkpoint(
        region=REGION, endpoint=spec.endpoint_url, s3client_config=s3tc_client_config()
    )
    with Meter() as m, checkpoint.writer(spec.url("model.pt")) as writer:
        torch.save(sd, writer)
    return m.result(payload_bytes=tensor_bytes(sd))


def m_torch_save_mem(spec: Spec) -> dict[str, Any]:
    import torch

    sd = make_state_dict(spec.size_mib)
    with Meter() as m:
        buf = io.BytesIO()
        torch.save(sd, buf)
    return m.result(payload_bytes=tensor_bytes(sd), object_bytes=buf.tell())


MEASURES = {
    "cloudckpt": m_cloudckpt,
    "boto3": m_boto3,
    "s3fs": m_s3fs,
    "dcp_fsspec": m_dcp_fsspec,
    "s3tc": m_s3tc,
    "torch_save_mem": m_torch_save_mem,
}

# --------------------------------------------------------------------------------------------
# Parent


def s3tc_unavailable() -> str | None:
    try:
        import s3torchconnector  # noqa: F401
        import s3torchconnectorclient  # noqa: F401
    except ImportError as e:
        return f"not installed ({e}); pip install --no-deps s3torchconnector s3torchconnectorclient"
    return None


def main(argv: list[str]) -> int:
    if child_main(MEASURES, argv):
        return 0
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(p, default_rounds=2)
    p.add_argument("--shaped-size-mib", type=int, default=256)
    p.add_argument("--shaped-rounds", type=int, default=1)
    p.add_argument("--no-shaped", action="store_true", help="skip the shaping-proxy figure")
    add_patch_arg(p)
    p.add_argument(
        "--experiments",
        action="store_true",
        help=f"also run the experiment rows (no target): {', '.join(EXPERIMENTS)}",
    )
    p.add_argument(
        "--from-json", default="", help="print the report of a saved --json run (no new run)"
    )
    args = p.parse_args(argv)
    if args.from_json:
        return report_saved(args.from_json)
    check_torch_untouched()
    print(environment_note())
    tree_at_start = cloudckpt_hash()

    tools = [t for t in TOOLS if not args.only or t in args.only.split(",")]
    excluded: dict[str, str] = {}
    reason = s3tc_unavailable()
    if reason and "s3tc" in tools:
        excluded["s3tc"] = reason
        tools.remove("s3tc")
    refs = [t for t in REFERENCE_TOOLS if not args.only or t in args.only.split(",")]

    raw: dict[str, Any] = {"args": vars(args), "rounds": {}, "count": {}, "shaped": {}}
    with BenchServer() as server:
        runner = Runner(
            "bench_save",
            server,
            profile=set(filter(None, args.profile.split(","))),
            profile_mode=args.profile_mode,
            verbose=args.verbose,
        )
        entries = {t: (t, {}) for t in tools + refs}
        if args.experiments:
            entries.update(EXPERIMENTS)
            refs = refs + list(EXPERIMENTS)
        if args.patch:
            entries["exp:cloudckpt+patch"] = (
                "cloudckpt",
                {"patch": str(Path(args.patch).resolve())},
            )
            refs = [*refs, "exp:cloudckpt+patch"]
        results: dict[str, list[dict[str, Any]]] = {t: [] for t in entries}
        for rnd in range(args.rounds):
            for tool, (measure, extra) in entries.items():
                prefix = f"save/r{rnd}/{tool.replace(':', '_')}"
                spec = server.spec(prefix, args.size_mib, **extra)
                r = runner.run(measure, spec, label=tool)
                r["round"] = rnd
                if "error" not in r and tool not in refs:
                    r["stored_objects"], r["stored_bytes"] = server.prefix_bytes(prefix)
                results[tool].append(r)
                print(f"round {rnd + 1} {tool:15s} " + _one_line(r), flush=True)
        raw["rounds"] = results

        count: dict[str, dict[str, Any]] = {}
        if not args.no_count_bytes:
            proxy = counting_proxy(server.port)
            try:
                for tool in tools:
                    proxy.reset_counters()
                    spec = server.spec(
                        f"count/{tool}", args.size_mib, endpoint_url=proxy.endpoint_url
                    )
                    r = runner.run(tool, spec, label=f"count:{tool}")
                    count[tool] = {
                        "error": r.get("error"),
                        "sent_bytes": proxy.request_body_bytes,
                        "received_bytes": proxy.bytes_to_client(),
                        "requests": len(proxy.requests),
                        "by_kind": dict(proxy.counts_by_kind()),
                    }
                    print(
                        f"count   {tool:15s} sent {count[tool]['sent_bytes'] / MiB:.1f} MiB in "
                        f"{count[tool]['requests']} requests"
                        + (f" ERROR {r['error'][:200]}" if r.get("error") else ""),
                        flush=True,
                    )
            finally:
                proxy.stop()
        raw["count"] = count

        shaped: dict[str, list[dict[str, Any]]] = {}
        if not args.no_shaped and "cloudckpt" in tools:
            shaped = run_shaped(server, runner, args.shaped_size_mib, args.shaped_rounds)
        raw["shaped"] = shaped
        raw.update(tools=tools, refs=refs, excluded=excluded, environment=environment_note())

    write_json(args.json, raw)
    print(environment_note())
    if cloudckpt_hash() != tree_at_start:
        print("# WARNING: cloudckpt/ changed during this run: rounds may mix code versions")
    return report(args, tools, refs, excluded, results, count, shaped)


def run_shaped(
    server: BenchServer, runner: Runner, size_mib: int, rounds: int
) -> dict[str, list[dict[str, Any]]]:
    """cloudckpt c8 vs c1 behind a proxy capping each connection at 10 MiB/s, plus c8 through
    the same proxy unshaped (the proxy + server ceiling)."""
    out: dict[str, list[dict[str, Any]]] = {"c8_shaped": [], "c1_shaped": [], "c8_unshaped": []}
    shaped_proxy = counting_proxy(server.port, SHAPED_BANDWIDTH)
    plain_proxy = counting_proxy(server.port)
    try:
        for rnd in range(rounds):
            for label, conc, proxy in (
                ("c8_shaped", CONCURRENCY, shaped_proxy),
                ("c1_shaped", 1, shaped_proxy),
                ("c8_unshaped", CONCURRENCY, plain_proxy),
            ):
                proxy.reset_counters()
                spec = server.spec(
                    f"shaped/r{rnd}/{label}",
                    size_mib,
                    endpoint_url=proxy.endpoint_url,
                    upload={"max_concurrency": conc},
                )
                cpu0, t0 = parent_cpu_secs(), time.monotonic()
                r = runner.run("cloudckpt", spec, label=f"shaped:{label}")
                r["round"] = rnd
                r["proxy_cpu_s"] = parent_cpu_secs() - cpu0
                r["proxy_window_s"] = time.monotonic() - t0
                r["proxy_connections_bytes"] = proxy.request_body_bytes
                out[label].append(r)
                extra = ""
                if "error" not in r:
                    extra = f"  proxy CPU {r['proxy_cpu_s'] / r['wall_s']:.2f} cores over the save"
                print(f"shaped  {label:15s} " + _one_line(r) + extra, flush=True)
    finally:
        shaped_proxy.stop()
        plain_proxy.stop()
    return out


def ideal_shaped_ratio(nbytes: int, part_size: int, concurrency: int) -> float:
    """c1 time / c8 time when every connection moves exactly the capped rate: the parts go out
    in waves of ``concurrency``, so a short last wave (e.g. 9 parts on 8 lanes) caps the ratio
    below ``concurrency``."""
    parts = [part_size] * (nbytes // part_size) + (
        [nbytes % part_size] if nbytes % part_size else []
    )
    lanes = [0] * concurrency
    for p in parts:  # each part starts on the lane that frees first
        i = lanes.index(min(lanes))
        lanes[i] += p
    return sum(parts) / max(lanes)


def report_saved(path: str) -> int:
    """The report of a run saved with ``--json``."""
    raw = json.loads(Path(path).read_text())
    args = argparse.Namespace(**raw["args"])
    results = raw["rounds"]
    tools = raw.get("tools") or [t for t in TOOLS if t in results]
    refs = raw.get("refs") or [t for t in results if t not in tools]
    print(f"# report of {path}; {raw.get('environment', '')}")
    return report(
        args, tools, refs, dict(raw.get("excluded", {})), results, raw["count"], raw["shaped"]
    )


def _one_line(r: dict[str, Any]) -> str:
    if "error" in r:
        return "ERROR " + r["error"].replace("\n", " | ")[-400:]
    return (
        f"{r['payload_bytes'] / MiB / r['wall_s']:7.1f} MiB/s  wall {r['wall_s']:6.2f} s  "
        f"cpu {r['cpu_s']:6.2f} s  peak +{r['peak_extra_bytes'] / MiB:6.0f} MiB"
    )


def report(
    args: argparse.Namespace,
    tools: list[str],
    refs: list[str],
    excluded: dict[str, str],
    results: dict[str, list[dict[str, Any]]],
    count: dict[str, dict[str, Any]],
    shaped: dict[str, list[dict[str, Any]]],
) -> int:
    summaries = {t: summarize(t, results[t]) for t in tools + refs}
    for t, s in summaries.items():
        if not s.ok:
            excluded.setdefault(
                t, "failed in every round: " + s.errors[0].replace("\n", " | ")[-300:]
            )
    ok = [t for t in tools if summaries[t].ok]
    others = [t for t in ok if t != "cloudckpt"]
    best = max(others, key=lambda t: summaries[t].mib_s) if others else None
    lowest_cpu = min(others, key=lambda t: summaries[t].cpu_s_per_gib) if others else None

    payload = next((s.payload_bytes for s in summaries.values() if s.ok), 0)
    print(
        f"\n== save: {payload / MiB:.0f} MiB of tensors ({args.size_mib} MiB requested), "
        f"median of {args.rounds} interleaved rounds, fresh process each =="
    )
    rows = []
    for t in ok + [r for r in refs if summaries[r].ok]:
        s = summaries[t]
        thr_ratio = f"{paired_ratio(s, summaries[best], throughput):.2f}x" if best else "-"
        cpu_ratio = (
            f"{paired_ratio(s, summaries[lowest_cpu], cpu_per_byte):.2f}x" if lowest_cpu else "-"
        )
        stored = median(r.get("stored_bytes", 0) for r in s.runs)
        sent = count.get(t, {}).get("sent_bytes")
        rows.append(
            [
                t + (" (ref)" if t in REFERENCE_TOOLS else ""),
                f"{s.mib_s:.1f}",
                s.spread(),
                thr_ratio,
                f"{s.cpu_s_per_gib:.2f}",
                cpu_ratio,
                f"{s.peak_extra_mib:.0f}",
                fmt_mib(stored) if stored else "-",
                fmt_mib(sent) if sent else "-",
                str(count.get(t, {}).get("requests", "-")),
            ]
        )
    print(
        format_table(
            [
                "tool",
                "MiB/s",
                "range",
                "vs best*",
                "CPU s/GiB",
                "vs lowest*",
                "peak +MiB",
                "stored MiB",
                "sent MiB",
                "requests",
            ],
            rows,
        )
    )
    print(
        "MiB/s, CPU s/GiB, peak: medians over rounds; range: slowest-fastest round; *: median "
        "over rounds of the ratio to that tool's run in the same round (paired)"
    )
    if best:
        print(
            f"best other tool by median wall throughput: {best}; lowest median CPU/GiB: {lowest_cpu}"
        )
    for t, why in excluded.items():
        print(f"excluded: {t}: {why}")
    cm = summaries.get("cloudckpt")
    if cm and cm.ok and cm.runs[0].get("save_metrics"):
        sm = cm.runs[-1]["save_metrics"]
        print(
            f"cloudckpt SaveMetrics (last round): {sm['parts']} parts, {sm['retries']} retries, "
            f"upload {sm['upload_secs']:.2f} s, total {sm['total_secs']:.2f} s"
        )

    targets = Targets()
    if cm is None or not cm.ok:
        targets.check("save throughput >= 0.9x best", None, "cloudckpt did not run")
    else:
        if best:
            # vs every other tool, paired by round; the smallest ratio counts
            best = min(others, key=lambda t: paired_ratio(cm, summaries[t], throughput))
            b = summaries[best]
            ratio = paired_ratio(cm, b, throughput)
            targets.check(
                "save wall throughput >= 0.9x the best other tool",
                ratio >= 0.9,
                f"{ratio:.3f}x paired ({cm.mib_s:.1f} vs {best} {b.mib_s:.1f} MiB/s "
                f"median: {cm.mib_s / b.mib_s:.2f}x)",
            )
            # vs every other tool, paired by round; the largest ratio counts
            lowest_cpu = max(others, key=lambda t: paired_ratio(cm, summaries[t], cpu_per_byte))
            lc = summaries[lowest_cpu]
            cpu_ratio = paired_ratio(cm, lc, cpu_per_byte)
            targets.check(
                "save client CPU s/GiB <= the lowest other tool's",
                cpu_ratio <= 1.0,
                f"{cpu_ratio:.3f}x paired ({cm.cpu_s_per_gib:.2f} vs {lowest_cpu} "
                f"{lc.cpu_s_per_gib:.2f} s/GiB median: "
                f"{cm.cpu_s_per_gib / lc.cpu_s_per_gib:.2f}x)",
            )
        limit = PART_SIZE * (CONCURRENCY + 2) + 64 * MiB
        peak = cm.med("peak_extra_bytes")
        targets.check(
            "save peak extra RSS <= part_size x (concurrency + 2) + 64 MiB",
            peak <= limit,
            f"{peak / MiB:.0f} MiB vs limit {limit / MiB:.0f} MiB (max over rounds "
            f"{max(r['peak_extra_bytes'] for r in cm.runs) / MiB:.0f})",
        )
    if shaped:
        c8, c1, un = (summarize(k, shaped[k]) for k in ("c8_shaped", "c1_shaped", "c8_unshaped"))
        print(
            f"\n== shaping proxy: {SHAPED_BANDWIDTH / MiB:.0f} MiB/s per TCP connection, "
            f"cloudckpt, {args.shaped_size_mib} MiB state dict =="
        )
        rows = []
        for s in (c8, c1, un):
            if s.ok:
                pc = median(r["proxy_cpu_s"] / r["wall_s"] for r in s.runs)
                rows.append(
                    [
                        s.name,
                        f"{s.mib_s:.1f}",
                        f"{s.wall_s:.2f}",
                        f"{s.cpu_s_per_gib:.2f}",
                        f"{pc:.2f}",
                    ]
                )
            else:
                rows.append([s.name, "ERROR", s.errors[0][-200:], "", ""])
        print(format_table(["run", "MiB/s", "wall s", "CPU s/GiB", "proxy CPU (cores)"], rows))
        if c8.ok and c1.ok:
            ratio = paired_ratio(c8, c1, throughput)
            best_ratio = ideal_shaped_ratio(c8.payload_bytes, PART_SIZE, CONCURRENCY)
            targets.check(
                "shaped (10 MiB/s per connection) save: concurrency 8 >= 5x concurrency 1",
                ratio >= 5.0,
                f"{ratio:.2f}x ({c8.mib_s:.1f} vs {c1.mib_s:.1f} MiB/s; the most these parts "
                f"allow at 10 MiB/s per connection: {best_ratio:.2f}x"
                + (f"; unshaped through the proxy {un.mib_s:.1f} MiB/s)" if un.ok else ")"),
            )
        else:
            targets.check("shaped save c8 >= 5x c1", None, "a shaped run failed")
    return targets.report()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
