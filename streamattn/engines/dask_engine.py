"""The Dask engine: blocks folded on the workers, partial states merged in a tree.

The graph, for ``L`` leaves and ``split_every = s``::

    payload ─┬─► leaf 0 ─┐
             ├─► leaf 1 ─┼─► merge ─┐
             ├─►  ...    ┘          ├─► ... ─► root ─► client: from_state → finalise
             └─► leaf L-1 ─► merge ─┘

- **leaf i** reads ``blocks_per_task`` consecutive blocks *itself* — a store on disk is
  opened by path on the worker (``open_keys`` + ``KeySource.read``: validated, NaN/Inf
  and read errors named by row), an in-memory numpy/dask array arrives as the dask
  array's own chunks — and folds them, in order and with read-ahead, into fresh
  operators, exactly as the local engine does. It returns only their states
  (``Operator.to_state()``: flat dicts of plain numpy arrays); for a store, the key
  matrix never travels through the client.
- **merge** tasks fold up to ``split_every`` states each (``Operator.merge``), in block
  order, so the tree, and hence the float rounding, is fixed by the settings.
- **payload** is one graph key holding the operators' classes (pickled by reference, so
  unpickling imports their module and registers the family on the worker), their empty
  states (the spec, seeds and array-valued fields included) and the client's streamattn
  version. Every leaf and merge depends on this one key, so a spec with large array
  fields is shipped once per worker, not once per task. On a distributed cluster it is
  scattered to every worker before the graph is submitted: as a task of the graph it would
  live on the one worker that ran it, and the scheduler would place every leaf there.

Why a hand-built low-level graph rather than ``dask.array.reduction``, ``dask.bag`` or
the futures API: the graph is exactly one task per leaf plus about ``L/(s−1)`` merges —
for 2^17 blocks, 149 798 tasks with one block per leaf and 18 726 with eight, built in
well under a second — with no per-block array metadata, no ``meta`` inference on
dict-valued chunks (which ``reduction`` needs) and no partition/flatten layers (which
``bag`` adds). Unlike an ``as_completed`` futures loop, the whole tree is known to the
scheduler up front, so ``dask.order`` runs merges as soon as their inputs exist (bounded
memory), retries and lost-worker recomputation are the scheduler's own, and the result
is deterministic.

The engine knows the protocol only (``empty``, ``update``, ``merge``, ``to_state``,
``from_state``, ``result`` on the client): no algorithm-specific code.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import re
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

import streamattn
from streamattn.cores import usable_cores
from streamattn.errors import ConfigError, InvalidInputError, StreamattnError
from streamattn.operators.gram_step import STREAM_THREADS_ENV
from streamattn.operators.protocol import Operator, State
from streamattn.sources import Block, BlockStream, KeySource, open_keys
from streamattn.sources.keys import BufferPool, pooled_read

SCHEDULERS = ("threads", "local-cluster")
#: A scheduler address: tcp:// or tls://, a host name, IPv4 or [IPv6] address, and a port.
SCHEDULER_ADDRESS = re.compile(r"(tcp|tls)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):[0-9]{1,5}")
DEFAULT_SPLIT_EVERY = 8
DEFAULT_RETRIES = 2
DEFAULT_TIMEOUT = 30.0
MAX_AUTO_BLOCKS_PER_TASK = 64


# ---------------------------------------------------------------------------- options
@dataclass(frozen=True)
class DaskOptions:
    """Settings of a Dask run (the ``engine:`` config section, CLI flags, Python kwargs).

    Attributes
    ----------
    scheduler : ``"threads"`` (dask's local threaded scheduler, this process),
        ``"local-cluster"`` (a ``distributed.LocalCluster`` started and closed for the
        run) or ``"tcp://host:port"`` (an existing ``dask scheduler``).
    n_workers : worker processes of a LocalCluster (default: dask's choice from the cores).
    threads_per_worker : threads per LocalCluster worker, or the thread count of the
        threads scheduler (default: dask's choice).
    split_every : fan-in of the merge tree (>= 2).
    blocks_per_task : consecutive blocks each leaf task reads and folds (default: auto,
        see :func:`auto_blocks_per_task`).
    retries : extra attempts for a failed task before the run fails.
    timeout : seconds to wait for the scheduler and for the first worker.
    dashboard : serve the LocalCluster dashboard (link printed when progress is on).
    """

    scheduler: str = "threads"
    n_workers: int | None = None
    threads_per_worker: int | None = None
    split_every: int = DEFAULT_SPLIT_EVERY
    blocks_per_task: int | None = None
    retries: int = DEFAULT_RETRIES
    timeout: float = DEFAULT_TIMEOUT
    dashboard: bool = True

    @classmethod
    def from_kwargs(cls, options: dict[str, Any]) -> DaskOptions:
        """Build from keyword options, refusing unknown names with a ConfigError."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ConfigError(
                f"options {unknown} are not understood by the dask engine; known: {names}."
            )
        out = cls(**options)
        out.check()
        return out

    def check(self) -> None:
        """Raise ConfigError naming the first bad setting."""
        s = self.scheduler
        if not isinstance(s, str) or not (s in SCHEDULERS or SCHEDULER_ADDRESS.fullmatch(s)):
            raise ConfigError(
                f"engine.scheduler must be 'threads', 'local-cluster' or a scheduler address "
                f"'tcp://HOST:PORT' or 'tls://HOST:PORT' (port 1-65535; tls needs the "
                f"distributed.comm.tls settings), got {s!r}."
            )
        if s not in SCHEDULERS and not 0 < int(s.rsplit(":", 1)[1]) < 65536:
            raise ConfigError(f"engine.scheduler {s!r}: the port must be in 1..65535.")
        for name in ("n_workers", "threads_per_worker", "blocks_per_task"):
            value = getattr(self, name)
            if value is not None and (_not_int(value) or value < 1):
                raise ConfigError(f"engine.{name} must be an integer >= 1, got {value!r}.")
        if _not_int(self.split_every) or self.split_every < 2:
            raise ConfigError(
                f"engine.split_every must be an integer >= 2, got {self.split_every!r}."
            )
        if _not_int(self.retries) or self.retries < 0:
            raise ConfigError(f"engine.retries must be an integer >= 0, got {self.retries!r}.")
        if (
            isinstance(self.timeout, bool)
            or not isinstance(self.timeout, (int, float))
            or not (self.timeout > 0)
        ):
            raise ConfigError(
                f"engine.timeout must be a number of seconds > 0, got {self.timeout!r}."
            )
        if not isinstance(self.dashboard, bool):
            raise ConfigError(f"engine.dashboard must be true or false, got {self.dashboard!r}.")


def _not_int(value: Any) -> bool:
    return isinstance(value, bool) or not isinstance(value, (int, np.integer))


# ---------------------------------------------------------------------------- worker side
@dataclass(frozen=True)
class _Payload:
    """What every task needs besides its block: operator classes, empty states, version."""

    classes: tuple[type[Operator], ...]
    empties: tuple[State, ...]
    version: str

    def fresh(self) -> list[Operator]:
        if streamattn.__version__ != self.version:
            raise StreamattnError(
                f"worker {socket.gethostname()} runs streamattn {streamattn.__version__}, "
                f"the client {self.version}; install the same version on every worker."
            )
        return [
            cls.from_state(state) for cls, state in zip(self.classes, self.empties, strict=True)
        ]


@dataclass(frozen=True)
class _StoreRef:
    """A store on disk as the workers open it: absolute path, array name, expected shape."""

    path: str
    array: str | None
    n: int
    d: int
    dtype: str
    label: str
    run: str  # a per-run token: each run reopens the store (fresh metadata)
    fill_missing: bool = False  # read missing chunk files as the fill value (opt-in)


@functools.lru_cache(maxsize=8)
def _open_store(ref: _StoreRef) -> KeySource:
    """Open (once per process and run) the store a task reads, checking it is the same."""
    try:
        src = open_keys(ref.path, array=ref.array, fill_missing=ref.fill_missing)
    except StreamattnError as exc:
        raise InvalidInputError(
            f"worker {socket.gethostname()} cannot read the store {ref.label}: {exc} "
            "Workers open the store themselves by path: put it on storage every worker "
            "reaches at the same path (a shared filesystem)."
        ) from exc
    if (src.n, src.d, str(src.dtype)) != (ref.n, ref.d, ref.dtype):
        raise InvalidInputError(
            f"worker {socket.gethostname()} sees {ref.label} as {src.n} x {src.d} "
            f"{src.dtype}, the client as {ref.n} x {ref.d} {ref.dtype}: the workers must "
            "read the same store as the client (shared storage, same path)."
        )
    return src


class _RowWindow:
    """Rows ``[start, start + len(rows))`` of an ``(n, d)`` matrix, indexed globally.

    Lets an in-memory block be validated by ``KeySource.read`` with global row numbers
    in its messages.
    """

    def __init__(self, rows: np.ndarray, start: int, n: int) -> None:
        self.rows = rows
        self.start = start
        self.shape = (n, *rows.shape[1:])
        self.dtype = rows.dtype

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self.rows[rows.start - self.start : rows.stop - self.start]


def _fold(payload: _Payload, blocks: Iterable[Block], label: str) -> list[State]:
    """Fold consecutive blocks into fresh operators, as the local engine does; states out."""
    ops = payload.fresh()
    for block in blocks:
        try:
            for op in ops:
                op.update(block)
        except StreamattnError:
            raise
        except Exception as exc:
            raise StreamattnError(
                f"{label}: folding rows [{block.start}, {block.stop}) failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    return [op.to_state() for op in ops]


def _read_ahead(
    read: Callable[[int, int], Block], ranges: Sequence[tuple[int, int]]
) -> Iterator[Block]:
    """Yield the blocks in order, reading the next one in a background thread.

    Within a task, reading/decompressing block i+1 overlaps the BLAS work on block i
    (both release the GIL), as in the local engine; at most two blocks are alive, read
    into two pooled buffers (``BufferPool``: no page faults per block, which matters on
    Dask workers, whose nanny sets MALLOC_TRIM_THRESHOLD_).
    """
    if len(ranges) == 1:
        yield read(*ranges[0])
        return
    buffers = BufferPool(2, patience=0.1)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamattn-task-read") as pool:
        pending = pool.submit(pooled_read, buffers, read, *ranges[0])
        for nxt in ranges[1:]:
            block = pending.result()
            pending = pool.submit(pooled_read, buffers, read, *nxt)
            yield block
        yield pending.result()


def _read_retrying(src: KeySource, start: int, stop: int, attempts: int) -> Block:
    """Read a block; retry read *errors* (not bad values) up to ``attempts - 1`` times.

    Used by the threads scheduler, which has no task retries of its own; on a
    distributed cluster ``attempts`` is 1 and the scheduler retries the whole task.
    """
    for attempt in range(attempts):
        try:
            return src.read(start, stop)
        except InvalidInputError as exc:
            # KeySource.read chains the underlying I/O or codec error; NaN/Inf or shape
            # errors have no cause and would fail the same way again.
            if exc.__cause__ is None or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _leaf_store(
    payload: _Payload, ref: _StoreRef, ranges: list[tuple[int, int]], attempts: int
) -> list[State]:
    """A leaf over a store on disk: open it by path, read and fold its blocks in order."""
    src = _open_store(ref)
    blocks = _read_ahead(lambda a, b: _read_retrying(src, a, b, attempts), ranges)
    return _fold(payload, blocks, ref.label)


def _window_block(
    rows: np.ndarray, values: np.ndarray | None, start: int, n: int, label: str
) -> Block:
    window = KeySource(
        _RowWindow(np.asarray(rows), start, n),
        label=label,
        values=None if values is None else _RowWindow(np.asarray(values), start, n),
    )
    return window.read(start, start + rows.shape[0])


def _leaf_array(
    payload: _Payload,
    rows: list[np.ndarray],
    values: list[np.ndarray] | None,
    starts: list[int],
    n: int,
    label: str,
) -> list[State]:
    """A leaf over in-memory chunks (dask array blocks), validated like a store's reads."""
    vals = values if values is not None else [None] * len(rows)
    blocks = (_window_block(r, v, a, n, label) for r, v, a in zip(rows, vals, starts, strict=True))
    return _fold(payload, blocks, label)


def _merge_states(payload: _Payload, children: list[list[State]]) -> list[State]:
    """Merge the children's states operator by operator, in block order."""
    ops = payload.fresh()
    for states in children:
        for op, state in zip(ops, states, strict=True):
            op.merge(Operator.from_state(state))
    return [op.to_state() for op in ops]


def _worker_probe(ref: _StoreRef | None) -> dict[str, Any]:
    """Run on each worker before a pass: its streamattn version and the store as it sees it."""
    info: dict[str, Any] = {"streamattn": streamattn.__version__, "host": socket.gethostname()}
    if ref is not None:
        try:
            src = open_keys(ref.path, array=ref.array, fill_missing=ref.fill_missing)
            info["store"] = [src.n, src.d, str(src.dtype)]
        except Exception as exc:
            info["store_error"] = f"{type(exc).__name__}: {exc}"
    return info


# ---------------------------------------------------------------------------- the graph
@dataclass
class MergeGraph:
    """A task graph folding ``ranges`` into the operators and merging the states in a tree.

    Attributes
    ----------
    dsk : the graph (dict of dask tasks), ``root`` its final key, ``ranges`` the block row
        ranges, ``parts`` the row range of each leaf (leaf ``i`` folds the consecutive
        blocks inside ``parts[i]``), ``leaf_name`` the leaves' key prefix, ``store`` the
        store the workers open (None for an in-memory array), ``payload_key`` the key every
        leaf and merge takes its operators from.
    """

    dsk: dict[Any, Any]
    root: Any
    ranges: list[tuple[int, int]]
    parts: list[tuple[int, int]]
    leaf_name: str
    store: _StoreRef | None
    payload_key: str

    @property
    def n_tasks(self) -> int:
        return len(self.dsk)

    def rows_of(self, key: Any) -> tuple[int, int] | None:
        """The row range a leaf key reads (None for other keys)."""
        if isinstance(key, tuple) and len(key) == 2 and key[0] == self.leaf_name:
            return self.parts[int(key[1])]
        return None


def auto_blocks_per_task(n_blocks: int, threads: int) -> int:
    """Blocks folded sequentially per leaf task when not configured.

    One leaf per thread, at most ``MAX_AUTO_BLOCKS_PER_TASK`` blocks per leaf (a retried or
    recomputed leaf stays bounded). Long leaves matter for the exact kernels: a fresh
    operator's start (the leverage set's seed QR, TRMM steps and small Gram windows until
    it has seen ~2^16 rows) costs about what 2–3·10^5 rows of its steady state do. Measured
    (2^22 × 128 keys, 64 blocks, threads scheduler, 2 cores): 8 blocks per leaf 4.34 s,
    16 → 3.55 s, 32 → 3.17 s, against 2.95 s for the local engine.
    """
    return max(1, min(MAX_AUTO_BLOCKS_PER_TASK, -(-n_blocks // max(1, threads))))


def build_graph(
    source: Any,
    operators: Sequence[Operator],
    *,
    chunk_rows: int | None = None,
    split_every: int = DEFAULT_SPLIT_EVERY,
    blocks_per_task: int = 1,
    read_attempts: int = 1,
) -> MergeGraph:
    """The merge-tree graph of one pass of ``source`` through ``operators``.

    Leaf ``i`` folds blocks ``[i·k, (i+1)·k)`` (``k = blocks_per_task``) in order; merge
    tasks fold up to ``split_every`` states each, in block order.
    """
    ranges = source.block_ranges(chunk_rows)
    groups_of_blocks = [
        ranges[i : i + blocks_per_task] for i in range(0, len(ranges), blocks_per_task)
    ]
    parts = [(g[0][0], g[-1][1]) for g in groups_of_blocks]
    # A fresh token per run: graph keys never collide with results (or errors) of an
    # earlier run still known to a long-lived scheduler.
    token = uuid.uuid4().hex[:16]
    payload_key = f"streamattn-payload-{token}"
    leaf = f"streamattn-leaf-{token}"
    dsk: dict[Any, Any] = {
        payload_key: _Payload(
            tuple(type(op) for op in operators),
            tuple(op.empty().to_state() for op in operators),
            streamattn.__version__,
        )
    }
    ref = None
    if source.path is not None:
        ref = _StoreRef(
            os.path.abspath(source.path),
            source.array_name,
            source.n,
            source.d,
            str(source.dtype),
            source.label,
            token,
            bool(getattr(source, "fill_missing", False)),
        )
        for i, group in enumerate(groups_of_blocks):
            dsk[(leaf, i)] = (_leaf_store, payload_key, ref, group, read_attempts)
    else:
        dsk.update(_array_leaves(source, ranges, blocks_per_task, payload_key, leaf, token))
    level = [(leaf, i) for i in range(len(parts))]
    depth = 0
    while len(level) > 1:
        name = f"streamattn-merge{depth}-{token}"
        merges = [level[i : i + split_every] for i in range(0, len(level), split_every)]
        for j, members in enumerate(merges):
            dsk[(name, j)] = (_merge_states, payload_key, list(members))
        level = [(name, j) for j in range(len(merges))]
        depth += 1
    return MergeGraph(dsk, level[0], ranges, parts, leaf, ref, payload_key)


def _array_leaves(
    source: Any,
    ranges: list[tuple[int, int]],
    blocks_per_task: int,
    payload_key: str,
    leaf: str,
    token: str,
) -> dict[Any, Any]:
    """Leaves over an in-memory numpy/zarr/dask array: the dask array's own blocks."""
    import dask.array as da

    row_chunks = tuple(b - a for a, b in ranges)

    def as_dask(arr: Any, what: str) -> Any:
        if type(arr).__module__.startswith("dask."):
            x = arr.rechunk((row_chunks, (arr.shape[1],)))
        else:
            x = da.from_array(
                arr, chunks=(row_chunks, (arr.shape[1],)), name=f"streamattn-{what}-{token}"
            )
        return x

    keys = as_dask(source.keys, "keys")
    dsk: dict[Any, Any] = dict(keys.__dask_graph__())
    vname = None
    if source.values is not None:
        values = as_dask(source.values, "values")
        dsk.update(dict(values.__dask_graph__()))
        vname = values.name
    for j, first in enumerate(range(0, len(ranges), blocks_per_task)):
        idx = range(first, min(first + blocks_per_task, len(ranges)))
        dsk[(leaf, j)] = (
            _leaf_array,
            payload_key,
            [(keys.name, i, 0) for i in idx],
            None if vname is None else [(vname, i, 0) for i in idx],
            [ranges[i][0] for i in idx],
            source.n,
            source.label,
        )
    return dsk


# ---------------------------------------------------------------------------- sessions
#: The interface a LocalCluster (scheduler, workers, dashboard) binds.
LOCAL_HOST = "127.0.0.1"


def _dashboard_address() -> str:
    """Dask's usual :8787 on 127.0.0.1 when free, else any free port there."""
    with socket.socket() as s:
        try:
            s.bind((LOCAL_HOST, 8787))
        except OSError:
            return f"{LOCAL_HOST}:0"
    return f"{LOCAL_HOST}:8787"


def _stop_worker_http(dask_worker: Any) -> None:
    server = getattr(dask_worker, "http_server", None)
    if server is not None:
        server.stop()


def _stop_http(cluster: Any, client: Any) -> None:
    """Close the HTTP listeners of a LocalCluster's scheduler and workers."""
    server = getattr(cluster.scheduler, "http_server", None)
    if server is not None:
        server.stop()
    client.run(_stop_worker_http)


def worker_env(n_workers: int | None) -> dict[str, str]:
    """Environment of a LocalCluster's worker processes: each its share of the cores
    (``usable_cores() // n_workers``, at least 1) as stream threads, unless this process
    sets ``STREAMATTN_STREAM_THREADS`` (the workers inherit it). Each worker would
    otherwise size its thread pool by every core, n_workers times over. ``n_workers``
    None: dask's own choice for the cores (``nprocesses_nthreads``)."""
    if os.environ.get(STREAM_THREADS_ENV):
        return {}
    cores = usable_cores()
    if n_workers is None:
        from distributed.deploy.utils import nprocesses_nthreads

        n_workers = nprocesses_nthreads(cores)[0]
    return {STREAM_THREADS_ENV: str(max(1, cores // max(1, n_workers)))}


@contextmanager
def dask_session(
    options: DaskOptions, client: Any | None = None, *, progress: bool = False
) -> Iterator[Any | None]:
    """Yield a ``distributed.Client`` for the options (None for the threads scheduler).

    An existing ``client`` is used as is (never closed here). ``local-cluster`` starts a
    ``LocalCluster`` and closes it on exit; an address is connected within
    ``options.timeout`` seconds or a :class:`StreamattnError` says it is unreachable.
    """
    options.check()
    if client is not None:
        yield client
        return
    if options.scheduler == "threads":
        yield None
        return
    from distributed import Client, LocalCluster

    if options.scheduler == "local-cluster":
        # Everything binds 127.0.0.1 (dask's default host is every interface). The
        # scheduler and workers start HTTP servers (health, metrics) even without the
        # dashboard; without it they are stopped as soon as the cluster is up, so nothing
        # is served. "127.0.0.1:0" keeps a run from clashing with another cluster.
        with (
            LocalCluster(
                n_workers=options.n_workers,
                threads_per_worker=options.threads_per_worker,
                processes=True,
                env=worker_env(options.n_workers),
                host=LOCAL_HOST,
                dashboard_address=_dashboard_address() if options.dashboard
                else f"{LOCAL_HOST}:0",
                worker_dashboard_address=None,
                scheduler_kwargs={"dashboard": options.dashboard},
            ) as cluster,
            Client(cluster) as started,
        ):
            if not options.dashboard:
                _stop_http(cluster, started)
            if progress and options.dashboard:
                bokeh = importlib.util.find_spec("bokeh") is not None
                note = "" if bokeh else " (pip install bokeh to serve it)"
                print(f"streamattn: dask dashboard {started.dashboard_link}{note}", file=sys.stderr)
            yield started
        return
    _probe_scheduler(options.scheduler, options.timeout)
    try:
        connected = _within(options.timeout, lambda: Client(options.scheduler,
                                                            timeout=options.timeout))
    except (OSError, TimeoutError, ValueError, TypeError) as exc:
        raise StreamattnError(_unreachable(options, exc)) from exc
    with connected:
        yield connected


def _unreachable(options: DaskOptions, exc: BaseException) -> str:
    return (
        f"cannot reach the Dask scheduler at {options.scheduler} within {options.timeout:g} s "
        f"({type(exc).__name__}: {exc}). Start it with `dask scheduler --host HOST` and check "
        "the address, port, firewall and (tls://) the distributed.comm.tls settings."
    )


def _within(timeout: float, fn: Callable[[], Any]) -> Any:
    """``fn()`` in a helper thread, given up after ``timeout`` (+1 s) with TimeoutError.

    distributed's own timeouts cover the TCP connect, not a peer that accepts and then
    never answers; this deadline does (the helper thread ends with distributed's own
    timeout or the process).
    """
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamattn-connect")
    try:
        return pool.submit(fn).result(timeout=timeout + 1.0)
    except FuturesTimeout:
        raise TimeoutError(f"no answer within {timeout:g} s") from None
    finally:
        pool.shutdown(wait=False)


def _check_listening(options: DaskOptions) -> None:
    """Plain TCP connects first, retried until the timeout (a scheduler may still be
    starting): nothing listening is "cannot reach", told apart from a peer that accepts
    and then stays silent (the identity probe's timeout), however loaded the machine."""
    from distributed.comm.addressing import get_address_host_port

    try:
        host, port = get_address_host_port(options.scheduler)
    except (ValueError, TypeError):
        return  # not a TCP address: the identity probe reports it
    deadline = time.monotonic() + options.timeout
    while True:
        left = deadline - time.monotonic()
        try:
            socket.create_connection((host, port), timeout=max(left, 0.1)).close()
            return
        except OSError as exc:
            if time.monotonic() + 0.2 >= deadline:
                raise StreamattnError(_unreachable(options, exc)) from exc
            time.sleep(0.2)


def _probe_scheduler(address: str, timeout: float) -> None:
    """Ask the scheduler for its identity within ``timeout``; one clear error otherwise."""
    import asyncio

    from distributed.core import rpc
    from distributed.security import Security

    async def identity() -> Any:
        args = Security().get_connection_args("client")
        async with rpc(address, timeout=timeout, connection_args=args) as remote:
            return await asyncio.wait_for(remote.identity(), timeout)

    options = DaskOptions(scheduler=address, timeout=timeout)
    _check_listening(options)
    try:
        info = _within(timeout, lambda: asyncio.run(identity()))
    except (OSError, TimeoutError, ValueError, TypeError) as exc:
        if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
            raise StreamattnError(
                f"the Dask scheduler at {address} did not answer within {timeout:g} s "
                "(something accepts connections there but does not speak the Dask protocol, "
                "or the scheduler is hung). Check the address and port."
            ) from exc
        raise StreamattnError(_unreachable(options, exc)) from exc
    if not isinstance(info, dict) or info.get("type") != "Scheduler":
        raise StreamattnError(
            f"{address} answered, but not as a Dask scheduler ({str(info)[:80]!r}); check the "
            "address and port."
        )


def _wait_for_workers(client: Any, timeout: float) -> None:
    try:
        client.wait_for_workers(1, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        raise StreamattnError(
            f"the Dask cluster at {client.scheduler.address} has no workers after "
            f"{timeout:g} s; start some with `dask worker {client.scheduler.address}`."
        ) from exc


def _preflight(client: Any, graph_ref: _StoreRef | None) -> None:
    """Refuse to start when the workers cannot run the pass (version, store access)."""
    try:
        infos: dict[str, dict[str, Any]] = client.run(_worker_probe, graph_ref)
    except ImportError as exc:
        raise StreamattnError(
            f"Dask workers cannot import streamattn ({exc}); install streamattn "
            f"{streamattn.__version__} in every worker's environment."
        ) from exc
    mine = streamattn.__version__
    other = {w: i["streamattn"] for w, i in infos.items() if i["streamattn"] != mine}
    if other:
        listing = ", ".join(f"{w} has {v}" for w, v in sorted(other.items()))
        raise StreamattnError(
            f"Dask workers run a different streamattn version than the client "
            f"({streamattn.__version__}): {listing}. Install the same version everywhere."
        )
    if graph_ref is None:
        return
    bad = {w: i["store_error"] for w, i in infos.items() if "store_error" in i}
    if bad:
        worker, why = sorted(bad.items())[0]
        raise InvalidInputError(
            f"{len(bad)} of {len(infos)} Dask worker(s) cannot read the store "
            f"{graph_ref.path} (e.g. {worker}: {why}). Workers read the store themselves: "
            "put it on shared storage that every worker reaches at the same path."
        )
    expect = [graph_ref.n, graph_ref.d, graph_ref.dtype]
    differ = {w: i["store"] for w, i in infos.items() if i["store"] != expect}
    if differ:
        worker, seen = sorted(differ.items())[0]
        raise InvalidInputError(
            f"Dask worker {worker} sees {graph_ref.path} as {seen}, the client as {expect}: "
            "every worker must read the same store (shared storage, same path)."
        )


# ---------------------------------------------------------------------------- the run
def run_dask(
    source: BlockStream,
    operators: Sequence[Operator],
    *,
    chunk_rows: int | None = None,
    progress: bool = False,
    description: str = "pass",
    client: Any | None = None,
    scheduler: str = "threads",
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    split_every: int = DEFAULT_SPLIT_EVERY,
    blocks_per_task: int | None = None,
    retries: int = DEFAULT_RETRIES,
    timeout: float = DEFAULT_TIMEOUT,
    dashboard: bool = True,
) -> list[Operator]:
    """Fold every block of ``source`` into ``operators`` on Dask; merge states in a tree.

    The operators are updated in place (their final states merged into them on the
    client) and returned, as with the local engine. The result equals the local
    engine's up to float rounding of the different merge order (operator laws).

    Parameters
    ----------
    client
        An existing ``distributed.Client`` (then ``scheduler`` and the cluster settings
        are ignored).
    scheduler, n_workers, threads_per_worker, split_every, blocks_per_task, retries, timeout,
    dashboard
        See :class:`DaskOptions`.
    """
    options = DaskOptions(
        scheduler,
        n_workers,
        threads_per_worker,
        split_every,
        blocks_per_task,
        retries,
        timeout,
        dashboard,
    )
    options.check()
    ops = list(operators)
    with dask_session(options, client, progress=progress) as live:
        if live is not None:
            _wait_for_workers(live, options.timeout)
        if blocks_per_task is None:
            threads = (
                sum(live.nthreads().values())
                if live is not None
                else (threads_per_worker or usable_cores())
            )
            blocks_per_task = auto_blocks_per_task(len(source.block_ranges(chunk_rows)), threads)
        graph = build_graph(
            source,
            ops,
            chunk_rows=chunk_rows,
            split_every=split_every,
            blocks_per_task=blocks_per_task,
            read_attempts=1 if live is not None else retries + 1,
        )
        if live is None:
            states = _compute_threads(graph, options, progress)
        else:
            _preflight(live, graph.store)
            states = _compute_distributed(live, graph, options, progress, description)
    for op, state in zip(ops, states, strict=True):
        op.merge(Operator.from_state(state))
    return ops


def _compute_threads(graph: MergeGraph, options: DaskOptions, progress: bool) -> list[State]:
    """Run the graph on dask's threaded scheduler, one BLAS thread per task.

    Every dask thread runs its own BLAS calls; letting each also start a BLAS thread pool
    oversubscribes the cores (measured: a 65536 x 128 QR update 40x slower on a busy
    2-core machine). distributed's nanny sets OPENBLAS/MKL/OMP_NUM_THREADS=1 for its
    workers for the same reason; here threadpoolctl does it for the run.
    """
    import dask.threaded
    from dask.diagnostics import ProgressBar
    from threadpoolctl import threadpool_limits

    bar = ProgressBar(out=sys.stderr) if progress else None
    if bar is not None:
        bar.register()
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            return dask.threaded.get(graph.dsk, graph.root, num_workers=options.threads_per_worker)
    finally:
        if bar is not None:
            bar.unregister()


def _lost_scheduler_errors() -> tuple[type[BaseException], ...]:
    """What a client sees when the scheduler dies: cancelled futures, closed comms."""
    import asyncio

    from distributed.client import FutureCancelledError
    from distributed.comm.core import CommClosedError

    return (FutureCancelledError, asyncio.CancelledError, CommClosedError)


def _with_payload(task: Any, payload_key: str, payload: Any) -> Any:
    """``task`` (a leaf's or merge's tuple, or a dask array's own task) with the payload
    key among its arguments replaced by ``payload`` (a future)."""
    if not isinstance(task, tuple):
        return task
    return tuple(payload if isinstance(a, str) and a == payload_key else a for a in task)


def _compute_distributed(
    client: Any, graph: MergeGraph, options: DaskOptions, progress: bool, description: str
) -> list[State]:
    from distributed import progress as progress_bar
    from distributed.scheduler import KilledWorker

    payload = future = None
    try:
        # The payload on every worker before the graph: as a task of the graph it lives on
        # the one worker that ran it, and the scheduler places every leaf there (data
        # locality); the others got a leaf only by work stealing, 0.1–1.4 s later
        # (scripts/bench_cluster_passes.py: a 2-worker LocalCluster, 2^22 × 128).
        payload = client.scatter(graph.dsk[graph.payload_key], broadcast=True, hash=False)
        dsk = {key: _with_payload(task, graph.payload_key, payload)
               for key, task in graph.dsk.items() if key != graph.payload_key}
        future = client.get(dsk, graph.root, sync=False, retries=options.retries)
        if progress:
            print(
                f"streamattn: {description} on {client.scheduler.address} "
                f"({len(graph.ranges)} blocks in {len(graph.parts)} leaf tasks, "
                f"{graph.n_tasks} tasks)",
                file=sys.stderr,
            )
            progress_bar(future)
        return future.result()
    except _lost_scheduler_errors() as exc:
        raise StreamattnError(
            f"lost the Dask scheduler at {client.scheduler.address} during the pass "
            f"({type(exc).__name__}: {' '.join(str(exc).split()) or 'cancelled'}); no output "
            "was written (with "
            "checkpoints on, rerun with --resume to continue from the last one)."
        ) from exc
    except KilledWorker as exc:
        key = getattr(exc, "task", None)
        where = graph.rows_of(key)
        rows = f"rows [{where[0]}, {where[1]})" if where else f"task {key}"
        raise StreamattnError(
            f"Dask workers died repeatedly while processing {rows} of the pass; the "
            "block may exhaust a worker's memory (try a smaller chunk_rows)."
        ) from exc
    except StreamattnError as exc:
        raise type(exc)(f"{exc} (the Dask engine gave up after {options.retries} retries)") from exc
    finally:
        for held in (future, payload):
            if held is not None:
                held.release()
