"""``streamattn extract``: a real model's q, k, v written to the KV-cache layout, window by window.

The text's token ids (no special tokens) are cut into consecutive windows of ``window``
tokens; each window is one forward pass of the model's base network (no LM head, no cache,
positions 0..W−1 inside the window), and the attention calls of the chosen layers are
captured (:mod:`streamattn.models.capture`) and appended to the store before the next window
runs, so memory is bounded by one window's activations, not by n. The forward pass stops
after the last chosen layer.

Layout written (docs/architecture.md, note 1.3; the real-caches commands read it as it is):

- ``keys/layer_{l}`` (n, H_kv·hd): keys as the kernel receives them — after RoPE and the
  projection bias, KV heads before the GQA repetition; ``queries/layer_{l}`` (n, H_q·hd);
  ``values/layer_{l}`` (n, H_kv·hd). float32, chunks (R, hd) inside shards (R, width),
  R = min(window, 8192), so one head is read alone. Array attributes ``n_heads``,
  ``head_dim``, ``layer``, ``post_rope``, ``attn_scaling``; the ``keys``/``values``/``queries``
  groups carry ``heads`` as well.
- ``tokens/ids``, ``tokens/window`` (segment id), ``tokens/pos`` (position in the window).
- group attribute ``model``: ``causal``, ``attn_scaling``, ``heads``, ``kv_heads``,
  ``head_dim``, ``layers`` (the model's), ``rope`` (type and parameters, or null),
  ``position_embedding``, ``weights_file``, ``weights_sha256``, versions; ``extract``: the
  settings and the text's label and SHA-256.

``verify=True`` runs the first window with eager attention and, for every chosen layer,
recomputes P = softmax(q kᵀ·scale + mask) in float64 from the tensors *read back from the
store* (mask: causal inside the window for a decoder, none for an encoder) and compares P
with the probabilities the model's eager attention returned (the tensors
``output_attentions`` exposes) and P·v with the model's attention output; the max absolute
errors are stored in the group attribute ``verification`` and the run fails when one
exceeds ``tolerance`` (default 1e-4).
"""

from __future__ import annotations

import hashlib
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamattn.errors import ConfigError, InvalidInputError
from streamattn.io.outputs import atomic_dir, check_writable, to_jsonable
from streamattn.models.loading import (
    ModelRef,
    load_model,
    read_text,
    resolve_model,
    sha256_file,
    text_ids,
)

VERIFY_TOLERANCE = 1e-4
QUERY_CHUNK = 1024


def parse_layers(arg: str | None, n_layers: int) -> list[int]:
    """``None``/``all`` → every layer; ``0,7,15`` and ranges ``0-3`` (inclusive), sorted."""
    if arg is None or arg.strip() == "all":
        return list(range(n_layers))
    out: set[int] = set()
    try:
        for part in arg.split(","):
            lo, _, hi = part.strip().partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError as exc:
        raise ConfigError(f"--layers {arg!r}: expected e.g. 0,7,15 or 0-3 or all.") from exc
    bad = [lay for lay in out if not 0 <= lay < n_layers]
    if not out or bad:
        raise ConfigError(f"--layers {arg!r}: layers must lie in [0, {n_layers - 1}].")
    return sorted(out)


def model_record(model: Any, ref: ModelRef) -> dict[str, Any]:
    """The ``model`` attribute of a store: heads, scaling, positions, weights and versions."""
    import torch
    import transformers

    cfg = model.config
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)
    theta = getattr(cfg, "rope_theta", None)
    if rope is None and theta is not None:
        rope = {"rope_type": "default", "rope_theta": theta}
    weights = ref.weight_files[0] if ref.weight_files else None
    return {
        "name": ref.name,
        "model_type": cfg.model_type,
        "causal": bool(model.base_model.layers[0].self_attn.is_causal)
        if hasattr(model.base_model, "layers") else bool(getattr(cfg, "is_decoder", False)),
        "attn_scaling": head_dim**-0.5,
        "heads": heads,
        "kv_heads": int(getattr(cfg, "num_key_value_heads", None) or heads),
        "head_dim": head_dim,
        "layers": int(cfg.num_hidden_layers),
        "rope": None if rope is None else dict(rope),
        "position_embedding": "rope" if rope is not None
        else str(getattr(cfg, "position_embedding_type", "absolute")),
        "max_positions": int(getattr(cfg, "max_position_embeddings", 0) or 0),
        "weights_file": None if weights is None else str(weights),
        "weights_sha256": None if weights is None else sha256_file(weights),
        "dtype": "float32",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }


@dataclass
class _Writer:
    """Creates the layer arrays on first sight and appends each window's rows."""

    root: Any
    n: int
    rows: int
    layers: set[int]
    last_layer: int
    start: int = 0
    arrays: dict[tuple[str, int], Any] = field(default_factory=dict)
    scaling: dict[int, float] = field(default_factory=dict)
    causal: dict[int, bool] = field(default_factory=dict)
    on_layer: Callable[[Any], None] | None = None
    post_rope: bool = True

    def _array(self, kind: str, layer: int, heads: int, hd: int, post_rope: bool,
               scale: float) -> Any:
        key = (kind, layer)
        if key not in self.arrays:
            group = self.root.require_group(kind)
            group.attrs["heads"] = heads
            width = heads * hd
            arr = group.create_array(
                f"layer_{layer}", shape=(self.n, width), dtype="float32",
                chunks=(self.rows, hd), shards=(self.rows, width),
            )
            arr.attrs.update({"n_heads": heads, "head_dim": hd, "layer": layer,
                              "post_rope": post_rope, "attn_scaling": scale})
            self.arrays[key] = arr
        return self.arrays[key]

    def __call__(self, call: Any) -> None:
        from streamattn.models.capture import StopForward

        if call.layer in self.layers:
            rope = self.post_rope
            for kind, t in (("queries", call.query), ("keys", call.key), ("values", call.value)):
                h, s, hd = int(t.shape[1]), int(t.shape[2]), int(t.shape[3])
                block = t[0].transpose(0, 1).reshape(s, h * hd).detach().float().numpy()
                self._array(kind, call.layer, h, hd, rope, call.scaling)[
                    self.start:self.start + s] = block
            self.scaling[call.layer] = call.scaling
            self.causal[call.layer] = call.causal
            if self.on_layer is not None:
                self.on_layer(call)
        if call.layer >= self.last_layer:
            raise StopForward


def _softmax_rows(logits: np.ndarray) -> np.ndarray:
    m = logits.max(axis=1, keepdims=True)
    e = np.exp(logits - m)
    return e / e.sum(axis=1, keepdims=True)


def verify_layer(root: Any, call: Any, rows: int) -> dict[str, float]:
    """Max |P − P_model| and |P·v − out_model| for one layer's first window, from the store."""
    lay = call.layer
    q = np.asarray(root[f"queries/layer_{lay}"][:rows], dtype=np.float64)
    k = np.asarray(root[f"keys/layer_{lay}"][:rows], dtype=np.float64)
    v = np.asarray(root[f"values/layer_{lay}"][:rows], dtype=np.float64)
    hq, hkv, hd = int(call.query.shape[1]), int(call.key.shape[1]), int(call.query.shape[3])
    hv = v.shape[1] // hkv
    weights = call.weights[0].detach().double().numpy()  # (H_q, S, S)
    out = call.output[0].detach().double().numpy()  # (S, H_q, hd_v)
    err_p = err_o = 0.0
    for h in range(hq):
        g = h // (hq // hkv)
        kh, vh = k[:, g * hd:(g + 1) * hd], v[:, g * hv:(g + 1) * hv]
        for a in range(0, rows, QUERY_CHUNK):
            b = min(a + QUERY_CHUNK, rows)
            logits = q[a:b, h * hd:(h + 1) * hd] @ kh.T * call.scaling
            if call.causal:
                logits[np.arange(b - a)[:, None] + a < np.arange(rows)[None, :]] = -np.inf
            p = _softmax_rows(logits)
            err_p = max(err_p, float(np.abs(p - weights[h, a:b]).max()))
            err_o = max(err_o, float(np.abs(p @ vh - out[a:b, h]).max()))
    return {"layer": lay, "max_abs_err_probs": err_p, "max_abs_err_output": err_o}


def extract(
    model: str,
    text: str,
    tokens: int,
    window: int,
    out: str | Path,
    *,
    layers: str | None = None,
    verify: bool = False,
    tolerance: float = VERIFY_TOLERANCE,
    overwrite: bool = False,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write the KV-cache layout of ``model`` on the first ``tokens`` tokens of ``text``.

    Returns the summary (the ``model``, ``extract`` and ``verification`` attributes written).
    Raises InvalidInputError when a verification error exceeds ``tolerance`` (no output then).
    """
    import torch
    import zarr

    from streamattn.models import capture

    if tokens < 1 or window < 1:
        raise ConfigError(f"--tokens and --window must be >= 1, got {tokens} and {window}.")
    out = Path(out)
    check_writable(out, overwrite)
    ref = resolve_model(model)
    body, label = read_text(text)
    t0 = time.perf_counter()
    net, tok = load_model(ref, attn_implementation="sdpa")
    ids = text_ids(tok, body, tokens, label)
    record = model_record(net, ref)
    if record["max_positions"] and window > record["max_positions"]:
        raise ConfigError(
            f"--window {window} exceeds {ref.name}'s {record['max_positions']} positions."
        )
    chosen = parse_layers(layers, record["layers"])
    rows = min(window, 8192, tokens)
    verification: list[dict[str, float]] = []
    say = say or (lambda _line: None)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        root = zarr.open_group(str(tmp), mode="w")
        writer = _Writer(root, tokens, rows, set(chosen), max(chosen),
                         post_rope=record["rope"] is not None)
        starts = list(range(0, tokens, window))
        for w, start in enumerate(starts):
            stop = min(start + window, tokens)
            writer.start = start
            checking = verify and w == 0
            writer.on_layer = (
                (lambda call, n=stop - start: verification.append(verify_layer(root, call, n)))
                if checking else None
            )
            x = torch.tensor([ids[start:stop]], dtype=torch.long)
            with torch.no_grad(), capture.capturing(net, writer, "eager" if checking else "sdpa"):
                try:
                    net.base_model(input_ids=x, use_cache=False)
                except capture.StopForward:
                    pass
            say(f"  window {w + 1}/{len(starts)}: rows {start}..{stop - 1}")
        tokens_group = root.require_group("tokens")
        pos = np.concatenate([np.arange(min(window, tokens - s)) for s in starts])
        win = np.concatenate([np.full(min(window, tokens - s), i) for i, s in enumerate(starts)])
        for name, arr in (("ids", np.asarray(ids)), ("window", win), ("pos", pos)):
            tokens_group.create_array(name, data=arr.astype(np.int64), chunks=(min(tokens, 65536),))
        record["causal"] = all(writer.causal.values())
        record["attn_scaling"] = writer.scaling[chosen[0]]
        settings = {
            "text": label,
            "text_sha256": hashlib.sha256(body.encode()).hexdigest(),
            "tokens": tokens, "window": window, "layers": chosen, "special_tokens": False,
            "seconds": time.perf_counter() - t0,
        }
        summary: dict[str, Any] = {"model": record, "extract": settings}
        if verify:
            worst_p = max(v["max_abs_err_probs"] for v in verification)
            worst_o = max(v["max_abs_err_output"] for v in verification)
            summary["verification"] = {
                "window": 0, "rows": min(window, tokens), "tolerance": tolerance,
                "max_abs_err_probs": worst_p, "max_abs_err_output": worst_o,
                "passed": worst_p <= tolerance and worst_o <= tolerance,
                "per_layer": verification,
                "reference": "probabilities and output of the model's eager attention",
            }
            if not summary["verification"]["passed"]:
                raise InvalidInputError(
                    f"extract --verify: recomputed attention differs from {ref.name}'s by "
                    f"{worst_p:.3g} (probabilities) / {worst_o:.3g} (output) > {tolerance:g}; "
                    "no store written."
                )
        root.attrs.update(to_jsonable(summary))
    return summary
