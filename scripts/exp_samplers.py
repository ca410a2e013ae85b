"""Experiment: leverage samplers — kept rows and measured spectral error vs n and vs ε.

Usage::

    .venv/bin/python scripts/exp_samplers.py              # n up to 2^18 (a few minutes)
    .venv/bin/python scripts/exp_samplers.py --max-log2n 16 --out /tmp/samplers  # quicker

Writes results/samplers/results.json, results.md and samplers.png.

Keys (d = 16): ``gaussian`` (anisotropic, offset 2), ``student-t`` (ν = 2.5, heavy tails)
and ``low-rank+outliers`` (rank 4 + noise 0.05, 0.1 % rows × 50, offset 3).
For every method (``online``, ``merge-reduce``) and engine (local; Dask threads for
merge-reduce and online at the largest n) the table reports the kept rows, c, the proved
failure bound for this run's tree / parts, and the **measured** spectral error
max_q |qᵀ(G̃ − G)q| / qᵀGq, computed exactly from G (TSQR factor of the same keys) and
G̃ through a d × d eigenproblem. At the same size B as each sample: uniform sampling
without replacement (weights n/B) and the exact top-B leverage set (weights 1), with the
same error measure. The uses table (n = 2^16, ε = 0.25, affine merge-reduce) measures x²
normalisers over random and adversarial queries (q = G⁺k_j for the 32 top-leverage keys),
approximate leverage of every row, and the one-pass PCA (m = 4) against the two-pass map.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

import streamattn as sa
from streamattn.io.outputs import write_json_atomic
from streamattn.operators.projection import CentredFactor, CentredFactorSpec, ProjectionMap
from streamattn.recipes.embeddings import quality_report
from streamattn.recipes.samplers import LeverageSample, spectral_error
from streamattn.sources import Block

ROOT = Path(__file__).resolve().parents[1]
D = 16


def make_keys(kind: str, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        return rng.standard_normal((n, D)) @ np.diag(np.geomspace(0.3, 3.0, D)) + 2.0
    if kind == "student-t":
        return rng.standard_t(2.5, (n, D))
    x = rng.standard_normal((n, 4)) @ rng.standard_normal((4, D))
    x += 0.05 * rng.standard_normal((n, D))
    out = rng.choice(n, max(1, n // 1000), replace=False)
    x[out] *= 50.0
    return x + 3.0


def exact_factor(x: np.ndarray) -> Any:
    op = CentredFactor(CentredFactorSpec())
    for a in range(0, x.shape[0], 65536):
        op.update(Block(a, x[a : a + 65536]))
    return op.result()


def leverage(x: np.ndarray, affine: bool) -> np.ndarray:
    a = np.hstack([x, np.ones((x.shape[0], 1))]) if affine else x
    q, _ = np.linalg.qr(a)
    return np.einsum("ij,ij->i", q, q)


def baselines(x: np.ndarray, b: int, tau: np.ndarray, factor: Any, variant: str) -> dict:
    n = x.shape[0]
    rng = np.random.default_rng(1)
    uni = np.sort(rng.choice(n, min(b, n), replace=False))
    top = np.sort(np.lexsort((np.arange(n), -tau))[: min(b, n)])
    cert = {"variant": variant}
    u = LeverageSample(uni, np.full(uni.size, n / uni.size), x[uni], cert)
    t = LeverageSample(top, np.ones(top.size), x[top], cert)
    return {"uniform_error": spectral_error(u, factor), "top_b_error": spectral_error(t, factor)}


def run_one(x: np.ndarray, kind: str, method: str, variant: str, eps: float, engine: str,
            tau: np.ndarray, factor: Any) -> dict[str, Any]:
    opts: dict[str, Any] = {"engine": engine, "chunk_rows": 16384}
    if engine == "dask":
        opts.update(scheduler="threads", threads_per_worker=2)
    t0 = time.perf_counter()
    s = sa.leverage_sample(x, eps=eps, delta=0.01, method=method, variant=variant, seed=0,
                           **opts)
    sec = time.perf_counter() - t0
    assert isinstance(s, LeverageSample)
    c = s.certificate
    row = {
        "keys": kind, "n": x.shape[0], "method": method, "variant": variant, "engine": engine,
        "eps": eps, "kept": len(s), "c": round(c["c"], 1), "delta_bound": c["delta_bound"],
        "spectral_error": spectral_error(s, factor), "seconds": round(sec, 2),
        "tree_height": c.get("root_height"), "parts": c.get("parts"),
    }
    row.update(baselines(x, len(s), tau, factor, variant))
    return row


def uses_table(n: int) -> dict[str, Any]:
    x = make_keys("low-rank+outliers", n, 3)
    eps = 0.25
    s = sa.leverage_sample(x, eps=eps, method="merge-reduce", variant="affine", seed=0)
    assert isinstance(s, LeverageSample)
    factor = exact_factor(x)
    g = x.T @ x
    tau_plain = leverage(x, False)
    rng = np.random.default_rng(0)
    adversarial = (np.linalg.pinv(g) @ x[np.argsort(tau_plain)[-32:]].T).T
    random_q = rng.standard_normal((256, D))
    out: dict[str, Any] = {"n": n, "eps": eps, "kept": len(s),
                           "spectral_error": spectral_error(s, factor)}
    for name, q in (("random", random_q), ("adversarial", adversarial)):
        worst = 0.0
        for c in (0.0, -5.0, 50.0):
            exact = ((q @ x.T + c) ** 2).sum(axis=1)
            worst = max(worst, float(np.abs(s.normaliser(q, c) / exact - 1).max()))
        out[f"normaliser_max_rel_error_{name}"] = worst
    tau = leverage(x, True)
    ratio = s.leverage(x) / tau
    out["approx_leverage_ratio_min"] = float(ratio.min())
    out["approx_leverage_ratio_max"] = float(ratio.max())
    exact_u = sa.universal_set(x, 0.01, variant="affine")
    approx_u = sa.approximate_universal_set(x, s, 0.01)
    out["universal_exact_size"] = len(exact_u)
    out["universal_approx_size"] = len(approx_u)
    out["universal_false_negatives"] = len(set(exact_u.indices.tolist())
                                           - set(approx_u.indices.tolist()))
    m = 4
    v_exact, _ = factor.principal_directions(m)
    two_pass = ProjectionMap("pca", D, m, matrix=v_exact)
    one_pass, _ = s.pca(m)
    keys = x[np.sort(rng.choice(n, 2048, replace=False))]
    q = rng.standard_normal((256, D)) * float(np.sqrt((x**2).sum(1).mean()))
    for name, pmap in (("two_pass", two_pass), ("one_pass", one_pass)):
        rep = quality_report(pmap, keys, q, mean=factor.mean, scale=1 / np.sqrt(D))
        for k in ("centred_logit_error_max", "attention_tv_max", "attention_tv_mean"):
            out[f"pca_{name}_{k}"] = rep[k]
    xc = x - factor.mean
    scatter = xc.T @ xc
    best = np.trace(v_exact.T @ scatter @ v_exact)
    v1 = one_pass.dense()
    out["pca_one_pass_captured_variance_ratio"] = float(np.trace(v1.T @ scatter @ v1) / best)
    out["pca_proved_lower_bound"] = (1 - eps) / (1 + eps)
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    vs_n = [r for r in rows if r["eps"] == 0.25 and r["engine"] == "local"]
    for kind, ls in (("gaussian", "-"), ("student-t", "--"), ("low-rank+outliers", ":")):
        for method, color in (("online", "C0"), ("merge-reduce", "C1")):
            sel = sorted((r for r in vs_n if r["keys"] == kind and r["method"] == method),
                         key=lambda r: r["n"])
            if not sel:
                continue
            ns = [r["n"] for r in sel]
            axes[0].plot(ns, [r["kept"] for r in sel], ls, color=color, marker="o",
                         label=f"{method}, {kind}")
            axes[1].plot(ns, [r["spectral_error"] for r in sel], ls, color=color, marker="o")
            axes[1].plot(ns, [r["uniform_error"] for r in sel], ls, color="C2", marker="x")
    axes[0].set(xscale="log", yscale="log", xlabel="n", ylabel="kept rows",
                title="kept rows vs n (eps = 0.25)")
    axes[0].legend(fontsize=7)
    axes[1].axhline(0.25, color="k", lw=0.8)
    axes[1].set(xscale="log", yscale="log", xlabel="n", ylabel="spectral error",
                title="measured error (blue/orange) vs uniform at equal size (green)")
    vs_e = [r for r in rows if r.get("sweep") == "eps"]
    for method, color in (("online", "C0"), ("merge-reduce", "C1")):
        sel = sorted((r for r in vs_e if r["method"] == method), key=lambda r: r["eps"])
        axes[2].plot([r["eps"] for r in sel], [r["spectral_error"] for r in sel], "-o",
                     color=color, label=f"{method}")
    axes[2].plot([0.05, 0.6], [0.05, 0.6], "k", lw=0.8, label="eps (the bound)")
    axes[2].set(xscale="log", yscale="log", xlabel="eps", ylabel="spectral error",
                title="measured error vs eps (gaussian, n = 2^16)")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(rows: list[dict[str, Any]], uses: dict[str, Any]) -> str:
    cols = ["keys", "n", "method", "variant", "engine", "eps", "kept", "c", "tree_height",
            "parts", "delta_bound", "spectral_error", "uniform_error", "top_b_error", "seconds"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for k in cols:
            v = r.get(k)
            cells.append(f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Uses (low-rank+outliers, affine merge-reduce):", ""]
    lines += [f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}"
              for k, v in uses.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-log2n", type=int, default=18)
    ap.add_argument("--out", default=str(ROOT / "results" / "samplers"))
    args = ap.parse_args()
    out = Path(args.out)
    rows: list[dict[str, Any]] = []
    ns = [2**k for k in range(14, args.max_log2n + 1, 2)]
    for kind in ("gaussian", "student-t", "low-rank+outliers"):
        for n in ns:
            x = make_keys(kind, n)
            factor = exact_factor(x)
            for variant in ("plain", "affine") if kind == "low-rank+outliers" else ("plain",):
                tau = leverage(x, variant == "affine")
                for method in ("online", "merge-reduce"):
                    engines = ["local"] + (["dask"] if n == ns[-1] else [])
                    for engine in engines:
                        r = run_one(x, kind, method, variant, 0.25, engine, tau, factor)
                        rows.append(r)
                        print(r, flush=True)
    n = 2**16
    x = make_keys("gaussian", n)
    factor = exact_factor(x)
    tau = leverage(x, False)
    for eps in (0.1, 0.25, 0.5):
        for method in ("online", "merge-reduce"):
            r = run_one(x, "gaussian", method, "plain", eps, "local", tau, factor)
            r["sweep"] = "eps"
            rows.append(r)
            print(r, flush=True)
    uses = uses_table(2**16)
    print(uses)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", {"rows": rows, "uses": uses, "d": D, "delta": 0.01})
    (out / "results.md").write_text(markdown(rows, uses))
    plot(rows, out / "samplers.png")


if __name__ == "__main__":
    main()
