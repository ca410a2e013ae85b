"""The operator laws, written once and run for every operator (Algebird/river style).

Shipped so that a user's own ``Operator`` subclass can be checked the same way (needs the
``dev`` extra: pytest and hypothesis).

``check_operator_laws(make_empty, x, compare, data)`` folds the rows of ``x`` (and
``values``) through the operator in a chunking and a merge tree drawn by hypothesis,
and asserts with ``compare(result_a, result_b)`` that:

- any chunking and any merge tree (associativity, commutativity) give the result of a
  single sequential pass;
- the empty operator is a two-sided identity;
- ``from_state(to_state(op))`` has the same result, and the state is plain arrays;
- a block merged twice, or a state with another spec, is refused.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import strategies as st

from streamattn.errors import IncompatibleMergeError
from streamattn.operators.protocol import Operator
from streamattn.sources import Block


def blocks_of(x: np.ndarray, cuts: list[int], values: np.ndarray | None = None) -> list[Block]:
    """Split rows of ``x`` at the sorted ``cuts`` into blocks with global starts."""
    edges = [0, *sorted(set(c for c in cuts if 0 < c < len(x))), len(x)]
    return [
        Block(a, x[a:b], None if values is None else values[a:b])
        for a, b in itertools.pairwise(edges)
    ]


def fold(make_empty: Callable[[], Operator], blocks: list[Block]) -> Operator:
    op = make_empty()
    for b in blocks:
        op.update(b)
    return op


def fold_tree(
    make_empty: Callable[[], Operator], blocks: list[Block], rng: np.random.Generator
) -> Operator:
    """One operator per block, merged in a random order and random pairing (any tree)."""
    ops = [make_empty().update(b) for b in blocks]
    rng.shuffle(ops)  # type: ignore[arg-type, unused-ignore]
    while len(ops) > 1:
        i = int(rng.integers(0, len(ops) - 1))
        left, right = ops[i], ops.pop(i + 1)
        if rng.random() < 0.5:  # either side may absorb the other
            left, right = right, left
        ops[i] = left.merge(right)
    return ops[0]


def assert_plain_state(state: dict[str, Any]) -> None:
    for key, value in state.items():
        assert isinstance(value, np.ndarray), f"state[{key!r}] is {type(value).__name__}"
        assert value.dtype != object, f"state[{key!r}] has dtype object (would need pickle)"


def check_operator_laws(
    make_empty: Callable[[], Operator],
    x: np.ndarray,
    compare: Callable[[Any, Any], None],
    data: st.DataObject,
    *,
    values: np.ndarray | None = None,
    max_cuts: int = 6,
    make_other_spec: Callable[[], Operator] | None = None,
) -> None:
    n = len(x)
    reference = fold(make_empty, blocks_of(x, [], values)).result()

    cuts = data.draw(st.lists(st.integers(1, max(1, n - 1)), max_size=max_cuts), label="cuts")
    blocks = blocks_of(x, cuts, values)
    compare(fold(make_empty, blocks).result(), reference)

    seed = data.draw(st.integers(0, 2**32 - 1), label="tree seed")
    tree = fold_tree(make_empty, blocks, np.random.default_rng(seed))
    compare(tree.result(), reference)

    # identity on both sides
    whole = fold(make_empty, blocks)
    compare(make_empty().merge(whole).result(), reference)
    compare(whole.copy().merge(make_empty()).result(), reference)

    # state round trip, plain arrays only
    state = whole.to_state()
    assert_plain_state(state)
    back = Operator.from_state(state)
    assert type(back) is type(whole)
    compare(back.result(), reference)
    empty_back = Operator.from_state(make_empty().to_state())
    compare(empty_back.merge(whole).result(), reference)

    # a block folded twice is refused, through update and through merge
    with pytest.raises(IncompatibleMergeError):
        fold(make_empty, blocks).update(blocks[0])
    with pytest.raises(IncompatibleMergeError):
        fold(make_empty, blocks).merge(make_empty().update(blocks[0]))
    if make_other_spec is not None:
        with pytest.raises(IncompatibleMergeError):
            make_empty().update(blocks[0]).merge(make_other_spec().update(blocks[-1]))
