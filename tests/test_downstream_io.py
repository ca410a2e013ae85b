"""downstream outputs without a model: columns, kept budget, report, merging parallel runs."""

from __future__ import annotations

import csv

import pytest

from streamattn.errors import ConfigError
from streamattn.models import downstream as ds


def _rows(full: float, names: list[str], ratio: float) -> list[ds.Row]:
    rows = [ds.Row("full", "model", 0.0, 2048.0, full, 2.0, 0.0, 1.0)]
    for i, n in enumerate(names):
        loss = full + 0.01 * (i + 1)
        rows.append(ds.Row(n, "kvpress" if n[0].isupper() else "streamattn", ratio, 1024.0,
                           loss, 2.0, loss - full, 0.5))
    return rows


def _settings(ratio: float, names: list[str]) -> dict:
    return {"model": "m", "text": "t", "context": 2048, "continuation": 512, "ratios": [ratio],
            "selectors": [n for n in names if n.islower()],
            "peers": [n for n in names if not n.islower()], "kvpress_skipped": {},
            "prior_fitted_on": None}


def test_kept_per_head_is_ceiling():
    assert ds.kept_per_head(2048, 0.5) == 1024
    assert ds.kept_per_head(2048, 0.75) == 512
    assert ds.kept_per_head(10, 0.75) == 3  # ceil(2.5)
    assert ds.parse_ratios("0.5,0.75") == [0.5, 0.75]
    with pytest.raises(ConfigError):
        ds.parse_ratios("0,1.5")


def test_merge_runs_keeps_one_full_row_and_refuses_other_runs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ds.write_outputs(a, _rows(2.0, ["sinks-window"], 0.5), _settings(0.5, ["sinks-window"]))
    ds.write_outputs(b, _rows(2.0, ["StreamingLLM"], 0.75), _settings(0.75, ["StreamingLLM"]))
    rows = ds.merge_runs([a, b], tmp_path / "m")
    assert [r.selector for r in rows] == ["full", "sinks-window", "StreamingLLM"]
    with open(tmp_path / "m" / "results.csv") as fh:
        table = list(csv.reader(fh))
    assert table[0] == list(ds.COLUMNS) and len(table) == 4
    report = (tmp_path / "m" / "report.md").read_text()
    assert "| sinks-window | streamattn | +0.0100 | - |" in report
    c = tmp_path / "c"
    ds.write_outputs(c, _rows(2.5, ["Knorm"], 0.5), _settings(0.5, ["Knorm"]))
    with pytest.raises(ConfigError, match="full-cache loss"):
        ds.merge_runs([a, c], tmp_path / "m2")
