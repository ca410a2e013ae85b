"""The pass planner: recipes propose passes, the runner reads the store for them.

A *recipe* (an algorithm, :class:`Recipe`) is a generator of passes: it yields a
:class:`Pass` (named operators and a label), receives the finished operators, and either
yields the next pass or returns its typed result. It never touches an engine, a block
size default, a checkpoint or a head grid. The runner owns all of that:

- **one engine session** for the whole plan (one Dask cluster, started once);
- **the block size**: ``chunk_rows`` or the source's storage-aligned default, resolved
  once (``BlockStream.rows_per_block``) and handed to recipes in the :class:`PassContext`;
- **fusion**: the passes that several recipes propose in the same round are folded
  from one read of the store (``run`` with select + reduce items reads the store once
  per pass number);
- **checkpoint/resume per pass**: one ``Checkpointer`` for every engine (the local
  engine checkpoints block by block, the Dask engine by segments of merged partial
  states); operators with side effects (a pass that writes rows to a file) are marked
  ``resumable=False`` and run outside the checkpoint;
- **KV caches**: a recipe written for one head is lifted to a whole cache by running
  one copy per (layer, head) and wrapping each round's per-head operators in one
  ``MultiHead`` per name, so every head is served by the same read of each block;
- **a memory budget**: before each read, the sum of the operators' ``nbytes_bound``, the
  blocks in flight and the threads' own buffers is compared with ``memory_limit``; a plan
  over it is refused with ``MemoryBudgetError`` before any row is read, and the report
  records the projected peak next to the measured peak RSS;
- **prefix snapshots** (``run_pass(..., snapshots=(n1, n2, ...), on_snapshot=f)``): one
  read of the store, with ``f(n_i, ops)`` called when the operators hold exactly the first
  n_i rows, so a sweep over n costs one pass (the rows are read once, segment by segment,
  as :class:`RowRange` windows).
"""

from __future__ import annotations

import itertools
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

from streamattn.blas import single_blas_thread
from streamattn.engines import engine_session, run_operators
from streamattn.errors import ConfigError, MemoryBudgetError
from streamattn.io.checkpoint import RowWindow
from streamattn.memory import peak_rss_bytes
from streamattn.operators.gram_step import kernel_threads, work_bytes
from streamattn.operators.multihead import MultiHead
from streamattn.operators.protocol import Operator
from streamattn.progress import progress_bar
from streamattn.results import MultiHeadResult
from streamattn.sources import HeadView, KeySource, MultiHeadSource, open_keys

R = TypeVar("R")


def blocks_in_flight(source: KeySource | MultiHeadSource) -> int:
    """Blocks alive at once in a pass: the one being folded plus the source's read-ahead."""
    return 1 + source.READ_AHEAD


@dataclass
class Pass:
    """One proposed pass: operators by name, a progress label, and whether a checkpoint
    may resume it (False for operators that write rows to a file as they go)."""

    ops: dict[str, Operator]
    description: str
    resumable: bool = True
    #: The names a checkpoint must not resume (a fused pass: those of unresumable parts);
    #: None: every name when ``resumable`` is False, none otherwise.
    volatile: frozenset[str] | None = None


@dataclass(frozen=True)
class PassContext:
    """What a recipe may know about the run: the source (one head of a cache when lifted),
    the resolved block size and the engine's name (for certificates)."""

    source: KeySource | HeadView | MultiHeadSource
    chunk_rows: int
    engine: str


#: What a recipe's ``plan`` is: yields passes, receives their finished operators.
Plan = Generator[Pass, dict[str, Operator], R]


class Recipe(ABC, Generic[R]):
    """An algorithm as a sequence of passes (see the module docstring)."""

    #: On a KV cache: ``"lift"`` (one copy per (layer, head), wrapped in ``MultiHead``),
    #: ``"as-is"`` (its operators take whole-cache blocks) or ``"refuse"``.
    on_cache: str = "lift"

    @abstractmethod
    def plan(self, ctx: PassContext) -> Plan[R]:
        """Yield passes; return the result once the last pass's operators are in."""

    def describe(self) -> str:
        """A short name for messages."""
        return type(self).__name__


# ---------------------------------------------------------------------------- combinators
def fuse(plans: Sequence[Plan[Any]]) -> Plan[list[Any]]:
    """Run several plans side by side: each round, every unfinished plan's pass is folded
    into one pass (operator names prefixed ``"{i}/"``); returns their results in order."""
    results: list[Any] = [None] * len(plans)
    pending: dict[int, Pass] = {}
    try:
        for i, plan in enumerate(plans):
            _advance(plan, i, None, pending, results)
        while pending:
            order = sorted(pending)
            done = yield Pass(
                {f"{i}/{k}": op for i in order for k, op in pending[i].ops.items()},
                " + ".join(dict.fromkeys(pending[i].description for i in order)),
                all(pending[i].resumable for i in order),
                frozenset(f"{i}/{k}" for i in order for k in _volatile(pending[i])),
            )
            for i in order:
                mine = {k: done[f"{i}/{k}"] for k in pending[i].ops}
                del pending[i]
                _advance(plans[i], i, mine, pending, results)
        return results
    finally:
        for plan in plans:
            plan.close()


def _volatile(p: Pass) -> frozenset[str]:
    """Names of the operators of ``p`` that a checkpoint must not resume."""
    if p.volatile is not None:
        return p.volatile
    return frozenset() if p.resumable else frozenset(p.ops)


def _advance(
    plan: Plan[Any], i: int, done: dict[str, Operator] | None, pending: dict[int, Pass],
    results: list[Any],
) -> None:
    try:
        pending[i] = next(plan) if done is None else plan.send(done)
    except StopIteration as stop:
        results[i] = stop.value


def lift(recipe: Recipe[Any], source: MultiHeadSource, chunk_rows: int, engine: str
         ) -> Plan[MultiHeadResult]:
    """``recipe`` for every (layer, head) of a cache, from the passes of one head.

    Each round, the per-head operators named ``k`` become one ``MultiHead`` named ``k``
    (heads that propose no ``k`` this round hold no operator there); each head gets its
    own operators back. The result is a ``MultiHeadResult`` of the per-head results.
    """
    grid = [(lay, h) for lay in range(source.layers) for h in range(source.heads)]
    plans = {
        (lay, h): recipe.plan(PassContext(source.head(lay, h), chunk_rows, engine))
        for lay, h in grid
    }
    items: list[list[Any]] = [[None] * source.heads for _ in range(source.layers)]
    pending: dict[tuple[int, int], Pass] = {}
    try:
        for key, plan in plans.items():
            _advance_head(plan, key, None, pending, items)
        while pending:
            names = list(dict.fromkeys(k for p in pending.values() for k in p.ops))
            wrapped = {
                k: MultiHead.of(
                    [[pending[(lay, h)].ops.get(k) if (lay, h) in pending else None
                      for h in range(source.heads)] for lay in range(source.layers)]
                )
                for k in names
            }
            first = next(iter(pending.values()))
            done = yield Pass(
                dict(wrapped), first.description, all(p.resumable for p in pending.values())
            )
            for key in sorted(pending):
                lay, h = key
                mine = {}
                for k in pending[key].ops:
                    op = done[k]
                    assert isinstance(op, MultiHead)
                    head_op = op.ops[lay][h]
                    assert head_op is not None
                    mine[k] = head_op
                del pending[key]
                _advance_head(plans[key], key, mine, pending, items)
        return MultiHeadResult(items, source.layer_ids, source.head_ids)
    finally:
        for plan in plans.values():
            plan.close()


def _advance_head(
    plan: Plan[Any], key: tuple[int, int], done: dict[str, Operator] | None,
    pending: dict[tuple[int, int], Pass], items: list[list[Any]],
) -> None:
    """One head's recipe to its next pass or its result, with one BLAS thread: its work
    between passes is d × d factorisations (SVDs of the final factor, ...), ~15× slower
    with OpenBLAS threads on 2 cores, times layers × heads."""
    try:
        with single_blas_thread():
            pending[key] = next(plan) if done is None else plan.send(done)
    except StopIteration as stop:
        items[key[0]][key[1]] = stop.value


# ---------------------------------------------------------------------------- the budget
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | str | None) -> int | None:
    """``memory_limit`` as bytes: an integer, or a string such as ``"512MiB"``/``"2GB"``."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"memory_limit must be bytes (int) or e.g. '4GiB', got {value!r}.")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"memory_limit must be >= 1 byte, got {value}.")
        return value
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if m is None or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise ConfigError(
            f"memory_limit must be bytes (int) or a size such as '512MiB' or '4GB', "
            f"got {value!r}."
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def projected_bytes(source: KeySource | MultiHeadSource, ops: Sequence[Operator],
                    chunk_rows: int) -> dict[str, int]:
    """The projected peak of one pass: operator states (``nbytes_bound``), blocks in
    flight, and the threads' own buffers: each reader thread's (a compressed store's frame
    and chunk, ``reader_scratch_bytes``) and each kernel thread's work buffers
    (``gram_step.work_bytes``; their number grows with the cores, not with n)."""
    states = sum(int(op.nbytes_bound(source.d)) for op in ops)
    blocks = blocks_in_flight(source) * chunk_rows * source.row_nbytes()
    threads = (source.READ_AHEAD * source.reader_scratch_bytes()
               + kernel_threads(len(ops)) * work_bytes(source.d))
    return {"operators": states, "blocks": blocks, "threads": threads,
            "total": states + blocks + threads}


# ---------------------------------------------------------------------------- the runner
@dataclass
class RunReport:
    """What the runner did: one entry per read of the store, and the memory picture."""

    engine: str
    chunk_rows: int
    memory_limit: int | None
    passes: list[dict[str, Any]] = field(default_factory=list)
    measured_peak_rss_bytes: int = 0

    @property
    def projected_peak_bytes(self) -> int:
        return max((p["projected_bytes"]["total"] for p in self.passes), default=0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "chunk_rows": self.chunk_rows,
            "reads": len(self.passes),
            "memory_limit": self.memory_limit,
            "projected_peak_bytes": self.projected_peak_bytes,
            "measured_peak_rss_bytes": self.measured_peak_rss_bytes,
            "projection_note": "projected: sum of the operators' nbytes_bound plus "
            "the blocks in flight (the one folded and the source's READ_AHEAD) and the "
            "reader and kernel threads' own buffers; measured: "
            "the process's peak RSS "
            "(interpreter, libraries and any earlier work included)",
            "passes": self.passes,
        }


@dataclass
class Outcome(Generic[R]):
    """The recipes' results (in order) and the run report."""

    results: list[R]
    report: RunReport


def run_recipes(
    source: Any,
    recipes: Sequence[Recipe[Any]],
    *,
    engine: str = "local",
    chunk_rows: int | None = None,
    progress: bool = False,
    checkpoint: Any = None,
    memory_limit: int | str | None = None,
    array: str | None = None,
    **engine_options: Any,
) -> Outcome[Any]:
    """Run ``recipes`` over one source, their passes fused round by round.

    ``source``: a ``KeySource``, a ``MultiHeadSource`` (liftable recipes then run for
    every head) or anything ``open_keys`` accepts. ``checkpoint``: a
    ``streamattn.io.checkpoint.Checkpointer`` (resumable passes). ``memory_limit``: bytes
    (or ``"4GiB"``); a pass whose projected peak exceeds it is refused before its read.
    ``engine_options``: the engine's settings (Dask: ``scheduler``, ``client``, ...).
    """
    src = open_keys(source, array=array)
    rows = src.rows_per_block(chunk_rows)
    limit = parse_bytes(memory_limit)
    if isinstance(src, MultiHeadSource):
        _check_cache_engine(src, engine)
        plans: list[Plan[Any]] = []
        for r in recipes:
            if r.on_cache == "refuse":
                raise ConfigError(
                    f"{src.label}: {r.describe()} takes a single-head key store; select per "
                    "head for a multi-head KV cache."
                )
            lifted = r.on_cache == "lift"
            plans.append(lift(r, src, rows, engine) if lifted else
                         r.plan(PassContext(src, rows, engine)))
    else:
        ctx = PassContext(src, rows, engine)
        plans = [r.plan(ctx) for r in recipes]
    report = RunReport(engine, rows, limit)
    plan = fuse(plans)
    try:
        with engine_session(engine, progress=progress, **engine_options) as options:
            results = _drive(plan, src, rows, engine, progress, checkpoint, limit, report,
                             options)
    finally:
        plan.close()
    report.measured_peak_rss_bytes = peak_rss_bytes()
    return Outcome(results, report)


def _drive(
    plan: Plan[list[Any]], src: KeySource | MultiHeadSource, rows: int, engine: str,
    progress: bool, checkpoint: Any, limit: int | None, report: RunReport,
    options: dict[str, Any],
) -> list[Any]:
    try:
        step = next(plan)
    except StopIteration as stop:
        return list(stop.value)
    while True:
        volatile = _volatile(step)
        groups = [list(step.ops)]
        if checkpoint is not None and volatile and len(volatile) < len(step.ops):
            groups = [[k for k in step.ops if k not in volatile],
                      [k for k in step.ops if k in volatile]]
        needs = [projected_bytes(src, [step.ops[k] for k in names], rows) for names in groups]
        for need in needs:  # every read of this round is checked before the first one
            if limit is not None and need["total"] > limit:
                what = "nothing was read" if not report.passes else "it was not started"
                raise MemoryBudgetError(
                    f"{src.label}: the pass '{step.description}' needs up to "
                    f"{_mib(need['total'])} ({_mib(need['operators'])} of operator state, "
                    f"{_mib(need['blocks'])} of blocks of {rows} rows, "
                    f"{_mib(need['threads'])} of thread buffers), over memory_limit = "
                    f"{_mib(limit)}; {what}. Lower chunk_rows, ask for fewer or smaller "
                    "sets, or raise memory_limit."
                )
        done: dict[str, Operator] = {}
        for names, need in zip(groups, needs, strict=True):
            ops = [step.ops[k] for k in names]
            resumable = not any(k in volatile for k in names)
            t0 = time.perf_counter()
            finished = run_operators(
                src, ops, engine=engine, chunk_rows=rows, progress=progress,
                description=step.description,
                checkpoint=checkpoint if resumable else None, **options,
            )
            done.update(zip(names, finished, strict=True))
            report.passes.append({
                "description": step.description,
                "operators": len(ops),
                "checkpointed": checkpoint is not None and resumable,
                "projected_bytes": need,
                "seconds": time.perf_counter() - t0,
            })
        try:
            step = plan.send(done)
        except StopIteration as stop:
            return list(stop.value)


def _mib(x: int) -> str:
    return f"{x / 2**20:.1f} MiB"


def _check_cache_engine(source: MultiHeadSource, engine: str) -> None:
    if engine != "local" and (source.path is None or source.declared or source.subset):
        raise ConfigError(
            f"{source.label}: the {engine} engine's workers open a KV cache by path "
            "and read all of it with its head layout from disk (a 4-D array or "
            "keys/layer_{l} arrays with an n_heads attribute); an in-memory cache, a 2-D "
            "array split by a declared n_heads, or a layers/heads subset runs on engine: "
            "local."
        )


@contextmanager
def session(engine: str = "local", *, progress: bool = False, **engine_options: Any
            ) -> Iterator[dict[str, Any]]:
    """One engine session across several planner calls (an iterative solver's passes):
    yields the options to give ``run_pass`` / ``run_recipes`` (a live Dask client
    included), so the cluster is started once."""
    with engine_session(engine, progress=progress, **engine_options) as options:
        yield options


# ---------------------------------------------------------------------------- small recipes
class FromPlan(Recipe[R]):
    """A recipe from a function ``ctx -> plan`` (single-head sources)."""

    on_cache = "refuse"

    def __init__(self, make: Callable[[PassContext], Plan[R]], name: str = "this recipe") -> None:
        self.make, self.name = make, name

    def describe(self) -> str:
        return self.name

    def plan(self, ctx: PassContext) -> Plan[R]:
        return self.make(ctx)


class OnePass(Recipe[list[Operator]]):
    """The simplest recipe: one pass of the given operators; returns them finished."""

    def __init__(self, ops: Sequence[Operator], description: str = "pass") -> None:
        self.ops = list(ops)
        self.description = description
        self.on_cache = "as-is"  # the operators are built for the source as it is

    def plan(self, ctx: PassContext) -> Plan[list[Operator]]:
        done = yield Pass({str(i): op for i, op in enumerate(self.ops)}, self.description)
        return [done[str(i)] for i in range(len(self.ops))]


def run_pass(
    source: Any,
    ops: Sequence[Operator],
    *,
    description: str = "pass",
    snapshots: Sequence[int] | None = None,
    on_snapshot: Callable[[int, list[Operator]], None] | None = None,
    **run: Any,
) -> list[Operator]:
    """One pass of ``ops`` through the runner (session, block size, budget); returns them.

    ``snapshots``: row counts n_1 < n_2 < … ≤ n at which ``on_snapshot(n_i, ops)`` is
    called, when ``ops`` have folded exactly rows ``[0, n_i)``; the pass then goes on to
    the end of the source (see :func:`run_snapshots`).
    """
    if snapshots is not None:
        if on_snapshot is None:
            raise ConfigError("run_pass: snapshots= needs on_snapshot= (what to do at each n).")
        return run_snapshots(source, ops, snapshots, on_snapshot, description=description,
                             **run)
    if on_snapshot is not None:
        raise ConfigError("run_pass: on_snapshot= without snapshots= is never called.")
    out: list[Operator] = run_recipes(source, [OnePass(ops, description)], **run).results[0]
    return out


# ---------------------------------------------------------------------------- snapshots
class RowRange(RowWindow):
    """``source`` restricted to rows ``[start, stop)``, global row numbers kept, for every
    engine: ``blocks`` (the local engine) and ``block_ranges`` (the Dask engine) cover the
    window only; ``keys``/``values`` are the window's rows (``RowWindow``); ``n``, ``read``
    and everything else are the source's, so operators see the same blocks (same ``start``)
    as in a pass over the whole source that starts a block at ``start``."""

    def __init__(self, source: Any, start: int, stop: int) -> None:
        if not 0 <= start < stop <= source.n:
            raise ConfigError(
                f"{source.label}: row range [{start}, {stop}) is empty or outside [0, {source.n})."
            )
        super().__init__(source, start, stop)
        self.start, self.stop = start, stop

    def blocks(self, chunk_rows: int | None = None, *, start: int = 0, stop: int | None = None,
               prefetch: int | None = None, digests: bool = False) -> Iterator[Any]:
        a = max(start, self.start)
        b = self.stop if stop is None else min(stop, self.stop)
        return iter(()) if b <= a else self._source.blocks(
            chunk_rows, start=a, stop=b, prefetch=prefetch, digests=digests
        )


def snapshot_rows(snapshots: Sequence[int], n: int, label: str) -> list[int]:
    """``snapshots`` checked: integers, strictly increasing, each in [1, n]."""
    cuts = [int(c) for c in snapshots]
    if any(c != s for c, s in zip(cuts, snapshots, strict=True)) or not cuts:
        raise ConfigError(f"{label}: snapshots must be a non-empty list of row counts, "
                          f"got {list(snapshots)!r}.")
    if any(b <= a for a, b in itertools.pairwise(cuts)) or cuts[0] < 1 or cuts[-1] > n:
        raise ConfigError(f"{label}: snapshots must increase strictly within [1, {n}] (the "
                          f"source's rows), got {cuts}.")
    return cuts


def run_snapshots(
    source: Any,
    ops: Sequence[Operator],
    snapshots: Sequence[int],
    on_snapshot: Callable[[int, list[Operator]], None],
    *,
    description: str = "pass",
    engine: str = "local",
    chunk_rows: int | None = None,
    progress: bool = False,
    checkpoint: Any = None,
    memory_limit: int | str | None = None,
    array: str | None = None,
    **engine_options: Any,
) -> list[Operator]:
    """One pass of ``ops`` over ``source``, calling ``on_snapshot(n_i, ops)`` at each prefix.

    The rows are read once, as the segments ``[0, n_1), [n_1, n_2), …, [n_k, n)`` (each a
    :class:`RowRange` through the planner: one engine session, the block size, the memory
    budget), folded into the same operators in order. Guarantee: at ``n_i`` the operators
    have folded exactly the rows ``[0, n_i)``, in blocks of ``chunk_rows`` that start at
    0, n_1, …, n_{i-1}; on the local engine that is the same sequence of ``update`` calls
    as a separate pass over the first n_i rows whenever the earlier snapshots are multiples
    of the block size (then bit for bit equal; otherwise equal up to the operator's chunk
    invariance, i.e. float rounding). On the Dask engine each segment is a merge tree whose
    state is merged into ``ops`` (equal up to merge-order rounding, the operator laws).
    ``on_snapshot`` must not change ``ops`` (it may read ``result()``). A checkpoint is
    refused: a resumed run could not replay the snapshots it skipped.
    """
    src = open_keys(source, array=array)
    if checkpoint is not None:
        raise ConfigError(
            f"{src.label}: snapshots do not combine with a checkpoint (a resumed pass would "
            "skip the snapshots before its resume point); run the pass without one."
        )
    if isinstance(src, MultiHeadSource) and engine != "local":
        raise ConfigError(f"{src.label}: snapshots of a KV cache run on engine: local.")
    cuts = snapshot_rows(snapshots, src.n, src.label)
    rows = src.rows_per_block(chunk_rows)
    limit = parse_bytes(memory_limit)
    report = RunReport(engine, rows, limit)
    folded = list(ops)
    with engine_session(engine, progress=progress, **engine_options) as options, \
            progress_bar(src.n, description, enabled=progress) as bar:
        start = 0
        for stop in dict.fromkeys([*cuts, src.n]):
            if stop > start:
                window = RowRange(src, start, stop)
                plan = OnePass(folded, f"{description} rows [{start}, {stop})").plan(
                    PassContext(src, rows, engine)
                )
                # a RowRange reads like its source (duck-typed), restricted to the window;
                # one progress bar for the whole pass (a segment's engine bar would count n)
                _drive(_single(plan), cast(KeySource, window), rows, engine, False, None,
                       limit, report, options)
                bar.update(stop - start)
            start = stop
            if stop in cuts:
                on_snapshot(stop, folded)
    return folded


def _single(plan: Plan[R]) -> Plan[list[R]]:
    """A one-recipe plan in the shape ``_drive`` takes (a list of results)."""
    result = yield from plan
    return [result]


__all__ = [
    "FromPlan",
    "OnePass",
    "Outcome",
    "Pass",
    "PassContext",
    "Plan",
    "Recipe",
    "RowRange",
    "RunReport",
    "fuse",
    "lift",
    "parse_bytes",
    "projected_bytes",
    "run_pass",
    "run_recipes",
    "run_snapshots",
    "session",
    "snapshot_rows",
]
