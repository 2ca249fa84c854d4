"""Load benchmark (issue 4): cloudckpt's restore vs the raw ceiling and the other loaders.

    python -m bench.bench_load                      # ~1 GiB checkpoint, 3 rounds
    python -m bench.bench_load --size-mib 512
    python -m bench.bench_load --only cloudckpt,raw_readinto --profile cloudckpt --profile-mode perf

One local SeaweedFS; the checkpoints are written once (untimed, by a "prepare" child), then
every load runs in a fresh process, interleaved by rounds (see ``bench/common.py`` for how wall,
CPU and peak RSS are measured). Every load is checked bit-exact (CRC32C per tensor) after the
meter stops. Tools:

* ``cloudckpt``: ``make_sync_checkpointer(...).load(url)``, default DownloadConfig (32 MiB
  ranges, 8 in flight, CRC32C verified).
* ``raw_read`` / ``raw_readinto``: the raw ceiling. boto3 HEAD, then ranged GETs of 32 MiB on
  8 threads into ONE preallocated buffer of the object's size (no tensors are built).
  ``raw_read``: ``Body.read()`` then a copy into the buffer; ``raw_readinto``: the urllib3 stream
  ``readinto`` the buffer in 1 MiB slices (what cloudckpt does). The ceiling is the faster one.
* ``s3tc_dcp``: s3torchconnector ``S3StorageReader`` (DCP, default dcp_optimized reader) on a
  DCP checkpoint written by ``S3StorageWriter``.
* ``s3tc_seq``: s3torchconnector ``S3Checkpoint.reader`` (sequential) + ``torch.load``.
* ``s3fs_torch_load``: ``torch.load(s3fs.S3FileSystem(...).open(url, "rb"))``.
* ``dcp_fsspec``: torch DCP ``FsspecReader`` on a DCP checkpoint written by ``FsspecWriter``.
* ``s3fs_cat``: ``torch.load(io.BytesIO(fs.cat_file(url)))``.

DCP loads fill a caller-allocated state dict: allocating it (``torch.empty``, pages touched by
the load) is inside the meter, so every row ends with the full state dict in memory.

Then the partial load: cloudckpt loading only ``model.head.weight`` (16 MiB) through a counting
proxy (no faults), which counts every response byte (manifest, HEAD, pickle record, tensor).

Targets (issue 4): cloudckpt >= 0.9x the raw ceiling, >= 1.3x the fastest other tool, >= 1.8x
``torch.load`` over s3fs; client CPU s/GiB <= 1.3x the raw ceiling's; peak extra RSS <= loaded
tensor bytes + 64 MiB; partial load of one 16 MiB tensor transfers <= 17 MiB.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import (
    BUCKET,
    PARTIAL_KEY,
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
    check_loaded,
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
    summarize,
    tensor_bytes,
    tensor_crcs,
    throughput,
    write_json,
)

TOOLS = (
    "cloudckpt",
    "raw_read",
    "raw_readinto",
    "s3tc_dcp",
    "s3tc_seq",
    "s3fs_torch_load",
    "dcp_fsspec",
    "s3fs_cat",
)
RAW = ("raw_read", "raw_readinto")
#: ``--experiments``: extra rows (no target uses them) that size what a change would buy.
EXPERIMENTS: dict[str, tuple[str, dict[str, Any]]] = {
    # One 32 MiB GET per window like the raw ceiling: a 40 MiB range cap lets each 4 KiB
    # bias ride with its 32 MiB neighbour instead of costing a GET of its own.
    "exp:cloudckpt_range40": ("cloudckpt", {"download": {"range_size_bytes": 40 * (1 << 20)}}),
    "exp:cloudckpt_noverify": ("cloudckpt", {"download": {"verify_checksums": False}}),
    # The raw ceiling without urllib3's temporary bytes + copy (http.client readinto).
    "exp:raw_direct": ("raw_direct", {}),
}
S3TC = ("s3tc_dcp", "s3tc_seq")
RANGE_SIZE = 32 * MiB
CONCURRENCY = 8
READ_SLICE = 1 * MiB

# Object layout under the run's prefix (written by m_prepare).
CLOUDCKPT_PATH = "cloudckpt"
TORCH_KEY = "torch/model.pt"
DCP_FSSPEC_PATH = "dcp_fsspec"
DCP_S3TC_PATH = "dcp_s3tc"

# --------------------------------------------------------------------------------------------
# Helpers for s3torchconnector (its DCP classes take no endpoint: swap in a client that has one)


def s3tc_client(spec: Spec) -> Any:
    from s3torchconnector import S3ClientConfig
    from s3torchconnector._s3client import S3Client

    return S3Client(
        REGION, endpoint=spec.endpoint_url, s3client_config=S3ClientConfig(force_path_style=True)
    )


def s3tc_dcp_writer(spec: Spec, url: str) -> Any:
    from s3torchconnector.dcp import S3StorageWriter
    from s3torchconnector.dcp.s3_file_system import S3FileSystem

    writer = S3StorageWriter(REGION, url)
    writer.fs = S3FileSystem(REGION, s3_client=s3tc_client(spec))
    return writer


def s3tc_dcp_reader(spec: Spec, url: str) -> Any:
    from s3torchconnector.dcp import S3StorageReader
    from s3torchconnector.dcp.s3_file_system import S3FileSystem

    reader = S3StorageReader(REGION, url)
    reader.fs = S3FileSystem(
        REGION, s3_client=s3tc_client(spec), reader_constructor=reader._reader_constructor
    )
    return reader


def _quiet() -> None:
    import warnings

    warnings.filterwarnings("ignore")


# --------------------------------------------------------------------------------------------
# Measurements (each runs in a fresh child process)


def m_prepare(spec: Spec) -> dict[str, Any]:
    """Write the checkpoints every load reads (untimed). Returns per-tensor CRC32Cs."""
    import torch
    import torch.distributed.checkpoint as dcp
    from boto3.s3.transfer import TransferConfig
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    from cloudckpt import CheckpointerConfig, make_sync_checkpointer

    _quiet()
    sd = make_state_dict(spec.size_mib)
    out: dict[str, Any] = {"crcs": tensor_crcs(sd), "payload_bytes": tensor_bytes(sd), "errors": {}}
    need = set(spec["need"])
    ckpt = make_sync_checkpointer(CheckpointerConfig(storage_options=spec.storage_options))
    ckpt.save(spec.url(CLOUDCKPT_PATH), sd)  # always: the partial load reads it
    buf = io.BytesIO()
    torch.save(sd, buf)
    out["torch_object_bytes"] = buf.tell()
    buf.seek(0)
    spec.boto3_client().upload_fileobj(
        buf,
        BUCKET,
        spec.key(TORCH_KEY),
        Config=TransferConfig(multipart_chunksize=RANGE_SIZE, max_concurrency=CONCURRENCY),
    )
    del buf
    if "dcp_fsspec" in need:
        dcp.save(sd, storage_writer=FsspecWriter(spec.url(DCP_FSSPEC_PATH), **spec.storage_options))
    if "s3tc_dcp" in need:
        try:
            dcp.save(sd, storage_writer=s3tc_dcp_writer(spec, spec.url(DCP_S3TC_PATH)))
        except Exception as e:  # reported and excluded by the parent
            out["errors"]["s3tc_dcp"] = f"{type(e).__name__}: {e}"
    return out


def _verify(spec: Spec, loaded: Any, scalars: bool = True) -> str | None:
    return check_loaded(loaded, spec["crcs"], scalars=scalars)


def m_cloudckpt(spec: Spec) -> dict[str, Any]:
    from cloudckpt import CheckpointerConfig, DownloadConfig, make_sync_checkpointer

    apply_patch(spec)
    download = DownloadConfig(**spec.get("download", {}))
    ckpt = make_sync_checkpointer(
        CheckpointerConfig(storage_options=spec.storage_options, download_config=download)
    )
    url = spec.url(CLOUDCKPT_PATH)
    ckpt._reader.storage(url)  # build the boto3 client now (no request): not timed
    with Meter() as m:
        sd = ckpt.load(url)
    return m.result(
        payload_bytes=tensor_bytes(sd),
        bytes_fetched=ckpt._reader.last_bytes_fetched,
        mismatch=_verify(spec, sd),
    )


def m_cloudckpt_partial(spec: Spec) -> dict[str, Any]:
    import torch

    from cloudckpt import CheckpointerConfig, make_sync_checkpointer

    ckpt = make_sync_checkpointer(CheckpointerConfig(storage_options=spec.storage_options))
    url = spec.url(CLOUDCKPT_PATH)
    ckpt._reader.storage(url)
    group, name = PARTIAL_KEY
    template = make_state_dict(spec.size_mib, fill=False)[group][name]
    with Meter() as m:
        target = {group: {name: torch.empty_like(template)}}
        sd = ckpt.load(url, target)
    got = tensor_crcs(sd)
    key = f"{group}.{name}"
    mismatch = (
        None if got == {key: spec["crcs"][key]} else f"partial load got {sorted(got)} / wrong bytes"
    )
    return m.result(
        payload_bytes=tensor_bytes(sd),
        bytes_fetched=ckpt._reader.last_bytes_fetched,
        mismatch=mismatch,
    )


def _raw(spec: Spec, readinto: bool, direct: bool = False) -> dict[str, Any]:
    import torch

    client = spec.boto3_client(max_pool_connections=CONCURRENCY + 2)
    key = spec.key(TORCH_KEY)

    def get(buf: memoryview, start: int) -> None:
        end = start + len(buf)
        body = client.get_object(Bucket=BUCKET, Key=key, Range=f"bytes={start}-{end - 1}")["Body"]
        try:
            if direct:
                # http.client's readinto: the socket reads straight into ``buf`` (no temporary
                # bytes, no second copy); then the connection goes back to urllib3's pool.
                raw = body._raw_stream
                fp, pos = raw._fp, 0
                while pos < len(buf):
                    n = fp.readinto(buf[pos:])
                    if not n:
                        raise OSError(f"short read at {start + pos}")
                    pos += n
                raw.release_conn()
            elif readinto:
                raw, pos = body._raw_stream, 0
                while pos < len(buf):
                    n = raw.readinto(buf[pos : pos + READ_SLICE])
                    if not n:
                        raise OSError(f"short read at {start + pos}")
                    pos += n
            else:
                data = body.read()
                buf[: len(data)] = data
        finally:
            body.close()

    with Meter() as m:
        size = int(client.head_object(Bucket=BUCKET, Key=key)["ContentLength"])
        dest = torch.empty(size, dtype=torch.uint8)
        view = memoryview(dest.numpy()).cast("B")
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(lambda s: get(view[s : s + RANGE_SIZE], s), range(0, size, RANGE_SIZE)))
    # Bit-exact: the buffer is a torch.save zip; load it from memory and compare.
    loaded = torch.load(io.BytesIO(view), weights_only=True)
    return m.result(
        payload_bytes=size, tensor_bytes=tensor_bytes(loaded), mismatch=_verify(spec, loaded)
    )


def m_raw_read(spec: Spec) -> dict[str, Any]:
    return _raw(spec, readinto=False)


def m_raw_readinto(spec: Spec) -> dict[str, Any]:
    return _raw(spec, readinto=True)


def m_raw_direct(spec: Spec) -> dict[str, Any]:
    return _raw(spec, readinto=True, direct=True)


def m_s3tc_dcp(spec: Spec) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    _quiet()
    reader = s3tc_dcp_reader(spec, spec.url(DCP_S3TC_PATH))
    _ = reader.fs._client._client  # build the native client now (no request): not timed
    with Meter() as m:
        sd = make_state_dict(spec.size_mib, fill=False)
        sd["step"], sd["lr"] = 0, 0.0
        dcp.load(sd, storage_reader=reader)
    return m.result(payload_bytes=tensor_bytes(sd), mismatch=_verify(spec, sd))


def m_s3tc_seq(spec: Spec) -> dict[str, Any]:
    import torch
    from s3torchconnector import S3Checkpoint, S3ClientConfig

    checkpoint = S3Checkpoint(
        REGION, endpoint=spec.endpoint_url, s3client_config=S3ClientConfig(force_path_style=True)
    )
    _ = checkpoint._client._client  # build the native client now (no request): not timed
    with Meter() as m, checkpoint.reader(spec.url(TORCH_KEY)) as f:
        sd = torch.load(f, weights_only=True)
    return m.result(payload_bytes=tensor_bytes(sd), mismatch=_verify(spec, sd))


def m_s3fs_torch_load(spec: Spec) -> dict[str, Any]:
    import torch

    fs = spec.s3fs()
    fs.connect()
    with Meter() as m, fs.open(spec.url(TORCH_KEY), "rb") as f:
        sd = torch.load(f, weights_only=True)
    return m.result(payload_bytes=tensor_bytes(sd), mismatch=_verify(spec, sd))


def m_dcp_fsspec(spec: Spec) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    _quiet()
    reader = FsspecReader(spec.url(DCP_FSSPEC_PATH), **spec.storage_options)
    with Meter() as m:
        sd = make_state_dict(spec.size_mib, fill=False)
        sd["step"], sd["lr"] = 0, 0.0
        dcp.load(sd, storage_reader=reader)
    return m.result(payload_bytes=tensor_bytes(sd), mismatch=_verify(spec, sd))


def m_s3fs_cat(spec: Spec) -> dict[str, Any]:
    import torch

    fs = spec.s3fs()
    fs.connect()
    with Meter() as m:
        data = fs.cat_file(spec.url(TORCH_KEY))
        sd = torch.load(io.BytesIO(data), weights_only=True)
        del data
    return m.result(payload_bytes=tensor_bytes(sd), mismatch=_verify(spec, sd))


MEASURES = {
    "prepare": m_prepare,
    "cloudckpt": m_cloudckpt,
    "cloudckpt_partial": m_cloudckpt_partial,
    "raw_read": m_raw_read,
    "raw_readinto": m_raw_readinto,
    "raw_direct": m_raw_direct,
    "s3tc_dcp": m_s3tc_dcp,
    "s3tc_seq": m_s3tc_seq,
    "s3fs_torch_load": m_s3fs_torch_load,
    "dcp_fsspec": m_dcp_fsspec,
    "s3fs_cat": m_s3fs_cat,
}

# --------------------------------------------------------------------------------------------
# Parent


def main(argv: list[str]) -> int:
    if child_main(MEASURES, argv):
        return 0
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(p, default_rounds=5)
    p.add_argument("--partial-rounds", type=int, default=2)
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

    from bench.bench_save import s3tc_unavailable

    only = set(filter(None, args.only.split(",")))
    tools = [t for t in TOOLS if not only or t in only]
    excluded: dict[str, str] = {}
    reason = s3tc_unavailable()
    if reason:
        for t in S3TC:
            if t in tools:
                excluded[t] = reason
                tools.remove(t)

    raw: dict[str, Any] = {"args": vars(args)}
    with BenchServer() as server:
        runner = Runner(
            "bench_load",
            server,
            profile=set(filter(None, args.profile.split(","))),
            profile_mode=args.profile_mode,
            verbose=args.verbose,
        )
        prefix = "load"
        base = server.spec(prefix, args.size_mib, need=tools)
        prep = runner.run("prepare", base)
        if "error" in prep:
            print("prepare failed:\n" + prep["error"])
            return 1
        for t, err in prep["errors"].items():
            if t in tools:
                excluded[t] = f"could not write its checkpoint against SeaweedFS: {err}"
                tools.remove(t)
        print(
            f"prepared checkpoints: {prep['payload_bytes'] / MiB:.0f} MiB of tensors, torch.save "
            f"object {prep['torch_object_bytes'] / MiB:.1f} MiB, in {prep['process_s']:.0f} s",
            flush=True,
        )
        spec = {**base, "crcs": prep["crcs"]}

        entries = {t: (t, {}) for t in tools}
        if args.experiments:
            entries.update(EXPERIMENTS)
        if args.patch:
            entries["exp:cloudckpt+patch"] = (
                "cloudckpt",
                {"patch": str(Path(args.patch).resolve())},
            )
        results: dict[str, list[dict[str, Any]]] = {t: [] for t in entries}
        for rnd in range(args.rounds):
            for label, (measure, extra) in entries.items():
                r = runner.run(measure, {**spec, **extra}, label=label)
                r["round"] = rnd
                results[label].append(r)
                print(f"round {rnd + 1} {label:16s} " + _one_line(r), flush=True)
        raw["rounds"] = results

        count: dict[str, dict[str, Any]] = {}
        partial: list[dict[str, Any]] = []
        proxy = counting_proxy(server.port)
        try:
            for rnd in range(args.partial_rounds):
                proxy.reset_counters()
                r = runner.run(
                    "cloudckpt_partial",
                    {**spec, "endpoint_url": proxy.endpoint_url},
                    label="cloudckpt_partial",
                )
                r["proxy_bytes_to_client"] = proxy.bytes_to_client()
                r["proxy_requests"] = dict(proxy.counts_by_kind())
                partial.append(r)
                print(
                    f"partial {rnd + 1} cloudckpt_partial "
                    + _one_line(r)
                    + f"  transferred {r['proxy_bytes_to_client'] / MiB:.3f} MiB",
                    flush=True,
                )
            if not args.no_count_bytes:
                for tool in tools:
                    proxy.reset_counters()
                    r = runner.run(
                        tool, {**spec, "endpoint_url": proxy.endpoint_url}, label=f"count:{tool}"
                    )
                    count[tool] = {
                        "error": r.get("error"),
                        "received_bytes": proxy.bytes_to_client(),
                        "requests": len(proxy.requests),
                        "by_kind": dict(proxy.counts_by_kind()),
                    }
                    print(
                        f"count   {tool:16s} received {count[tool]['received_bytes'] / MiB:.1f} MiB in "
                        f"{count[tool]['requests']} requests"
                        + (f" ERROR {r['error'][-200:]}" if r.get("error") else ""),
                        flush=True,
                    )
        finally:
            proxy.stop()
        raw.update(
            count=count,
            partial=partial,
            prepare={k: v for k, v in prep.items() if k != "crcs"},
            excluded=excluded,
            tools=tools,
            environment=environment_note(),
        )

    write_json(args.json, raw)
    print(environment_note())
    if cloudckpt_hash() != tree_at_start:
        print("# WARNING: cloudckpt/ changed during this run: rounds may mix code versions")
    return report(args, tools, excluded, results, count, partial, prep, list(entries))


def report_saved(path: str) -> int:
    """The report of a run saved with ``--json``."""
    raw = json.loads(Path(path).read_text())
    args = argparse.Namespace(**raw["args"])
    results = raw["rounds"]
    tools = raw.get("tools") or [t for t in TOOLS if t in results]
    print(f"# report of {path}; {raw.get('environment', '')}")
    return report(
        args,
        tools,
        dict(raw.get("excluded", {})),
        results,
        raw["count"],
        raw["partial"],
        raw["prepare"],
        list(results),
    )


def _one_line(r: dict[str, Any]) -> str:
    if "error" in r:
        return "ERROR " + r["error"].replace("\n", " | ")[-400:]
    bad = f"  MISMATCH: {r['mismatch']}" if r.get("mismatch") else ""
    return (
        f"{r['payload_bytes'] / MiB / r['wall_s']:7.1f} MiB/s  wall {r['wall_s']:6.2f} s  "
        f"cpu {r['cpu_s']:6.2f} s  peak +{r['peak_extra_bytes'] / MiB:6.0f} MiB{bad}"
    )


def report(
    args: argparse.Namespace,
    tools: list[str],
    excluded: dict[str, str],
    results: dict[str, list[dict[str, Any]]],
    count: dict[str, dict[str, Any]],
    partial: list[dict[str, Any]],
    prep: dict[str, Any],
    rows_order: list[str],
) -> int:
    for t in rows_order:  # a wrong result disqualifies the run
        for r in results[t]:
            if r.get("mismatch"):
                r["error"] = f"wrong result: {r['mismatch']}"
    summaries = {t: summarize(t, results[t]) for t in rows_order}
    for t, s in summaries.items():
        if not s.ok:
            excluded.setdefault(
                t, "failed in every round: " + s.errors[0].replace("\n", " | ")[-300:]
            )
    ok = [t for t in tools if summaries[t].ok]
    raws = [t for t in ok if t in RAW]
    ceiling = max(raws, key=lambda t: summaries[t].mib_s) if raws else None
    others = [t for t in ok if t != "cloudckpt" and t not in RAW]
    fastest = max(others, key=lambda t: summaries[t].mib_s) if others else None
    object_bytes = prep["torch_object_bytes"]

    print(
        f"\n== load: {prep['payload_bytes'] / MiB:.0f} MiB of tensors ({args.size_mib} MiB "
        f"requested), median of {args.rounds} interleaved rounds, fresh process each =="
    )
    rows = []
    for t in ok + [e for e in rows_order if e not in tools and summaries[e].ok]:
        s = summaries[t]
        vs_ceiling = f"{paired_ratio(s, summaries[ceiling], throughput):.2f}x" if ceiling else "-"
        cpu_vs = f"{paired_ratio(s, summaries[ceiling], cpu_per_byte):.2f}x" if ceiling else "-"
        recv = count.get(t, {}).get("received_bytes")
        rows.append(
            [
                t + (" (ceiling)" if t == ceiling else ""),
                f"{s.mib_s:.1f}",
                s.spread(),
                vs_ceiling,
                f"{s.cpu_s_per_gib:.2f}",
                cpu_vs,
                f"{s.peak_extra_mib:.0f}",
                f"{s.peak_extra_mib / (s.payload_bytes / MiB):.2f}",
                fmt_mib(recv) if recv else "-",
                f"{recv / object_bytes:.2f}" if recv else "-",
                str(count.get(t, {}).get("requests", "-")),
            ]
        )
    print(
        format_table(
            [
                "tool",
                "MiB/s",
                "range",
                "vs ceiling*",
                "CPU s/GiB",
                "vs ceiling*",
                "peak +MiB",
                "peak/loaded",
                "recv MiB",
                "recv/object",
                "requests",
            ],
            rows,
        )
    )
    print(
        "MiB/s, CPU s/GiB, peak: medians over rounds; range: slowest-fastest round; *: median "
        "over rounds of the ratio to the ceiling's run in the same round (paired)"
    )
    for t, why in excluded.items():
        print(f"excluded: {t}: {why}")

    targets = Targets()
    cm = summaries.get("cloudckpt")
    if cm is None or not cm.ok:
        targets.check(
            "load: cloudckpt ran",
            None,
            "cloudckpt failed: " + (cm.errors[0][-300:] if cm else "not run"),
        )
    else:
        if ceiling:
            c = summaries[ceiling]
            # vs every raw variant, paired by round; the smallest ratio counts
            ratio = min(paired_ratio(cm, summaries[r], throughput) for r in raws)
            targets.check(
                "full load >= 0.9x the raw ceiling",
                ratio >= 0.9,
                f"{ratio:.3f}x paired ({cm.mib_s:.1f} vs {ceiling} {c.mib_s:.1f} MiB/s "
                f"median: {cm.mib_s / c.mib_s:.2f}x)",
            )
            cpu_ratio = paired_ratio(cm, c, cpu_per_byte)
            targets.check(
                "load client CPU s/GiB <= 1.3x the raw ceiling's",
                cpu_ratio <= 1.3,
                f"{cpu_ratio:.3f}x paired ({cm.cpu_s_per_gib:.2f} vs {c.cpu_s_per_gib:.2f} "
                f"s/GiB median: {cm.cpu_s_per_gib / c.cpu_s_per_gib:.2f}x)",
            )
        else:
            targets.check("full load >= 0.9x the raw ceiling", None, "no raw ceiling measured")
        if fastest:
            f = summaries[fastest]
            # vs every other tool, paired by round; the smallest ratio counts
            fastest = min(others, key=lambda t: paired_ratio(cm, summaries[t], throughput))
            f = summaries[fastest]
            ratio = paired_ratio(cm, f, throughput)
            targets.check(
                "full load >= 1.3x the fastest other tool",
                ratio >= 1.3,
                f"{ratio:.3f}x paired ({cm.mib_s:.1f} vs {fastest} {f.mib_s:.1f} MiB/s "
                f"median: {cm.mib_s / f.mib_s:.2f}x)",
            )
        if "s3fs_torch_load" in ok:
            f = summaries["s3fs_torch_load"]
            ratio = paired_ratio(cm, f, throughput)
            targets.check(
                "full load >= 1.8x torch.load over s3fs",
                ratio >= 1.8,
                f"{ratio:.3f}x paired ({cm.mib_s:.1f} vs {f.mib_s:.1f} MiB/s median: "
                f"{cm.mib_s / f.mib_s:.2f}x)",
            )
        else:
            targets.check(
                "full load >= 1.8x torch.load over s3fs", None, "s3fs_torch_load did not run"
            )
        peak = cm.med("peak_extra_bytes")
        limit = cm.payload_bytes + 64 * MiB
        targets.check(
            "full load peak extra RSS <= loaded tensor bytes + 64 MiB",
            peak <= limit,
            f"{peak / MiB:.0f} MiB vs limit {limit / MiB:.0f} MiB (max over rounds "
            f"{max(r['peak_extra_bytes'] for r in cm.runs) / MiB:.0f})",
        )
    good = [r for r in partial if "error" not in r and not r.get("mismatch")]
    if good:
        transferred = max(r["proxy_bytes_to_client"] for r in good)
        r0 = good[-1]
        print(
            f"\n== partial load of {'.'.join(PARTIAL_KEY)} (16 MiB) through a counting proxy ==\n"
            f"transferred {transferred / MiB:.3f} MiB in {sum(r0['proxy_requests'].values())} "
            f"requests {r0['proxy_requests']}; reader.last_bytes_fetched "
            f"{r0['bytes_fetched'] / MiB:.3f} MiB; wall {median(r['wall_s'] for r in good):.2f} s; "
            f"peak +{median(r['peak_extra_bytes'] for r in good) / MiB:.0f} MiB"
        )
        targets.check(
            "partial load of one 16 MiB tensor transfers <= 17 MiB",
            transferred <= 17 * MiB,
            f"{transferred / MiB:.3f} MiB",
        )
    else:
        targets.check(
            "partial load of one 16 MiB tensor transfers <= 17 MiB",
            None,
            "partial load failed: "
            + (partial[0].get("error") or partial[0].get("mismatch") or "")[-300:]
            if partial
            else "not run",
        )
    return targets.report()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
