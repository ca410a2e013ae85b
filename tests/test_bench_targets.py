"""``streamattn bench``'s issue-16 configurations on tiny stores, run in this process.

Checks that each new configuration runs and that its row carries the target it is held
to with a met/missed verdict, and that results.md opens with the targets table. Timings
are not asserted (they are measured by ``streamattn bench`` itself, never in tests).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
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
    assert [k for *_, k in caches] == [["cache-read-keys", "cache-gram-floor", "cache-select"]] * 2
    assert [(n, k) for n, _, _, k in cases] == [
        (2**22, ["zarr-loop", "zarr-loop-reuse", "parallel-read", "dask-ckpt"]),
        (2**21, ["zarr-loop", "dask-ckpt"]), (2**22, ["zarr-loop", "dask-ckpt"])]
    cases, caches = bench.plan_cases(parser.parse_args(["--no-cache", "--quick"]))
    assert caches == [] and all(n <= 2**20 for n, *_ in cases)
    _, caches = bench.plan_cases(parser.parse_args(["--cache-n", "1000", "--cache-shape", "2",
                                                    "2", "8"]))
    assert caches == [(1000, (2, 2, 8), list(bench.CACHE_KINDS))]
    full, _ = bench.plan_cases(parser.parse_args([]))
    ckpt = sorted(n for n, d, _, k in full if "dask-ckpt" in k)
    assert ckpt == [2**21, 2**22]  # two sizes: the flatness check has a pair


def test_the_float64_floor_forms_every_heads_gram(tmp_path: Path) -> None:
    """gram-floor / cache-gram-floor do the work they stand for: ‖KₕᵀKₕ‖_F against dense
    numpy on the stores they read (all heads of a cache), and each time target carries it."""
    import zarr

    cases = [(5000, 16, "none", ["zarr-loop", "parallel-read", "gram-floor", "uset-plain"])]
    rows = bench.bench_rows(cases, tmp_path, 1, log=lambda _: None, measure_fn=here)
    floor = next(r for r in rows if r["config"] == "gram-floor")
    keys = np.asarray(zarr.open_group(str(bench.store_path(tmp_path, 5000, 16, "none")),
                                      mode="r")["keys"][:], dtype=np.float64)
    assert floor["heads"] == 1
    assert floor["gram_fro"] == pytest.approx(np.linalg.norm(keys.T @ keys), rel=1e-12)
    uset = next(r for r in rows if r["config"] == "uset-plain")
    assert "× loop" in uset["floor"] and "× parallel read" in uset["floor"]
    assert isinstance(uset["floor_within_target"], bool)

    (case,) = bench.default_cache_cases(quick=True, sizes=[700], shape=(2, 3, 8))
    rows = bench.cache_rows([case], tmp_path, 1, log=lambda _: None, measure_fn=here)
    floor = next(r for r in rows if r["config"] == "cache-gram-floor")
    root = zarr.open_group(str(bench.cache_path(tmp_path, 700, (2, 3, 8))), mode="r")
    fro2 = 0.0
    for layer in range(2):
        k = np.asarray(root["keys"][f"layer_{layer}"][:], dtype=np.float64)
        fro2 += sum(float(np.sum((k[:, h * 8 : (h + 1) * 8].T @ k[:, h * 8 : (h + 1) * 8]) ** 2))
                    for h in range(3))
    assert floor["heads"] == 6 and floor["gram_fro"] == pytest.approx(np.sqrt(fro2), rel=1e-12)
    select = next(r for r in rows if r["config"] == "cache-select")
    assert "× cache-read-keys" in select["floor"]


def test_floor_checks_mark_a_limit_below_the_floor() -> None:
    def case(floor_seconds: float, par: float = 4.0) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = [
            {"config": "zarr-loop", "status": "ok", "seconds": 1.0},
            {"config": "parallel-read", "status": "ok", "seconds": 0.5},
            {"config": "gram-floor", "status": "ok", "seconds": floor_seconds},
            {"config": "uset-plain", "status": "ok", "seconds": 2.0, "ratio_to_zarr_loop": 2.0,
             "ratio_to_parallel_read": par, "meets_target": False}]
        bench.floor_checks(rows)
        return rows

    low, high = case(0.9)[-1], case(1.2)[-1]
    assert low["floor"] == "0.90× loop (within), 1.80× parallel read (within)"
    assert low["floor_within_target"] is True
    assert high["floor"] == "1.20× loop (above), 2.40× parallel read (above)"
    assert high["floor_within_target"] is False
    mixed = case(0.9, par=6.0)[-1]  # within the loop limit, above the parallel read's
    assert mixed["floor"] == "0.90× loop (within), 2.70× parallel read (above)"
    assert mixed["floor_within_target"] is False
    table = bench.targets_table([{"n": 4096, "d": 8, "compressor": "none", **high,
                                  "target": "≤ 1× loop, ≤ 2× parallel read"}])
    assert "| 1.20× loop (above), 2.40× parallel read (above) |" in table


def test_every_store_is_read_once_before_its_first_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 16 measures with the page cache warm: the bench reads each store's files
    (every byte of them) before the case's baseline, for single heads and caches."""
    events: list[tuple[str, str]] = []
    warm = bench.warm_store

    def spy(path: Path, log: Any = print) -> float:
        events.append(("warm", path.name))
        return warm(path, log)

    def recorded(kind: str, path: Path, repeat: int) -> dict[str, Any]:
        events.append((kind, path.name))
        return here(kind, path, repeat)

    monkeypatch.setattr(bench, "warm_store", spy)
    bench.bench_rows([(2048, 16, "none", ["zarr-loop", "uset-plain"])], tmp_path, 1,
                     log=lambda _: None, measure_fn=recorded)
    bench.cache_rows(bench.default_cache_cases(quick=True, sizes=[512], shape=(2, 2, 8)),
                     tmp_path, 1, log=lambda _: None, measure_fn=recorded)
    stores = list(dict.fromkeys(name for _, name in events))
    assert len(stores) == 2
    for name in stores:
        mine = [kind for kind, store in events if store == name]
        assert mine[0] == "warm" and mine.count("warm") == 1 and len(mine) > 2
    lines: list[str] = []
    store = tmp_path / stores[0]
    size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    assert warm(store, lines.append) >= 0
    assert f"({size / 1e9:.2f} GB)" in lines[0]


def test_the_heap_reusing_loop_runs_in_a_process_with_its_allocator_settings(
    tmp_path: Path,
) -> None:
    """``zarr-loop-reuse`` is the zarr loop in a child whose environment tells glibc to
    reuse heap memory (``KIND_ENV``); the plain loop's child has the caller's environment."""
    store = bench.ensure_bench_store(tmp_path, 2048, 16, "none")
    reuse = bench.measure("zarr-loop-reuse", store, 1)
    plain = bench.measure("zarr-loop", store, 1)
    assert reuse["status"] == plain["status"] == "ok"
    assert reuse["env"] == bench.KIND_ENV["zarr-loop-reuse"] and "env" not in plain
    rows = bench.bench_rows([(2048, 16, "none", ["zarr-loop", "zarr-loop-reuse", "uset-plain"])],
                            tmp_path, 1, log=lambda _: None, measure_fn=here)
    uset = next(r for r in rows if r["config"] == "uset-plain")
    assert "ratio_to_zarr_loop_reuse" in uset
    (entry,) = [t for t in bench.target_rows(rows) if t["config"] == "uset-plain"]
    assert "zarr-loop-reuse)" in entry["measured"]
