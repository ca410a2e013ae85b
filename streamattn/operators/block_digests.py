"""``BlockDigests``: the XXH3-64 digest of every block's bytes, keyed by row range (an
operator, so it runs wherever the blocks are read, Dask workers included).
:mod:`streamattn.io.readlog` uses it to refuse a store that changed under a checkpoint or a
saved state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from streamattn.operators.protocol import Operator, State
from streamattn.sources import Block
from streamattn.sources.keys import block_digest


@dataclass(frozen=True)
class BlockDigestsSpec:
    """Checksums of the blocks of a pass; ``max_blocks`` bounds the state's size."""

    max_blocks: int


class BlockDigests(Operator[BlockDigestsSpec, list[tuple[int, int, int]]]):
    """The row range and XXH3-64 digest (:func:`block_digest`) of every block folded
    (merge: the union, by row).

    Unlike the algorithms' operators its result depends on the chunking by design: it
    records the blocks as they were read. Memory: 24 bytes per block
    (``nbytes_bound`` = 24 · ``max_blocks``). State format 2: 64-bit digests (format 1
    held CRC-32s).
    """

    family = "block-digests"
    format_version = 2
    Spec = BlockDigestsSpec

    def __init__(self, spec: BlockDigestsSpec) -> None:
        super().__init__(spec)
        self.starts = np.zeros(0, dtype=np.int64)
        self.stops = np.zeros(0, dtype=np.int64)
        self.digests = np.zeros(0, dtype=np.uint64)

    def _update(self, block: Block) -> None:
        self._put(
            np.array([block.start], np.int64),
            np.array([block.stop], np.int64),
            np.array([block_digest(block)], np.uint64),
        )

    def _put(self, starts: np.ndarray, stops: np.ndarray, digests: np.ndarray) -> None:
        a = np.concatenate([self.starts, starts])
        order = np.argsort(a, kind="stable")
        self.starts = a[order]
        self.stops = np.concatenate([self.stops, stops])[order]
        self.digests = np.concatenate([self.digests, digests])[order]

    def _merge(self, other: BlockDigests) -> None:
        self._put(other.starts, other.stops, other.digests)

    def _state(self) -> State:
        return {"starts": self.starts, "stops": self.stops, "digests": self.digests}

    def _load(self, state: State) -> None:
        self.starts = np.array(state["starts"], dtype=np.int64)
        self.stops = np.array(state["stops"], dtype=np.int64)
        self.digests = np.array(state["digests"], dtype=np.uint64)

    def result(self) -> list[tuple[int, int, int]]:
        """``(start, stop, digest)`` per block, in row order."""
        return [
            (int(a), int(b), int(c))
            for a, b, c in zip(self.starts, self.stops, self.digests, strict=True)
        ]

    def nbytes_bound(self, d: int) -> int:
        return 24 * self.spec.max_blocks

    def resized(self, max_blocks: int) -> BlockDigests:
        """The same digests under a larger ``max_blocks`` (a store that grew)."""
        out = BlockDigests(BlockDigestsSpec(max(max_blocks, self.spec.max_blocks)))
        if self.n_rows:
            out.merge_unchecked(self)
        return out

    def merge_unchecked(self, other: BlockDigests) -> None:
        """Load ``other``'s blocks into an empty operator whatever its spec."""
        self.covered.union(other.covered)
        self._load(other._state())


def digests_for(source: Any, chunk_rows: int) -> BlockDigests:
    """An empty digest operator sized for ``source`` cut into blocks of ``chunk_rows``."""
    return BlockDigests(BlockDigestsSpec(-(-int(source.n) // max(1, int(chunk_rows)))))
