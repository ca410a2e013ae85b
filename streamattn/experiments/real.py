"""``real-sparsity``: per layer and head sparsity of a KV cache against the Gaussian model.

Input: a zarr v3 group in the cache layout of issue 11 (documented in docs/experiments.md):
``keys/layer_{l}`` (n, H_kv·hd) with attributes ``n_heads``, ``head_dim`` (optional
``attn_scaling``), ``queries/layer_{l}`` (n, H_q·hd) with ``n_heads``, optional
``tokens/window`` (segment id per row, segments contiguous) and ``tokens/pos``, and the
group attribute ``model`` with ``causal`` and ``attn_scaling``. Query head h uses KV head
h // (H_q / H_kv).

For each layer, ``queries`` rows are sampled (seeded, the same rows for every layer) and
each query head gets one ``SparsityStats`` operator over its KV head's columns with the
*native* mask: keys of the query's own segment, and only rows ≤ the query's row when
``model.causal``. All heads of a layer share one streaming read of ``keys/layer_{l}``.

The Gaussian prediction uses each query's own statistics: n_i = its number of native
keys and σ_i = the standard deviation of its logits over them (exact, from the same
pass), in the formulas of ``streamattn.experiments.gaussian``. A real head departs from
the model where its logits are not Gaussian: heavy tails (attention sinks, a few
dominant keys), or structure such as recency, which the i.i.d. model cannot express.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamattn.errors import ConfigError, InvalidInputError
from streamattn.experiments.common import (
    PLOTS_MISSING,
    as_list,
    csv_text,
    new_figure,
    plots_available,
    save_figure,
)
from streamattn.experiments.gaussian import (
    missing_mass,
    predicted_heavy,
    predicted_heavy_typical,
    predicted_kdelta,
)
from streamattn.operators.sparsity import SparsitySpec, SparsityStats, heavy_counts, k_delta
from streamattn.runner import run_pass
from streamattn.sources import KeySource

NAME = "real-sparsity"
COLUMNS = [
    "layer", "head", "kv_head", "mask", "eps", "queries", "n_keys_mean", "logit_std_mean",
    "measured_heavy_per_query", "predicted_heavy_per_query", "relative_error",
    "predicted_heavy_typical_L", "in_regime_fraction", "measured_entropy",
    "predicted_entropy", "measured_max_prob_median", "measured_lse_minus_log_n",
    "predicted_lse_minus_log_n",
]
KDELTA_COLUMNS = [
    "layer", "head", "kv_head", "mask", "delta", "queries", "measured_kdelta_median",
    "measured_kdelta_exact_fraction", "predicted_kdelta_median", "kdelta_fraction_of_keys",
]


@dataclass(frozen=True)
class RealSparsityConfig:
    """``path`` of the cache; ``layers``/``heads`` null for all (query heads); ``eps``,
    ``delta`` scalars or lists; ``queries`` rows sampled per layer with ``seed``."""

    path: str = "data/kvcache.zarr"
    layers: Any = None
    heads: Any = None
    queries: int = 64
    seed: int = 0
    eps: Any = field(default_factory=lambda: [1e-2, 1e-3])
    delta: Any = field(default_factory=lambda: [0.1, 0.5])
    top_keys: int | None = None
    min_keys: int = 256
    regime_missing_mass: float = 0.02

    def check(self) -> None:
        if self.queries < 1 or self.min_keys < 1:
            raise ConfigError("config.queries and config.min_keys must be >= 1.")
        if self.seed < 0:
            raise ConfigError("config.seed must be >= 0.")
        if any(not 0 < e <= 1 for e in as_list(self.eps, float, "eps")):
            raise ConfigError("config.eps: values must be in (0, 1].")
        if any(not 0 < v < 1 for v in as_list(self.delta, float, "delta")):
            raise ConfigError("config.delta: values must be in (0, 1).")
        for name in ("layers", "heads"):
            if getattr(self, name) is not None:
                as_list(getattr(self, name), int, name)
        if self.top_keys is not None and self.top_keys < self.needed_top_keys():
            raise ConfigError(f"config.top_keys must be >= floor(1/min eps) = "
                              f"{self.needed_top_keys()}.")

    def needed_top_keys(self) -> int:
        return max(math.floor(1.0 / e + 1e-9) for e in as_list(self.eps, float, "eps"))

    def seeds(self) -> list[int]:
        return [self.seed]


# ---------------------------------------------------------------------- the cache
@dataclass
class CacheLayer:
    layer: int
    keys: Any
    queries: Any
    kv_heads: int
    q_heads: int
    head_dim: int
    scale: float


def _attr(node: Any, name: str, where: str) -> Any:
    if name not in node.attrs:
        raise InvalidInputError(f"{where}: missing attribute {name!r} (see the cache layout).")
    return node.attrs[name]


def open_cache(path: str | Path) -> tuple[Any, dict[str, Any], list[int]]:
    """The zarr group, its ``model`` attributes and the layer indices present."""
    import zarr

    path = Path(path)
    if not path.exists():
        raise InvalidInputError(
            f"{path}: no such KV cache; write one in the cache layout (docs/experiments.md) "
            "and point config.path at it."
        )
    try:
        root = zarr.open_group(str(path), mode="r")
    except Exception as exc:
        raise InvalidInputError(f"{path}: not a readable zarr group ({exc}).") from exc
    raw = root.attrs.get("model", {})
    if not isinstance(raw, dict):
        raise InvalidInputError(f"{path}: the group attribute model must be a mapping.")
    model = dict(raw)
    for key in ("causal", "attn_scaling"):
        if key not in model:
            raise InvalidInputError(f"{path}: the group attribute model has no {key!r}.")
    if "keys" not in root or "queries" not in root:
        raise InvalidInputError(f"{path}: needs keys/layer_{{l}} and queries/layer_{{l}} arrays.")
    keys: Any = root["keys"]
    layers = sorted(
        int(name.removeprefix("layer_")) for name, _ in keys.arrays()
        if name.startswith("layer_")
    )
    return root, model, layers


def cache_layer(root: Any, model: dict[str, Any], layer: int, path: str) -> CacheLayer:
    name = f"layer_{layer}"
    if name not in root["queries"]:
        raise InvalidInputError(f"{path}: keys/{name} has no matching queries/{name}.")
    keys, queries = root["keys"][name], root["queries"][name]
    where = f"{path}/keys/{name}"
    kv, hd = int(_attr(keys, "n_heads", where)), int(_attr(keys, "head_dim", where))
    hq = int(_attr(queries, "n_heads", f"{path}/queries/{name}"))
    if keys.shape[1] != kv * hd or queries.shape[1] != hq * hd or hq % kv:
        raise InvalidInputError(
            f"{path}: layer {layer}: keys {keys.shape} / queries {queries.shape} do not fit "
            f"n_heads {kv} (keys), {hq} (queries) and head_dim {hd}."
        )
    if queries.shape[0] != keys.shape[0]:
        raise InvalidInputError(f"{path}: layer {layer}: queries and keys differ in rows.")
    scale = float(keys.attrs.get("attn_scaling", model["attn_scaling"]))
    return CacheLayer(layer, keys, queries, kv, hq, hd, scale)


def segment_bounds(root: Any, n: int, rows: np.ndarray, block: int = 2**20) -> np.ndarray:
    """(rows, 2) int64: [start, stop) of each row's segment (``tokens/window``; one
    segment when absent), read block by block."""
    if "tokens" not in root or "window" not in root["tokens"]:
        return np.tile(np.array([0, n], dtype=np.int64), (rows.size, 1))
    window = root["tokens"]["window"]
    if window.shape != (n,):
        raise InvalidInputError(f"tokens/window has shape {window.shape}; expected ({n},).")
    starts, prev = [0], None
    for a in range(0, n, block):
        w = np.asarray(window[a : a + block])
        change = np.flatnonzero(np.diff(w) != 0) + 1 + a
        if prev is not None and w[0] != prev:
            starts.append(a)
        starts.extend(change.tolist())
        prev = w[-1]
    s = np.asarray(starts, dtype=np.int64)
    e = np.append(s[1:], n)
    idx = np.searchsorted(s, rows, side="right") - 1
    return np.stack([s[idx], e[idx]], axis=1)


# ---------------------------------------------------------------------- the experiment
def run(cfg: RealSparsityConfig, out: Path, *, progress: bool = False) -> dict[str, Any]:
    root, model, present = open_cache(cfg.path)
    layers = present if cfg.layers is None else as_list(cfg.layers, int, "layers")
    missing = sorted(set(layers) - set(present))
    if missing:
        raise ConfigError(f"config.layers: {missing} not in {cfg.path} (layers {present}).")
    causal = bool(model["causal"])
    epss, deltas = as_list(cfg.eps, float, "eps"), as_list(cfg.delta, float, "delta")
    top = cfg.top_keys or cfg.needed_top_keys()
    rows: list[dict[str, Any]] = []
    krows: list[dict[str, Any]] = []
    mask = "native-causal" if causal else "native"
    for layer in layers:
        lay = cache_layer(root, model, layer, cfg.path)
        n = int(lay.keys.shape[0])
        rng = np.random.default_rng([cfg.seed, 0x5245414C])
        qrows = np.sort(rng.choice(n, size=min(cfg.queries, n), replace=False)).astype(np.int64)
        bounds = segment_bounds(root, n, qrows)
        lo = bounds[:, 0]
        hi = np.minimum(bounds[:, 1], qrows + 1) if causal else bounds[:, 1]
        keep = (hi - lo) >= cfg.min_keys
        if not keep.any():
            raise ConfigError(
                f"layer {layer}: no sampled query has >= min_keys = {cfg.min_keys} native "
                "keys; lower config.min_keys."
            )
        qrows, lo, hi = qrows[keep], lo[keep], hi[keep]
        qall = np.asarray(lay.queries.get_orthogonal_selection((qrows, slice(None))),
                          dtype=np.float64)
        heads = list(range(lay.q_heads)) if cfg.heads is None else as_list(cfg.heads, int, "heads")
        if any(not 0 <= h < lay.q_heads for h in heads):
            raise ConfigError(f"config.heads: layer {layer} has query heads 0..{lay.q_heads - 1}.")
        group = lay.q_heads // lay.kv_heads
        hd = lay.head_dim
        ops = []
        for h in heads:
            kv = h // group
            ops.append(SparsityStats(SparsitySpec(
                np.ascontiguousarray(qall[:, h * hd : (h + 1) * hd]), scale=lay.scale,
                top_keys=top, key_lo=lo, key_hi=hi, columns=(kv * hd, (kv + 1) * hd),
            )))
        source = KeySource(lay.keys, label=f"{cfg.path}/keys/layer_{layer}", path=cfg.path)
        run_pass(source, ops, progress=progress, description=f"{NAME} layer {layer}")
        for h, op in zip(heads, ops, strict=True):
            res = op.result()
            head = {"layer": layer, "head": h, "kv_head": h // group, "mask": mask,
                    "queries": int(qrows.size)}
            rows += _rows(res, head, epss, cfg)
            krows += _krows(res, head, deltas)
    (out / "results.csv").write_text(csv_text(rows, COLUMNS))
    (out / "kdelta.csv").write_text(csv_text(krows, KDELTA_COLUMNS))
    plots = _plots(rows, out) if plots_available() else []
    (out / "report.md").write_text(_report(cfg, model, rows, krows, plots))
    return {"layers": len(layers), "rows": len(rows), "plots": plots}


def _per_query(fn: Any, n_keys: np.ndarray, sigma: np.ndarray, x: float) -> np.ndarray:
    return np.array([float(fn(int(m), x, np.array([s]))[0]) for m, s in zip(n_keys, sigma,
                                                                          strict=True)])


def _rows(res: dict[str, Any], head: dict[str, Any], epss: list[float],
          cfg: RealSparsityConfig) -> list[dict[str, Any]]:
    nk, sig = res["n_keys"], res["logit_std"]
    # softmax ignores the common offset: L − mean logit − ln n is the model's σ²/2
    excess = res["lse"] - res["logit_mean"] - np.log(nk)
    miss = np.array([float(missing_mass(int(m), np.array([s]))[0]) for m, s in zip(nk, sig,
                                                                                 strict=True)])
    stats = {
        "n_keys_mean": float(nk.mean()),
        "logit_std_mean": float(sig.mean()),
        "in_regime_fraction": float(np.mean(miss <= cfg.regime_missing_mass)),
        "measured_entropy": float(res["entropy"].mean()),
        "predicted_entropy": float(np.mean(np.log(nk) - sig**2 / 2)),
        "measured_max_prob_median": float(np.median(res["max_prob"])),
        "measured_lse_minus_log_n": float(excess.mean()),
        "predicted_lse_minus_log_n": float(np.mean(sig**2 / 2)),
    }
    out = []
    for eps in epss:
        measured = float(heavy_counts(res, eps).mean())
        predicted = float(_per_query(predicted_heavy, nk, sig, eps).mean())
        out.append({
            **head, "eps": eps, **stats, "measured_heavy_per_query": measured,
            "predicted_heavy_per_query": predicted,
            "relative_error": (measured - predicted) / predicted if predicted > 0 else None,
            "predicted_heavy_typical_L": float(
                _per_query(predicted_heavy_typical, nk, sig, eps).mean()
            ),
        })
    return out


def _krows(res: dict[str, Any], head: dict[str, Any], deltas: list[float]) -> list[dict]:
    nk, sig = res["n_keys"], res["logit_std"]
    out = []
    for delta in deltas:
        kd, exact = k_delta(res, delta)
        out.append({
            **head, "delta": delta,
            "measured_kdelta_median": float(np.median(kd)) if exact.all() else None,
            "measured_kdelta_exact_fraction": float(exact.mean()),
            "predicted_kdelta_median": float(np.median(_per_query(predicted_kdelta, nk, sig,
                                                                  delta))),
            "kdelta_fraction_of_keys": float(np.median(kd / nk)) if exact.all() else None,
        })
    return out


def _plots(rows: list[dict[str, Any]], out: Path) -> list[str]:
    epss = sorted({r["eps"] for r in rows}, reverse=True)
    layers = sorted({r["layer"] for r in rows})
    fig, axes = new_figure(ncols=len(epss) + 1, width=4.2)
    for ax, eps in zip(axes[0], epss, strict=False):
        for i, layer in enumerate(layers):
            pts = [r for r in rows if r["eps"] == eps and r["layer"] == layer]
            ax.plot([r["predicted_heavy_per_query"] for r in pts],
                    [r["measured_heavy_per_query"] for r in pts], "o", color=f"C{i % 10}",
                    ms=4, label=f"layer {layer}")
        vals = [v for r in rows for v in (r["measured_heavy_per_query"],
                                          r["predicted_heavy_per_query"]) if v > 0]
        lim = [min(vals, default=0.1) / 2, 2 * max(vals, default=1.0)]
        ax.plot(lim, lim, "k--", lw=0.8, label="measured = Gaussian prediction")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("Gaussian prediction (own n, σ)")
        ax.set_ylabel(f"measured #{{A ≥ {eps:g}}} per query")
        ax.set_title(f"one point per head, ε = {eps:g}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    ax = axes[0][-1]
    sel = [r for r in rows if r["eps"] == epss[0]]
    for i, layer in enumerate(layers):
        pts = [r for r in sel if r["layer"] == layer]
        ax.plot([r["predicted_entropy"] for r in pts], [r["measured_entropy"] for r in pts],
                "o", color=f"C{i % 10}", ms=4)
    lo = min(min(r["predicted_entropy"] for r in sel), min(r["measured_entropy"] for r in sel))
    hi = max(max(r["predicted_entropy"] for r in sel), max(r["measured_entropy"] for r in sel))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel("Gaussian entropy ln n − σ²/2 (valid in regime only)")
    ax.set_ylabel("measured entropy (nats)")
    ax.set_title("entropy per head")
    ax.grid(alpha=0.3)
    save_figure(fig, out / "real_vs_gaussian.png")
    return ["real_vs_gaussian.png"]


def _report(cfg: RealSparsityConfig, model: dict[str, Any], rows: list[dict],
            krows: list[dict], plots: list[str]) -> str:
    lines = [
        f"# {NAME}: {cfg.path}",
        "",
        f"model: {', '.join(f'{k}={v}' for k, v in sorted(model.items()))}",
        "",
        "Per layer and query head: exact counts over the native mask vs the Gaussian model",
        "with each query's own n (native keys) and σ (std of its logits).",
        "",
        "| layer | head | ε | n keys | σ | measured | Gaussian | ratio | entropy | Gaussian H |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r["predicted_heavy_per_query"]
        ratio = r["measured_heavy_per_query"] / p if p > 0 else float("inf")
        lines.append(
            f"| {r['layer']} | {r['head']} | {r['eps']:g} | {r['n_keys_mean']:.0f} | "
            f"{r['logit_std_mean']:.2f} | {r['measured_heavy_per_query']:.3g} | {p:.3g} | "
            f"{ratio:.2f} | {r['measured_entropy']:.2f} | {r['predicted_entropy']:.2f} |"
        )
    far = [r for r in rows if r["predicted_heavy_per_query"] > 0 and not
           0.5 <= r["measured_heavy_per_query"] / r["predicted_heavy_per_query"] <= 2]
    lines += [
        "",
        f"- {len(far)} of {len(rows)} (head, ε) rows depart from the Gaussian count by more "
        "than a factor 2.",
        "",
        "| layer | head | δ | k_δ (median) | exact share | Gaussian k_δ | k_δ / n |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in krows:
        kd = r["measured_kdelta_median"]
        frac = r["kdelta_fraction_of_keys"]
        lines.append(
            f"| {r['layer']} | {r['head']} | {r['delta']:g} | "
            f"{'> top_keys' if kd is None else f'{kd:.0f}'} | "
            f"{r['measured_kdelta_exact_fraction']:.2f} | {r['predicted_kdelta_median']:.0f} | "
            f"{'' if frac is None else f'{frac:.3g}'} |"
        )
    lines += ["", "## Plots", ""] + ([f"![{p}]({p})" for p in plots] or [PLOTS_MISSING]) + [""]
    return "\n".join(lines)
