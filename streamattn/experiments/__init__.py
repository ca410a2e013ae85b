"""Experiments: reproducible one-pass studies shipped with the tool.

``streamattn experiment NAME [CONFIG.yaml] --out DIR`` runs one; ``--list`` lists them.
Each experiment is a module here (``NAME``, ``SUMMARY``, a config dataclass and
``run(cfg, out)``) plus its shipped config (``configs/experiments/NAME.yaml``, embedded
as package data in ``streamattn/experiments/configs/``). Data is generated on the fly
from the config's seed, block by block, and streamed through the operators and the
engine; the output directory (``results.csv``, ``report.md``, plots, ``provenance.json``)
is written atomically, and ``results.csv`` is the same byte for byte on every rerun.
"""

from __future__ import annotations

import importlib
import os
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from streamattn.errors import ConfigError


@dataclass(frozen=True)
class Experiment:
    name: str
    module: str
    config_class: str
    summary: str

    def load(self) -> Any:
        return importlib.import_module(self.module)


EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        Experiment(
            "gaussian-sparsity", "streamattn.experiments.gaussian", "GaussianSparsityConfig",
            "Gaussian keys and queries: heavy counts, k_delta, entropy vs the prediction",
        ),
        Experiment(
            "scaling", "streamattn.experiments.scaling", "ScalingConfig",
            "universal set, JL embeddings, ground truth: time/row, |U|, RSS vs n",
        ),
        Experiment(
            "real-sparsity", "streamattn.experiments.real", "RealSparsityConfig",
            "a KV cache's per-layer/head sparsity (native mask) vs the Gaussian model",
        ),
    )
}


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise ConfigError(
            f"unknown experiment {name!r}; known: {', '.join(sorted(EXPERIMENTS))} "
            "(streamattn experiment --list)."
        )
    return EXPERIMENTS[name]


def shipped_config(name: str) -> Path:
    """The embedded copy of ``configs/experiments/NAME.yaml``."""
    get_experiment(name)
    path = Path(str(resources.files("streamattn.experiments") / "configs" / f"{name}.yaml"))
    if not path.is_file():
        raise ConfigError(f"the shipped config of {name} is missing from the package ({path}).")
    return path


def load_config(name: str, path: str | os.PathLike[str] | None = None) -> Any:
    """The experiment's config from ``path`` (default: its shipped config), validated."""
    from streamattn.config import load_yaml_config

    exp = get_experiment(name)
    cls = getattr(exp.load(), exp.config_class)
    return load_yaml_config(cls, path if path is not None else shipped_config(name))


def run_experiment(
    name: str,
    config: str | os.PathLike[str] | None,
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Run experiment ``name`` with ``config`` (None: shipped) into ``out``, atomically."""
    from streamattn.experiments.common import provenance
    from streamattn.io.outputs import atomic_dir, check_writable, write_json_atomic

    exp = get_experiment(name)
    cfg_path = Path(config) if config is not None else shipped_config(name)
    cfg = load_config(name, cfg_path)
    check_writable(Path(out), overwrite)
    module = exp.load()
    t0 = time.perf_counter()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        summary = module.run(cfg, tmp, progress=progress)
        prov = provenance(name, cfg, str(cfg_path), cfg.seeds())
        write_json_atomic(tmp / "provenance.json", prov)
        (tmp / "config.yaml").write_text(cfg_path.read_text())
    return {**summary, "seconds": time.perf_counter() - t0, "out": str(out)}


__all__ = ["EXPERIMENTS", "get_experiment", "load_config", "run_experiment", "shipped_config"]
