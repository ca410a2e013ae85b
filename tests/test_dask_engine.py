"""The Dask engine equals the local engine, on every scheduler, and survives faults.

Clusters are module-scoped (started once): a ``distributed.LocalCluster`` with two worker
processes, and a real cluster started with the ``dask scheduler`` / ``dask worker``
command-line programs on 127.0.0.1 (two worker processes under one nanny each). Every
process is killed in a ``finally`` (process groups, SIGKILL as the last resort), so a
failing test leaves no orphans.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from conftest import svd_leverage
from dask_helpers import SlowGram, SlowGramSpec, rerun_tasks, transitions_so_far

import streamattn
import streamattn.engines as engines
from streamattn import cli
from streamattn.config import load_config
from streamattn.engines import run_operators
from streamattn.engines.dask_engine import build_graph
from streamattn.errors import ConfigError, InvalidInputError, StreamattnError
from streamattn.operators import LeverageScores, LeverageSpec
from streamattn.recipes.selection import Selection
from streamattn.recipes.universal import universal_sets
from streamattn.results import UniversalSet
from streamattn.sources import KeySource, open_keys

N, D, DV, CHUNK = 6000, 8, 3, 500
SELECTIONS = {
    "plain": Selection(eps=0.05, variant="plain"),
    "affine": Selection(eps=0.05, variant="affine"),
    "budget": Selection(variant="affine", budget=30),
}
REPO = Path(__file__).resolve().parents[1]
DASK_BIN = Path(sys.executable).parent / "dask"


def make_keys(n: int = N, d: int = D, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4)) @ rng.standard_normal((4, d)) + 3.0
    x += 0.1 * rng.standard_normal((n, d))
    x[rng.choice(n, 12, replace=False)] *= 6.0  # outliers every set must contain
    return x.astype(np.float32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def assert_same(a: UniversalSet, b: UniversalSet) -> None:
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(a.rows, b.rows)
    assert a.values is not None and b.values is not None
    np.testing.assert_allclose(a.values, b.values, rtol=0, atol=1e-6)
    assert a.certificate["passes"] == b.certificate["passes"]
    assert a.certificate["numerical_rank"] == b.certificate["numerical_rank"]


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A zarr v3 group (zstd) with keys and values, 500-row storage chunks."""
    path = tmp_path_factory.mktemp("dask") / "store.zarr"
    root = zarr.open_group(str(path), mode="w")
    values = np.random.default_rng(1).standard_normal((N, DV)).astype(np.float32)
    for name, data in {"keys": make_keys(), "values": values}.items():
        arr = root.create_array(
            name, shape=data.shape, dtype=data.dtype, chunks=(CHUNK, data.shape[1])
        )
        arr[...] = data
    return path


@pytest.fixture(scope="module")
def local_sets(store: Path) -> dict[str, UniversalSet]:
    out = universal_sets(store, list(SELECTIONS.values()), chunk_rows=CHUNK)
    sets = dict(zip(SELECTIONS, out, strict=True))
    assert sets["budget"].certificate["passes"] == 2  # the second pass is exercised too
    return sets


@pytest.fixture(scope="module")
def local_cluster() -> Iterator[Any]:
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",  # never the shared :8787
            scheduler_kwargs={"dashboard": False},
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


@pytest.fixture(scope="module")
def cli_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """``dask scheduler`` + ``dask worker --nworkers 2`` on 127.0.0.1, killed afterwards."""
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    log = (tmp_path_factory.mktemp("cluster") / "cluster.log").open("w")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO / "tests"), env.get("PYTHONPATH")) if p
    )
    commands = [
        # --idle-timeout: the scheduler exits on its own even if pytest itself is SIGKILLed
        [DASK_BIN, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard",
         "--dashboard-address", ":0", "--idle-timeout", "300s"],
        [
            DASK_BIN, "worker", address, "--nworkers", "2", "--nthreads", "1",
            "--host", "127.0.0.1", "--no-dashboard", "--death-timeout", "60",
        ],
    ]  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []
    client = None
    try:
        for cmd in commands:
            procs.append(
                subprocess.Popen(
                    [str(c) for c in cmd],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=str(REPO),
                    start_new_session=True,  # own process group: killpg reaches the workers
                )
            )
        client = Client(address, timeout=30)
        client.wait_for_workers(2, timeout=60)
        yield client
    finally:
        if client is not None:
            client.close()
        for proc in reversed(procs):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
        log.close()


@pytest.fixture
def no_local_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if any pass (the budget's second one included) falls back to the local engine."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the local engine ran inside a dask run")

    monkeypatch.setattr(engines, "run_local", refuse)


def dask_sets(store: Path, **options: Any) -> dict[str, UniversalSet]:
    out = universal_sets(
        store, list(SELECTIONS.values()), chunk_rows=CHUNK, engine="dask", **options
    )
    return dict(zip(SELECTIONS, out, strict=True))


# ---------------------------------------------------------------------------- equality
def test_threads_equals_local(store: Path, local_sets: dict, no_local_engine: None) -> None:
    sets = dask_sets(store, scheduler="threads", threads_per_worker=2)
    for name in SELECTIONS:
        assert_same(sets[name], local_sets[name])
        assert sets[name].certificate["engine"] == "dask"


def test_local_cluster_equals_local(
    store: Path, local_sets: dict, local_cluster: Any, no_local_engine: None
) -> None:
    sets = dask_sets(store, client=local_cluster, split_every=3)
    for name in SELECTIONS:
        assert_same(sets[name], local_sets[name])


def test_leaves_get_the_payload_as_data_on_every_worker(
    store: Path, local_sets: dict, local_cluster: Any
) -> None:
    """The operators' payload reaches the workers scattered, not as a graph task: a task
    holding it lives on one worker and draws every leaf there (data locality). Dask's task
    stream of a pass shows leaves and merges only, and both workers ran leaves."""
    from distributed import get_task_stream

    with get_task_stream(local_cluster) as stream:
        sets = dask_sets(store, client=local_cluster, blocks_per_task=1)
    for name in SELECTIONS:
        assert_same(sets[name], local_sets[name])
    keys = [str(t["key"]) for t in stream.data]
    assert keys and not any("payload" in k for k in keys)
    assert len({t["worker"] for t in stream.data if "leaf" in str(t["key"])}) == 2


def test_cli_cluster_equals_local(
    store: Path, local_sets: dict, cli_cluster: Any, no_local_engine: None
) -> None:
    address = cli_cluster.scheduler.address
    sets = dask_sets(store, scheduler=address, timeout=10)
    for name in SELECTIONS:
        assert_same(sets[name], local_sets[name])


@pytest.mark.parametrize("split_every, blocks_per_task", [(2, 1), (4, 3), (32, 1), (2, None)])
@pytest.mark.parametrize("kind", ["zarr", "npy", "numpy", "dask"])
def test_merge_tree_shape_independence(
    store: Path,
    tmp_path: Path,
    local_sets: dict,
    split_every: int,
    blocks_per_task: int | None,
    kind: str,
) -> None:
    """Any tree (fan-in, leaf size), any input kind: the local engine's set (37 blocks)."""
    keys = np.asarray(zarr.open_group(str(store), mode="r")["keys"][...])
    if kind == "zarr":
        source: Any = store
    elif kind == "npy":
        np.save(tmp_path / "keys.npy", keys)
        source = tmp_path / "keys.npy"
    elif kind == "numpy":
        source = keys
    else:
        import dask.array as da

        source = da.from_array(keys, chunks=(1000, D))
    rows = 163  # not aligned with anything: blocks straddle storage and dask chunks
    ref = universal_sets(keys, [SELECTIONS["plain"], SELECTIONS["affine"]], chunk_rows=rows)
    out = universal_sets(
        source,
        [SELECTIONS["plain"], SELECTIONS["affine"]],
        chunk_rows=rows,
        engine="dask",
        split_every=split_every,
        blocks_per_task=blocks_per_task,
    )
    for a, b in zip(out, ref, strict=True):
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(a.rows, b.rows)
    # and both against the independent reference: a dense SVD of K (plain) / of K - mean
    for u, affine in zip(out, (False, True), strict=True):
        assert_offline(u, keys, affine)


def assert_offline(u: UniversalSet, keys: np.ndarray, affine: bool) -> None:
    tau, _ = svd_leverage(np.asarray(keys, dtype=np.float64), affine)
    np.testing.assert_array_equal(u.indices, np.flatnonzero(tau >= u.certificate["eps"]))
    np.testing.assert_allclose(u.scores, tau[u.indices], rtol=1e-7, atol=1e-9)


def test_in_memory_values_reach_the_operators(capsys: pytest.CaptureFixture[str]) -> None:
    """numpy keys + values (no path): value rows of the selected keys, progress shown."""
    keys = make_keys(2000)
    values = np.random.default_rng(3).standard_normal((2000, DV))
    src = KeySource(keys, values=values)
    ref = streamattn.universal_set(src, 0.05, variant="affine", chunk_rows=128)
    out = streamattn.universal_set(
        src, 0.05, variant="affine", chunk_rows=128, engine="dask", progress=True
    )
    assert_same(out, ref)
    assert_offline(out, keys, True)
    np.testing.assert_array_equal(out.values, values[out.indices])
    assert "100% Completed" in capsys.readouterr().err


@pytest.mark.parametrize("blocks_per_task", [1, 7])
def test_graph_size_is_one_task_per_leaf_plus_merges(store: Path, blocks_per_task: int) -> None:
    src = open_keys(store)
    op = LeverageScores(LeverageSpec(0.05, False))
    for split_every in (2, 8):
        graph = build_graph(
            src, [op], chunk_rows=100, split_every=split_every, blocks_per_task=blocks_per_task
        )
        assert len(graph.ranges) == 60
        leaves = -(-60 // blocks_per_task)
        assert len(graph.parts) == leaves
        assert graph.parts[0] == (0, 100 * blocks_per_task) and graph.parts[-1][1] == N
        merges, level = 0, leaves
        while level > 1:
            level = -(-level // split_every)
            merges += level
        assert graph.n_tasks == 1 + leaves + merges  # + the one payload key
        assert graph.rows_of((graph.leaf_name, 1)) == graph.parts[1]
        assert graph.rows_of(("not-a-leaf", 0)) is None


# ---------------------------------------------------------------------------- faults
def is_partial_state(key: Any) -> bool:
    name = str(key[0]) if isinstance(key, tuple) else str(key)
    return name.startswith(("streamattn-leaf-", "streamattn-merge"))


def test_worker_killed_mid_run_same_answer(store: Path, local_sets: dict, cli_cluster: Any) -> None:
    """SIGKILL a worker that holds partial states mid-run: the lost tasks are recomputed."""
    client = cli_cluster
    source = open_keys(store)
    sel = SELECTIONS["affine"]
    ops = [LeverageScores(LeverageSpec(sel.eps, True)), SlowGram(SlowGramSpec(0.05))]
    done: dict[str, Any] = {}

    def work() -> None:
        try:
            done["ops"] = run_operators(
                source,
                ops,
                engine="dask",
                client=client,
                chunk_rows=100,
                split_every=4,
                blocks_per_task=2,
            )
        except BaseException as exc:  # reported by the main thread
            done["error"] = exc

    pids = client.run(os.getpid)
    log_start = client.run_on_scheduler(transitions_so_far)
    runner = threading.Thread(target=work)
    runner.start()
    victim = None
    deadline = time.monotonic() + 30
    while victim is None and time.monotonic() < deadline and runner.is_alive():
        held = client.has_what()
        victim = next(
            (w for w, keys in held.items() if any(is_partial_state(k) for k in keys)), None
        )
        time.sleep(0.02)
    assert victim is not None, "no worker held partial states while the run was going"
    assert runner.is_alive(), "the run finished before the kill"
    os.kill(pids[victim], signal.SIGKILL)
    runner.join(timeout=120)
    assert not runner.is_alive()
    assert "error" not in done, done.get("error")
    lev, gram = done["ops"]
    res = lev.result()
    ref = local_sets["affine"]
    np.testing.assert_array_equal(res["indices"][res["scores"] >= sel.eps], ref.indices)
    keys = np.asarray(zarr.open_group(str(store), mode="r")["keys"][...], dtype=np.float64)
    np.testing.assert_allclose(gram.result(), keys.T @ keys, rtol=1e-10)
    assert gram.n_rows == lev.n_rows == N
    # The lost work was done again: some task of this run was scheduled twice.
    assert client.run_on_scheduler(rerun_tasks, log_start), "no task was recomputed"
    client.wait_for_workers(2, timeout=60)  # the nanny restarts the killed worker


def test_corrupt_chunk_fails_with_its_rows(tmp_path: Path, local_cluster: Any) -> None:
    """A chunk that fails on every attempt fails the run, naming the block's rows."""
    path = tmp_path / "bad.zarr"
    arr = zarr.create_array(str(path), shape=(N, D), dtype="float32", chunks=(CHUNK, D))
    arr[...] = make_keys()
    chunk = path / "c" / "3" / "0"  # rows [1500, 2000)
    assert chunk.is_file()
    chunk.write_bytes(b"\x00garbage, not a zstd frame" * 10)
    for options in ({"scheduler": "threads"}, {"client": local_cluster, "retries": 1}):
        with pytest.raises(InvalidInputError, match=r"rows \[1500, 2000\)") as info:
            streamattn.universal_set(path, 0.05, chunk_rows=CHUNK, engine="dask", **options)
        assert str(path) in str(info.value)


def test_unreachable_scheduler_clear_error() -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(StreamattnError, match="cannot reach the Dask scheduler"):
        streamattn.universal_set(make_keys(200), 0.1, engine="dask", scheduler=address, timeout=1)


def test_store_workers_cannot_read(local_cluster: Any) -> None:
    """A path only the client has (here: none at all) is refused before any task runs."""
    keys = make_keys(200)
    ghost = KeySource(keys, label="/no/such/shared/keys.zarr", path="/no/such/shared/keys.zarr")
    with pytest.raises(InvalidInputError, match=r"cannot read the store.*shared storage"):
        streamattn.universal_set(ghost, 0.1, engine="dask", client=local_cluster)


def test_worker_version_mismatch(local_cluster: Any) -> None:
    def set_version(value: str) -> None:
        import streamattn as sa

        sa.__version__ = value

    local_cluster.run(set_version, "0.0.0-other")
    try:
        with pytest.raises(StreamattnError, match="different streamattn version"):
            streamattn.universal_set(make_keys(200), 0.1, engine="dask", client=local_cluster)
    finally:
        local_cluster.run(set_version, streamattn.__version__)


# ---------------------------------------------------------------------------- config, CLI
def test_dask_local_config_loads() -> None:
    cfg = load_config(REPO / "configs" / "dask-local.yaml")
    assert cfg.engine.kind == "dask"
    assert cfg.engine.scheduler == "local-cluster"
    assert cfg.engine.options()["n_workers"] == 2
    assert cfg.input.generate is not None and cfg.input.generate.n < 2**20


@pytest.mark.parametrize(
    "engine, match",
    [
        ({"kind": "dask", "scheduler": "thread"}, "engine.scheduler"),
        ({"kind": "dask", "split_every": 1}, "engine.split_every"),
        ({"kind": "dask", "retries": -1}, "engine.retries"),
        ({"kind": "dask", "n_workers": 0}, "engine.n_workers"),
        ({"kind": "dask", "timeout": 0}, "engine.timeout"),
        ({"kind": "spark"}, "engine.kind"),
        ({"kind": "dask", "schedular": "threads"}, "did you mean 'scheduler'"),
    ],
)
def test_engine_config_refused(tmp_path: Path, engine: dict, match: str) -> None:
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"engine": engine}))
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_unknown_engine_option_refused() -> None:
    with pytest.raises(ConfigError, match="not understood by the dask engine"):
        streamattn.universal_set(make_keys(100), 0.1, engine="dask", shedular="threads")


# Another process may take :8787 between the engine's check and the cluster's start.
@pytest.mark.filterwarnings("ignore:Port 8787 is already in use")
def test_cli_select_on_local_cluster(
    store: Path, tmp_path: Path, local_sets: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    """`streamattn select --engine dask --scheduler local-cluster`: same set, link printed."""
    from streamattn.recipes.universal import load_universal_set

    out = tmp_path / "out"
    argv = [
        "select", str(store), "--eps", "0.05", "--variant", "affine", "--chunk-rows",
        str(CHUNK), "--engine", "dask", "--scheduler", "local-cluster", "--n-workers", "1",
        "--threads-per-worker", "1", "--out", str(out),
    ]  # fmt: skip
    assert cli.main(argv) == 0
    assert "dask dashboard http" in capsys.readouterr().err
    assert_same(load_universal_set(out, "affine-eps0.05"), local_sets["affine"])
    assert cli.main([*argv[:-2], "--split-every", "1", "--out", str(tmp_path / "o2")]) == 2
    assert "engine.split_every must be an integer >= 2" in capsys.readouterr().err


def test_auto_leaves_are_one_per_thread_and_bounded() -> None:
    from streamattn.engines.dask_engine import MAX_AUTO_BLOCKS_PER_TASK, auto_blocks_per_task

    assert auto_blocks_per_task(64, 2) == 32  # one leaf per thread (a leaf's start is costly)
    assert auto_blocks_per_task(65, 2) == 33
    assert auto_blocks_per_task(3, 8) == 1
    assert auto_blocks_per_task(10**6, 2) == MAX_AUTO_BLOCKS_PER_TASK == 64
