"""Engines run operators over a key source. They know the protocol, not the algorithms."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from streamattn.engines.dask_engine import DaskOptions, dask_session, run_dask
from streamattn.engines.local import run_local
from streamattn.errors import ConfigError
from streamattn.operators.protocol import Operator
from streamattn.sources import BlockStream

ENGINES = ("local", "dask")


def run_operators(
    source: BlockStream,
    operators: Sequence[Operator[Any, Any]],
    *,
    engine: str = "local",
    chunk_rows: int | None = None,
    progress: bool = False,
    description: str = "pass",
    checkpoint: Any = None,
    **engine_options: Any,
) -> list[Operator[Any, Any]]:
    """One pass of ``source`` through ``operators`` on the chosen engine.

    ``checkpoint`` (a ``streamattn.io.checkpoint.Checkpointer``): resume the pass from its
    last checkpoint and write new ones as it goes.
    """
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose one of {list(ENGINES)}.")
    if engine == "dask":
        require_dask()
    if engine == "local":
        if engine_options:
            raise ConfigError(
                f"options {sorted(engine_options)} are not understood by the local engine."
            )
        return run_local(
            source,
            operators,
            chunk_rows=chunk_rows,
            progress=progress,
            description=description,
            checkpoint=checkpoint,
        )
    if checkpoint is not None:
        from streamattn.io.checkpoint import run_segmented

        return run_segmented(
            source,
            list(operators),
            checkpoint,
            lambda src, ops: run_operators(
                src, ops, engine=engine, chunk_rows=chunk_rows, description=description,
                **engine_options,
            ),
            chunk_rows=chunk_rows,
            progress=progress,
            description=description,
        )
    if engine == "dask":
        return run_dask(
            source,
            operators,
            chunk_rows=chunk_rows,
            progress=progress,
            description=description,
            **engine_options,
        )
    raise ConfigError(f"unknown engine {engine!r}; choose one of {list(ENGINES)}.")


def require_dask() -> None:
    """The Dask engine needs the ``dask`` extra (dask.array and distributed)."""
    import importlib.util

    missing = [m for m in ("dask", "distributed") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"the dask engine needs {' and '.join(missing)}: pip install 'streamattn[dask]' "
            "(or use engine: local)."
        )


@contextmanager
def engine_session(
    engine: str, *, progress: bool = False, **engine_options: Any
) -> Iterator[dict[str, Any]]:
    """Engine options for several passes that share one cluster (started once, closed after).

    For ``engine="dask"`` with ``scheduler="local-cluster"`` or an address, the yielded
    options carry a live ``client`` so every ``run_operators`` call inside reuses it.
    """
    if engine != "dask" or engine_options.get("client") is not None:
        yield dict(engine_options)
        return
    require_dask()
    client_free = {k: v for k, v in engine_options.items() if k != "client"}
    with dask_session(DaskOptions.from_kwargs(client_free), progress=progress) as client:
        yield client_free if client is None else {**client_free, "client": client}


__all__ = ["ENGINES", "engine_session", "require_dask", "run_dask", "run_local", "run_operators"]
