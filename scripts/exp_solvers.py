"""Experiment: kernel-regression solvers and the one-layer attention fit, measured.

Usage::

    .venv/bin/python scripts/exp_solvers.py                 # all tables (several minutes)
    .venv/bin/python scripts/exp_solvers.py --out results/solvers

Tables (results/solvers/results.json, results.md, iterations_vs_cond.png, time_vs_n.png):

1. Iterations vs cond(A) (n = 4096, d = 32, σ log-spaced from 1 to 1/cond): for gram_power and
   a_gram_power, j = 1, 2: relative error of ``direct`` and ``sketch-precondition`` against
   the SVD of A (float64), the preconditioned CG iterations (all stages) and plain CG's on the
   same stages (same tolerance 1e-10, cap 2000 per stage), and the direct error bound.
2. Time vs n (A a float32 .npy on disk, d = 32, n = 2^12..2^18): one direct TSQR pass, the
   sketch-precondition solve (its passes), against one plain read of the file.
3. exp(AAᵀ) (|(AAᵀ)_ij| ≤ 2, d = 16): Nyström-PCG (rank 300) vs plain CG at n = 1024, 4096,
   λ = 0 and λ = 1e-2, to ‖r‖ ≤ 1e-6‖b‖: iterations, residual, seconds (at n = 4096 plain
   CG only for λ = 1e-2, capped at 150 products); and the peak RSS of one kernel product at
   n = 32768 in a fresh process against the operators' ``nbytes_bound``.
4. One-layer fit on planted instances (n = 300, 1000, d = 4): Gauss–Newton (variable
   projection) vs Adam from the same start (Adam: 300 steps, lr 1e-2): iterations, seconds,
   final loss / initial loss, max |S_fit − S*|, and Gauss–Newton's iterations and seconds to
   reach Adam's final loss.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import streamattn as sa
from streamattn.io.outputs import write_json_atomic
from streamattn.memory import peak_rss_bytes
from streamattn.operators.solve_ops import ExpKernelMatvec, ExpKernelMatvecSpec
from streamattn.sources import open_keys

ROOT = Path(__file__).resolve().parents[1]


def conditioned(n: int, d: int, cond: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((n, d)))[0]
    v = np.linalg.qr(rng.standard_normal((d, d)))[0]
    return (u * np.logspace(0, -np.log10(cond), d)) @ v.T


def rel(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def table_cond(n: int, d: int) -> list[dict[str, Any]]:
    rows = []
    rng = np.random.default_rng(1)
    b_small, b_tall = rng.standard_normal(d), rng.standard_normal(n)
    for cond in [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6]:
        a = conditioned(n, d, cond, seed=2)
        u, s, vt = np.linalg.svd(a, full_matrices=False)
        for problem in ["gram-power", "a-gram-power"]:
            for j in [1, 2]:
                if problem == "gram-power":
                    fn, b = sa.solve.gram_power, b_small
                    ref = vt.T @ ((vt @ b) / s ** (2 * j))
                else:
                    fn, b = sa.solve.a_gram_power, b_tall
                    ref = vt.T @ ((u.T @ b) / s ** (2 * j + 1))
                direct = fn(a, b, j, verify=False)
                pre = fn(a, b, j, method="sketch-precondition", compare=True, tol=1e-10,
                         max_iter=2000, verify=False)
                rows.append({
                    "problem": problem, "j": j, "cond": cond,
                    "direct_rel_err": rel(direct.x, ref),
                    "direct_error_bound": direct.info["error_bound"],
                    "sketch_rel_err": rel(pre.x, ref),
                    "pre_iterations": pre.info["iterations"],
                    "pre_stage_iterations": pre.info["stage_iterations"],
                    "pre_passes": pre.info["passes"],
                    "unpre_iterations": pre.info["unpreconditioned"]["iterations"],
                    "unpre_converged": pre.info["unpreconditioned"]["converged"],
                })
                print(json.dumps(rows[-1]), flush=True)
    return rows


def read_time(path: Path) -> float:
    src = open_keys(path)
    t = time.perf_counter()
    for blk in src.blocks():
        float(blk.rows[0, 0])
    return time.perf_counter() - t


def table_time(ns: list[int], d: int, tmp: Path) -> list[dict[str, Any]]:
    rows = []
    for n in ns:
        rng = np.random.default_rng(n)
        a = (rng.standard_normal((n, d)) * np.linspace(1, 10, d)).astype(np.float32)
        path = tmp / f"a_{n}.npy"
        np.save(path, a)
        b = rng.standard_normal(d)
        del a
        raw = read_time(path)
        t = time.perf_counter()
        direct = sa.solve.gram_power(str(path), b, 2, verify=False)
        t_direct = time.perf_counter() - t
        t = time.perf_counter()
        pre = sa.solve.gram_power(str(path), b, 2, method="sketch-precondition", verify=False,
                                  tol=1e-10)
        t_pre = time.perf_counter() - t
        rows.append({
            "n": n, "d": d, "read_s": raw, "direct_s": t_direct, "direct_passes": 1,
            "sketch_s": t_pre, "sketch_passes": pre.info["passes"],
            "agree": rel(pre.x, direct.x),
        })
        print(json.dumps(rows[-1]), flush=True)
        path.unlink()
    return rows


def kernel_problem(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, d))
    a *= np.sqrt(2) * rng.uniform(0.5, 1.0, (n, 1)) / np.linalg.norm(a, axis=1, keepdims=True)
    return a, rng.standard_normal(n)


def table_kernel(ns: list[int], d: int, rank: int) -> list[dict[str, Any]]:
    """Nyström-PCG vs plain CG to ‖r‖ ≤ 1e-6‖b‖; at the largest n plain CG only with λ > 0
    and a cap of 150 products (each product reads A once and costs n² exps)."""
    rows = []
    for n in ns:
        a, x_true = kernel_problem(n, d, seed=n)
        # b = K x_true by one matvec pass (no n × n array)
        (op,) = sa.run_operators(
            open_keys(a), [ExpKernelMatvec(ExpKernelMatvecSpec(a, x_true[:, None]))]
        )
        k_x = op.result()[:, 0]
        for ridge in [0.0, 1e-2]:
            rhs = k_x + ridge * x_true
            for method in ["nystrom-pcg", "cg"]:
                largest = n == max(ns)
                if largest and method == "cg" and ridge == 0.0:
                    continue
                cap = 150 if largest and method == "cg" else 400
                t = time.perf_counter()
                res = sa.solve.attention_kernel(a, rhs, ridge=ridge, method=method, rank=rank,
                                                tol=1e-6, max_iter=cap)
                rows.append({
                    "n": n, "d": d, "ridge": ridge, "method": method,
                    "rank": rank if method == "nystrom-pcg" else None,
                    "iterations": res.info["iterations"], "max_iter": cap,
                    "converged": res.info["converged"],
                    "residual": res.info["residual"],
                    "backward_error": res.info["backward_error"],
                    "x_rel_err": rel(res.x, x_true),
                    "passes": res.info["passes_with_verify"],
                    "seconds": time.perf_counter() - t,
                })
                print(json.dumps(rows[-1]), flush=True)
    return rows


def kernel_memory_child(n: int, d: int, k: int) -> dict[str, Any]:
    """Run in a fresh process: peak RSS of one exp-kernel product pass vs the bound."""
    a, _ = kernel_problem(n, d, seed=0)
    v = np.random.default_rng(1).standard_normal((n, k))
    chunk = 4096
    # warm-up on 2 tiles (imports, BLAS thread buffers), then the baseline
    warm = ExpKernelMatvec(ExpKernelMatvecSpec(a[:2048], v[:2048]))
    sa.run_operators(open_keys(a[:2048]), [warm], chunk_rows=chunk)
    del warm
    base = peak_rss_bytes()
    op = ExpKernelMatvec(ExpKernelMatvecSpec(a, v))
    t = time.perf_counter()
    (done,) = sa.run_operators(open_keys(a), [op], chunk_rows=chunk)
    seconds = time.perf_counter() - t
    peak = peak_rss_bytes()
    norm = float(np.linalg.norm(done.result()))
    return {
        "n": n, "d": d, "k": k, "seconds": seconds, "baseline_rss": base, "peak_rss": peak,
        "growth_bytes": peak - base, "nbytes_bound": op.nbytes_bound(d),
        "bound_with_inputs": sa.solve.kernel_matvec_bound(n, d, k),
        "n_by_n_float64_bytes": 8 * n * n, "result_norm": norm,
        # the local engine holds up to prefetch + 1 = 3 blocks of chunk × d (float64 here)
        "engine_block_bytes": 3 * 8 * chunk * d,
        "note": "spec arrays (A, v) exist before the baseline; growth = output + tiles + blocks",
    }


def table_fit(ns: list[int], d: int, adam_iters: int) -> list[dict[str, Any]]:
    rows = []
    for n in ns:
        rng = np.random.default_rng(100 + n)
        a1, a2, a3 = (rng.standard_normal((n, d)) for _ in range(3))
        x_star, y_star = rng.standard_normal((d, d)) / d, rng.standard_normal((d, d))
        s_star = sa.fit.attention_matrix(a1, x_star, a2)
        b = s_star @ a3 @ y_star
        gn = sa.fit.one_layer_attention(a1, a2, a3, b, seed=0, max_iter=60)
        adam = sa.fit.one_layer_attention(a1, a2, a3, b, seed=0, method="adam",
                                          max_iter=adam_iters, lr=1e-2)
        target = adam.loss_history[-1]
        hit = next((k for k, v in enumerate(gn.loss_history) if v <= target), None)
        rows.append({
            "n": n, "d": d,
            "gn_iterations": gn.info["iterations"], "gn_starts": gn.info["starts"],
            "gn_seconds": gn.info["seconds"], "gn_passes": gn.info["passes"],
            "gn_relative_loss": gn.info["relative_loss"], "gn_converged": gn.info["converged"],
            "gn_max_attention_err": float(
                np.abs(sa.fit.attention_matrix(a1, gn.X, a2) - s_star).max()
            ),
            "adam_iterations": adam.info["iterations"], "adam_seconds": adam.info["seconds"],
            "adam_relative_loss": adam.info["relative_loss"],
            "gn_iterations_to_adam_loss": hit,
            "gn_seconds_to_adam_loss": None if hit is None else gn.info["time_history"][hit],
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def markdown(rows: list[dict[str, Any]], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def plots(out: Path, cond_rows: list[dict[str, Any]], time_rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for problem in ["gram-power", "a-gram-power"]:
        for j in [1, 2]:
            sel = [r for r in cond_rows if r["problem"] == problem and r["j"] == j]
            c = [r["cond"] for r in sel]
            ax.plot(c, [r["pre_iterations"] for r in sel], "o-", label=f"{problem} j={j} precond")
            ax.plot(c, [r["unpre_iterations"] for r in sel], "x--",
                    label=f"{problem} j={j} plain CG")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("cond(A)")
    ax.set_ylabel("CG iterations (all stages) = passes over A")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "iterations_vs_cond.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    n = [r["n"] for r in time_rows]
    ax.plot(n, [r["read_s"] for r in time_rows], "s-", label="one plain read")
    ax.plot(n, [r["direct_s"] for r in time_rows], "o-", label="direct (1 TSQR pass)")
    ax.plot(n, [r["sketch_s"] for r in time_rows], "x-", label="sketch-precondition")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("n (rows of A, d = 32, float32 .npy)")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "time_vs_n.png", dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "results" / "solvers"))
    p.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    p.add_argument("--kernel-memory-child", nargs=3, type=int, metavar=("N", "D", "K"))
    args = p.parse_args()
    if args.kernel_memory_child:
        print(json.dumps(kernel_memory_child(*args.kernel_memory_child)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quick = args.quick
    t0 = time.perf_counter()
    partial: dict[str, Any] = {}

    def keep(name: str, value: Any) -> Any:  # partial results survive an interrupted run
        partial[name] = value
        write_json_atomic(out / "results.partial.json", partial)
        return value

    cond_rows = keep("cond", table_cond(1024 if quick else 4096, 16 if quick else 32))
    with tempfile.TemporaryDirectory() as tmp:
        ns = [2**12, 2**14] if quick else [2**12, 2**14, 2**16, 2**18]
        time_rows = keep("time", table_time(ns, 32, Path(tmp)))
    kernel_rows = keep("kernel", table_kernel([512] if quick else [1024, 4096], 16, 300))
    mem_n = 4096 if quick else 32768
    child = subprocess.run(
        [sys.executable, __file__, "--kernel-memory-child", str(mem_n), "16", "1"],
        check=True, capture_output=True, text=True,
    )
    memory = json.loads(child.stdout.strip().splitlines()[-1])
    print(json.dumps(memory), flush=True)
    keep("kernel_memory", memory)
    fit_rows = keep("fit", table_fit([300] if quick else [300, 1000], 4, 300))
    results = {"cond": cond_rows, "time": time_rows, "kernel": kernel_rows,
               "kernel_memory": memory, "fit": fit_rows,
               "seconds": time.perf_counter() - t0, "versions": {"streamattn": sa.__version__}}
    write_json_atomic(out / "results.json", results)
    (out / "results.partial.json").unlink()
    plots(out, cond_rows, time_rows)
    md = [
        "# Solvers: measured results (scripts/exp_solvers.py)", "",
        "## 1. Iterations vs cond(A)", "",
        markdown(cond_rows, ["problem", "j", "cond", "direct_rel_err", "direct_error_bound",
                             "sketch_rel_err", "pre_iterations", "pre_passes",
                             "unpre_iterations", "unpre_converged"]),
        "", "## 2. Time vs n (gram_power, j = 2)", "",
        markdown(time_rows, ["n", "d", "read_s", "direct_s", "sketch_s", "sketch_passes",
                             "agree"]),
        "", "## 3. exp(AAᵀ) solves", "",
        markdown(kernel_rows, ["n", "d", "ridge", "method", "rank", "iterations", "max_iter",
                               "converged",
                               "residual", "backward_error", "x_rel_err", "passes",
                               "seconds"]),
        "", "Peak memory of one kernel product (fresh process):", "",
        "```", json.dumps(memory, indent=1), "```",
        "", "## 4. One-layer attention fit (planted)", "",
        markdown(fit_rows, ["n", "d", "gn_iterations", "gn_starts", "gn_seconds",
                            "gn_relative_loss", "gn_max_attention_err", "adam_iterations",
                            "adam_seconds", "adam_relative_loss", "gn_iterations_to_adam_loss",
                            "gn_seconds_to_adam_loss"]),
        "",
    ]
    (out / "results.md").write_text("\n".join(md))
    print(f"wrote {out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
