"""Experiment: ℓp universal sets, ridge sets for large d, and the sliding window, measured.

Usage::

    .venv/bin/python scripts/exp_lp.py            # n = 2^18 (about 1-2 minutes on 2 cores)
    .venv/bin/python scripts/exp_lp.py --n 65536  # quicker

Tables (written to results/exp_lp/results.json and results.md):

1. Lewis weights on a synthetic store (d = 32, rank-8 structure + noise, outliers): for each
   p, the method, iterations, passes, |Σw − rank|, |U| and its size bound, the time per
   pass and its ratio to one plain read of the store.
2. Ridge sets for large d (d = 512, n/4 rows): |U| of the one-pass FD ridge set and of the
   JL-sketched path against the exact ridge set (computed densely), for ℓ and λ_rel, with
   the FD error Δ/λ and whether the superset property held.
3. Sliding window: rows/s of ``SlidingWindow.append`` (W = 4096, b = 512, d = 64) and the
   largest number of blocks held.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from streamattn.io.outputs import write_json_atomic
from streamattn.recipes.lp import lp_universal_set
from streamattn.recipes.ridge import ridge_universal_set
from streamattn.recipes.sliding_window import SlidingWindow
from streamattn.sources import open_keys
from streamattn.synthetic import SyntheticSpec, generate_store

ROOT = Path(__file__).resolve().parents[1]


def read_time(src: Any) -> float:
    t0 = time.perf_counter()
    for _ in src.blocks():
        pass
    return time.perf_counter() - t0


def lewis_table(path: Path, ps: list[float], eps: float) -> list[dict[str, Any]]:
    src = open_keys(path)
    base = min(read_time(src) for _ in range(2))
    rows = []
    for p in ps:
        t0 = time.perf_counter()
        u = lp_universal_set(src, eps, p=p)
        sec = time.perf_counter() - t0
        c = u.certificate
        rows.append(
            {
                "p": p,
                "method": c["method"],
                "beta": c["beta"],
                "iterations": c["iterations"],
                "passes": c["passes"],
                "sum_w_minus_rank": abs(c["sum_weights"] - c["numerical_rank"]),
                "selected": len(u),
                "size_bound": c["size_bound"],
                "seconds": sec,
                "seconds_per_pass": sec / c["passes"],
                "pass_over_read": sec / c["passes"] / base,
            }
        )
        print(rows[-1])
    return rows


def ridge_table(n: int, d: int, eps: float) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    k = rng.standard_normal((n, d)) * np.geomspace(4.0, 0.02, d)
    k[:: max(1, n // 32)] *= 12.0
    out = []
    for lam_rel in (0.1, 1.0):
        lam = lam_rel * float(np.sum(k**2)) / d
        g = k.T @ k + lam * np.eye(d)
        tau = np.einsum("ij,ji->i", k, np.linalg.solve(g, k.T))
        exact = set(np.flatnonzero(tau >= eps).tolist())
        for ell in (16, 64):
            for sketch_eps in (None, 0.5):
                t0 = time.perf_counter()
                u = ridge_universal_set(k, eps, ell=ell, lam_rel=lam_rel, sketch_eps=sketch_eps,
                                        chunk_rows=8192)
                c = u.certificate
                out.append(
                    {
                        "d": d,
                        "n": n,
                        "lam_rel": lam_rel,
                        "ell": ell,
                        "path": "fd" if sketch_eps is None else f"fd+jl(eps'={sketch_eps})",
                        "sketch_m": c.get("sketch_m"),
                        "exact_ridge_set": len(exact),
                        "selected": len(u),
                        "superset": exact <= set(u.indices.tolist()),
                        "fd_delta_over_lam": c["fd_delta"] / c["lam"],
                        "size_bound": c["size_bound"],
                        "seconds": time.perf_counter() - t0,
                    }
                )
                print(out[-1])
    return out


def window_table(n: int) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    sw = SlidingWindow(4096, 512, 0.01, variant="affine")
    held = 0
    pool = rng.standard_normal((8192, 64))  # rows generated up front, replayed
    t0 = time.perf_counter()
    for a in range(0, n, 256):
        sw.append(pool[a % 8192 : a % 8192 + 256])
        held = max(held, len(sw.done))
    sec = time.perf_counter() - t0
    u = sw.result()
    return {"rows": n, "window": 4096, "block": 512, "d": 64, "rows_per_s": n / sec,
            "max_blocks_held": held, "final_window": [u.start, u.stop], "final_size": len(u)}


def markdown(res: dict[str, Any]) -> str:
    lines = ["# ℓp universal sets, ridge sets and sliding windows (scripts/exp_lp.py)", ""]
    lines += [f"Lewis weights: store n = {res['n']}, d = 32, eps = {res['eps']}.", "",
              "| p | method | iterations | passes | abs(Σw − rank) | abs(U) | size bound | "
              "s/pass | pass / read |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in res["lewis"]:
        lines.append(
            f"| {r['p']:g} | {r['method']} (β={r['beta']:.3g}) | {r['iterations']} | "
            f"{r['passes']} | {r['sum_w_minus_rank']:.1e} | {r['selected']} | "
            f"{r['size_bound']:.0f} | {r['seconds_per_pass']:.2f} | {r['pass_over_read']:.2f} |"
        )
    lines += ["", "Ridge sets (eps = 0.05) against the exact dense ridge set:", "",
              "| d | n | λ_rel | ℓ | path | m | exact | abs(U) | superset | Δ/λ | s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["ridge"]:
        lines.append(
            f"| {r['d']} | {r['n']} | {r['lam_rel']} | {r['ell']} | {r['path']} | "
            f"{r['sketch_m'] or '-'} | {r['exact_ridge_set']} | {r['selected']} | "
            f"{r['superset']} | {r['fd_delta_over_lam']:.2f} | {r['seconds']:.1f} |"
        )
    w = res["window"]
    lines += ["", f"Sliding window W = {w['window']}, b = {w['block']}, d = {w['d']}, affine: "
              f"{w['rows_per_s']:.0f} rows/s, at most {w['max_blocks_held']} blocks held.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2**18)
    ap.add_argument("--out", default=str(ROOT / "results" / "exp_lp"))
    args = ap.parse_args()
    eps = 0.01
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "keys.zarr"
        generate_store(store, SyntheticSpec(n=args.n, d=32, rank=8, outliers=8, chunk_rows=16384,
                                            compressor="none"))
        lewis = lewis_table(store, [0.5, 1.0, 1.5, 3.0, 5.0], eps)
    ridge = ridge_table(args.n // 4, 512, 0.05)
    window = window_table(args.n)
    res = {"n": args.n, "eps": eps, "lewis": lewis, "ridge": ridge, "window": window,
           "command": f"scripts/exp_lp.py --n {args.n}"}
    out = Path(args.out)
    write_json_atomic(out / "results.json", res)
    (out / "results.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
