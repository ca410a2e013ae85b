"""Whole-cache evaluation: every figure of results.csv equals a dense numpy computation of
the same head, mask and queries; masks exact for several segments and chunkings."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from streamattn.cli.main import main
from streamattn.decoder_cache import DecoderSpec, write_decoder_cache
from streamattn.engines import run_operators
from streamattn.masks import Mask, Segments
from streamattn.operators.ground_truth import GroundTruth, GroundTruthSpec
from streamattn.recipes.cache_evaluate import COLUMNS, random_scores
from streamattn.sources import open_kv

EPS = 0.02


def dense_leverage(k: np.ndarray, affine: bool) -> np.ndarray:
    x = np.hstack([k, np.ones((k.shape[0], 1))]) if affine else k
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    u = u[:, s > 1e-10 * s[0]]
    return (u * u).sum(axis=1)


def top_in(scores: np.ndarray, lo: int, hi: int, b: int) -> set[int]:
    """The b best keys of [lo, hi] by score (ties: smaller index) — independent of the code."""
    idx = np.arange(lo, hi + 1)
    order = sorted(idx.tolist(), key=lambda j: (-scores[j], j))
    return set(order[:b])


def dense_sets(name: str, budget: Any, weights: np.ndarray, k: np.ndarray, row: int, lo: int,
               hi: int, seg_lo: int, lev: dict[str, np.ndarray], rnd: np.ndarray) -> set[int]:
    cnt = hi - lo + 1
    if name == "universal-threshold":
        return {j for j in range(lo, hi + 1) if lev["plain"][j] >= 0.1}
    b = min(budget, cnt) if isinstance(budget, int) else max(1, math.ceil(budget * cnt - 1e-9))
    if name == "oracle":  # the query's own top-b keys by its attention weights
        return top_in(weights, lo, hi, b)
    if name in ("leverage-plain", "leverage-affine"):
        return top_in(lev[name.split("-")[1]], lo, hi, b)
    if name == "key-norm":
        return top_in((k * k).sum(axis=1), lo, hi, b)
    if name == "random":
        return top_in(rnd, lo, hi, b)
    if name == "sinks-window":
        s = min(4, b)
        keep = set(range(seg_lo, seg_lo + s)) | set(range(row - (b - s) + 1, row + 1))
        return {j for j in keep if lo <= j <= hi}
    assert name == "local-window"
    a = max(lo, min(row - (b - 1) // 2, hi - b + 1))
    return set(range(a, min(hi, a + b - 1) + 1))


def interval(mask: str, row: int, starts: np.ndarray, stops: np.ndarray, n: int,
             causal: bool) -> tuple[int, int, int]:
    """(lo, hi, segment start) from the definitions (docs/architecture.md, note 1.4)."""
    seg = int(np.searchsorted(starts, row, side="right") - 1)
    a, b = int(starts[seg]), int(stops[seg]) - 1
    if mask == "global":
        return 0, n - 1, a
    if mask == "causal":
        return 0, row, a
    end = row if causal else b
    if mask == "native":
        return a, end, a
    w = int(mask.split(":")[1])
    return max(a, row - w), min(end, row + w), a


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    assert rows and list(rows[0]) == list(COLUMNS)
    return rows


def close(got: str, want: float | None) -> bool:
    if want is None:
        return got == ""
    return math.isclose(float(got), want, rel_tol=2e-5, abs_tol=1e-6)


@pytest.mark.parametrize("causal,modes,kind", [(True, ["native", "causal"], "softmax"),
                                               (False, ["native", "local:12", "global"],
                                                "power")])
def test_every_figure_equals_a_dense_computation(tmp_path: Path, causal: bool,
                                                 modes: list[str], kind: str) -> None:
    spec = DecoderSpec(n=330, segment=100, layers=2, q_heads=4, kv_heads=2, head_dim=8,
                       causal=causal, seed=3, chunk_rows=64, layer_ids=(0, 7))
    store = write_decoder_cache(tmp_path / "kv.zarr", spec)
    cfg = tmp_path / "ev.yaml"
    cfg.write_text(
        f"input:\n  path: {store}\n  heads: [1, 2]\nqueries:\n  count: 20\n  seed: 5\n"
        f"attention:\n  kinds: [{kind}]\n  modes: {json.dumps(modes)}\n  eps: {EPS}\n"
        "selectors:\n  budgets: [6, 0.15]\n  universal_eps: 0.1\n"
        f"engine:\n  chunk_rows: 50\noutput:\n  dir: {tmp_path / 'out'}\nprogress: false\n"
    )
    assert main(["evaluate", str(cfg), "--quiet"]) == 0
    if causal:  # the output is streamattn's own: it may be replaced
        assert main(["evaluate", str(cfg), "--quiet", "--overwrite"]) == 0
    rows = read_csv(tmp_path / "out" / "results.csv")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    qrows = np.asarray(report["query_rows"])
    assert qrows.size == 20 and len(set(qrows.tolist())) == 20
    assert [p["pass"] for p in report["passes"]] == [
        "ground truth, oracle, factors", "leverage of every key", "restricted attention"]
    root = zarr.open_group(str(store), mode="r")
    window = root["tokens/window"][...]
    starts = np.flatnonzero(np.r_[True, window[1:] != window[:-1]])
    stops = np.r_[starts[1:], spec.n]
    scale = 1 / math.sqrt(spec.head_dim)
    seen = set()
    for layer in (0, 7):
        q_all = root[f"queries/layer_{layer}"][...].astype(np.float64)
        k_all = root[f"keys/layer_{layer}"][...].astype(np.float64)
        v_all = root[f"values/layer_{layer}"][...].astype(np.float64)
        for qh in (1, 2):
            kv = qh // 2  # GQA: 4 query heads on 2 KV heads
            k = k_all[:, kv * 8 : (kv + 1) * 8]
            v = v_all[:, kv * 8 : (kv + 1) * 8]
            lev = {"plain": dense_leverage(k, False), "affine": dense_leverage(k, True)}
            rnd = random_scores(spec.n, 0, layer, kv)
            for mask in modes:
                per = {}
                for row in qrows:
                    q = q_all[row, qh * 8 : (qh + 1) * 8]
                    lo, hi, seg_lo = interval(mask, int(row), starts, stops, spec.n, causal)
                    lg = np.full(spec.n, -np.inf)
                    x = k[lo : hi + 1] @ q  # power: A ∝ |q·k|^2 (p = 2)
                    lg[lo : hi + 1] = scale * x if kind == "softmax" else 2 * np.log(np.abs(x))
                    a = np.exp(lg - lg.max())
                    a /= a.sum()
                    per[int(row)] = (q, lo, hi, seg_lo, a)
                mine = [r for r in rows if (int(r["layer"]), int(r["head"]), r["mask"]) == (
                    layer, qh, mask)]
                assert {r["selector"] for r in mine} == {
                    "oracle", "universal-threshold", "leverage-plain", "leverage-affine",
                    "sinks-window", "local-window", "key-norm", "random"}
                for r in mine:
                    assert int(r["kv_head"]) == kv and int(r["n_queries"]) == 20
                    budget: Any = None if r["budget"] == "" else (
                        float(r["budget"]) if "." in r["budget"] else int(r["budget"]))
                    used, rec, hits_all, heavy_all, mass, err, heavy_n = [], [], 0, 0, [], [], []
                    for row, (_q, lo, hi, seg_lo, a) in per.items():
                        s = dense_sets(r["selector"], budget, a, k, row, lo, hi, seg_lo, lev,
                                       rnd)
                        heavy = set(np.flatnonzero(a >= EPS).tolist())
                        idx = np.array(sorted(s), dtype=np.int64)
                        used.append(len(s))
                        if heavy:
                            rec.append(len(heavy & s) / len(heavy))
                        hits_all += len(heavy & s)
                        heavy_all += len(heavy)
                        heavy_n.append(len(heavy))
                        mass.append(a[idx].sum())
                        o = a @ v
                        # an empty set (U_eps may miss a segment) has output 0: error 1
                        o_s = (a[idx] / a[idx].sum()) @ v[idx] if idx.size else 0 * o
                        err.append(np.linalg.norm(o - o_s) / np.linalg.norm(o))
                    assert close(r["keys_used_mean"], float(np.mean(used))), r
                    assert close(r["recall_mean"], float(np.mean(rec)) if rec else None), r
                    assert close(r["recall_pooled"], hits_all / heavy_all if heavy_all
                                 else None), r
                    assert close(r["mass_mean"], float(np.mean(mass))), r
                    assert close(r["mass_p10"], float(np.percentile(mass, 10))), r
                    assert close(r["output_error_mean"], float(np.mean(err))), r
                    assert close(r["heavy_per_query"], float(np.mean(heavy_n))), r
                    seen.add((layer, qh, mask, r["selector"], r["budget"]))
    assert len(seen) == len(rows) == 2 * 2 * len(modes) * (7 * 2 + 1)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "at equal keys used" in md and "oracle" in md
    assert "budgets as counts" in md and "budgets as fractions" in md  # never mixed
    pd = pytest.importorskip("pandas")
    pytest.importorskip("xarray")
    ds = pd.read_csv(tmp_path / "out" / "results.csv").set_index(
        ["layer", "head", "mask", "selector", "budget"]).to_xarray()
    assert dict(ds.sizes)["layer"] == 2 and "mass_mean" in ds
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == [f"mass_{kind}.png", f"recall_{kind}.png"]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk_rows", [37, 64, 1000])
def test_native_ground_truth_is_exact_across_segments_and_chunkings(
    causal: bool, chunk_rows: int
) -> None:
    rng = np.random.default_rng(11)
    n, d = 400, 6
    k = rng.standard_normal((n, d))
    v = rng.standard_normal((n, 3))
    window = np.repeat([4, 9, 2, 5], [130, 70, 111, 89])  # ids need not be sorted
    pos = np.concatenate([np.arange(c) for c in (130, 70, 111, 89)])
    segs = Segments.from_tokens(window, pos, n, "test")
    rows = np.array([0, 5, 129, 130, 150, 199, 200, 250, 310, 311, 399])
    q = 2.0 * rng.standard_normal((rows.size, d))
    for mask in (Mask.parse("native"), Mask.parse("local:9")):
        lo, hi = mask.bounds(rows, segs, causal)
        gt = GroundTruth(GroundTruthSpec(q, eps=0.05, values_dim=3, key_lo=lo, key_hi=hi))
        run_operators(open_kv_like(k, v), [gt], chunk_rows=chunk_rows)
        res = gt.result()
        bounds = np.cumsum([0, 130, 70, 111, 89])
        for i, row in enumerate(rows):
            seg = np.searchsorted(bounds, row, side="right") - 1
            a, b = bounds[seg], bounds[seg + 1] - 1
            end = row if causal else b
            if mask.kind == "local":
                a, end = max(a, row - 9), min(end, row + 9)
            lg = np.full(n, -np.inf)
            lg[a : end + 1] = k[a : end + 1] @ q[i] / math.sqrt(d)
            w = np.exp(lg - lg.max())
            w /= w.sum()
            heavy = np.flatnonzero(w >= 0.05)
            got = res["indices"][i][res["indices"][i] >= 0]
            np.testing.assert_array_equal(got, heavy)
            np.testing.assert_allclose(res["weights"][i][: got.size], w[heavy], rtol=1e-10)
            np.testing.assert_allclose(res["output"][i], w @ v, rtol=1e-10, atol=1e-12)


def open_kv_like(k: np.ndarray, v: np.ndarray) -> Any:
    from streamattn.sources import KeySource

    return KeySource(k, values=v)


def test_segments_refuse_split_ids_and_broken_positions() -> None:
    from streamattn.errors import InvalidInputError

    with pytest.raises(InvalidInputError,
                       match=r"id 0 appears in separate runs of rows \(starting at rows \[0, 4"):
        Segments.from_tokens(np.array([0, 0, 1, 1, 0]), None, 5, "c")
    with pytest.raises(InvalidInputError, match="tokens/pos at row 2 is 5 after 1"):
        Segments.from_tokens(np.array([0, 0, 0, 1]), np.array([0, 1, 5, 0]), 4, "c")


def test_native_needs_the_model_causal_attribute_and_queries(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    store = write_decoder_cache(tmp_path / "kv.zarr", DecoderSpec(n=64, segment=32,
                                                                 layers=1, chunk_rows=32))
    root = zarr.open_group(str(store), mode="r+")
    model = dict(root.attrs["model"])
    del model["causal"]
    root.attrs["model"] = model
    cfg = tmp_path / "ev.yaml"
    cfg.write_text(f"input:\n  path: {store}\nattention:\n  modes: [native]\n"
                   f"output:\n  dir: {tmp_path / 'o'}\nprogress: false\n")
    assert main(["evaluate", str(cfg), "--quiet"]) == 2
    assert "model.causal attribute" in capsys.readouterr().err
    cfg.write_text(f"input:\n  path: {store}\nselectors:\n  names: [hybrid]\n"
                   f"output:\n  dir: {tmp_path / 'o'}\nprogress: false\n")
    assert main(["evaluate", str(cfg), "--quiet"]) == 2
    assert "not available for a KV cache" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert open_kv(store).queries is not None


def test_each_pass_reads_each_layer_once_per_block(
    tmp_path: Path,
) -> None:
    import dataclasses

    from streamattn.recipes.cache_evaluate import evaluate_cache, open_for_evaluate
    from streamattn.recipes.evaluate import EvaluateConfig, load_evaluate_config

    store = write_decoder_cache(tmp_path / "kv.zarr", DecoderSpec(
        n=256, segment=64, layers=2, q_heads=4, kv_heads=2, head_dim=8, chunk_rows=32))
    cfg_path = tmp_path / "ev.yaml"
    cfg_path.write_text(f"input:\n  path: {store}\nqueries:\n  count: 8\nattention:\n"
                        "  kinds: [softmax]\n  modes: [native, causal]\nselectors:\n"
                        "  budgets: [4, 0.1]\nprogress: false\n")
    cfg: EvaluateConfig = load_evaluate_config(cfg_path)
    src, group = open_for_evaluate(store, cfg)

    class Counting:
        def __init__(self, arr: Any) -> None:
            self.arr, self.reads = arr, 0
            self.shape, self.dtype, self.chunks = arr.shape, arr.dtype, arr.chunks

        def __getitem__(self, key: Any) -> Any:
            self.reads += 1
            return self.arr[key]

    keys = [Counting(a) for a in src._keys.arrays]
    assert src._values is not None
    vals = [Counting(a) for a in src._values.arrays]
    src._keys = dataclasses.replace(src._keys, arrays=tuple(keys))
    src._values = dataclasses.replace(src._values, arrays=tuple(vals))
    report = evaluate_cache(src, group, cfg, {"chunk_rows": 64})
    assert len(report["passes"]) == 3
    blocks = 256 // 64
    assert [k.reads for k in keys] == [3 * blocks] * 2  # one read per layer per block per pass
    assert [v.reads for v in vals] == [3 * blocks] * 2  # values ride along each read


def test_single_store_outputs_open_in_xarray(tmp_path: Path) -> None:
    xr = pytest.importorskip("xarray")
    k = np.random.default_rng(0).standard_normal((300, 5)).astype(np.float32)
    np.save(tmp_path / "k.npy", k)
    assert main(["select", str(tmp_path / "k.npy"), "--budget", "9", "--out",
                 str(tmp_path / "o"), "--quiet"]) == 0
    ds = xr.open_zarr(tmp_path / "o" / "result.zarr", group="universal_set/plain-top9",
                      consolidated=False)
    assert ds["indices"].dims == ("rank",) and ds["rows"].dims == ("rank", "dim")
