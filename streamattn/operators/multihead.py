"""``MultiHead``: one operator per (layer, head) of a KV cache, fed from one read per block.

``update`` takes blocks with rows ``(r, layers, heads, d)`` (a
:class:`streamattn.sources.MultiHeadSource`) and folds the ``layers × heads`` head
operators *per block* (never per row), with one BLAS thread; each head's work is
block-level BLAS/LAPACK on its ``r × d`` view of the block (strided: the source reads each
layer's ``(r, H·d)`` rows once and hands out views, the operators convert pieces to
float64 themselves).

Where every head operator allows it (``Operator.concurrent_updates``: the leverage set),
the heads are dealt to the stream threads (``gram_step.STREAM_THREADS``) in fixed lanes,
one lane per thread and block, and each head runs on one row span (``serial_rows``): the
same arithmetic as that head folded alone, whatever the thread count or the thread a lane
lands on. Measured on 2 cores
(30 layers × 3 heads × d = 64, 4096-row blocks): splitting each head's rows over the two
threads instead made a 4096-row Gram pass slower than one thread (1.11 ms against
0.93 ms: the hand-off costs more than it saves at this size). An earlier batched
``np.matmul`` over a layer's ``(H, m, d)`` stack took 6.5 ms per layer-block against
3.6 ms for the per-head loop (twice the flops of TRMM / SYRK, no triangle). Memory is
bounded by ``layers × heads`` times the single-head bound of the wrapped operator
(``MultiHead.nbytes_bound``), independent of n.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from streamattn.blas import single_blas_thread
from streamattn.errors import ConfigError, InvalidInputError
from streamattn.operators.gram_step import STREAM_THREADS, serial_rows
from streamattn.operators.protocol import (
    Operator,
    RowRanges,
    State,
    decode_state,
    encode_state,
    spec_to_state,
)
from streamattn.sources import Block


@cache
def _head_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(STREAM_THREADS, thread_name_prefix="streamattn-heads")


def _fold_heads(jobs: list[tuple[Operator[Any, Any], Block]]) -> None:
    with serial_rows():
        for op, part in jobs:
            op.update(part)


@dataclass(frozen=True)
class MultiHeadSpec:
    """``layers × heads`` inner operators; ``inner`` encodes their specs (any family)."""

    layers: int
    heads: int
    inner: np.ndarray


def _empty_state(op: Operator[Any, Any]) -> State:
    return {
        "family": np.array(op.family),
        "format_version": np.array(op.format_version, dtype=np.int64),
        "covered": RowRanges().to_array(),
        **spec_to_state(op.spec),
    }


def _split_prefixed(state: State) -> dict[tuple[int, int], State]:
    out: dict[tuple[int, int], State] = {}
    for key, value in state.items():
        head, _, rest = key.partition("|")
        layer, h = head.split(".")
        out.setdefault((int(layer), int(h)), {})[rest] = value
    return out


class MultiHead(Operator[MultiHeadSpec, list[list[Any]]]):
    """One operator per (layer, head), fed from one read of each block.

    ``update`` takes blocks with rows ``(r, layers, heads, d)`` and folds the view
    ``rows[:, l, h]`` into head (l, h)'s operator: a loop over heads per block,
    block-level BLAS inside each. ``merge``, states and results are per head.
    A head may hold no operator (``None``: nothing is folded there, its result is None),
    so a pass serves only the heads that asked for it.
    Memory: the sum of the heads' bounds (``layers × heads`` × the single-head bound).
    """

    family = "multi-head"
    Spec = MultiHeadSpec

    def __init__(self, spec: MultiHeadSpec) -> None:
        super().__init__(spec)
        empties = _split_prefixed(decode_state(spec.inner))
        self.ops: list[list[Operator[Any, Any] | None]] = [
            [Operator.from_state(empties[(layer, h)]) if (layer, h) in empties else None
             for h in range(spec.heads)]
            for layer in range(spec.layers)
        ]

    @classmethod
    def of(cls, ops: list[list[Operator[Any, Any] | None]]) -> MultiHead:
        """Wrap empty per-head operators ``ops[layer][head]`` (any families; None: none)."""
        layers, heads = len(ops), len(ops[0])
        if any(len(row) != heads for row in ops):
            raise ConfigError("every layer needs the same number of head operators.")
        if all(op is None for row in ops for op in row):
            raise ConfigError("a multi-head operator needs at least one head operator.")
        flat: State = {}
        for layer, row in enumerate(ops):
            for h, op in enumerate(row):
                if op is not None:
                    for key, value in _empty_state(op).items():
                        flat[f"{layer}.{h}|{key}"] = value
        return cls(MultiHeadSpec(layers, heads, encode_state(flat)))

    def _heads(self) -> Iterator[tuple[int, int, Operator[Any, Any]]]:
        for layer, row in enumerate(self.ops):
            for h, op in enumerate(row):
                if op is not None:
                    yield layer, h, op

    def _update(self, block: Block) -> None:
        rows = block.rows
        want = (self.spec.layers, self.spec.heads)
        if rows.ndim != 4 or rows.shape[1:3] != want:
            raise InvalidInputError(
                f"multi-head operator for {want[0]} layers x {want[1]} heads got a block of "
                f"shape {rows.shape}; expected (rows, {want[0]}, {want[1]}, d)."
            )
        vals = block.values
        jobs = [(op, Block(block.start, rows[:, layer, h],
                           None if vals is None else vals[:, layer, h]))
                for layer, h, op in self._heads()]
        lanes = min(STREAM_THREADS, len(jobs))
        with single_blas_thread():
            if lanes < 2 or not all(op.concurrent_updates for op, _ in jobs):
                for op, part in jobs:
                    op.update(part)
                return
            # each head in one lane (the same lane every block): lanes run side by side,
            # each head with the same arithmetic as alone (one row span, no nested threads)
            list(_head_pool().map(_fold_heads, [jobs[i::lanes] for i in range(lanes)]))

    def _merge(self, other: MultiHead) -> None:
        with single_blas_thread():
            for layer, h, op in self._heads():
                theirs = other.ops[layer][h]
                assert theirs is not None  # same spec: the same heads hold operators
                op.merge(theirs)

    def _state(self) -> State:
        out: State = {}
        for layer, h, op in self._heads():
            for key, value in op.to_state().items():
                out[f"{layer}.{h}|{key}"] = value
        return out

    def _load(self, state: State) -> None:
        for (layer, h), sub in _split_prefixed(state).items():
            self.ops[layer][h] = Operator.from_state(sub)

    def result(self) -> list[list[Any]]:
        """``result()[layer][head]``: each head operator's result (one BLAS thread: the
        d × d SVDs of many heads are ~15× slower with OpenBLAS threads on 2 cores)."""
        with single_blas_thread():
            return [[None if op is None else op.result() for op in row] for row in self.ops]

    def nbytes_bound(self, d: int) -> int:
        return sum(op.nbytes_bound(d) for _, _, op in self._heads())
