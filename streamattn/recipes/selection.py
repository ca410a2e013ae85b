"""Universal-set requests: ``Selection`` (threshold, budget, variant, p) and its checks.

The certificate texts (``GUARANTEE``, ``SOFTMAX_NOTE``, ``BUDGET_NOTE``) say what a set
guarantees; the recipes (:mod:`streamattn.recipes.universal`, ``.lp``, ``.ridge``) copy
them into every certificate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamattn.errors import ConfigError
from streamattn.operators.leverage import DEFAULT_RTOL

VARIANTS = ("plain", "affine")
#: In budget mode the first pass keeps candidates with score ≥ dim / (BUDGET_SLACK · B),
#: so at most BUDGET_SLACK · B candidates are held.
BUDGET_SLACK = 4

GUARANTEE = {
    "plain": (
        "For f(x) = x^2 attention, A_qj = (q.k_j)^2 / sum_l (q.k_l)^2 <= tau_j for every "
        "query q, so every key that any query weights >= eps is in U, and |U| <= rank/eps."
    ),
    "affine": (
        "For f(x) = (x + c)^2 attention with any query q and any common offset c, the share "
        "of key j is <= tau~_j = 1/n + centred leverage, so every key that any such query "
        "weights >= eps is in U, and |U| <= (rank of [K, 1])/eps."
    ),
}
SOFTMAX_NOTE = (
    "No worst-case universal set exists for softmax attention; for softmax this selection "
    "is a heuristic. Measure its coverage (recall, attention mass) on real queries."
)
BUDGET_NOTE = (
    "Budget mode returns the top-B keys by leverage (exact, ties by index). It carries the "
    "threshold guarantee only for eps >= the B-th score, reported as eps_equivalent."
)


def check_selection(
    eps: float | None, variant: str, budget: int | None, n: int | None = None
) -> None:
    """Validate selection settings; raise ConfigError naming the bad one."""
    if variant not in VARIANTS:
        raise ConfigError(f"variant must be one of {list(VARIANTS)}, got {variant!r}.")
    if eps is None and budget is None:
        raise ConfigError("give eps (threshold mode) or budget (top-B mode).")
    if eps is not None:
        real = isinstance(eps, (int, float, np.integer, np.floating)) and not isinstance(eps, bool)
        if not real or not 0 < eps <= 1:
            raise ConfigError(f"eps must be in (0, 1], got {eps!r}.")
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
            raise ConfigError(f"budget must be an integer >= 1, got {budget!r}.")
        if n is not None and budget > n:
            raise ConfigError(f"budget {budget} is larger than the number of keys n = {n}.")


def check_p(p: Any) -> float:
    """p must be a finite real > 0."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p <= 0:
        raise ConfigError(f"p must be a finite number > 0, got {p!r}.")
    return float(p)


def check_lp_selection(sel: Any) -> None:
    """Settings of a p != 2 ``Selection``: p > 0, threshold mode (``eps``), no budget."""
    check_p(sel.p)
    if sel.budget is not None or sel.eps is None:
        raise ConfigError(
            f"p = {sel.p:g}: l_p universal sets are computed in threshold mode; give eps "
            "and no budget (budget mode supports p = 2 only)."
        )


@dataclass(frozen=True)
class Selection:
    """One universal-set request: threshold ``eps``, top-``budget``, or both (top-B of U_eps)."""

    eps: float | None = None
    variant: str = "plain"
    budget: int | None = None
    rtol: float = DEFAULT_RTOL
    p: float = 2.0  # f(x) = |x|^p; p != 2 is computed by streamattn.recipes.lp (Lewis weights)

    def check(self, n: int | None = None) -> None:
        check_selection(self.eps, self.variant, self.budget, n)
        if self.p != 2:
            check_lp_selection(self)
        if not (isinstance(self.rtol, float) and 0 < self.rtol < 1):
            raise ConfigError(f"rtol must be a float in (0, 1), got {self.rtol!r}.")

    def pruning_threshold(self, d: int) -> float:
        """Pass-1 threshold: eps, raised in budget mode so <= BUDGET_SLACK·B rows are held."""
        floor = 0.0 if self.eps is None else float(self.eps)
        if self.budget is None:
            return floor
        dim = d + 1 if self.variant == "affine" else d
        return max(floor, min(1.0, dim / (BUDGET_SLACK * self.budget)))
