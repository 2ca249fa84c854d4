"""Human output of the command line: sizes, times, tables, JSON and a progress bar."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, TextIO

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_REDRAW_SECS = 0.1
_BAR_CELLS = 24


def format_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB`` (binary units)."""
    value = float(n)
    unit = 0
    while abs(value) >= 1024 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    return f"{int(value)} B" if unit == 0 else f"{value:.1f} {_UNITS[unit]}"


def format_time(secs: float | None) -> str:
    """Local wall-clock time of an epoch timestamp, or ``-``."""
    if secs is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(secs))


def format_duration(secs: float) -> str:
    whole = max(0, round(secs))
    hours, rest = divmod(whole, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def mib_per_sec(nbytes: int, secs: float) -> float:
    return nbytes / (1 << 20) / secs if secs > 0 else 0.0


def print_json(doc: Any, out: TextIO | None = None) -> None:
    json.dump(doc, out or sys.stdout, indent=2, sort_keys=False)
    (out or sys.stdout).write("\n")


def table(rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> list[str]:
    """Rows of cells as aligned lines; the columns in ``right`` are right-aligned."""
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


class ProgressBar:
    """``label [#####.....] 12.0/48.0 MiB  96.1 MiB/s  ETA 0:01`` on a terminal's stderr.

    Thread-safe :meth:`update`; redraws at most every 0.1 s. Disabled (every call is a no-op)
    unless ``enabled``: the CLI enables it only when stderr is a terminal and not ``--quiet``.
    """

    def __init__(
        self, label: str, total_bytes: int, *, enabled: bool, stream: TextIO | None = None
    ) -> None:
        self.label = label
        self.total_bytes = max(0, total_bytes)
        self.enabled = enabled
        self.done_bytes = 0
        self._stream = stream or sys.stderr
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._drawn_at = 0.0
        self._width = 0

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, nbytes: int) -> None:
        if not self.enabled:
            return
        with self._lock:
            self.done_bytes += nbytes
            now = time.monotonic()
            if now - self._drawn_at >= _REDRAW_SECS or self.done_bytes >= self.total_bytes:
                self._draw(now)

    def close(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._draw(time.monotonic())
            self._stream.write("\n")
            self._stream.flush()
            self.enabled = False

    def render(self, now: float) -> str:
        """The bar's text at time ``now`` (monotonic seconds)."""
        elapsed = max(now - self._started, 1e-9)
        rate = self.done_bytes / elapsed
        total = self.total_bytes or 1
        fraction = min(1.0, self.done_bytes / total)
        filled = int(fraction * _BAR_CELLS)
        bar = "#" * filled + "." * (_BAR_CELLS - filled)
        remaining = max(0, self.total_bytes - self.done_bytes)
        eta = format_duration(remaining / rate) if rate > 0 and remaining else "0:00"
        return (
            f"{self.label} [{bar}] {format_bytes(self.done_bytes)}/"
            f"{format_bytes(self.total_bytes)}  {rate / (1 << 20):.1f} MiB/s  ETA {eta}"
        )

    def _draw(self, now: float) -> None:
        text = self.render(now)
        pad = " " * max(0, self._width - len(text))
        self._width = len(text)
        self._stream.write(f"\r{text}{pad}")
        self._stream.flush()
        self._drawn_at = now
