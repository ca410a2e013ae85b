"""streamattn selectors as per-(layer, KV head) key sets of a model's cache: the one adapter.

``select_head(name, keys, budget, layer=, head=)`` returns the sorted indices of exactly
``budget`` keys of one KV head's (n, d) key matrix (post-RoPE, as the cache holds them),
chosen by the existing streamattn selector of that name (:mod:`streamattn.selectors`), for a
global query after the last key (the continuation's queries come after the whole context):

- ``leverage-plain`` / ``leverage-affine``: exact top-B by plain / centred leverage;
- ``universal-budget``: ``universal_set(keys, budget=B)`` — the LevAttention universal set in
  budget mode (the top-B plain leverage scores with its certificate; by construction the same
  set as ``leverage-plain``, a consistency check of the two code paths);
- ``sinks-window``: the first 4 keys and the B − 4 most recent;
- ``hybrid``: sinks + a recent window of half the rest + highest affine leverage;
- ``key-norm``: largest ‖k‖; ``random``: uniform, seeded by (seed, layer, head);
- ``prior-attention``: the new selector of :mod:`streamattn.models.learned` (needs
  ``prior=``, a query prior fitted once per model on a tuning text).

:func:`head_scores` turns a set into per-key scores (1 for kept keys, 0 otherwise) for
score-based tools such as kvpress's ``ScorerPress`` (:mod:`streamattn.models.press`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from streamattn.errors import ConfigError
from streamattn.recipes.selectors import (
    hybrid,
    largest_norm,
    leverage_top,
    sinks_window,
    uniform_random,
)
from streamattn.recipes.universal import universal_set
from streamattn.results import UniversalSet

SINKS = 4

Selector = Callable[..., np.ndarray]


def _global(keyset: Any) -> np.ndarray:
    return np.asarray(keyset.for_query(None), dtype=np.int64)


def _leverage(variant: str) -> Selector:
    def pick(keys: np.ndarray, budget: int, **_: Any) -> np.ndarray:
        return _global(leverage_top(keys, [budget], variant=variant)[0])

    return pick


def _universal(keys: np.ndarray, budget: int, **_: Any) -> np.ndarray:
    chosen = universal_set(keys, budget=budget, variant="plain")
    assert isinstance(chosen, UniversalSet)  # one head's (n, d) keys
    return np.sort(chosen.indices).astype(np.int64)


def _sinks_window(keys: np.ndarray, budget: int, **_: Any) -> np.ndarray:
    return _global(sinks_window(keys.shape[0], [budget], sinks=SINKS)[0])


def _hybrid(keys: np.ndarray, budget: int, **_: Any) -> np.ndarray:
    return _global(hybrid(keys, [budget], sinks=SINKS)[0])


def _key_norm(keys: np.ndarray, budget: int, **_: Any) -> np.ndarray:
    return _global(largest_norm(keys, [budget])[0])


def _random(keys: np.ndarray, budget: int, *, layer: int = 0, head: int = 0, seed: int = 0,
            **_: Any) -> np.ndarray:
    sub = int(np.random.SeedSequence([seed, layer, head]).generate_state(1)[0])
    return _global(uniform_random(keys.shape[0], [budget], seed=sub)[0])


def _prior_attention(keys: np.ndarray, budget: int, **kw: Any) -> np.ndarray:
    from streamattn.models.learned import prior_attention

    return prior_attention(keys, budget, **kw)


SELECTORS: dict[str, Selector] = {
    "leverage-plain": _leverage("plain"),
    "leverage-affine": _leverage("affine"),
    "universal-budget": _universal,
    "sinks-window": _sinks_window,
    "hybrid": _hybrid,
    "key-norm": _key_norm,
    "random": _random,
    "prior-attention": _prior_attention,
}


def check_selectors(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in SELECTORS]
    if unknown:
        raise ConfigError(
            f"unknown streamattn selector(s) {unknown}; choose from {sorted(SELECTORS)}."
        )
    return names


def select_head(name: str, keys: np.ndarray, budget: int, *, layer: int = 0, head: int = 0,
                seed: int = 0, **extra: Any) -> np.ndarray:
    """Sorted indices of exactly ``budget`` keys of one head chosen by selector ``name``.

    ``extra`` goes to the selector (``prior=`` for ``prior-attention``).
    """
    check_selectors([name])
    keys = np.ascontiguousarray(keys)
    n = keys.shape[0]
    if not 1 <= budget <= n:
        raise ConfigError(f"budget must lie in [1, n = {n}], got {budget}.")
    if budget == n:
        return np.arange(n, dtype=np.int64)
    idx = SELECTORS[name](keys, budget, layer=layer, head=head, seed=seed, **extra)
    if idx.shape != (budget,) or np.unique(idx).size != budget:
        raise RuntimeError(f"selector {name} returned {idx.size} keys, not {budget}.")
    return idx


def head_scores(name: str, keys: np.ndarray, budget: int, **kw: Any) -> np.ndarray:
    """Per-key scores whose top-``budget`` is :func:`select_head`'s set (1 kept, 0 not)."""
    scores = np.zeros(keys.shape[0])
    scores[select_head(name, keys, budget, **kw)] = 1.0
    return scores
