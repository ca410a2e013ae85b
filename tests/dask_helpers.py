"""Test-only operator and scheduler probes for the Dask engine tests, importable.

Dask workers rebuild operators from their class (pickled by reference), and functions
run on the scheduler are pickled by reference too, so they must live in a module the
cluster's processes can import: ``tests/`` is on ``sys.path``
through pytest's ``pythonpath`` (LocalCluster workers inherit it) and through
``PYTHONPATH`` for the ``dask worker`` processes the tests start.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamattn.operators.protocol import Operator, State
from streamattn.sources import Block


@dataclass(frozen=True)
class SlowGramSpec:
    delay: float = 0.05


class SlowGram(Operator):
    """G = Σ_j k_j k_jᵀ in float64, sleeping ``delay`` seconds per block (a slow task)."""

    family = "test-slow-gram"
    Spec = SlowGramSpec

    def __init__(self, spec: SlowGramSpec) -> None:
        super().__init__(spec)
        self.gram = np.zeros((0, 0))

    def _update(self, block: Block) -> None:
        time.sleep(self.spec.delay)
        x = np.asarray(block.rows, dtype=np.float64)
        g = x.T @ x
        self.gram = g if self.gram.size == 0 else self.gram + g

    def _merge(self, other: SlowGram) -> None:
        self.gram = self.gram + other.gram

    def _state(self) -> State:
        return {"gram": self.gram}

    def _load(self, state: State) -> None:
        self.gram = np.array(state["gram"], dtype=np.float64)

    def result(self) -> Any:
        return self.gram.copy()

    def nbytes_bound(self, d: int) -> int:
        return 8 * d * d


def transitions_so_far(dask_scheduler: Any) -> int:
    """Length of the scheduler's transition log (run with ``client.run_on_scheduler``)."""
    return len(dask_scheduler.transition_log)


def rerun_tasks(start: int, dask_scheduler: Any) -> list[str]:
    """Keys of streamattn tasks that went to ``processing`` more than once since ``start``."""
    log = list(dask_scheduler.transition_log)[start:]
    starts = Counter(str(rec[0]) for rec in log if rec[2] == "processing")
    return [k for k, c in starts.items() if c > 1 and "streamattn-" in k]
