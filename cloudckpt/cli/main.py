"""The ``cloudckpt`` console script: argument parsing, logging, and the one-line error contract.

Every command is a thin function in :mod:`cloudckpt.cli.commands` over the library. Errors the
library raises on purpose (:class:`cloudckpt.CloudCkptError`, whose message already names the
URL, rank and a hint) and bad arguments print ONE line ``cloudckpt: error: <message>`` on
stderr; ``--debug`` adds the traceback. Exit codes: 0 success, 1 failure (including a
``verify`` that found problems), 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from ..errors import CloudCkptError, UnsupportedURLError
from . import commands
from .options import (
    StorageOptions,
    parse_duration_secs,
    parse_positive_int,
    parse_rank,
    parse_size_bytes,
    parse_storage_option,
)

PROG = "cloudckpt"
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line in the CLI's error format."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")


def _common_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """Options accepted before and after the subcommand (``SUPPRESS`` keeps the subcommand's
    copy from overwriting a value given before it)."""
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--storage-option",
        "-o",
        dest="storage_option",
        metavar="[SCOPE.]KEY=VALUE",
        type=parse_storage_option,
        action="append",
        default=default,
        help="store option, repeatable; VALUE is JSON when it parses (anon=true). SCOPE s3 or "
        "gs limits it to that store (s3.endpoint_url=..., gs.token=...). Defaults come from "
        "AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and STORAGE_EMULATOR_HOST",
    )
    parser.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        default=default if suppress else False,
        help="no progress bars, no warnings",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=default if suppress else False,
        help="debug logging and full tracebacks",
    )


def _json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def build_parser() -> argparse.ArgumentParser:
    """The full command line (``cloudckpt --help``)."""
    parser = _Parser(
        prog=PROG,
        description="Inspect, verify, restore, copy and clean up cloudckpt checkpoints on S3, "
        "GCS and local disks.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  cloudckpt ls s3://my-bucket/run-7\n"
        "  cloudckpt restore s3://my-bucket/run-7/step-1000 ./step-1000",
    )
    _common_options(parser, suppress=False)
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    def add(name: str, help_text: str, example: str, func: Callable[..., int]) -> _Parser:
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=f"example:\n{example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _common_options(p, suppress=True)
        p.set_defaults(func=func)
        return p

    p = add(
        "ls",
        "list the checkpoints under a run prefix (newest committed marked with *)",
        "  cloudckpt ls s3://my-bucket/run-7\n  cloudckpt ls --json gs://my-bucket/run-7",
        commands.cmd_ls,
    )
    p.add_argument("prefix", metavar="PREFIX", help="run prefix, e.g. s3://bucket/run-7")
    _json_option(p)

    p = add(
        "info",
        "show a checkpoint's manifest: ranks, objects, keys with dtype/shape/bytes, versions",
        "  cloudckpt info s3://my-bucket/run-7/step-1000\n"
        "  cloudckpt info --json --rank 0 ./checkpoints/step-1000",
        commands.cmd_info,
    )
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint URL or directory")
    p.add_argument("--rank", type=parse_rank, help="show only this rank's keys")
    _json_option(p)

    p = add(
        "verify",
        "read every object of a checkpoint and check sizes and checksums (exit 1 on problems)",
        "  cloudckpt verify s3://my-bucket/run-7/step-1000 && echo intact",
        commands.cmd_verify,
    )
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint URL or directory")
    _json_option(p)

    p = add(
        "restore",
        "download a checkpoint to a local directory (a valid local checkpoint), or write one "
        "plain torch.save file with --to-torch",
        "  cloudckpt restore s3://my-bucket/run-7/step-1000 ./step-1000\n"
        "  cloudckpt restore s3://my-bucket/run-7/step-1000 --to-torch model.pt "
        "--keys model --rank 0",
        commands.cmd_restore,
    )
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint URL")
    p.add_argument("dest", metavar="DEST", nargs="?", help="local directory to restore into")
    p.add_argument(
        "--to-torch",
        metavar="FILE",
        help="write one plain torch.save file (loadable by torch.load) instead of a directory",
    )
    p.add_argument(
        "--keys",
        metavar="K1,K2",
        help="with --to-torch: only these keys (dotted paths, e.g. model.layer.weight,optim)",
    )
    p.add_argument(
        "--rank", type=parse_rank, default=None, help="with --to-torch: which rank (default 0)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint at DEST")

    p = add(
        "cp",
        "copy a committed checkpoint between stores, streaming and verifying, committing last",
        "  cloudckpt cp s3://my-bucket/run-7/step-1000 gs://backup/run-7/step-1000\n"
        "  cloudckpt -o s3.endpoint_url=http://127.0.0.1:9000 cp s3://b/run/step-1 gs://b/step-1",
        commands.cmd_cp,
    )
    p.add_argument("src", metavar="SRC", help="committed checkpoint to copy")
    p.add_argument("dst", metavar="DST", help="destination checkpoint URL or directory")
    p.add_argument("--overwrite", action="store_true", help="replace a committed checkpoint at DST")

    p = add(
        "prune",
        "delete committed checkpoints beyond the newest N (never uncommitted ones)",
        "  cloudckpt prune s3://my-bucket/run-7 --keep 3 --keep-every 1000 --dry-run",
        commands.cmd_prune,
    )
    p.add_argument("prefix", metavar="PREFIX", help="run prefix")
    p.add_argument("--keep", type=parse_positive_int, required=True, metavar="N", help="newest N")
    p.add_argument(
        "--keep-every", type=parse_positive_int, metavar="K", help="also keep steps divisible by K"
    )
    p.add_argument(
        "--protect",
        action="append",
        default=[],
        metavar="NAME",
        help="never delete this checkpoint (name or URL; repeatable)",
    )
    p.add_argument("--dry-run", action="store_true", help="only print what would be deleted")
    _json_option(p)

    p = add(
        "gc",
        "abort stale unfinished uploads and delete uncommitted checkpoints older than DURATION",
        "  cloudckpt gc s3://my-bucket/run-7 --older-than 7d --dry-run",
        commands.cmd_gc,
    )
    p.add_argument("prefix", metavar="PREFIX", help="run prefix")
    p.add_argument(
        "--older-than",
        type=parse_duration_secs,
        required=True,
        metavar="DURATION",
        help="e.g. 90s, 30m, 2h, 7d; longer than your slowest save",
    )
    p.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    _json_option(p)

    p = add(
        "local",
        "start/stop the local S3 (SeaweedFS/moto) and GCS (fake-gcs-server) test servers",
        "  cloudckpt local up --gcs --bucket ckpts\n"
        '  eval "$(cloudckpt local env)"\n  cloudckpt local down',
        commands.cmd_local,
    )
    p.add_argument("action", choices=["up", "down", "env", "status"], help="what to do")
    p.add_argument(
        "extra",
        nargs=argparse.REMAINDER,
        metavar="...",
        help="passed to `python -m localstack ACTION` (e.g. --s3 moto --gcs --bucket NAME)",
    )

    p = add(
        "bench",
        "save and load a synthetic state dict under URL and print MiB/s; cleans up after itself",
        "  cloudckpt bench s3://my-bucket/scratch --size 1GiB",
        commands.cmd_bench,
    )
    p.add_argument("url", metavar="URL", help="prefix to benchmark under (a temporary child)")
    p.add_argument(
        "--size",
        type=parse_size_bytes,
        default=parse_size_bytes("256MiB"),
        metavar="SIZE",
        help="state dict size (default 256MiB)",
    )
    _json_option(p)
    return parser


def _configure_logging(*, quiet: bool, debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    package_logger = logging.getLogger("cloudckpt")
    package_logger.handlers[:] = [handler]
    package_logger.propagate = False
    package_logger.setLevel(logging.DEBUG if debug else logging.ERROR if quiet else logging.WARNING)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _error_message(e: BaseException) -> str:
    if isinstance(e, CloudCkptError | ValueError | TypeError | OSError):
        return _one_line(str(e)) or type(e).__name__
    return _one_line(f"internal error: {type(e).__name__}: {e} (rerun with --debug for details)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet = bool(getattr(args, "quiet", False))
    debug = bool(getattr(args, "debug", False))
    _configure_logging(quiet=quiet, debug=debug)
    ctx = commands.Context(
        storage=StorageOptions.from_flags(getattr(args, "storage_option", None) or []),
        quiet=quiet,
        progress=not quiet and sys.stderr.isatty(),
    )
    try:
        return int(args.func(args, ctx))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if debug:
            traceback.print_exc()
        print(f"{PROG}: error: {_error_message(e)}", file=sys.stderr)
        # Bad arguments are ValueError/TypeError (raised before any I/O), like a bad URL.
        usage = isinstance(e, UnsupportedURLError) or (
            isinstance(e, ValueError | TypeError) and not isinstance(e, CloudCkptError)
        )
        return EXIT_USAGE if usage else EXIT_FAILURE
