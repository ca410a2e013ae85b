"""Per-key scores (L, H, n) of a query-free selector, for plugging into cache compression.

``key_scores(cache, "leverage-affine")`` returns one score per key of every chosen
(layer, KV head): keeping each head's top-B keys by it is that selector at budget B (the
kvpress convention: a press scores keys, the framework keeps the best). Selectors:

- ``leverage-plain`` / ``leverage-affine``: τ_j = k̃_jᵀ (K̃ᵀK̃)⁺ k̃_j with the exact final
  factor (two passes: the factor, then every key's score); k̃ = (k, 1) for affine;
- ``key-norm``: ‖k_j‖² (one pass);
- ``random``: seeded uniform scores (no pass; the same as ``evaluate``'s ``random``);
- ``sinks-window``: StreamingLLM as scores — +∞ for the first ``sinks`` keys, j / n for
  the others (the most recent keys score highest).

Memory: O(L · H · n) floats for the answer (8 bytes per key and head) plus each head's
d × d factor.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from streamattn.errors import ConfigError
from streamattn.operators.cache_sets import KeyScores, KeyScoresSpec
from streamattn.operators.leverage import LeverageScores, LeverageSpec
from streamattn.operators.multihead import MultiHead
from streamattn.runner import OnePass, run_recipes
from streamattn.sources import open_kv

QUERY_FREE_SELECTORS = ("leverage-plain", "leverage-affine", "key-norm", "random",
                        "sinks-window")


def key_scores(
    cache: Any,
    selector: str = "leverage-affine",
    *,
    sinks: int = 4,
    seed: int = 0,
    chunk_rows: int | None = None,
    progress: bool = False,
    **open_options: Any,
) -> np.ndarray:
    """``(L, H, n)`` float64 scores of ``selector`` for every key of the cache.

    ``cache``: anything ``open_kv`` reads (``open_options``: layers, heads, n_heads,
    batch). Layer/head order follows ``open_kv(cache).layer_ids`` / ``head_ids``.

    Examples
    --------
    >>> import numpy as np
    >>> k = np.random.default_rng(0).standard_normal((2, 3, 50, 4)).astype(np.float32)
    >>> s = key_scores(k, "key-norm")
    >>> s.shape, bool(np.allclose(s[1, 2], (k[1, 2].astype(float) ** 2).sum(1)))
    ((2, 3, 50), True)
    """
    if selector not in QUERY_FREE_SELECTORS:
        raise ConfigError(
            f"key_scores: {selector!r} is not a query-free selector; choose one of "
            f"{list(QUERY_FREE_SELECTORS)}."
        )
    src = open_kv(cache, **open_options)
    n, shape = src.n, (src.layers, src.heads)

    def multi(make: Any) -> MultiHead:
        return MultiHead.of([[make(li, hi) for hi in range(shape[1])] for li in range(shape[0])])

    def one_pass(op: MultiHead, what: str) -> MultiHead:
        (done,) = run_recipes(src, [OnePass([op], what)], chunk_rows=chunk_rows,
                              progress=progress).results[0]
        assert isinstance(done, MultiHead)
        return done

    if selector == "random":
        from streamattn.recipes.cache_evaluate import random_scores

        return np.stack([np.stack([random_scores(n, seed, lay, h) for h in src.head_ids])
                         for lay in src.layer_ids])
    if selector == "sinks-window":
        row = np.arange(n) / n
        row[: min(sinks, n)] = np.inf
        return np.broadcast_to(row, (*shape, n)).copy()
    if selector == "key-norm":
        op = one_pass(multi(lambda li, hi: KeyScores(KeyScoresSpec(n))), "key norms")
    else:
        affine = selector == "leverage-affine"
        lev = one_pass(multi(lambda li, hi: LeverageScores(LeverageSpec(1.0, affine))),
                       "leverage factor")
        maps = [[head["scoring_map"] for head in row] for row in lev.result()]
        op = one_pass(multi(lambda li, hi: KeyScores(KeyScoresSpec(
            n, "map", maps[li][hi].w, maps[li][hi].shift, maps[li][hi].offset))),
            "leverage of every key")
    return np.stack([np.stack(row) for row in op.result()])
