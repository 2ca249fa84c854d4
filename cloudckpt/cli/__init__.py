"""The ``cloudckpt`` command line (console script ``cloudckpt = cloudckpt.cli:main``)."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
