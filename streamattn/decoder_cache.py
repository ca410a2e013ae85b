"""A KV cache in the documented layout (docs/real-caches.md) from a small random-weights
transformer, in numpy — no torch needed.

``write_decoder_cache`` runs a ``layers``-layer pre-norm transformer with random weights
over random token ids, split into segments (``tokens/window``) that the model attends
within (causally when ``causal=True``, a decoder; bidirectionally otherwise, an encoder),
with grouped-query attention (``q_heads`` query heads sharing ``kv_heads`` KV heads) and
RoPE applied to queries and keys inside each segment (positions ``tokens/pos`` restart at
0 per segment). It stores what the model computed: ``queries/layer_l`` (post-RoPE),
``keys/layer_l`` (post-RoPE), ``values/layer_l``, attributes ``n_heads``, ``head_dim``,
``layer``, ``post_rope``, and the group attribute ``model`` (``causal``, ``attn_scaling``
= 1/√head_dim, sizes, seed). The per-layer arrays are chunked ``(chunk_rows, head_dim)``
inside shards ``(chunk_rows, full width)``, so one head can be read alone.

It has the *shape* of a real model's cache (RoPE, GQA, segments, a residual stream) but
not trained attention patterns (no attention sinks, near-uniform leverage): use it to test
the pipeline, and the extractor for real models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamattn.errors import ConfigError
from streamattn.io.outputs import atomic_dir


@dataclass(frozen=True)
class DecoderSpec:
    """Sizes of the random model and of the cache it writes."""

    n: int = 2048
    segment: int = 512
    layers: int = 2
    q_heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    vocab: int = 512
    causal: bool = True
    seed: int = 0
    chunk_rows: int = 256
    layer_ids: tuple[int, ...] | None = None  # real indices written (a subset; None: all)

    def check(self) -> None:
        if self.q_heads % self.kv_heads:
            raise ConfigError("q_heads must be a multiple of kv_heads (GQA).")
        if self.head_dim % 2:
            raise ConfigError("head_dim must be even (RoPE rotates pairs).")
        if min(self.n, self.segment, self.layers, self.head_dim, self.chunk_rows) < 1:
            raise ConfigError("decoder cache sizes must be >= 1.")


def rope(x: np.ndarray, pos: np.ndarray, base: float = 10000.0) -> np.ndarray:
    """Rotary embedding of ``x`` (n, heads, d) at positions ``pos`` (n,): pairs (2i, 2i+1)
    rotated by pos · base^(−2i/d)."""
    d = x.shape[-1]
    freq = base ** (-np.arange(0, d, 2) / d)
    ang = pos[:, None] * freq[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    out = np.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
    out[..., 1::2] = x[..., 0::2] * sin + x[..., 1::2] * cos
    return out


def _norm(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + 1e-6)


def decoder_cache(spec: DecoderSpec) -> dict[str, Any]:
    """Run the model; ``{"q", "k", "v"}`` lists (per layer) of (n, heads, d) float32, plus
    ``window``, ``pos`` and ``ids``."""
    spec.check()
    rng = np.random.default_rng(spec.seed)
    hq, hkv, hd = spec.q_heads, spec.kv_heads, spec.head_dim
    width = hq * hd
    window = np.arange(spec.n) // spec.segment
    pos = np.arange(spec.n) - window * spec.segment
    ids = rng.integers(0, spec.vocab, size=spec.n)
    x = rng.standard_normal((spec.vocab, width))[ids]
    group = hq // hkv
    scale = 1.0 / np.sqrt(hd)
    out: dict[str, Any] = {"q": [], "k": [], "v": [], "window": window, "pos": pos, "ids": ids}
    for _ in range(spec.layers):
        wq, wk, wv = (rng.standard_normal((width, h * hd)) / np.sqrt(width)
                      for h in (hq, hkv, hkv))
        wo = rng.standard_normal((width, width)) / np.sqrt(width)
        h = _norm(x)
        q = rope((h @ wq).reshape(spec.n, hq, hd), pos)
        k = rope((h @ wk).reshape(spec.n, hkv, hd), pos)
        v = (h @ wv).reshape(spec.n, hkv, hd)
        att = np.zeros((spec.n, hq, hd))
        for a in range(0, spec.n, spec.segment):  # attention within each segment
            b = min(a + spec.segment, spec.n)
            for qh in range(hq):
                kh = qh // group
                lg = scale * q[a:b, qh] @ k[a:b, kh].T
                if spec.causal:
                    lg[np.triu_indices(b - a, 1)] = -np.inf
                w = np.exp(lg - lg.max(axis=1, keepdims=True))
                att[a:b, qh] = (w / w.sum(axis=1, keepdims=True)) @ v[a:b, kh]
        x = x + att.reshape(spec.n, width) @ wo
        x = x + np.tanh(_norm(x) @ wo.T)  # a small MLP stand-in
        for name, arr in (("q", q), ("k", k), ("v", v)):
            out[name].append(arr.astype(np.float32))
    return out


def write_decoder_cache(path: str | Path, spec: DecoderSpec, *, overwrite: bool = False) -> Path:
    """Write the cache of ``decoder_cache(spec)`` to a zarr v3 group (atomically)."""
    import zarr

    data = decoder_cache(spec)
    ids = spec.layer_ids if spec.layer_ids is not None else tuple(range(spec.layers))
    if len(ids) != spec.layers:
        raise ConfigError(f"layer_ids {ids} must name {spec.layers} layers.")
    hd, rows = spec.head_dim, spec.chunk_rows
    with atomic_dir(path, overwrite=overwrite) as tmp:
        root = zarr.open_group(str(tmp), mode="w")
        root.attrs["model"] = {
            "name": "random-weights-decoder" if spec.causal else "random-weights-encoder",
            "causal": spec.causal, "attn_scaling": 1.0 / np.sqrt(hd), "layers": spec.layers,
            "q_heads": spec.q_heads, "kv_heads": spec.kv_heads, "head_dim": hd,
            "seed": spec.seed, "segment": spec.segment, "rope": True,
        }
        for name, heads in (("queries", spec.q_heads), ("keys", spec.kv_heads),
                            ("values", spec.kv_heads)):
            group = root.require_group(name)
            for lay, arr in zip(ids, data[name[0]], strict=True):
                flat = arr.reshape(spec.n, heads * hd)
                z = group.create_array(
                    f"layer_{lay}", shape=flat.shape, dtype="float32",
                    shards=(rows, heads * hd), chunks=(rows, hd),
                )
                z[...] = flat
                z.attrs.update({"n_heads": heads, "head_dim": hd, "layer": lay,
                                "post_rope": name != "values"})
        tok = root.require_group("tokens")
        for name in ("window", "pos", "ids"):
            tok.create_array(name, data=np.asarray(data[name], dtype=np.int64))
    return Path(path)
