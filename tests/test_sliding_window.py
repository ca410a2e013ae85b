"""Sliding window: at every checkpoint the set equals the batch universal set of the window
rows; the window is the longest block-aligned suffix of at most W rows; memory is bounded."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import streamattn as sa
from streamattn.cli import main
from streamattn.errors import ConfigError, InvalidInputError
from streamattn.recipes.sliding_window import SlidingWindow


def stream(n: int, d: int = 5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((n, d)) * np.linspace(0.5, 2.0, d) + 1.0
    k[rng.choice(n, n // 40, replace=False)] *= 10.0  # outliers spread along the stream
    return k


@pytest.mark.parametrize(
    ("window", "block", "variant"),
    [(300, 100, "plain"), (300, 100, "affine"), (250, 60, "plain"), (64, 64, "affine")],
)
def test_equals_batch_over_the_window_at_checkpoints(window: int, block: int, variant: str) -> None:
    k = stream(1500)
    v = np.arange(3000.0).reshape(1500, 2)
    eps = 0.05
    sw = SlidingWindow(window, block, eps, variant=variant)
    rng = np.random.default_rng(1)
    t = 0
    checked = 0
    while t < len(k):
        m = int(rng.integers(1, 90))  # tokens arrive in ragged groups
        sw.append(k[t : t + m], v[t : t + m])
        t = min(len(k), t + m)
        assert sw.t == t
        assert len(sw.done) <= math.ceil(window / block)  # bounded memory
        u = sw.result()
        s = max(0, block * math.ceil((t - window) / block))
        assert (u.start, u.stop) == (s, t)
        assert window - block < t - s <= window or t <= window
        batch = sa.universal_set(k[s:t], eps=eps, variant=variant)
        np.testing.assert_array_equal(u.indices, s + batch.indices)
        np.testing.assert_allclose(u.scores, batch.scores, rtol=1e-8, atol=1e-12)
        np.testing.assert_array_equal(u.rows, k[u.indices])
        np.testing.assert_array_equal(u.values, v[u.indices])
        assert len(u) <= u.certificate["size_bound"]
        checked += 1
    assert checked > 10


def test_window_is_exact_w_at_block_multiples() -> None:
    k = stream(900, seed=3)
    sw = SlidingWindow(300, 100, 0.1)
    for t in range(0, 900, 100):
        sw.append(k[t : t + 100])
        u = sw.result()
        assert u.stop - u.start == min(300, t + 100)
        batch = sa.universal_set(k[u.start : u.stop], eps=0.1)
        np.testing.assert_array_equal(u.indices, u.start + batch.indices)


def test_memory_bound_does_not_depend_on_stream_length() -> None:
    sw = SlidingWindow(200, 50, 0.1)
    bound = None
    for i in range(40):
        sw.append(stream(50, seed=i))
        held = sum(b.r.nbytes + b.rows.nbytes for b in sw.done)
        assert held <= sw.nbytes_bound()
        bound = sw.nbytes_bound() if bound is None else bound
        assert sw.nbytes_bound() == bound
    assert len(sw.done) <= 4


def test_bad_input() -> None:
    with pytest.raises(ConfigError, match="block"):
        SlidingWindow(10, 20, 0.1)
    with pytest.raises(ConfigError, match="eps"):
        SlidingWindow(10, 5, 0.0)
    with pytest.raises(ConfigError, match="window"):
        SlidingWindow(0, 5, 0.1)
    sw = SlidingWindow(10, 5, 0.1)
    with pytest.raises(InvalidInputError, match="no rows"):
        sw.result()
    sw.append(np.ones((3, 4)))
    with pytest.raises(InvalidInputError, match="width"):
        sw.append(np.ones((3, 5)))
    bad = np.ones((4, 4))
    bad[2, 1] = np.nan
    with pytest.raises(InvalidInputError, match="row 5"):
        sw.append(bad)


def test_cli_window(tmp_path: Path) -> None:
    k = stream(600).astype(np.float32)
    np.save(tmp_path / "k.npy", k)
    out = tmp_path / "out"
    rc = main([
        "window", str(tmp_path / "k.npy"), "--window", "200", "--block", "50",
        "--eps", "0.05", "--every", "100", "--out", str(out), "--quiet",
    ])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert [c["t"] for c in report["checkpoints"]] == [100, 200, 300, 400, 500, 600]
    last = report["checkpoints"][-1]
    assert last["window"] == [400, 600]
    batch = sa.universal_set(k[400:600], eps=0.05)
    assert last["indices"] == (400 + batch.indices).tolist()
    assert main(["window", str(tmp_path / "k.npy"), "--window", "20", "--block", "50",
                 "--eps", "0.05", "--out", str(tmp_path / "o2"), "--quiet"]) == 2
