"""Softmax: what a norm bound guarantees, and why without one no universal set exists.

Guarantee (``streamattn.recipes.lp.softmax_entry_bound``): if ‖q‖ ≤ Bq and ‖k_j − c‖ ≤ Bk for
every key (c any common offset), every softmax entry is ≤ e^{2·s·Bq·Bk}/n.

Counterexample without a bound on the query norm: n keys equally spaced on a circle.
For each key j the query q = t·k_j/‖k_j‖ gives k_j the largest logit by a margin
t·R·(1 − cos(2π/n)), so for t large enough A_qj > 1/2. Every key is heavy for some query,
so the only universal set is all n keys — no set of size independent of n exists for
softmax — while the x² universal set (leverage 2/n for every key) is empty at eps = 1/2.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import logsumexp, softmax

import streamattn as sa
from streamattn.errors import ConfigError
from streamattn.recipes.lp import softmax_entry_bound


def circle(n: int, radius: float = 1.0) -> np.ndarray:
    theta = 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(theta), np.sin(theta)], axis=1)


def test_counterexample_keys_on_a_circle_every_key_can_be_heavy() -> None:
    n = 400
    k = circle(n)
    # margin to the nearest neighbour: t·(1 − cos(2π/n)); make the rest sum to < 1/2
    t = 2.0 * np.log(4.0 * n) / (1.0 - np.cos(2 * np.pi / n))
    q = t * k  # one query per key, pointing at it
    logits = q @ k.T
    diag = np.diag(logits) - logsumexp(logits, axis=1)  # log A_jj, stable
    assert np.all(np.exp(diag) > 0.5)  # every key takes more than half the attention
    # so any universal set at eps = 1/2 must be all n keys ...
    # ... while leverage is flat (2/n each) and the x² set at eps = 1/2 is empty
    lev = sa.universal_set(k, eps=0.5)
    assert len(lev) == 0
    u = sa.universal_set(k, eps=1.0 / n)
    np.testing.assert_allclose(u.scores, 2.0 / n, rtol=1e-9)
    # and the norm needed grows with n: the entry bound only allows a share > 1/2 once
    # e^{2 t} / n > 1/2
    assert softmax_entry_bound(n, bq=t, bk=1.0) > 0.5


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_bounded_norms_bound_every_entry(scale: float) -> None:
    rng = np.random.default_rng(0)
    n, d = 3000, 8
    k = rng.standard_normal((n, d)) + 5.0  # a large common offset: softmax ignores it
    c = k.mean(axis=0)
    bk = float(np.max(np.linalg.norm(k - c, axis=1)))
    bq = 1.5
    bound = softmax_entry_bound(n, bq, bk, scale)
    q = rng.standard_normal((500, d))
    q *= bq / np.linalg.norm(q, axis=1, keepdims=True)
    # adversarial directions: towards each of the most extreme keys
    far = np.argsort(np.linalg.norm(k - c, axis=1))[-20:]
    q_adv = (k[far] - c) / np.linalg.norm(k[far] - c, axis=1, keepdims=True) * bq
    for qq in (q, q_adv):
        a = softmax(scale * qq @ k.T, axis=1)
        assert a.max() <= bound
    # with the query norm chosen so the bound is below eps, no query of that norm (random
    # or pointing at the most extreme keys) gives any key a share >= eps: U = {} is universal
    eps = 0.01
    bq_safe = np.log(eps * n / 2) / (2 * scale * bk)
    assert softmax_entry_bound(n, bq_safe, bk, scale) < eps
    for qq in (q, q_adv):
        qq = qq * (bq_safe / bq)
        assert softmax(scale * qq @ k.T, axis=1).max() < eps


def test_bound_settings() -> None:
    assert softmax_entry_bound(1, 10.0, 10.0) == 1.0
    with pytest.raises(ConfigError):
        softmax_entry_bound(0, 1.0, 1.0)
    with pytest.raises(ConfigError):
        softmax_entry_bound(10, -1.0, 1.0)
