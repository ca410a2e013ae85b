"""Run configuration: YAML → frozen dataclasses, validated, unknown keys refused.

The embedded default (``RunConfig()``) is what ``streamattn run`` does with no argument;
``configs/default.yaml`` spells it out and a test keeps the two equal. Every section is
a frozen dataclass; ``load_config`` rejects unknown keys with the dotted path of the key
and the closest known name, so a typo never passes silently.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from streamattn.engines import ENGINES
from streamattn.engines.dask_engine import DaskOptions
from streamattn.errors import ConfigError, InvalidInputError
from streamattn.io.checkpoint import CheckpointConfig
from streamattn.recipes.embeddings import ReduceConfig
from streamattn.recipes.samplers import SampleConfig
from streamattn.recipes.selection import Selection
from streamattn.runner import parse_bytes
from streamattn.sources.keys import check_array_name
from streamattn.synthetic import SyntheticSpec

#: What a selection name may be (it names a group inside result.zarr).
SELECTION_NAME = re.compile(r"[A-Za-z0-9_+\-][A-Za-z0-9_.+\-]*")


@dataclass(frozen=True)
class InputConfig:
    """Where the keys are; with ``generate``, the store is made there once and cached."""

    path: str = "data/default-keys.zarr"
    array: str | None = None
    generate: SyntheticSpec | None = None
    # KV caches (streamattn.sources.kvcache.open_kv, docs/real-caches.md):
    n_heads: int | None = None  # the head count of a 2-D (n, H*d) array
    layers: tuple[int, ...] | None = None  # real layer indices to read (null: all)
    heads: tuple[int, ...] | None = None  # KV heads (select) / query heads (evaluate)
    batch: int | None = None  # the sequence of a batched (5-D) cache
    fill_missing_chunks: bool = False  # missing zarr chunk files: error (false) or fill value

    def cache_options(self) -> dict[str, Any]:
        """``open_source`` keyword options besides ``array``."""
        return {"n_heads": self.n_heads, "layers": self.layers, "heads": self.heads,
                "batch": self.batch, "fill_missing": self.fill_missing_chunks}


@dataclass(frozen=True)
class SelectionConfig:
    """One universal set to compute (see ``streamattn.recipes.universal.Selection``)."""

    name: str
    eps: float | None = None
    variant: str = "plain"
    budget: int | None = None
    rtol: float = 1e-10
    p: float = 2.0  # f(x) = |x|^p attention; p != 2: l_p Lewis weights (streamattn.recipes.lp)

    def selection(self) -> Selection:
        return Selection(self.eps, self.variant, self.budget, self.rtol, self.p)


def _default_selections() -> tuple[SelectionConfig, ...]:
    return (
        SelectionConfig(name="plain-eps0.01", eps=0.01, variant="plain"),
        SelectionConfig(name="affine-eps0.01", eps=0.01, variant="affine"),
        SelectionConfig(name="affine-top256", variant="affine", budget=256),
    )


@dataclass(frozen=True)
class EngineConfig:
    """How the pass runs: ``kind`` local (one process) or dask.

    The other keys apply to ``kind: dask`` only (see
    ``streamattn.engines.dask_engine.DaskOptions``): ``scheduler`` (``threads``,
    ``local-cluster`` or ``tcp://host:port``), ``n_workers``, ``threads_per_worker``,
    ``split_every``, ``blocks_per_task``, ``retries``, ``timeout`` (seconds) and
    ``dashboard``. ``memory_limit`` (any engine; bytes or a size such as ``4GiB``): a
    plan whose projected peak (operator bounds plus blocks in flight) exceeds it is
    refused before any read.
    """

    kind: str = "local"
    chunk_rows: int | None = None
    memory_limit: int | str | None = None
    scheduler: str = DaskOptions.scheduler
    n_workers: int | None = None
    threads_per_worker: int | None = None
    split_every: int = DaskOptions.split_every
    blocks_per_task: int | None = None
    retries: int = DaskOptions.retries
    timeout: float = DaskOptions.timeout
    dashboard: bool = DaskOptions.dashboard

    def options(self) -> dict[str, Any]:
        """Keyword options for ``run_operators`` / ``universal_sets`` besides ``engine``."""
        if self.kind != "dask":
            return {}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(DaskOptions)}

    def check(self) -> None:
        if self.kind not in ENGINES:
            raise ConfigError(f"engine.kind must be one of {list(ENGINES)}, got {self.kind!r}.")
        if self.chunk_rows is not None and self.chunk_rows < 1:
            raise ConfigError(f"engine.chunk_rows must be >= 1, got {self.chunk_rows}.")
        try:
            parse_bytes(self.memory_limit)
        except ConfigError as exc:
            raise ConfigError(f"engine.{exc}") from exc
        if self.kind == "dask":  # the dask keys are ignored by the local engine
            DaskOptions.from_kwargs(self.options()).check()


@dataclass(frozen=True)
class OutputConfig:
    """Where results go; an existing output is replaced (atomically) only if ``overwrite``."""

    dir: str = "runs/default"
    overwrite: bool = True
    keep_mask: bool = False  # KV caches: also the (layer, head, key) boolean keep-mask
    per_head: bool = False  # KV caches: also one group per (layer, head)
    save_state: bool = False  # KV caches: also state.npz (for `streamattn update`)


@dataclass(frozen=True)
class RunConfig:
    """A whole ``streamattn run``."""

    input: InputConfig = field(default_factory=lambda: InputConfig(generate=SyntheticSpec()))
    select: tuple[SelectionConfig, ...] = field(default_factory=_default_selections)
    engine: EngineConfig = field(default_factory=EngineConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    progress: bool = True
    reduce: ReduceConfig | None = None  # reduced embeddings, in the same read (embeddings.py)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # checkpoint.py
    sample: SampleConfig | None = None  # a leverage sample, own pass (samplers.py)

    def check(self) -> None:
        names = [s.name for s in self.select]
        if not names and self.reduce is None and self.sample is None:
            raise ConfigError(
                "select: is empty and there is no reduce: or sample: section; nothing would be "
                "computed. "
                "List at least one selection (e.g. - name: plain, eps: 0.01)."
            )
        for i, name in enumerate(names):
            if not isinstance(name, str) or not SELECTION_NAME.fullmatch(name) or ".." in name:
                raise ConfigError(
                    f"select[{i}].name {name!r}: a selection name becomes a group name in "
                    "result.zarr; use letters, digits and . _ + - (no '/', no '..', not "
                    "starting with '.')."
                )
        if len(set(names)) != len(names):
            raise ConfigError(f"select: selection names must be unique, got {names}.")
        if self.input.array is not None:
            try:
                check_array_name(self.input.array)
            except InvalidInputError as exc:
                raise ConfigError(f"input.array: {exc}") from exc
        for i, sel in enumerate(self.select):
            try:
                sel.selection().check()
            except ConfigError as exc:
                raise ConfigError(f"select[{i}] ({sel.name}): {exc}") from exc
        if self.input.generate is not None:
            self.input.generate.check()
        self.engine.check()
        if self.reduce is not None:
            self.reduce.check()
        self.checkpoint.check()
        if self.sample is not None:
            if self.reduce is not None:
                raise ConfigError("sample: and reduce: in one run config are not supported; "
                                  "run them as two configs.")
            self.sample.validate()


def _build(tp: Any, value: Any, where: str) -> Any:
    """Build a value of type ``tp`` from plain YAML data, naming ``where`` on error."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _build(args[0], value, where) if len(args) == 1 else value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}.")
        return from_dict(tp, value, where)  # type: ignore[arg-type]
    if origin is tuple:
        (item,) = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}.")
        return tuple(_build(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads exponents without a dot (1e-10) as strings
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not (
        isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}.")
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Instantiate dataclass ``cls`` from a mapping, refusing unknown or mistyped keys."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{where}: unknown key {key!r}{hint}; known keys: {', '.join(names)}."
            )
        kwargs[key] = _build(hints[key], value, f"{where}.{key}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def to_dict(obj: Any) -> Any:
    """Plain-data form of a config (for provenance records and the default YAML)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


def load_yaml_config(cls: type, path: str | os.PathLike[str] | None) -> Any:
    """Read a YAML config into dataclass ``cls`` (``None``: its defaults), validated.

    Errors name the file and the dotted key; ``cls`` must have a ``check()`` method.
    """
    if path is None:
        cfg = cls()
        cfg.check()
        return cfg
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping at the top level.")
    try:
        cfg = from_dict(cls, data, where="config")
        cfg.check()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return cfg


def load_config(path: str | Path | None) -> RunConfig:
    """Read a YAML run config (``None``: the embedded default), validated."""
    cfg: RunConfig = load_yaml_config(RunConfig, path)
    return cfg
