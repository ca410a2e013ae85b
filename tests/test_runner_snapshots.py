"""Prefix snapshots through the runner (``run_pass(..., snapshots=, on_snapshot=)``).

The law: the state handed to ``on_snapshot`` at n equals the state of a separate pass over
the first n rows — bit for bit when the earlier snapshots are multiples of the block size
(same update calls), and otherwise equal to a fold of the same rows in blocks cut at the
snapshots (``streamattn.testing.laws.fold``, an independent fold loop) and, up to float
rounding, to the separate pass.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from streamattn.errors import ConfigError
from streamattn.operators.ground_truth import GroundTruth, GroundTruthSpec
from streamattn.operators.leverage import LeverageScores, LeverageSpec
from streamattn.operators.protocol import Operator
from streamattn.operators.sparsity import SparsitySpec, SparsityStats
from streamattn.runner import RowRange, run_pass
from streamattn.sources import open_keys
from streamattn.testing.laws import blocks_of, fold

RNG = np.random.default_rng(15)
X = RNG.standard_normal((3000, 6)) * np.array([3.0, 1.0, 1.0, 0.5, 0.2, 0.1])
X[1700] *= 40.0  # one outlier row, so the leverage set is not empty
Q = RNG.standard_normal((5, 6))

MAKERS: dict[str, Callable[[], Operator]] = {
    "sparsity": lambda: SparsityStats(SparsitySpec(Q, scale=0.5, top_keys=50)),
    "ground-truth": lambda: GroundTruth(GroundTruthSpec(Q, eps=0.02)),
    "leverage-affine": lambda: LeverageScores(LeverageSpec(0.01, affine=True)),
}


def states(ops: list[Operator]) -> list[dict[str, np.ndarray]]:
    return [{k: np.array(v, copy=True) for k, v in op.to_state().items()} for op in ops]


def assert_states_equal(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    for sa, sb in zip(a, b, strict=True):
        assert sa.keys() == sb.keys()
        for key in sa:
            np.testing.assert_array_equal(sa[key], sb[key], err_msg=key)


def assert_close(a: Any, b: Any, what: str = "result") -> None:
    """Floats to 1e-9 (another block cut or merge order rounds differently), the rest
    (indices, counts, flags) exactly; dicts and sequences compared item by item."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for key in a.keys() - {"scoring_map"}:  # a Gram factor (up to rotation): its
            assert_close(a[key], b[key], f"{what}[{key!r}]")  # scores are compared
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close(x, y, f"{what}[{i}]")
    elif np.asarray(a).dtype.kind == "f":
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9, err_msg=what)
    else:
        np.testing.assert_array_equal(a, b, err_msg=what)


def assert_results_close(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    """The results of operators rebuilt from two lists of states (a QR state is defined
    up to row signs, so states from different block cuts are compared by their results)."""
    for sa, sb in zip(a, b, strict=True):
        assert_close(Operator.from_state(sa).result(), Operator.from_state(sb).result())


def snapshot_run(cuts: list[int], chunk_rows: int, **run: Any) -> dict[int, list[dict]]:
    seen: dict[int, list[dict]] = {}

    def keep(n: int, ops: list[Operator]) -> None:
        seen[n] = states(ops)

    ops = [make() for make in MAKERS.values()]
    final = run_pass(X, ops, snapshots=cuts, on_snapshot=keep, chunk_rows=chunk_rows, **run)
    assert final == ops  # folded in place, like run_pass
    assert list(seen) == cuts  # called once per snapshot, in order
    return seen


def test_aligned_snapshot_equals_a_separate_run_bit_for_bit() -> None:
    cuts = [500, 1250, 2250]  # multiples of the block size
    seen = snapshot_run(cuts, 250)
    for n in cuts:
        alone = run_pass(np.ascontiguousarray(X[:n]), [m() for m in MAKERS.values()],
                         chunk_rows=250)
        assert_states_equal(seen[n], states(alone))
    # the pass goes on to the end: its final state is a plain pass over every row
    ops = [m() for m in MAKERS.values()]
    run_pass(X, ops, snapshots=cuts, on_snapshot=lambda n, o: None, chunk_rows=250)
    assert_states_equal(states(ops), states(run_pass(X, [m() for m in MAKERS.values()],
                                                     chunk_rows=250)))


def test_unaligned_snapshots_are_the_prefix_folded_in_cut_blocks() -> None:
    cuts = [333, 1000, 2999, 3000]
    seen = snapshot_run(cuts, 400)
    for n in cuts:
        # the runner's blocks: each segment [a, b) between snapshots in steps of 400 from a
        edges = [0, *[c for c in cuts if c < n], n]
        cut_blocks = blocks_of(X[:n], [s for a, b in itertools.pairwise(edges)
                                       for s in range(a, b, 400)])
        assert n < 1000 or [b.start for b in cut_blocks][:3] == [0, 333, 733]
        ref = [fold(m, cut_blocks) for m in MAKERS.values()]
        assert_states_equal(seen[n], states(ref))
        alone = run_pass(np.ascontiguousarray(X[:n]), [m() for m in MAKERS.values()],
                         chunk_rows=400)
        assert_results_close(seen[n], states(alone))


def test_snapshots_on_dask_equal_the_local_run() -> None:
    pytest.importorskip("distributed")
    cuts = [1000, 2000]
    local = snapshot_run(cuts, 250)
    dask = snapshot_run(cuts, 250, engine="dask", scheduler="threads")
    for n in cuts:
        assert_results_close(dask[n], local[n])


def test_row_range_streams_only_its_window_with_global_rows() -> None:
    src = open_keys(X)
    window = RowRange(src, 700, 1900)
    blocks = list(window.blocks(500))
    assert [(b.start, b.stop) for b in blocks] == [(700, 1200), (1200, 1700), (1700, 1900)]
    np.testing.assert_array_equal(np.vstack([b.rows for b in blocks]), X[700:1900])
    assert window.block_ranges(500) == [(700, 1200), (1200, 1700), (1700, 1900)]
    assert window.n == src.n
    with pytest.raises(ConfigError, match="outside"):
        RowRange(src, 10, 3001)


@pytest.mark.parametrize(("cuts", "match"), [
    ([], "non-empty"), ([100, 100], "increase strictly"), ([0, 5], "increase strictly"),
    ([10, 3001], "increase strictly"), ([1.5], "row counts"),
])
def test_bad_snapshots_are_refused_before_reading(cuts: list[Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        run_pass(X, [MAKERS["sparsity"]()], snapshots=cuts, on_snapshot=lambda n, o: None)


def test_snapshot_options_must_come_together(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="needs on_snapshot"):
        run_pass(X, [MAKERS["sparsity"]()], snapshots=[10])
    with pytest.raises(ConfigError, match="never called"):
        run_pass(X, [MAKERS["sparsity"]()], on_snapshot=lambda n, o: None)
    from streamattn.io.checkpoint import Checkpointer

    with pytest.raises(ConfigError, match="checkpoint"):
        run_pass(X, [MAKERS["sparsity"]()], snapshots=[10], on_snapshot=lambda n, o: None,
                 checkpoint=Checkpointer(tmp_path / "ck"))
