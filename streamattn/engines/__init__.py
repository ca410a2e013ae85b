"""Engines run operators over a key source. They know the protocol, not the algorithms."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from streamattn.engines.local import run_local
from streamattn.errors import ConfigError
from streamattn.operators.protocol import Operator
from streamattn.source import KeySource

ENGINES = ("local",)


def run_operators(
    source: KeySource,
    operators: Sequence[Operator],
    *,
    engine: str = "local",
    chunk_rows: int | None = None,
    progress: bool = False,
    description: str = "pass",
    **engine_options: Any,
) -> list[Operator]:
    """One pass of ``source`` through ``operators`` on the chosen engine."""
    if engine == "local":
        if engine_options:
            raise ConfigError(
                f"options {sorted(engine_options)} are not understood by the local engine."
            )
        return run_local(
            source, operators, chunk_rows=chunk_rows, progress=progress, description=description
        )
    raise ConfigError(f"unknown engine {engine!r}; choose one of {list(ENGINES)}.")


__all__ = ["ENGINES", "run_local", "run_operators"]
