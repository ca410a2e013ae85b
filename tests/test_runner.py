"""The pass planner: budget refusal before any read, fusion (one read per round), lifting."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import svd_leverage

import streamattn as sa
from streamattn.errors import ConfigError, MemoryBudgetError
from streamattn.operators.frequent_directions import FDSpec, FrequentDirections
from streamattn.operators.gram_step import STREAM_THREADS
from streamattn.recipes.universal import selection_recipe
from streamattn.runner import OnePass, parse_bytes, run_recipes
from streamattn.sources import KeySource


class CountingArray:
    """A numpy array that counts the rows read through ``__getitem__``."""

    def __init__(self, x: np.ndarray) -> None:
        self.x, self.shape, self.dtype, self.rows_read = x, x.shape, x.dtype, 0

    def __getitem__(self, item: Any) -> np.ndarray:
        out = self.x[item]
        self.rows_read += out.shape[0]
        return out


def keys(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d))
    x[::97] *= 20.0
    return x


def test_plan_over_memory_limit_is_refused_before_any_read() -> None:
    x = keys(3000, 16)
    counting = CountingArray(x)
    src = KeySource(counting, label="<counting>")
    sel = sa.Selection(eps=0.01)
    with pytest.raises(MemoryBudgetError, match="over memory_limit") as info:
        sa.universal_sets(src, [sel], chunk_rows=10, memory_limit="64KiB")  # state > limit
    assert "nothing was read" in str(info.value)
    assert counting.rows_read == 0
    # under the limit the same plan runs, and the report states projected vs measured
    out = run_recipes(src, [selection_recipe(sel)], chunk_rows=500, memory_limit="1GiB")
    report = out.report.as_dict()
    # the leverage state: R, an open Gram window (7 x 16 x 16), <= d/eps candidates (row, index)
    state = out.report.passes[0]["projected_bytes"]["operators"]
    assert state == 8 * (7 * 16 * 16 + int(16 / 0.01) * (16 + 1))
    # + each kernel thread's work buffers (2048-row pieces: 16 + 2 x 4 + 16 + 17 + 16 + 17
    # floats a row) for the stream pool, the head pool and the pass's one operator
    threads = (2 * STREAM_THREADS + 1) * 8 * 2048 * 90
    assert out.report.passes[0]["projected_bytes"]["threads"] == threads
    assert report["projected_peak_bytes"] == state + 3 * 500 * 16 * 8 + threads
    assert report["measured_peak_rss_bytes"] > 0
    assert report["reads"] == 1
    tau, _ = svd_leverage(x)
    np.testing.assert_array_equal(out.results[0].indices, np.flatnonzero(tau >= 0.01))


def test_recipes_of_one_round_share_one_read() -> None:
    """Two sets (one budget set needing a second pass) and an FD sketch: two reads."""
    x = keys(2000, 8, seed=3)
    counting = CountingArray(x)
    src = KeySource(counting, label="<counting>")
    sels = [sa.Selection(eps=0.05, variant="affine"), sa.Selection(budget=40)]
    recipes = [*(selection_recipe(s) for s in sels), OnePass([FrequentDirections(FDSpec(4))])]
    out = run_recipes(src, recipes, chunk_rows=300)
    thresh, top, (fd,) = out.results
    assert top.certificate["passes"] == 2  # the budget set did need its second pass
    assert counting.rows_read == 2 * 2000  # round 1: all three; round 2: top-B alone
    assert [p["operators"] for p in out.report.passes] == [3, 1]
    tau_a, _ = svd_leverage(x, affine=True)
    np.testing.assert_array_equal(thresh.indices, np.flatnonzero(tau_a >= 0.05))
    tau, _ = svd_leverage(x)
    order = np.lexsort((np.arange(x.shape[0]), -tau))[:40]
    np.testing.assert_array_equal(top.indices, np.sort(order))
    # FD: 0 <= K^T K - B^T B <= delta I
    sk = fd.result()
    gap = np.linalg.eigvalsh(x.T @ x - sk.sketch.T @ sk.sketch)
    assert gap.min() > -1e-8 * np.linalg.norm(x) ** 2 and gap.max() <= sk.delta * (1 + 1e-9)


def test_lifted_recipe_on_a_cache_matches_each_head() -> None:
    """A single-head recipe lifted to a (2 layers x 3 heads) cache: every head's set."""
    rng = np.random.default_rng(5)
    cache = rng.standard_normal((2, 3, 600, 6))
    cache[:, :, ::50] *= 15.0
    (res,) = sa.universal_sets(cache, [sa.Selection(eps=0.05, budget=10)], chunk_rows=128)
    assert (res.layers, res.heads) == (2, 3)
    for (layer, head), uset in res:
        tau, _ = svd_leverage(cache[layer, head])
        reach = np.flatnonzero(tau >= 0.05)
        best = reach[np.lexsort((reach, -tau[reach]))][:10]
        np.testing.assert_array_equal(uset.indices, np.sort(best))


def test_lifted_second_pass_serves_only_the_heads_that_need_it() -> None:
    """Head 0 certifies its top-B in pass 1 (12 dominant keys), head 1 needs pass 2."""
    rng = np.random.default_rng(8)
    cache = rng.standard_normal((1, 2, 600, 6))
    cache[0, 0, 100:112] *= 200.0
    out = run_recipes(cache, [selection_recipe(sa.Selection(budget=10))], chunk_rows=100)
    (res,) = out.results
    assert [res[0, 0].certificate["passes"], res[0, 1].certificate["passes"]] == [1, 2]
    assert len(out.report.passes) == 2  # one top-B pass; head 0 keeps its pass-1 answer
    for h in range(2):
        tau, _ = svd_leverage(cache[0, h])
        best = np.lexsort((np.arange(600), -tau))[:10]
        np.testing.assert_array_equal(res[0, h].indices, np.sort(best))


def test_single_head_only_recipes_refuse_a_cache() -> None:
    cache = np.random.default_rng(0).standard_normal((1, 2, 100, 4))
    with pytest.raises(ConfigError, match="single-head key store"):
        sa.universal_sets(cache, [sa.Selection(eps=0.5, p=1.0)])


def test_parse_bytes() -> None:
    assert parse_bytes(None) is None
    assert parse_bytes(1000) == 1000
    assert parse_bytes("4GiB") == 4 * 2**30
    assert parse_bytes("1.5 MB") == 1_500_000
    for bad in ("lots", "-1GB", "0", 0, True, "3 parsecs"):
        with pytest.raises(ConfigError, match="memory_limit"):
            parse_bytes(bad)  # type: ignore[arg-type]
