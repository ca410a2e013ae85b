"""``streamattn evaluate``: metrics against brute force, report files, CLI, configs, engines."""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from streamattn.cli import main
from streamattn.config import EngineConfig, InputConfig, OutputConfig
from streamattn.engines import ENGINES
from streamattn.errors import ConfigError, InvalidInputError
from streamattn.operators.ground_truth import GroundTruth, GroundTruthSpec
from streamattn.recipes.evaluate import (
    AttentionConfig,
    EvaluateConfig,
    QueryConfig,
    SelectorConfig,
    evaluate,
    load_evaluate_config,
    set_metrics,
    write_report,
)
from streamattn.recipes.selectors import KeySet
from streamattn.sources import Block, open_keys
from streamattn.synthetic import SyntheticSpec, generate_store, spec_record

REPO = Path(__file__).resolve().parents[1]
SMALL = SyntheticSpec(
    n=3000, d=16, rank=4, chunk_rows=512, outliers=3, values_dim=4, queries=12, sinks=2,
    sink_logit=1.0, recency=4.0, recency_freqs=4,
)
BUDGETS = (8, 32, 128)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_store(tmp_path_factory.mktemp("eval") / "store.zarr", SMALL)


def small_config(path: Path, **changes: object) -> EvaluateConfig:
    cfg = EvaluateConfig(
        input=InputConfig(path=str(path)),
        selectors=SelectorConfig(budgets=BUDGETS, universal_eps=0.05),
        engine=EngineConfig(chunk_rows=700),
        output=OutputConfig(dir=str(path.parent / "out")),
        progress=False,
    )
    return replace(cfg, **changes)  # type: ignore[arg-type]


def test_default_synthetic_store_is_unchanged_by_the_new_fields() -> None:
    """Cached default stores (recorded before the optional fields existed) still match."""
    old_fields = {
        "n", "d", "rank", "noise", "offset_ratio", "outliers", "outlier_scale", "seed",
        "chunk_rows", "dtype", "compressor",
    }
    assert set(spec_record(SyntheticSpec())) == old_fields
    assert set(spec_record(SMALL)) > old_fields
    assert spec_record(SMALL) == {k: v for k, v in asdict(SMALL).items()
                                  if k in spec_record(SMALL)}


def test_store_layout_with_queries_and_values(store: Path) -> None:
    src = open_keys(store)
    assert src.values is not None and src.values.shape == (SMALL.n, SMALL.values_dim)
    assert src.queries is not None and src.queries.shape == (SMALL.queries, SMALL.d)
    pos = src.query_positions
    assert pos is not None and pos.dtype == np.int64 and np.all((pos >= 0) & (pos < SMALL.n))
    # the attention sinks: small keys that take a large share of most queries' softmax
    k = np.asarray(src.keys[:], dtype=np.float64)
    norms = np.linalg.norm(k, axis=1)
    assert norms[: SMALL.sinks].max() < np.median(norms)
    lw = np.asarray(src.queries[:], dtype=np.float64) @ k.T / np.sqrt(SMALL.d)
    share = np.exp(lw - np.logaddexp.reduce(lw, axis=1)[:, None])[:, : SMALL.sinks].sum(axis=1)
    assert np.median(share) > 10 * SMALL.sinks / SMALL.n  # far above a uniform share
    with pytest.raises(InvalidInputError, match="query_positions"):
        from streamattn.sources import KeySource

        KeySource(np.zeros((5, 2)), queries=np.zeros((3, 2)), query_positions=np.array([0, 9, 1]))


def test_set_metrics_against_brute_force() -> None:
    rng = np.random.default_rng(0)
    n, d = 300, 4
    k = rng.standard_normal((n, d)) * 2
    v = rng.standard_normal((n, 2)) + 1.0
    q = rng.standard_normal((5, d)) * 2
    pos = np.array([10, 50, 120, 200, 299], dtype=np.int64)
    spec = GroundTruthSpec(q, eps=0.02, mode="causal", positions=pos, values_dim=2)
    truth = GroundTruth(spec).update(Block(0, k, v)).result()
    ks = KeySet("x", 20, np.array([0, 1, 2, 3, 77, 150, 250]), n, window=13)
    lw = q @ k.T / 2.0
    lw[np.arange(n)[None, :] > pos[:, None]] = -np.inf
    a = np.exp(lw - np.logaddexp.reduce(lw, axis=1)[:, None])
    lse_s, out_s = np.zeros(5), np.zeros((5, 2))
    for i in range(5):
        s = ks.for_query(int(pos[i]))
        lse_s[i] = np.logaddexp.reduce(lw[i, s])
        out_s[i] = np.exp(lw[i, s] - lse_s[i]) @ v[s]
    met = set_metrics(ks, truth, lse_s, out_s, pos)
    for i in range(5):
        s = ks.for_query(int(pos[i]))
        heavy = np.flatnonzero(a[i] >= 0.02)
        assert met["recall"][i] == pytest.approx(np.isin(heavy, s).mean())
        assert met["mass"][i] == pytest.approx(a[i, s].sum(), rel=1e-12)
        o = a[i] @ v
        assert met["error"][i] == pytest.approx(np.linalg.norm(o - out_s[i]) / np.linalg.norm(o))
        assert met["keys"][i] == len(s)


def test_evaluate_report(store: Path, tmp_path: Path) -> None:
    cfg = small_config(store)
    report = evaluate(store, cfg)
    assert set(report["results"]) == {"global/softmax", "global/power", "causal/softmax",
                                      "causal/power"}
    for key, res in report["results"].items():
        names = {r["selector"] for r in res["rows"]}
        assert names == set(cfg.selectors.names)
        assert res["dropped_candidates"] == 0
        for name in names - {"universal-threshold"}:
            rows = sorted((r for r in res["rows"] if r["selector"] == name),
                          key=lambda r: r["budget"])
            assert [r["budget"] for r in rows] == list(BUDGETS)
            masses = [r["mass"]["mean"] for r in rows]
            # nested sets keep nested mass (sinks/window and hybrid sets are nested too)
            assert all(x <= y + 1e-12 for x, y in itertools.pairwise(masses)), name
            for r in rows:
                assert 0.0 <= r["mass"]["worst"] <= r["mass"]["mean"] <= 1.0 + 1e-12
                if key.startswith("global"):
                    assert r["keys"]["mean"] == r["budget"]  # exactly B keys per query
                else:
                    assert r["keys"]["worst"] <= r["budget"]
    # x^2 attention, global mode: the universal set keeps every heavy entry (the guarantee)
    x2 = report["results"]["global/power"]
    (u,) = [r for r in x2["rows"] if r["selector"] == "universal-threshold"]
    if u["recall"]["queries"]:
        assert u["recall"]["worst"] == 1.0
    out = write_report({**report, "config": {"attention": {"eps": 0.01}}}, tmp_path / "rep",
                       overwrite=False)
    names = {p.name for p in out.iterdir()}
    assert {"report.json", "report.md", "per_query.npz", "coverage_global_softmax.png"} <= names
    body = json.loads((out / "report.json").read_text())
    assert "per_query" not in body and body["results"]["causal/softmax"]["rows"]
    per_query = np.load(out / "per_query.npz")
    assert per_query["causal.softmax.random.8.recall"].shape == (SMALL.queries,)


def test_random_queries_and_bad_configs(store: Path, tmp_path: Path) -> None:
    keys_only = tmp_path / "k.npy"
    np.save(keys_only, open_keys(store).keys[:])
    cfg = small_config(store, queries=QueryConfig(source="random", count=6),
                       attention=AttentionConfig(kinds=("softmax",), modes=("global",)),
                       selectors=SelectorConfig(names=("random", "key-norm"), budgets=(4, 16)))
    report = evaluate(keys_only, cfg)
    assert report["queries"] == 6
    with pytest.raises(ConfigError, match="queries"):
        evaluate(keys_only, small_config(store))
    bad = tmp_path / "bad.yaml"
    bad.write_text("selectors:\n  budgetz: [4]\n")
    with pytest.raises(ConfigError, match="budgets"):
        load_evaluate_config(bad)
    bad.write_text("attention:\n  kinds: [relu]\n")
    with pytest.raises(ConfigError, match="relu"):
        load_evaluate_config(bad)


def test_cli_end_to_end(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "ev.yaml"
    cfg.write_text(
        f"input:\n  path: {store}\nselectors:\n  budgets: [8, 64]\n  universal_eps: 0.05\n"
        f"output:\n  dir: {tmp_path / 'cli-out'}\nprogress: false\n"
    )
    assert main(["evaluate", str(cfg), "--quiet"]) == 0
    assert (tmp_path / "cli-out" / "report.md").read_text().startswith("### global/softmax")
    assert main(["evaluate", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_shipped_config_equals_embedded_default() -> None:
    assert load_evaluate_config(REPO / "configs" / "evaluate.yaml") == EvaluateConfig()
    assert load_evaluate_config(REPO / "configs" / "coverage.yaml").input.generate is not None


@pytest.mark.skipif("dask" not in ENGINES, reason="the Dask engine is not registered yet")
def test_local_equals_dask(store: Path) -> None:
    cfg = small_config(store, attention=AttentionConfig(modes=("causal",)),
                       selectors=SelectorConfig(budgets=(8, 64), universal_eps=0.05))
    local = evaluate(store, cfg)
    dask_cfg = replace(cfg, engine=EngineConfig(kind="dask", chunk_rows=700, scheduler="threads"))
    remote = evaluate(store, dask_cfg)
    for key, res in local["results"].items():
        for a, b in zip(res["rows"], remote["results"][key]["rows"], strict=True):
            assert (a["selector"], a["budget"]) == (b["selector"], b["budget"])
            for metric in ("recall", "mass", "error", "keys"):
                for stat, x in a[metric].items():
                    assert b[metric][stat] == pytest.approx(x, rel=1e-9, abs=1e-12)
