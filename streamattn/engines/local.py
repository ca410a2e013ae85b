"""The local engine: one sequential pass folding every block through every operator.

Reads run ahead in a background thread (``KeySource.blocks``), so reading and
decompressing the next block overlaps with the BLAS work on the current one. Several
operators share each block: one read of the data serves them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from streamattn.operators.protocol import Operator
from streamattn.progress import progress_bar
from streamattn.sources import BlockStream


def run_local(
    source: BlockStream,
    operators: Sequence[Operator[Any, Any]],
    *,
    chunk_rows: int | None = None,
    start: int = 0,
    stop: int | None = None,
    progress: bool = False,
    prefetch: int = 2,
    description: str = "pass",
    checkpoint: Any = None,
) -> list[Operator[Any, Any]]:
    """Fold rows ``[start, stop)`` of ``source`` into each operator, in order, in place.

    With a ``checkpoint`` (``streamattn.io.checkpoint.Checkpointer``) the pass starts from
    the saved states and position when there are any, offers a checkpoint after every
    block, and records the final states: same blocks, same operations, same result.
    """
    ops = list(operators)
    stop = source.n if stop is None else stop
    if checkpoint is not None:
        chunk_rows = source.rows_per_block(chunk_rows)
        start = checkpoint.begin(source, ops, start=start, stop=stop, chunk_rows=chunk_rows)
    folded = ops if checkpoint is None else [*ops, checkpoint.reads]  # + read checksums
    with progress_bar(stop - start, description, enabled=progress) as bar:
        # with a checkpoint, the read log's digest of each block is taken by the reader thread
        for block in source.blocks(chunk_rows, start=start, stop=stop, prefetch=prefetch,
                                   digests=checkpoint is not None):
            for op in folded:
                op.update(block)
            bar.update(block.rows.shape[0])
            if checkpoint is not None:
                checkpoint.step(source, ops, block.stop)
    if checkpoint is not None:
        checkpoint.end(source, ops, stop)
    return ops
