"""Candidate rows, the bookkeeping shared by every operator that keeps rows.

An operator that keeps some rows of the stream (leverage candidates, the top-B, Lewis
candidates, sketched-score survivors) holds their global indices (int64), the rows
(float64) and, when the store has values, the value rows. These helpers store and restore
that triple under the same state keys (``idx``, ``rows``, ``values``) for all of them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from streamattn.operators.protocol import State


def candidate_state(idx: np.ndarray, rows: np.ndarray, values: np.ndarray | None) -> State:
    """The state arrays of kept rows (``values`` only when there are value rows)."""
    out: State = {"idx": idx, "rows": rows}
    if values is not None:
        out["values"] = values
    return out


def load_candidates(state: State) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(idx, rows, values)`` copied out of a state written by :func:`candidate_state`."""
    values = np.array(state["values"], dtype=np.float64) if "values" in state else None
    return (np.array(state["idx"], dtype=np.int64), np.array(state["rows"], dtype=np.float64),
            values)


def stack_values(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    """The value rows of two stacked candidate sets (None unless both have them)."""
    return None if a is None or b is None else np.vstack([a, b])


def merge_scored(
    held: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None],
    new: tuple[np.ndarray, np.ndarray, np.ndarray, Any],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Two scored candidate sets ``(idx, scores, rows, values)`` as one, in index order
    (a stable sort, so equal indices keep held-before-new); values stay only when both
    sets have them."""
    idx = np.concatenate([held[0], new[0]])
    order = np.argsort(idx, kind="stable")
    values = stack_values(held[3], new[3])
    return (idx[order], np.concatenate([held[1], new[1]])[order],
            np.vstack([held[2], new[2]])[order], None if values is None else values[order])
