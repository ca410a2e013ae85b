"""Key selectors: the sets of keys an attention approximation keeps, at a budget B.

Every selector returns ``KeySet`` objects, one per requested budget: a sorted set of
global key indices I plus an optional recent window w. A query at position pos sees

    S(pos) = (I ∩ [0, pos]) ∪ (pos − w, pos]

(in global mode pos = n − 1 for every query, so the window is the last w keys). In
causal mode no selector ever gives a query a key after its position. ``size(pos)`` is
the number of keys a query actually uses: B in global mode (or the documented number),
at most B in causal mode (keys of I after pos are not available to that query).

Selectors (the names used by ``streamattn evaluate``):

- ``universal-threshold``: U_ε = {j : τ_j ≥ ε} (LevAttention, exact; |U| ≤ rank/ε, not
  B). *Guarantee*: for f(x) = x² attention every share ≥ ε is kept, for every query.
- ``leverage-plain`` / ``leverage-affine``: exact top-B by plain / affine (centred)
  leverage. For softmax a heuristic.
- ``sinks-window``: StreamingLLM — the first ``sinks`` keys plus the B − sinks most
  recent keys before each query.
- ``heavy-hitters``: H2O-style observed attention — the top-B keys by accumulated
  attention Σ_i A_ij **from the query batch itself**. It needs the queries (and a
  ground-truth pass for the normalisers): an oracle-flavoured baseline, since it is
  evaluated on the very queries it was chosen from.
- ``key-norm``: the B keys of largest ‖k_j‖ (one pass, mergeable top-B).
- ``random``: B keys uniformly without replacement (seeded; nested across budgets).
- ``hybrid``: sinks + a recent window of ⌊window_fraction·(B − sinks)⌋ keys + the keys
  of highest affine leverage for the rest (excluding sinks and the global tail window).

Every top-B is exact with ties broken by the smaller index; sets for several budgets
come from one ranking, so they are nested.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamattn.errors import ConfigError
from streamattn.operators.ground_truth import (
    GroundTruth,
    GroundTruthSpec,
    ObservedAttentionSpec,
    ObservedAttentionTop,
)
from streamattn.operators.leverage import TopScores, TopScoresSpec
from streamattn.recipes.universal import universal_set
from streamattn.results import UniversalSet
from streamattn.runner import FromPlan, Pass, Plan, run_pass, run_recipes
from streamattn.sources import open_key_source, open_keys

SELECTORS = (
    "universal-threshold",
    "leverage-plain",
    "leverage-affine",
    "sinks-window",
    "heavy-hitters",
    "key-norm",
    "random",
    "hybrid",
)


@dataclass(frozen=True)
class KeySet:
    """A selected key set: sorted global ``indices`` plus a per-query recent ``window``.

    Attributes
    ----------
    name : the selector that made it
    budget : the budget B asked for (None for threshold sets)
    indices : sorted, unique int64 key indices I
    n : number of keys in the store
    window : w; a query at position pos also uses keys (pos − w, pos]
    """

    name: str
    budget: int | None
    indices: np.ndarray
    n: int
    window: int = 0

    def for_query(self, position: int | None = None) -> np.ndarray:
        """S(pos) = (I ∩ [0, pos]) ∪ (pos − w, pos], sorted; pos None means n − 1."""
        pos = self.n - 1 if position is None else int(position)
        head = self.indices[: np.searchsorted(self.indices, pos, side="right")]
        if self.window <= 0:
            return head
        recent = np.arange(max(0, pos - self.window + 1), pos + 1, dtype=np.int64)
        return np.union1d(head, recent)

    def sizes(self, positions: np.ndarray | None = None) -> np.ndarray:
        """|S(pos)| for each position (vectorised; None: one global query)."""
        pos = np.array([self.n - 1]) if positions is None else np.asarray(positions)
        head = np.searchsorted(self.indices, pos, side="right")
        if self.window <= 0:
            return head
        lo = np.maximum(0, pos - self.window + 1)
        overlap = head - np.searchsorted(self.indices, lo, side="left")
        return head + (pos - lo + 1) - overlap


def _check_budgets(budgets: Sequence[int], n: int) -> list[int]:
    out = []
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 1 <= b <= n:
            raise ConfigError(f"every budget must be an integer in [1, n = {n}], got {b!r}.")
        out.append(int(b))
    return out


def ranked_sets(
    name: str, order: np.ndarray, budgets: list[int], n: int
) -> list[KeySet]:
    """KeySets holding the first B entries of a ranking (best first), for each B."""
    return [KeySet(name, b, np.sort(order[:b]).astype(np.int64), n) for b in budgets]


def rank_by_score(indices: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Indices by decreasing score, ties by the smaller index."""
    return indices[np.lexsort((indices, -scores))]


def universal_threshold(source: Any, eps: float, variant: str = "plain", **run: Any) -> KeySet:
    """U_ε = {j : τ_j ≥ ε}, exact (its size is |U_ε| ≤ rank/ε, not a budget)."""
    src = open_key_source(source)
    u = universal_set(src, eps, variant=variant, **run)
    assert isinstance(u, UniversalSet)  # a single-head source gives one set
    return KeySet("universal-threshold", None, u.indices.astype(np.int64), src.n)


def leverage_ranking(source: Any, budget: int, variant: str = "affine", **run: Any) -> np.ndarray:
    """The exact top-``budget`` keys by leverage, best first (ties: smaller index)."""
    u = universal_set(open_key_source(source), budget=budget, variant=variant, **run)
    assert isinstance(u, UniversalSet)  # a single-head source gives one set
    return rank_by_score(u.indices, u.scores)


def leverage_top(
    source: Any,
    budgets: Sequence[int],
    variant: str = "affine",
    ranking: np.ndarray | None = None,
    **run: Any,
) -> list[KeySet]:
    """Exact top-B by (plain or affine) leverage for each budget, from one ranking."""
    src = open_keys(source)
    budgets = _check_budgets(budgets, src.n)
    if ranking is None:
        ranking = leverage_ranking(src, max(budgets), variant, **run)
    return ranked_sets(f"leverage-{variant}", ranking, budgets, src.n)


def sinks_window(n: int, budgets: Sequence[int], sinks: int = 4) -> list[KeySet]:
    """StreamingLLM: keys 0..sinks−1 plus the B − sinks keys just before (and at) each query.

    Exactly B keys for a query at position pos ≥ B − 1 (and for global queries); a query
    at an earlier position uses its whole prefix, pos + 1 < B keys. Never a future key.
    """
    budgets = _check_budgets(budgets, n)
    out = []
    for b in budgets:
        k = min(sinks, b)
        out.append(KeySet("sinks-window", b, np.arange(k, dtype=np.int64), n, window=b - k))
    return out


def largest_norm(source: Any, budgets: Sequence[int], **run: Any) -> list[KeySet]:
    """The B keys of largest Euclidean norm (one pass, mergeable exact top-B)."""
    src = open_keys(source)
    budgets = _check_budgets(budgets, src.n)
    out: list[KeySet] = run_recipes(
        src, [FromPlan(lambda ctx: largest_norm_plan(src.n, src.d, budgets), "key norms")],
        **run,
    ).results[0]
    return out


def largest_norm_plan(n: int, d: int, budgets: list[int]) -> Plan[list[KeySet]]:
    """The pass of :func:`largest_norm` (checked budgets), for fusing into other plans."""
    done = yield Pass({"norms": TopScores(TopScoresSpec(max(budgets), np.eye(d)))}, "key norms")
    res = done["norms"].result()
    return ranked_sets("key-norm", rank_by_score(res["indices"], res["scores"]), budgets, n)


def uniform_random(n: int, budgets: Sequence[int], seed: int = 0) -> list[KeySet]:
    """B keys uniformly at random without replacement; nested across budgets, seeded."""
    budgets = _check_budgets(budgets, n)
    order = np.random.default_rng(seed).choice(n, size=max(budgets), replace=False)
    return ranked_sets("random", order.astype(np.int64), budgets, n)


def observed_heavy_hitters(
    source: Any,
    budgets: Sequence[int],
    queries: np.ndarray,
    *,
    lse: np.ndarray | None = None,
    scale: float | None = None,
    kind: str = "softmax",
    p: float = 2.0,
    mode: str = "global",
    positions: np.ndarray | None = None,
    **run: Any,
) -> list[KeySet]:
    """H2O-style: the top-B keys by attention accumulated over the given queries.

    **Needs the queries.** a_j = Σ_i A_ij with the exact normalisers; ``lse`` (from a
    ``GroundTruth`` pass) saves the first of the two passes when given.
    """
    src = open_keys(source)
    budgets = _check_budgets(budgets, src.n)
    q = np.asarray(queries, dtype=np.float64)
    att = dict(scale=scale, kind=kind, p=p, mode=mode, positions=positions)
    if lse is None:
        gt = GroundTruth(GroundTruthSpec(q, eps=1.0, **att))  # type: ignore[arg-type]
        (done,) = run_pass(src, [gt], description="normalisers", **run)
        lse = done.result()["lse"]
    op = ObservedAttentionTop(
        ObservedAttentionSpec(q, lse=np.asarray(lse), budget=max(budgets), **att)  # type: ignore[arg-type]
    )
    (done,) = run_pass(src, [op], description="observed attention", **run)
    res = done.result()
    return ranked_sets(
        "heavy-hitters", rank_by_score(res["indices"], res["scores"]), budgets, src.n
    )


def hybrid(
    source: Any,
    budgets: Sequence[int],
    *,
    sinks: int = 4,
    window_fraction: float = 0.5,
    variant: str = "affine",
    ranking: np.ndarray | None = None,
    **run: Any,
) -> list[KeySet]:
    """Sinks + recent window + the highest-leverage far keys, B in total (global query).

    window w = ⌊window_fraction · (B − sinks)⌋; the remaining B − sinks − w keys are the
    top keys by ``variant`` leverage outside the sinks and the last w keys. A causal
    query uses at most B keys (leverage keys after its position are unavailable, and
    they may overlap its window). ``ranking`` (keys by decreasing leverage, at least
    max(budgets) long, e.g. from ``leverage_ranking``) saves the leverage pass.
    """
    src = open_keys(source)
    budgets = _check_budgets(budgets, src.n)
    if not 0 <= window_fraction <= 1:
        raise ConfigError(f"window_fraction must be in [0, 1], got {window_fraction}.")
    if ranking is None:
        ranking = leverage_ranking(src, max(budgets), variant, **run)
    out = []
    for b in budgets:
        k = min(sinks, b)
        w = int(window_fraction * (b - k))
        rest = b - k - w
        far = ranking[(ranking >= k) & (ranking < src.n - w)][:rest]
        out.append(
            KeySet("hybrid", b, np.union1d(np.arange(k), far).astype(np.int64), src.n, window=w)
        )
    return out
