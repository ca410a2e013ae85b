"""Experiment: logit and attention error of reduced embeddings vs m, for every method.

Usage::

    .venv/bin/python scripts/exp_embeddings.py                  # synthetic store of the config
    .venv/bin/python scripts/exp_embeddings.py --store my.zarr  # also any store (with queries)

For each store, method (gaussian, sparse-sign, srht, pca, frequent-directions) and m, one
``reduce_embeddings`` run reports (quality report, docs/architecture.md, note 2.4): max / mean
normalised logit error |q·k − (Sᵀq)·(Sᵀk)|/(‖q‖‖k‖), the same for centred keys, and the attention
error at scale 1/√d (max |p − p̂|, total variation per query row) over a key sample, with the
store's queries when it has them. A second table covers the d ≫ n regime
(streamattn.recipes.columns): BSS and column-leverage sampling on a wide synthetic matrix
with ‖XXᵀ‖∞ = r.

Writes results/exp_embeddings/results.json, results.md and errors_vs_m.png.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from streamattn.config import load_config
from streamattn.io.outputs import write_json_atomic
from streamattn.operators.projection import METHODS
from streamattn.recipes.columns import sparsify_columns
from streamattn.recipes.embeddings import ReduceConfig, reduce_embeddings
from streamattn.sources import open_keys
from streamattn.synthetic import ensure_store

ROOT = Path(__file__).resolve().parents[1]


def sweep(source: Any, base: ReduceConfig, ms: list[int], methods: list[str]) -> list[dict]:
    rows = []
    for method in methods:
        for m in ms:
            if m > source.d:
                continue
            cfg = ReduceConfig(**{**base.__dict__, "m": m, "method": method})
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                res = reduce_embeddings(source, config=cfg, out=Path(tmp) / "out")
                seconds = time.perf_counter() - t0
            q = res.quality
            rows.append(
                {
                    "store": source.label,
                    "n": source.n,
                    "d": source.d,
                    "method": method,
                    "m": m,
                    "seconds": seconds,
                    "passes": res.report["embeddings"]["map"]["passes"],
                    **{k: q[k] for k in q if k not in ("guarantee", "jl_eps_note")},
                    **{
                        k: v
                        for k, v in res.report["embeddings"]["map"].items()
                        if k.startswith("fd_delta") or k == "explained_variance_fraction"
                    },
                }
            )
            print(
                f"{source.label} {method:>20} m={m:4d}: logit max {q['logit_error_max']:.4f} "
                f"mean {q['logit_error_mean']:.4f}  TV mean {q['attention_tv_mean']:.4f} "
                f"max {q['attention_tv_max']:.4f}  ({seconds:.1f} s)",
                flush=True,
            )
    return rows


def wide_matrix(n: int, d: int, r: float, seed: int) -> np.ndarray:
    """d ≫ n, heavy-tailed column norms, scaled so that ‖XXᵀ‖∞ = r."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * rng.gamma(0.5, size=d)
    return x * np.sqrt(r / np.max(np.abs(x @ x.T)))


def columns_table(n: int, d: int, r: float, eps_list: list[float]) -> list[dict]:
    x = wide_matrix(n, d, r, seed=0)
    rows = []
    for method in ("bss", "leverage"):
        for eps in eps_list:
            t0 = time.perf_counter()
            sel = sparsify_columns(x, method=method, eps=eps, cols_per_block=2048)
            c = sel.certificate
            keep = (
                "m eps_target eps_achieved r softmax_error softmax_bound entrywise_error passes "
                "m_bound m_bound_expected"
            ).split()
            rows.append(
                {
                    "method": method,
                    "n": n,
                    "d": d,
                    "seconds": time.perf_counter() - t0,
                    **{k: c[k] for k in keep if k in c},
                }
            )
            print(
                f"columns {method:>8} eps={eps}: m={c['m']} softmax err {c['softmax_error']:.2e}"
                f" <= bound {c['softmax_bound']:.2e}",
                flush=True,
            )
    return rows


def markdown(rows: list[dict], cols: list[dict]) -> str:
    out = [
        "| store | method | m | logit err max | logit err mean | centred mean | "
        "attn max abs | TV max | TV mean | JL eps (Gaussian form) | s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        jl = "—" if r["jl_eps_gaussian_form"] is None else f"{r['jl_eps_gaussian_form']:.3f}"
        out.append(
            f"| {Path(str(r['store'])).name} | {r['method']} | {r['m']} | "
            f"{r['logit_error_max']:.4f} | {r['logit_error_mean']:.4f} | "
            f"{r['centred_logit_error_mean']:.4f} | {r['attention_max_abs_error']:.4f} | "
            f"{r['attention_tv_max']:.4f} | {r['attention_tv_mean']:.4f} | {jl} | "
            f"{r['seconds']:.1f} |"
        )
    out += [
        "",
        "| columns method | n | d | eps | m | eps achieved | r | softmax err | e^(2 eps r) - 1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cols:
        out.append(
            f"| {c['method']} | {c['n']} | {c['d']} | {c['eps_target']} | {c['m']} | "
            f"{c['eps_achieved']:.3f} | {c['r']:.3f} | {c['softmax_error']:.2e} | "
            f"{c['softmax_bound']:.2e} |"
        )
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stores = sorted({str(r["store"]) for r in rows})
    fig, axes = plt.subplots(len(stores), 3, figsize=(15, 4.2 * len(stores)), squeeze=False)
    panels = [
        ("logit_error_mean", "mean normalised logit error"),
        ("logit_error_max", "max normalised logit error"),
        ("attention_tv_mean", "mean total variation of attention rows"),
    ]
    for i, store in enumerate(stores):
        for j, (key, title) in enumerate(panels):
            ax = axes[i, j]
            for method in METHODS:
                pts = [
                    (r["m"], r[key]) for r in rows if r["store"] == store and r["method"] == method
                ]
                if pts:
                    ms, vals = zip(*pts, strict=True)
                    ax.plot(ms, np.maximum(vals, 1e-8), marker="o", label=method)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("m")
            ax.set_title(f"{Path(store).name}: {title}", fontsize=9)
            ax.grid(True, alpha=0.3)
        axes[i, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "embeddings.yaml"))
    parser.add_argument("--store", action="append", default=[], help="another key store")
    parser.add_argument("--array", help="key array name inside --store groups")
    parser.add_argument("--ms", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--wide", type=int, nargs=2, default=[64, 8192], metavar=("N", "D"))
    parser.add_argument("--out", default=str(ROOT / "results" / "exp_embeddings"))
    args = parser.parse_args()

    cfg = load_config(args.config)
    assert cfg.reduce is not None, "the experiment config needs a reduce: section"
    path = Path(cfg.input.path)
    if not path.is_absolute():
        path = ROOT / path
    if cfg.input.generate is not None:
        ensure_store(path, cfg.input.generate)
    sources = [open_keys(path, array=cfg.input.array)]
    sources += [open_keys(s, array=args.array) for s in args.store]
    rows = []
    for src in sources:
        rows += sweep(src, cfg.reduce, args.ms, args.methods)
    cols = columns_table(args.wide[0], args.wide[1], r=0.05, eps_list=[0.5, 0.8])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        out / "results.json",
        {
            "command": "scripts/exp_embeddings.py " + " ".join(f"--store {s}" for s in args.store),
            "config": str(args.config),
            "reduce_base": cfg.reduce.__dict__,
            "embeddings": rows,
            "columns": cols,
        },
    )
    (out / "results.md").write_text(markdown(rows, cols))
    plot(rows, out / "errors_vs_m.png")
    print(f"wrote {out}/results.json, results.md, errors_vs_m.png")


if __name__ == "__main__":
    main()
