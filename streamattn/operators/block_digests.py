"""``BlockDigests``: the CRC-32 of every block's bytes, keyed by row range (an operator, so
it runs wherever the blocks are read, Dask workers included). :mod:`streamattn.io.readlog`
uses it to refuse a store that changed under a checkpoint or a saved state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from streamattn.operators.protocol import Operator, State
from streamattn.sources import Block
from streamattn.sources.keys import block_crc


@dataclass(frozen=True)
class BlockDigestsSpec:
    """Checksums of the blocks of a pass; ``max_blocks`` bounds the state's size."""

    max_blocks: int


class BlockDigests(Operator[BlockDigestsSpec, list[tuple[int, int, int]]]):
    """The row range and CRC-32 of every block folded (merge: the union, by row).

    Unlike the algorithms' operators its result depends on the chunking by design: it
    records the blocks as they were read. Memory: 20 bytes per block
    (``nbytes_bound`` = 20 · ``max_blocks``).
    """

    family = "block-digests"
    Spec = BlockDigestsSpec

    def __init__(self, spec: BlockDigestsSpec) -> None:
        super().__init__(spec)
        self.starts = np.zeros(0, dtype=np.int64)
        self.stops = np.zeros(0, dtype=np.int64)
        self.crcs = np.zeros(0, dtype=np.uint32)

    def _update(self, block: Block) -> None:
        self._put(
            np.array([block.start], np.int64),
            np.array([block.stop], np.int64),
            np.array([block_crc(block)], np.uint32),
        )

    def _put(self, starts: np.ndarray, stops: np.ndarray, crcs: np.ndarray) -> None:
        a = np.concatenate([self.starts, starts])
        order = np.argsort(a, kind="stable")
        self.starts = a[order]
        self.stops = np.concatenate([self.stops, stops])[order]
        self.crcs = np.concatenate([self.crcs, crcs])[order]

    def _merge(self, other: BlockDigests) -> None:
        self._put(other.starts, other.stops, other.crcs)

    def _state(self) -> State:
        return {"starts": self.starts, "stops": self.stops, "crcs": self.crcs}

    def _load(self, state: State) -> None:
        self.starts = np.array(state["starts"], dtype=np.int64)
        self.stops = np.array(state["stops"], dtype=np.int64)
        self.crcs = np.array(state["crcs"], dtype=np.uint32)

    def result(self) -> list[tuple[int, int, int]]:
        """``(start, stop, crc32)`` per block, in row order."""
        return [
            (int(a), int(b), int(c))
            for a, b, c in zip(self.starts, self.stops, self.crcs, strict=True)
        ]

    def nbytes_bound(self, d: int) -> int:
        return 20 * self.spec.max_blocks

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
