"""The local engine: one sequential pass folding every block through every operator.

Reads run ahead in background threads (``KeySource.blocks``: one per block read ahead), so
reading and decompressing the next blocks overlaps with the BLAS work on the current one. Several
operators share each block: one read of the data serves them all; those that allow it
(``Operator.concurrent_updates``: the leverage set, JL embeddings, top-B) fold it side by
side in threads (their kernels release the GIL), the same arithmetic as one after another.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
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
    prefetch: int | None = None,
    description: str = "pass",
    checkpoint: Any = None,
) -> list[Operator[Any, Any]]:
    """Fold rows ``[start, stop)`` of ``source`` into each operator, in order, in place.

    ``prefetch``: blocks read ahead (None: the source's ``READ_AHEAD``). With a
    ``checkpoint`` (``streamattn.io.checkpoint.Checkpointer``) the pass starts from
    the saved states and position when there are any, offers a checkpoint after every
    block, and records the final states: same blocks, same operations, same result.
    """
    ops = list(operators)
    stop = source.n if stop is None else stop
    if checkpoint is not None:
        chunk_rows = source.rows_per_block(chunk_rows)
        start = checkpoint.begin(source, ops, start=start, stop=stop, chunk_rows=chunk_rows)
    folded = ops if checkpoint is None else [*ops, checkpoint.reads]  # + read checksums
    # operators that may run side by side (Operator.concurrent_updates) fold each block at
    # the same time, the first in this thread; each still sees every block in order
    beside = [op for op in ops if op.concurrent_updates]
    if len(beside) < 2:
        beside = []
    inline = [op for op in folded if all(op is not b for b in beside)]
    with (progress_bar(stop - start, description, enabled=progress) as bar,
          ThreadPoolExecutor(max(1, len(beside) - 1),
                             thread_name_prefix="streamattn-ops") as pool):
        # with a checkpoint, the read log's digest of each block is taken by its reader thread
        for block in source.blocks(chunk_rows, start=start, stop=stop, prefetch=prefetch,
                                   digests=checkpoint is not None):
            _fold_block(block, beside, inline, pool)
            bar.update(block.rows.shape[0])
            if checkpoint is not None:
                checkpoint.step(source, ops, block.stop)
    if checkpoint is not None:
        checkpoint.end(source, ops, stop)
    return ops


def _fold_block(block: Any, beside: list[Operator[Any, Any]],
                inline: list[Operator[Any, Any]], pool: ThreadPoolExecutor) -> None:
    """``beside[1:]`` in the pool while ``beside[0]`` and then ``inline`` run here; returns
    when all are done (re-raising the first error, after every update has stopped)."""
    futures = [pool.submit(op.update, block) for op in beside[1:]]
    try:
        for op in [*beside[:1], *inline]:
            op.update(block)
    finally:
        wait(futures)
    for fut in futures:
        fut.result()
