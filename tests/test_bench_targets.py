"""``streamattn bench``'s issue-16 configurations on tiny stores, run in this process.

Checks that each new configuration runs and that its row carries the target it is held
to with a met/missed verdict, and that results.md opens with the targets table. Timings
are not asserted (they are measured by ``streamattn bench`` itself, never in tests).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from streamattn import bench


def here(kind: str, path: Path, repeat: int) -> dict[str, Any]:
    return bench.measure_here(kind, path)


def test_cache_configurations_report_their_targets(tmp_path: Path) -> None:
    cases = bench.default_cache_cases(quick=True, sizes=[512, 1024], shape=(2, 2, 8))
    rows = bench.cache_rows(cases, tmp_path, 1, log=lambda _: None, measure_fn=here)
    assert [r["config"] for r in rows] == list(bench.CACHE_KINDS) * 2
    assert all(r["status"] == "ok" for r in rows)
    select = [r for r in rows if r["config"] == "cache-select"]
    for r in select:
        assert r["heads"] == 4 and r["reads"] == 1 and r["values_opened"] is False
        assert "keys arrays" in r["target"] and isinstance(r["meets_target"], bool)
        assert r["projected_peak_bytes"] > 0
    bench.flat_checks(rows)
    big = max(select, key=lambda r: r["n"])
    assert isinstance(big["meets_rss_target"], bool) and big["rss_ratio_to_smallest_n"] > 0
    assert "rss_within_projection" in big
    kv = [r for r in rows if r["config"] == "cache-read-kv"]
    assert all(r["arrays"] == 4 for r in kv)  # 2 layers of keys + 2 of values


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_budget_and_dask_checkpoint_rows_and_the_targets_table(tmp_path: Path) -> None:
    cases = [(4096, 16, "none", ["zarr-loop", "uset-plain", "uset-budget", "dask-ckpt"]),
             (8192, 16, "none", ["zarr-loop", "dask-ckpt"])]
    rows = bench.bench_rows(cases, tmp_path, 1, log=lambda _: None, measure_fn=here)
    assert all(r["status"] == "ok" for r in rows), rows
    budget = next(r for r in rows if r["config"] == "uset-budget")
    assert budget["selected"] == bench.BUDGET and budget["target"] == "≤ 2.0× zarr loop"
    assert isinstance(budget["meets_target"], bool) and budget["passes"] in (1, 2)
    ckpt = [r for r in rows if r["config"] == "dask-ckpt"]
    assert all(r["checkpointed"] and r["client_peak_rss_bytes"] > 0 for r in ckpt)
    bench.flat_checks(rows)
    assert "client" in ckpt[-1]["rss_target"]
    bench.write_results(tmp_path / "out", rows, {"command": "streamattn bench (test)"})
    md = (tmp_path / "out" / "results.md").read_text()
    table = md.split("Every configuration:")[0]
    assert "| 3 | dask-ckpt |" in table and "| 4 | uset-budget |" in table
    assert ("| met |" in table) or ("| missed |" in table)


def test_only_and_cache_flags_choose_the_cases() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    cases, caches = bench.plan_cases(parser.parse_args(["--only", "cache-select", "dask-ckpt"]))
    assert [k for *_, k in caches] == [["cache-read-keys", "cache-select"]] * 2
    assert [(n, k) for n, _, _, k in cases] == [
        (2**22, ["zarr-loop", "parallel-read", "dask-ckpt"]),
        (2**21, ["zarr-loop", "dask-ckpt"]), (2**22, ["zarr-loop", "dask-ckpt"])]
    cases, caches = bench.plan_cases(parser.parse_args(["--no-cache", "--quick"]))
    assert caches == [] and all(n <= 2**20 for n, *_ in cases)
    _, caches = bench.plan_cases(parser.parse_args(["--cache-n", "1000", "--cache-shape", "2",
                                                    "2", "8"]))
    assert caches == [(1000, (2, 2, 8), list(bench.CACHE_KINDS))]
    full, _ = bench.plan_cases(parser.parse_args([]))
    ckpt = sorted(n for n, d, _, k in full if "dask-ckpt" in k)
    assert ckpt == [2**21, 2**22]  # two sizes: the flatness check has a pair
