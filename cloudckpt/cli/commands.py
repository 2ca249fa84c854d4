"""The subcommands: each one a thin function ``cmd_<name>(args, ctx) -> exit code`` over the
library (:mod:`cloudckpt.manager`, :class:`cloudckpt.CheckpointReader`, the checkpointers).

Results go to stdout (text, or JSON with ``--json``); progress bars and errors to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..config import CheckpointerConfig, StorageConfig
from ..errors import CloudCkptError, CorruptCheckpointError
from ..format import key_path_name
from ..manager import (
    CheckpointInfo,
    CheckpointManager,
    copy_checkpoint,
    newest_committed,
    read_manifest,
    verify_checkpoint,
)
from ..manifest import MANIFEST_NAME, Manifest
from ..reader import CheckpointReader
from ..storage import get_storage, join_url, normalize_url, split_url
from .options import StorageOptions
from .output import (
    ProgressBar,
    format_bytes,
    format_time,
    mib_per_sec,
    print_json,
    table,
)

logger = logging.getLogger(__name__)

_BENCH_TENSOR_BYTES = 64 << 20


@dataclass(frozen=True)
class Context:
    """What every command gets besides its arguments."""

    storage: StorageOptions
    quiet: bool = False
    progress: bool = False  # draw progress bars (stderr is a terminal and not --quiet)

    def config_for(self, url: str) -> StorageConfig:
        return self.storage.config_for(url)

    def bar(self, label: str, total_bytes: int) -> ProgressBar:
        return ProgressBar(label, total_bytes, enabled=self.progress)


def _manifest_for_progress(ctx: Context, url: str) -> Manifest | None:
    """The manifest, read only to size a progress bar (None when bars are off)."""
    if not ctx.progress:
        return None
    storage = get_storage(url, ctx.config_for(url))
    try:
        return read_manifest(storage, url)
    finally:
        storage.close()


# --- ls ---------------------------------------------------------------------------------------


def cmd_ls(args: argparse.Namespace, ctx: Context) -> int:
    """``cloudckpt ls PREFIX``: one line per checkpoint, newest committed marked ``*``."""
    with CheckpointManager(args.prefix, storage_options=ctx.config_for(args.prefix)) as manager:
        checkpoints = manager.list()
        prefix = manager.prefix_url
    latest = newest_committed(checkpoints)
    if args.json:
        print_json(
            {
                "prefix": prefix,
                "latest": latest.name if latest is not None else None,
                "checkpoints": [{**c.to_dict(), "latest": c is latest} for c in checkpoints],
            }
        )
        return 0
    if not checkpoints:
        print(f"no checkpoints under {prefix}")
        return 0
    rows = [["", "STEP", "NAME", "RANKS", "SIZE", "TIME", "STATUS"]]
    for c in checkpoints:
        rows.append(
            [
                "*" if c is latest else "",
                "-" if c.step is None else str(c.step),
                c.name,
                str(c.ranks),
                format_bytes(c.size_bytes),
                format_time(c.time_secs),
                "committed" if c.committed else f"uncommitted: {c.problem}",
            ]
        )
    for line in table(rows, right=(1, 3, 4)):
        print(line)
    committed = sum(c.committed for c in checkpoints)
    total = sum(c.size_bytes for c in checkpoints)
    newest = f"; * = latest committed ({latest.name})" if latest is not None else ""
    print(f"{len(checkpoints)} checkpoint(s), {committed} committed, {format_bytes(total)}{newest}")
    return 0


# --- info -------------------------------------------------------------------------------------


def _tensor_rows(manifest: Manifest, rank: int | None) -> Iterator[tuple[int, dict[str, Any]]]:
    for entry in manifest.ranks:
        if rank is not None and entry.rank != rank:
            continue
        for t in entry.layout.tensors:
            yield (
                entry.rank,
                {
                    "key": t.name,
                    "dtype": t.dtype,
                    "shape": list(t.shape),
                    "bytes": t.nbytes,
                },
            )


def cmd_info(args: argparse.Namespace, ctx: Context) -> int:
    """``cloudckpt info CKPT``: the manifest, in words or JSON."""
    url = normalize_url(args.ckpt)
    storage = get_storage(url, ctx.config_for(url))
    try:
        manifest = read_manifest(storage, url)
    finally:
        storage.close()
    if args.rank is not None and args.rank >= manifest.world_size:
        raise ValueError(f"{url} has {manifest.world_size} rank(s); there is no rank {args.rank}")
    ranks = [e for e in manifest.ranks if args.rank is None or e.rank == args.rank]
    by_rank: dict[int, list[dict[str, Any]]] = {}
    for rank, row in _tensor_rows(manifest, args.rank):
        by_rank.setdefault(rank, []).append(row)
    doc = {
        "url": url,
        "format_version": manifest.format_version,
        "tool_version": manifest.tool_version,
        "torch_version": manifest.torch_version,
        "created_secs": manifest.created_secs,
        "world_size": manifest.world_size,
        "objects": len(manifest.ranks),
        "total_bytes": manifest.total_bytes,
        "checksum_algorithm": manifest.checksum_algorithm,
        "user_metadata": manifest.user_metadata,
        "ranks": [
            {
                "rank": e.rank,
                "object": e.object_name,
                "url": join_url(url, e.object_name),
                "size_bytes": e.size_bytes,
                "crc32c": e.layout.crc32c,
                "version": e.version,
                "tensor_bytes": sum(r["bytes"] for r in by_rank.get(e.rank, [])),
                "tensors": by_rank.get(e.rank, []),
            }
            for e in ranks
        ],
    }
    if args.json:
        print_json(doc)
        return 0
    print(f"checkpoint  {url}")
    print(
        f"format      cloudckpt v{manifest.format_version} (written by cloudckpt "
        f"{manifest.tool_version}, torch {manifest.torch_version or '?'})"
    )
    print(f"created     {format_time(manifest.created_secs)}")
    print(
        f"ranks       {manifest.world_size}, {len(manifest.ranks)} object(s), "
        f"{format_bytes(manifest.total_bytes)} ({manifest.total_bytes} bytes)"
    )
    if manifest.user_metadata:
        print(f"metadata    {json.dumps(manifest.user_metadata, sort_keys=True)}")
    for rank_doc in doc["ranks"]:
        print()
        print(
            f"rank {rank_doc['rank']}  {rank_doc['object']}  "
            f"{format_bytes(rank_doc['size_bytes'])}  crc32c {rank_doc['crc32c']:#010x}"
        )
        rows = [["  KEY", "DTYPE", "SHAPE", "BYTES"]]
        for t in rank_doc["tensors"]:
            shape = "[" + ", ".join(str(s) for s in t["shape"]) + "]"
            rows.append([f"  {t['key']}", t["dtype"], shape, format_bytes(t["bytes"])])
        for line in table(rows, right=(3,)):
            print(line)
        print(f"  {len(rank_doc['tensors'])} tensor(s), {format_bytes(rank_doc['tensor_bytes'])}")
    return 0


# --- verify -----------------------------------------------------------------------------------


def cmd_verify(args: argparse.Namespace, ctx: Context) -> int:
    """``cloudckpt verify CKPT``: exit 0 only if every size and checksum matches."""
    url = normalize_url(args.ckpt)
    manifest = _manifest_for_progress(ctx, url)
    with ctx.bar("verify", manifest.total_bytes if manifest else 0) as bar:
        report = verify_checkpoint(url, ctx.config_for(url), progress=bar.update)
    if args.json:
        print_json(report.to_dict())
    elif report.ok:
        print(
            f"OK {url}: {report.objects_checked} object(s), {format_bytes(report.bytes_checked)}"
            ", all sizes and checksums match"
        )
    else:
        print(f"FAILED {url}: {len(report.problems)} problem(s)")
        for p in report.problems:
            print(f"  rank {p.rank} [{p.kind}] {p.message}")
    if report.ok:
        return 0
    first = " ".join(report.problems[0].message.split())
    more = f" (+{len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
    print(f"cloudckpt: error: verify failed for {url}: {first}{more}", file=sys.stderr)
    return 1


# --- restore ----------------------------------------------------------------------------------


def cmd_restore(args: argparse.Namespace, ctx: Context) -> int:
    """``cloudckpt restore CKPT DEST`` or ``restore CKPT --to-torch FILE``."""
    if (args.dest is None) == (args.to_torch is None):
        raise ValueError("give either DEST (a directory) or --to-torch FILE")
    if args.to_torch is None and (args.keys is not None or args.rank is not None):
        raise ValueError("--keys and --rank go with --to-torch FILE")
    if args.to_torch is not None:
        return _restore_to_torch(args, ctx)
    if split_url(args.dest)[0] != "file":
        raise ValueError(
            f"DEST must be a local directory, got {args.dest!r}; copy between stores with "
            "`cloudckpt cp SRC DST`"
        )
    src = normalize_url(args.ckpt)
    manifest = _manifest_for_progress(ctx, src)
    with ctx.bar("restore", manifest.total_bytes if manifest else 0) as bar:
        report = copy_checkpoint(
            src,
            args.dest,
            src_config=ctx.config_for(src),
            dst_config=StorageConfig(),
            overwrite=args.overwrite,
            progress=bar.update,
        )
    print(
        f"restored {src} to {report.dst_url}: {report.ranks} rank object(s), "
        f"{format_bytes(report.bytes_copied)} in {report.seconds:.2f} s "
        f"({mib_per_sec(report.bytes_copied, report.seconds):.1f} MiB/s), checksums verified"
    )
    return 0


def _restore_to_torch(args: argparse.Namespace, ctx: Context) -> int:
    import torch

    url = normalize_url(args.ckpt)
    rank = args.rank or 0
    keys = [k.strip() for k in (args.keys or "").split(",") if k.strip()]
    if args.keys is not None and not keys:
        raise ValueError("--keys needs at least one key")
    reader = CheckpointReader(storage_config=ctx.config_for(url))
    try:
        if not keys:
            data, _ = reader.read(url, rank=rank)
        else:
            data = _read_keys(reader, url, rank, keys)
    finally:
        reader.close()
    path = os.path.abspath(args.to_torch)
    if os.path.exists(path) and not args.overwrite:
        raise CloudCkptError(
            f"{path} already exists", hint="pass --overwrite to replace it, or pick another file"
        )
    temp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        torch.save(data, temp)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    tensors = list(_tensors(data))
    size = sum(t.numel() * t.element_size() for t in tensors)
    print(
        f"wrote {path}: rank {rank} of {url}, {len(tensors)} tensor(s), {format_bytes(size)}; "
        "load it with torch.load()"
    )
    return 0


def _tensors(obj: Any) -> Iterator[Any]:
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _tensors(v)


def resolve_key(structure: Any, key: str) -> tuple[Any, ...]:
    """The dict-key path a dotted ``key`` names in ``structure``, in the spelling ``info``
    prints: ``model.layer.weight``, ``optim.state[0].exp_avg`` (``[0]`` is an int dict key).
    Keys may contain dots themselves (a flat ``layer.weight``): the longest match wins."""
    path: list[Any] = []
    node, rest = structure, key
    while rest:
        if not isinstance(node, dict):
            where = key_path_name(tuple(path)) or "the top level"
            raise ValueError(
                f"key {key!r}: {where} is a {type(node).__name__}, not a dict; select it whole"
            )
        match, match_len = None, -1
        for k in node:
            for spelling in (f"[{k}]", str(k)) if isinstance(k, int) else (str(k),):
                follows = rest[len(spelling) : len(spelling) + 1]
                if (
                    rest.startswith(spelling)
                    and follows in ("", ".", "[")
                    and len(spelling) > match_len
                ):
                    match, match_len = k, len(spelling)
        if match_len < 0:
            known = ", ".join(sorted(str(k) for k in node)[:10])
            where = key_path_name(tuple(path)) or "the top level"
            raise ValueError(f"key {key!r} is not in the checkpoint ({where} has: {known})")
        path.append(match)
        node, rest = node[match], rest[match_len:].removeprefix(".")
    if not path:
        raise ValueError("empty key in --keys")
    return tuple(path)


def _select(structure: Any, paths: list[tuple[Any, ...]], leaf: Any) -> dict[Any, Any]:
    """Nested dicts holding ``leaf(value)`` at each path, in the order given; a path inside
    another selected path adds nothing (the enclosing entry is taken whole). Inner dicts keep
    the checkpoint's dict type (an OrderedDict stays one: partial reads check types)."""
    kept = [p for p in paths if not any(q != p and p[: len(q)] == q for q in paths)]
    out: dict[Any, Any] = type(structure)() if isinstance(structure, dict) else {}
    for path in dict.fromkeys(kept):
        src, dst = structure, out
        for part in path[:-1]:
            src = src[part]
            if part not in dst:
                dst[part] = type(src)()
            dst = dst[part]
        dst[path[-1]] = leaf(src[path[-1]])
    return out


def _has_meta_tensor(obj: Any) -> bool:
    return any(t.device.type == "meta" for t in _tensors(obj))


def _read_keys(reader: CheckpointReader, url: str, rank: int, keys: list[str]) -> Any:
    """Only the tensors under ``keys``: a partial read (only their bytes are fetched)."""
    structure, _ = reader.read(url, map_location="meta", rank=rank)
    paths = [resolve_key(structure, k) for k in keys]
    data, missing = reader.read(url, _select(structure, paths, lambda _v: None), rank=rank)
    if missing or _has_meta_tensor(data):
        # Containers a partial read does not fill (tuples): select from a full read instead.
        full, _ = reader.read(url, rank=rank)
        data = _select(full, paths, lambda v: v)
    return data


# --- cp ---------------------------------------------------------------------------------------


def cmd_cp(args: argparse.Namespace, ctx: Context) -> int:
    """``cloudckpt cp SRC DST``: copy, verify on the fly, commit the copy last."""
    src, dst = normalize_url(args.src), normalize_url(args.dst)
    manifest = _manifest_for_progress(ctx, src)
    with ctx.bar("cp", manifest.total_bytes if manifest else 0) as bar:
        report = copy_checkpoint(
            src,
            dst,
            src_config=ctx.config_for(src),
            dst_config=ctx.config_for(dst),
            overwrite=args.overwrite,
            progress=bar.update,
        )
    print(
        f"copied {src} to {dst}: {report.ranks} rank object(s), "
        f"{format_bytes(report.bytes_copied)} in {report.seconds:.2f} s "
        f"({mib_per_sec(report.bytes_copied, report.seconds):.1f} MiB/s), checksums verified"
    )
    return 0


# --- prune / gc -------------------------------------------------------------------------------


def _describe(c: CheckpointInfo) -> str:
    step = "" if c.step is None else f"step {c.step}, "
    return f"{c.name} ({step}{format_bytes(c.size_bytes)})"


def cmd_prune(args: argparse.Namespace, ctx: Context) -> int:
    """``cloudckpt prune PREFIX --keep N``: retention from the command line."""
    with CheckpointManager(args.prefix, storage_options=ctx.config_for(args.prefix)) as manager:
        deleted = manager.apply_retention(
            args.keep, args.keep_every, args.protect, dry_run=args.dry_run
        )
        prefix = manager.prefix_url
    if args.json:
        print_json(
            {"prefix": prefix, "dry_run": args.dry_run, "deleted": [c.to_dict() for c in deleted]}
        )
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    for c in deleted:
        print(f"{verb} {_describe(c)}")
    freed = format_bytes(sum(c.size_bytes for c in deleted))
    print(f"{verb} {len(deleted)} checkpoint(s) under {prefix}, {freed}")
    return 0


def cmd_gc(args: argparse.Namespace, ctx: Context) -> int:
    """``cloudckpt gc PREFIX --older-than DURATION``: stale uploads and uncommitted saves."""
    with CheckpointManager(args.prefix, storage_options=ctx.config_for(args.prefix)) as manager:
        report = manager.gc(args.older_than, dry_run=args.dry_run)
        prefix = manager.prefix_url
    if args.json:
        print_json({"prefix": prefix, **report.to_dict()})
        return 0
    would = "would " if args.dry_run else ""
    for p in report.aborted_uploads:
        print(
            f"{would}abort upload {p.upload_id} of {p.url} "
            f"(started {format_time(p.initiated_secs)})"
        )
    for c in report.deleted_checkpoints:
        print(f"{would}delete uncommitted {_describe(c)}: {c.problem}")
    print(
        f"{would}abort {len(report.aborted_uploads)} upload(s) and delete "
        f"{len(report.deleted_checkpoints)} uncommitted checkpoint(s) "
        f"({report.deleted_objects} object(s), {format_bytes(report.freed_bytes)}) under {prefix}"
    )
    return 0


# --- local ------------------------------------------------------------------------------------


def cmd_local(args: argparse.Namespace, ctx: Context) -> int:
    """``cloudckpt local up|down|env|status``: the launcher of ``localstack/``."""
    try:
        from localstack.__main__ import main as launcher_main
    except ImportError as e:
        raise ValueError(
            f"the local server launcher is not importable ({e}); it ships with cloudckpt's "
            "source tree: run this from a checkout or install it from there"
        ) from e
    return int(launcher_main([args.action, *args.extra]))


# --- bench ------------------------------------------------------------------------------------


def _synthetic_state_dict(size_bytes: int) -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(0)
    remaining, out, i = size_bytes // 4, {}, 0
    while remaining > 0:
        n = min(remaining, _BENCH_TENSOR_BYTES // 4)
        out[f"layer_{i}.weight"] = torch.rand(n, generator=generator)
        remaining -= n
        i += 1
    return out


def _remove_tree(url: str, config: StorageConfig) -> None:
    """Delete everything under ``url``, its manifest first."""
    storage = get_storage(url, config)
    try:
        storage.delete([join_url(url, MANIFEST_NAME)])
        storage.delete([o.url for o in storage.list(url)])
    finally:
        storage.close()
    if split_url(url)[0] == "file" and os.path.isdir(url):
        import shutil

        shutil.rmtree(url)


def cmd_bench(args: argparse.Namespace, ctx: Context) -> int:
    """``cloudckpt bench URL``: save + load throughput against the user's own store."""
    from ..builder import make_sync_checkpointer

    base = normalize_url(args.url)
    url = join_url(base, f"cloudckpt-bench-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}")
    config = ctx.config_for(url)
    state_dict = _synthetic_state_dict(args.size)
    size = sum(t.numel() * t.element_size() for t in state_dict.values())
    checkpointer = make_sync_checkpointer(
        CheckpointerConfig(storage_options=dict(config.storage_options))
    )
    try:
        started = time.perf_counter()
        checkpointer.save(url, state_dict)
        save_secs = time.perf_counter() - started
        started = time.perf_counter()
        loaded = checkpointer.load(url)
        load_secs = time.perf_counter() - started
        if set(loaded) != set(state_dict):
            raise CorruptCheckpointError(f"bench checkpoint at {url} came back incomplete", url=url)
    except BaseException:
        checkpointer.close()
        try:
            _remove_tree(url, config)
        except Exception as cleanup_error:
            logger.warning("could not clean up %s: %s", url, cleanup_error)
        raise
    checkpointer.close()
    _remove_tree(url, config)
    doc = {
        "url": url,
        "size_bytes": size,
        "tensors": len(state_dict),
        "save_secs": save_secs,
        "save_mib_per_sec": mib_per_sec(size, save_secs),
        "load_secs": load_secs,
        "load_mib_per_sec": mib_per_sec(size, load_secs),
    }
    if args.json:
        print_json(doc)
        return 0
    print(f"bench {url}: {format_bytes(size)} in {len(state_dict)} tensor(s), removed afterwards")
    print(f"save  {save_secs:8.2f} s  {doc['save_mib_per_sec']:8.1f} MiB/s")
    print(f"load  {load_secs:8.2f} s  {doc['load_mib_per_sec']:8.1f} MiB/s")
    return 0


__all__ = [
    "Context",
    "cmd_bench",
    "cmd_cp",
    "cmd_gc",
    "cmd_info",
    "cmd_local",
    "cmd_ls",
    "cmd_prune",
    "cmd_restore",
    "cmd_verify",
    "resolve_key",
]
