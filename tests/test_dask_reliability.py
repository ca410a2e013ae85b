"""Issue 17 items 6 and 7: Dask failures are one clear line within the timeout, and a
LocalCluster serves nothing beyond 127.0.0.1 (no HTTP at all with the dashboard off)."""

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

import numpy as np
import psutil
import pytest
import zarr
from dask_helpers import SlowGram, SlowGramSpec

from streamattn.cli import main
from streamattn.engines import run_operators
from streamattn.errors import StreamattnError
from streamattn.sources import open_keys

REPO = Path(__file__).resolve().parents[1]
DASK_BIN = Path(sys.executable).with_name("dask")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def store(path: Path, n: int = 4000, d: int = 8) -> Path:
    arr = zarr.create_array(str(path), shape=(n, d), dtype="float32", chunks=(500, d))
    arr[...] = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    return path


@pytest.fixture
def silent_listener() -> Iterator[str]:
    """A socket that accepts TCP connections and never says a word."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"tcp://127.0.0.1:{srv.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        for c in held:
            c.close()
        srv.close()


def one_line(err: str) -> str:
    assert err.startswith("streamattn: error: ") and "Traceback" not in err, err
    assert err.strip().count("\n") == 0, err
    return err


# ---------------------------------------------------------------------------- item 6
def test_a_listener_that_never_answers_fails_within_the_timeout(
    tmp_path: Path, silent_listener: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = store(tmp_path / "k.zarr")
    t0 = time.monotonic()
    code = main(["select", str(path), "--eps", "0.1", "--out", str(tmp_path / "o"), "--quiet",
                 "--engine", "dask", "--scheduler", silent_listener, "--timeout", "2"])
    elapsed = time.monotonic() - t0
    assert code == 2
    err = one_line(capsys.readouterr().err)
    assert "did not answer within 2 s" in err
    assert elapsed < 15, elapsed  # the timeout, plus start-up; was > 120 s
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "address", ["tcp://", "tcp://127.0.0.1", "tls://", "foo://host:1", "tcp://host:99999",
                "tcp://a b:1"]
)
def test_malformed_scheduler_addresses_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], address: str
) -> None:
    path = store(tmp_path / "k.zarr", n=600)
    code = main(["select", str(path), "--eps", "0.1", "--out", str(tmp_path / "o"), "--quiet",
                 "--engine", "dask", "--scheduler", address, "--timeout", "2"])
    assert code == 2
    assert "engine.scheduler" in one_line(capsys.readouterr().err)


def test_a_tls_address_with_nothing_there_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = store(tmp_path / "k.zarr", n=600)
    t0 = time.monotonic()
    code = main(["select", str(path), "--eps", "0.1", "--out", str(tmp_path / "o"), "--quiet",
                 "--engine", "dask", "--scheduler", f"tls://127.0.0.1:{free_port()}",
                 "--timeout", "2"])
    assert code == 2 and time.monotonic() - t0 < 15
    assert "Dask scheduler" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("scheduler", ["threads", "local-cluster"])
def test_a_corrupt_chunk_on_dask_names_the_file_and_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], scheduler: str
) -> None:
    path = store(tmp_path / "k.zarr")
    (path / "c" / "3" / "0").write_bytes(b"\x00garbage, not a zstd frame" * 10)
    code = main(["select", str(path), "--eps", "0.1", "--out", str(tmp_path / "o"), "--quiet",
                 "--engine", "dask", "--scheduler", scheduler, "--n-workers", "1",
                 "--no-dashboard", "--retries", "0"])
    assert code == 2
    err = one_line(capsys.readouterr().err)
    assert str(path) in err and "rows [1500, 2000)" in err


def test_a_scheduler_killed_mid_run_is_one_line(tmp_path: Path) -> None:
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]))
    log = (tmp_path / "cluster.log").open("w")
    procs = [
        subprocess.Popen([str(DASK_BIN), "scheduler", "--host", "127.0.0.1", "--port",
                          str(port), "--no-dashboard", "--idle-timeout", "120s"],
                         stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True),
        subprocess.Popen([str(DASK_BIN), "worker", address, "--nworkers", "1", "--nthreads",
                          "1", "--host", "127.0.0.1", "--no-dashboard", "--death-timeout",
                          "30"],
                         stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True),
    ]
    try:
        src = open_keys(store(tmp_path / "k.zarr"))
        killer = threading.Timer(6.0, lambda: os.killpg(procs[0].pid, signal.SIGKILL))
        killer.start()
        t0 = time.monotonic()
        with pytest.raises(StreamattnError, match="lost the Dask scheduler") as info:
            run_operators(src, [SlowGram(SlowGramSpec(delay=2.0))], engine="dask",
                          scheduler=address, chunk_rows=500, timeout=20, blocks_per_task=1)
        killer.cancel()
        assert time.monotonic() - t0 < 60
        assert "\n" not in str(info.value)
    finally:
        for proc in procs:
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


# ---------------------------------------------------------------------------- item 7
def _listening(pids: list[int]) -> list[tuple[str, int]]:
    out = []
    for pid in pids:
        try:
            for c in psutil.Process(pid).net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    out.append((c.laddr.ip, c.laddr.port))
        except psutil.Error:
            continue
    return sorted(out)


def test_local_cluster_binds_localhost_and_serves_no_http_without_dashboard() -> None:
    from streamattn.engines.dask_engine import DaskOptions, dask_session

    me = psutil.Process()
    options = DaskOptions(scheduler="local-cluster", n_workers=1, threads_per_worker=1,
                          dashboard=False)
    with dask_session(options) as client:
        time.sleep(0.5)
        pids = [me.pid, *(p.pid for p in me.children(recursive=True))]
        listening = _listening(pids)
        info = client.scheduler_info()
        comm = {int(client.scheduler.address.rsplit(":", 1)[1])}
        for addr, w in info["workers"].items():
            comm.add(int(addr.rsplit(":", 1)[1]))
            if w.get("nanny"):
                comm.add(int(w["nanny"].rsplit(":", 1)[1]))
    assert listening, "found no listening sockets at all: the probe is broken"
    assert all(ip == "127.0.0.1" for ip, _ in listening), listening
    assert {port for _, port in listening} <= comm, (listening, comm)  # no HTTP server

