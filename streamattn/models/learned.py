"""``prior-attention``: query-free key selection from a query prior learned once per model.

**Idea.** The queries that will read a cache are not known when it is compressed, but their
*distribution* is a property of the model, not of the text: per layer and query head h the
pre-RoPE query q̃ is modelled as N(μ_h, Σ_h), fitted once on a tuning text
(:func:`fit_prior`, :data:`streamattn.models.loading.TUNE_TEXTS`) and reused on every other
text. A future query at position p is R_p q̃ (RoPE rotation), so its logit on a cached
(post-RoPE) key k_j is s = scale · q̃ · (R_pᵀ k_j), and with k̃_jp = R_pᵀ k_j

    log E[exp s] = scale · μ_h·k̃_jp + ½ scale² · k̃_jpᵀ Σ_h k̃_jp        (Gaussian mgf).

The expected attention share a_hp(j) = softmax_j(log E[exp s]) is summed over the query heads
h of the KV head (GQA) and over F future positions p ∈ {n, …, n + horizon} (F evenly
spaced); the selector keeps the first ``sinks`` keys, the last ``window_fraction`` of the
remaining budget as a recent window, and the keys of largest summed share for the rest.

**What it needs.** Only the keys of the head being compressed, their positions (rows 0..n−1
of one segment) and the prior (2·d + d² floats per query head): no query, value or hidden
state of the text, and one pass over the keys (each key is scored on its own, so the scores
stream and top-B is mergeable). Fitting the prior needs the model once, on another text.

**Guarantee.** None: a heuristic whose value is measured downstream (docs/real-models.md).
This is kvpress's ExpectedAttention idea with the statistics moved offline: ExpectedAttention
estimates the query statistics from the current context's own hidden states at compression
time; here they come from a different text, so compression needs no model forward pass.
Only the default RoPE (``rope_type: default``) is handled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from streamattn.errors import ConfigError

SINKS = 4
FUTURE_POSITIONS = 8
HORIZON = 512
#: Chosen on the tuning text (stdlib:argparse, C = 2048); see docs/real-models.md.
WINDOW_FRACTION = 0.25


def inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """Default RoPE frequencies θ^(−2i/d), i < d/2."""
    return 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def rotate(x: np.ndarray, positions: np.ndarray | float, freqs: np.ndarray) -> np.ndarray:
    """R_p x for rows x (n, d) at positions p (transformers' rotate-half convention)."""
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 1)
    ang = pos * freqs[None, :]
    cos = np.concatenate([np.cos(ang)] * 2, axis=1)
    sin = np.concatenate([np.sin(ang)] * 2, axis=1)
    h = x.shape[1] // 2
    half = np.concatenate([-x[:, h:], x[:, :h]], axis=1)
    return x * cos + half * sin


@dataclass(frozen=True)
class QueryPrior:
    """Pre-RoPE query mean (L, H_q, d) and covariance (L, H_q, d, d) for layers ``layers``."""

    layers: tuple[int, ...]
    mean: np.ndarray
    cov: np.ndarray
    kv_heads: int
    scale: float
    theta: float
    source: str

    def group(self, layer: int, kv_head: int) -> tuple[np.ndarray, np.ndarray]:
        """(μ, Σ) of the query heads that read KV head ``kv_head`` of ``layer``."""
        li = self.layers.index(layer)
        g = self.mean.shape[1] // self.kv_heads
        sl = slice(kv_head * g, (kv_head + 1) * g)
        return self.mean[li, sl], self.cov[li, sl]


def fit_prior(model: Any, ids: list[int], source: str) -> QueryPrior:
    """Fit N(μ, Σ) of every layer's pre-RoPE queries on the tokens ``ids`` (one forward pass)."""
    import torch

    from streamattn.models import capture

    cfg = model.config
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default" or "rope_theta" not in rope:
        raise ConfigError(f"prior-attention handles the default RoPE only, not {rope or None}.")
    theta = float(rope["rope_theta"])
    stats: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    scale = [0.0]

    def record(call: Any) -> None:
        q = call.query[0].detach().double().numpy()  # (H, S, d)
        hd = q.shape[2]
        freqs = inv_freq(hd, theta)
        pos = -np.arange(q.shape[1], dtype=np.float64)
        pre = np.stack([rotate(q[h], pos, freqs) for h in range(q.shape[0])])
        mean = pre.mean(axis=1)
        cent = pre - mean[:, None, :]
        cov = np.einsum("hsi,hsj->hij", cent, cent) / max(1, q.shape[1] - 1)
        stats[call.layer] = (mean, cov)
        scale[0] = call.scaling

    with torch.no_grad(), capture.capturing(model, record, "sdpa"):
        model.base_model(input_ids=torch.tensor([ids]), use_cache=False)
    layers = tuple(sorted(stats))
    return QueryPrior(
        layers, np.stack([stats[lay][0] for lay in layers]),
        np.stack([stats[lay][1] for lay in layers]),
        int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads),
        scale[0], theta, source,
    )


def prior_shares(keys: np.ndarray, mean: np.ndarray, cov: np.ndarray, scale: float,
                 theta: float, *, future: int = FUTURE_POSITIONS,
                 horizon: int = HORIZON) -> np.ndarray:
    """Σ_h Σ_p softmax_j(scale μ_h·k̃_jp + ½ scale² k̃_jpᵀ Σ_h k̃_jp) for keys (n, d)."""
    n, d = keys.shape
    freqs = inv_freq(d, theta)
    k = keys.astype(np.float64)
    total = np.zeros(n)
    g = mean.shape[0]
    sig = np.concatenate(list(cov), axis=1)  # (d, g·d): one GEMM for every head of the group
    for p in np.linspace(n, n + horizon, future):
        kt = rotate(k, -p, freqs)
        quad = np.sum((kt @ sig).reshape(n, g, d) * kt[:, None, :], axis=2)  # (n, g)
        logit = scale * (kt @ mean.T) + 0.5 * scale**2 * quad
        logit -= logit.max(axis=0)
        e = np.exp(logit)
        total += (e / e.sum(axis=0)).sum(axis=1)
    return total


def prior_attention(keys: np.ndarray, budget: int, *, prior: QueryPrior | None = None,
                    layer: int = 0, head: int = 0, window_fraction: float = WINDOW_FRACTION,
                    sinks: int = SINKS, **_: Any) -> np.ndarray:
    """Sorted indices of ``budget`` keys: sinks, a recent window, then the largest prior shares."""
    if prior is None:
        raise ConfigError("prior-attention needs a query prior (fit_prior on a tuning text).")
    n = keys.shape[0]
    k = min(sinks, budget)
    w = int(window_fraction * (budget - k))
    mean, cov = prior.group(layer, head)
    shares = prior_shares(keys, mean, cov, prior.scale, prior.theta)
    chosen = np.zeros(n, dtype=bool)
    chosen[:k] = True
    if w > 0:
        chosen[n - w:] = True
    rest = budget - int(chosen.sum())
    cand = np.flatnonzero(~chosen)
    order = cand[np.lexsort((cand, -shares[cand]))]
    chosen[order[:rest]] = True
    return np.flatnonzero(chosen).astype(np.int64)
