"""Record q, k, v exactly as they enter a model's attention kernel.

transformers routes every attention layer (Llama, BERT, ...) through
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, query, key, value, mask,
scaling=..., ...)`` with ``query`` (B, H_q, S, hd) after RoPE, ``key``/``value``
(B, H_kv, S_k, hd) after RoPE and projection bias, *before* the GQA repetition (the kernel
repeats them). :func:`capturing` registers two attention functions under the names
``streamattn_eager`` / ``streamattn_sdpa`` (with the matching mask builders), switches the
model to one of them, and hands each call's tensors to a callback before delegating to the
model's own eager function or to transformers' SDPA function — so the model computes exactly
what it computes without the capture. The callback may raise :class:`StopForward` to end the
forward pass early (after the last layer wanted).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

EAGER = "streamattn_eager"
SDPA = "streamattn_sdpa"


class StopForward(Exception):  # a control-flow signal, not an error
    """Raised by a capture callback to stop the forward pass after the layers it needs."""


@dataclass
class Call:
    """One attention call: tensors as the kernel receives them, and what it returned."""

    layer: int
    query: Any  # (B, H_q, S, hd)
    key: Any  # (B, H_kv, S_k, hd)
    value: Any  # (B, H_kv, S_k, hd_v)
    mask: Any  # additive float mask, boolean mask or None
    scaling: float
    causal: bool
    output: Any  # (B, S, H_q, hd_v)
    weights: Any  # (B, H_q, S, S_k) probabilities (eager) or None (sdpa)


_callback: Callable[[Call], None] | None = None


def _eager_of(module: Any) -> Callable[..., Any]:
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise TypeError(f"{type(module).__name__}: its module has no eager_attention_forward.")
    return fn


def _make(kind: str) -> Callable[..., Any]:
    # (dropout before scaling: kvpress wraps registered functions and passes dropout 6th)
    def attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                  dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> Any:
        if kind == "eager":
            delegate = _eager_of(module)
        else:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            delegate = sdpa_attention_forward
        out, weights = delegate(module, query, key, value, attention_mask, scaling=scaling,
                                dropout=dropout, **kwargs)
        if _callback is not None:
            scale = float(query.shape[-1] ** -0.5 if scaling is None else scaling)
            _callback(Call(int(module.layer_idx), query, key, value, attention_mask, scale,
                           bool(getattr(module, "is_causal", False)), out, weights))
        return out, weights

    return attention


def register() -> None:
    """Register the two capturing attention functions and their mask builders (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    AttentionInterface.register(EAGER, _make("eager"))
    AttentionInterface.register(SDPA, _make("sdpa"))
    AttentionMaskInterface.register(EAGER, eager_mask)
    AttentionMaskInterface.register(SDPA, sdpa_mask)


@contextmanager
def capturing(model: Any, callback: Callable[[Call], None], kind: str = "sdpa") -> Iterator[None]:
    """Within the block, every attention call of ``model`` goes to ``callback`` first.

    ``kind="eager"`` also returns the probabilities (``Call.weights``), at O(S²) memory per
    layer; ``"sdpa"`` does not. The model's previous attention implementation is restored.
    """
    global _callback
    register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(EAGER if kind == "eager" else SDPA)
    _callback = callback
    try:
        yield
    finally:
        _callback = None
        model.set_attn_implementation(previous)
