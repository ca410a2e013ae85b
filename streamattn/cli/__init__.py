"""The command line (``streamattn``; ``python -m streamattn``): one module per command."""

from streamattn.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
