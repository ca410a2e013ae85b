"""What every experiment shares: configs, sweeps, tidy tables, provenance, atomic outputs.

An experiment's config is a frozen dataclass read from YAML with the project's loader
(unknown keys refused with the dotted path). Sweep keys take a scalar or a list
(``as_list``). Outputs go to ``--out`` through ``streamattn.io.outputs.atomic_dir``: the
directory appears complete (``results.csv``, ``report.md``, plots, ``provenance.json``)
or not at all. ``results.csv`` holds only what the config and seed determine (no
timings), so a rerun reproduces it byte for byte; measured times go to other files.
"""

from __future__ import annotations

import csv
import io
import math
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from streamattn.errors import ConfigError


def as_list(value: Any, kind: type, name: str) -> list[Any]:
    """A sweep key: a scalar or a non-empty list of ``kind`` values, as a list."""
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise ConfigError(f"config.{name}: an empty list sweeps nothing; give a value.")
    out = []
    for i, v in enumerate(items):
        if kind is float and isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                pass
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if isinstance(v, bool) or not isinstance(v, kind):
            where = f"config.{name}" + (f"[{i}]" if isinstance(value, (list, tuple)) else "")
            raise ConfigError(f"{where}: expected {kind.__name__}, got {v!r}.")
        out.append(v)
    return out


def fmt(value: Any) -> str:
    """A CSV cell: ints as ints, floats with repr (round-trips exactly), None/NaN empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    if hasattr(value, "item"):  # numpy scalar
        return fmt(value.item())
    return str(value)


def csv_text(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A tidy CSV table (one observation per row) with a fixed column order."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([fmt(row.get(c)) for c in columns])
    return buf.getvalue()


def git_commit() -> str | None:
    """The commit of the streamattn checkout this code runs from (None if not a checkout)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=False,
        )
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def provenance(name: str, config: Any, config_path: str | None, seeds: Iterable[int]) -> dict:
    """Config, seeds, versions and commit: everything needed to rerun the experiment."""
    from streamattn.config import to_dict
    from streamattn.results import versions

    extra = {}
    if plots_available():
        import matplotlib

        extra["matplotlib"] = matplotlib.__version__
    return {
        "experiment": name,
        "config": to_dict(config),
        "config_path": config_path,
        "seeds": sorted(set(seeds)),
        "versions": {**versions(), **extra},
        "commit": git_commit(),
    }


def plots_available() -> bool:
    """Whether matplotlib (the ``plots`` extra) is installed; without it plots are skipped."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


PLOTS_MISSING = "(plots skipped: matplotlib is not installed; pip install 'streamattn[plots]')"


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.8) -> Any:
    """A matplotlib figure on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)


def save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    # no timestamp metadata, so a rerun writes the same bytes
    fig.savefig(path, dpi=80, metadata={"Software": None})
    plt.close(fig)
