"""The local engine folds concurrent-safe operators side by side: the same states as one
operator after another, every block in order, errors raised after all updates stop."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import zarr

from streamattn.engines.local import run_local
from streamattn.operators.leverage import LeverageScores, LeverageSpec
from streamattn.operators.projection import ProjectedEmbeddings, ProjectionSpec
from streamattn.operators.protocol import Operator
from streamattn.sources import Block, KeySource


def keys(n: int = 20000, d: int = 12) -> np.ndarray:
    rng = np.random.default_rng(31)
    return (rng.standard_normal((n, d)) * rng.uniform(0.5, 2.0, d)).astype(np.float32)


def embeddings_target(path: Path, n: int, m: int) -> str:
    zarr.create_array(str(path), shape=(n, m), chunks=(4096, m), dtype="float32")
    return str(path)


def test_side_by_side_equals_one_after_another(tmp_path: Path) -> None:
    x = keys()
    n, d = x.shape
    out = [embeddings_target(tmp_path / f"y{i}.zarr", n, 4) for i in range(2)]
    ops = [LeverageScores(LeverageSpec(0.01)), LeverageScores(LeverageSpec(0.02, True)),
           ProjectedEmbeddings(ProjectionSpec("srht", d, 4, seed=3, out_path=out[0]))]
    assert all(op.concurrent_updates for op in ops)
    together = run_local(KeySource(x), ops, chunk_rows=3000)
    alone = [run_local(KeySource(x), [op], chunk_rows=3000)[0] for op in (
        LeverageScores(LeverageSpec(0.01)), LeverageScores(LeverageSpec(0.02, True)),
        ProjectedEmbeddings(ProjectionSpec("srht", d, 4, seed=3, out_path=out[1])))]
    for a, b in zip(together, alone, strict=True):
        sa, sb = a.to_state(), b.to_state()
        assert sa.keys() == sb.keys()
        for k in sa.keys() - {"spec"}:  # the two projections differ in out_path only
            np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
    np.testing.assert_array_equal(zarr.open_array(out[0])[:], zarr.open_array(out[1])[:])


class Recorder(Operator[LeverageSpec, list[int]]):
    """Records the block starts it sees; fails on a chosen block."""

    family = "test-recorder"
    concurrent_updates = True
    Spec = LeverageSpec

    def __init__(self, spec: LeverageSpec) -> None:
        super().__init__(spec)
        self.starts: list[int] = []
        self.threads: set[str] = set()

    def _update(self, block: Block) -> None:
        if block.start == int(self.spec.threshold):
            raise RuntimeError(f"planted failure at row {block.start}")
        self.starts.append(block.start)
        self.threads.add(threading.current_thread().name)

    def _merge(self, other: Recorder) -> None:
        self.starts += other.starts

    def _state(self) -> dict[str, np.ndarray]:
        return {"starts": np.array(self.starts)}

    def _load(self, state: dict[str, np.ndarray]) -> None:
        self.starts = list(state["starts"])

    def result(self) -> list[int]:
        return self.starts

    def nbytes_bound(self, d: int) -> int:
        return 0


def test_every_operator_sees_every_block_in_order_and_errors_surface() -> None:
    x = keys(5000, 4)
    never = float(10**9)
    ops = [Recorder(LeverageSpec(never)) for _ in range(3)]
    run_local(KeySource(x), ops, chunk_rows=700)
    for op in ops:
        assert op.starts == list(range(0, 5000, 700))
    # really side by side: the first in this thread, the others in the pool's
    assert ops[0].threads == {threading.current_thread().name}
    assert all(t.startswith("streamattn-ops") for op in ops[1:] for t in op.threads)
    failing = [Recorder(LeverageSpec(never)), Recorder(LeverageSpec(2100.0)),
               Recorder(LeverageSpec(never))]
    with pytest.raises(RuntimeError, match="planted failure at row 2100"):
        run_local(KeySource(x), failing, chunk_rows=700)
    assert failing[1].starts == [0, 700, 1400]


def test_a_cache_deals_its_heads_to_the_stream_threads() -> None:
    from streamattn.operators.gram_step import STREAM_THREADS
    from streamattn.operators.multihead import MultiHead

    never = float(10**9)
    x = keys(3000, 2 * 3 * 4).reshape(3000, 2, 3, 4)
    multi = MultiHead.of([[Recorder(LeverageSpec(never)) for _ in range(3)] for _ in range(2)])
    for a in range(0, 3000, 1000):
        multi.update(Block(a, x[a : a + 1000]))
    heads = [op for row in multi.ops for op in row]
    assert all(isinstance(op, Recorder) and op.starts == [0, 1000, 2000] for op in heads)
    names = set().union(*(op.threads for op in heads if isinstance(op, Recorder)))
    if STREAM_THREADS > 1:  # side by side: the heads ran in the head pool's lanes, not here
        # (which pool thread takes which lane is the pool's choice: one may take both)
        assert names and all(n.startswith("streamattn-heads") for n in names)
