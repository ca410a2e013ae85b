"""The stream threads' default (streamattn/cores.py) and the kernels at other thread counts.

The default was two threads on every machine; it is now the cores the process may use
(affinity mask, cgroup quota). The kernels must give the offline answer at any count, so a
child process runs them with 3 and 5 stream threads (more than this machine's cores) and
checks them against the offline SVD and a long-double Gram.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from streamattn import cores


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(("cpu_max", "expected"), [
    ("200000 100000\n", 2.0), ("150000 100000\n", 1.5), ("50000 100000\n", 0.5),
    ("max 100000\n", None), ("garbage\n", None), ("0 100000\n", None),
])
def test_the_cgroup_v2_quota_of_the_process_group(tmp_path: Path, cpu_max: str,
                                                   expected: float | None) -> None:
    proc = tmp_path / "proc-cgroup"
    write(proc, "0::/machine.slice/job-7\n")
    write(tmp_path / "cg" / "machine.slice" / "job-7" / "cpu.max", cpu_max)
    write(tmp_path / "cg" / "cpu.max", "max 100000\n")  # the root's: not this process's
    assert cores.quota_cores(tmp_path / "cg", proc) == expected


@pytest.mark.parametrize(("quota", "period", "expected"), [
    ("-1", "100000", None), ("300000", "100000", 3.0), ("25000", "100000", 0.25),
])
def test_the_cgroup_v1_quota(tmp_path: Path, quota: str, period: str,
                             expected: float | None) -> None:
    write(tmp_path / "cpu,cpuacct" / "cpu.cfs_quota_us", quota + "\n")
    write(tmp_path / "cpu,cpuacct" / "cpu.cfs_period_us", period + "\n")
    assert cores.quota_cores(tmp_path, tmp_path / "missing") == expected


def test_no_cgroup_files_is_no_quota(tmp_path: Path) -> None:
    assert cores.quota_cores(tmp_path, tmp_path / "missing") is None
    write(tmp_path / "proc", "12:cpu:/x\n")  # a v1-only line: no v2 group
    assert cores.quota_cores(tmp_path, tmp_path / "proc") is None


@pytest.mark.parametrize(("mask", "quota", "expected"), [
    (8, None, 8), (8, 1.5, 2), (8, 0.2, 1), (3, 16.0, 3), (1, None, 1),
])
def test_usable_cores_is_the_mask_capped_by_the_quota_rounded_up(
        monkeypatch: pytest.MonkeyPatch, mask: int, quota: float | None, expected: int) -> None:
    monkeypatch.setattr(cores, "affinity_cores", lambda: mask)
    monkeypatch.setattr(cores, "quota_cores", lambda: quota)
    assert cores.usable_cores() == expected


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no affinity masks here")
def test_the_affinity_mask_counts_not_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5})
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert cores.affinity_cores() == 3


def child(code: str, **env: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, env={**os.environ, **env}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no affinity masks here")
def test_the_stream_threads_follow_the_affinity_mask_unless_set() -> None:
    code = """
        import os
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        from streamattn.operators import gram_step
        print(gram_step.STREAM_THREADS)
    """
    env = {k: v for k, v in os.environ.items() if k != "STREAMATTN_STREAM_THREADS"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["1"]
    assert child(code, STREAMATTN_STREAM_THREADS="4").split() == ["4"]
    # no cap below the usable cores (the old default was min(2, cores) on every machine)
    many = """
        import os
        os.sched_getaffinity = lambda pid: set(range(7))  # before streamattn is imported
        from streamattn import cores
        from streamattn.operators import gram_step
        print(gram_step.STREAM_THREADS, cores.usable_cores())
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(many)], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    threads, usable = out.stdout.split()
    assert threads == usable  # 7 unless a cgroup quota caps it


KERNELS_AT_THREADS = """
    import numpy as np
    from streamattn.operators import gram_step
    from streamattn.operators.gram_step import (accumulation_length, gamma, gram_and_bounds,
                                                make_frame, split_rows)
    from streamattn.operators.leverage import LeverageScores, LeverageSpec
    from streamattn.operators.multihead import MultiHead
    from streamattn.sources import Block

    threads = gram_step.STREAM_THREADS
    rng = np.random.default_rng(threads)

    def spread(n, d, cond, offset):
        u, _ = np.linalg.qr(rng.standard_normal((n, d)))
        v, _ = np.linalg.qr(rng.standard_normal((d, d)))
        x = (u * np.logspace(0, -np.log10(cond), d)) @ v.T * np.sqrt(n) + offset
        return x.astype(np.float32)

    def offline(x, affine):
        a = np.asarray(x, dtype=np.float64)
        if affine:
            a = np.hstack([a - a.mean(axis=0), np.ones((a.shape[0], 1))])
        u, s, _ = np.linalg.svd(a, full_matrices=False)
        u = u[:, s > 1e-10 * s[0]]
        return np.einsum("ij,ij->i", u, u)

    def check(idx, tau, eps):
        sure_in = np.flatnonzero(tau >= eps * (1 + 1e-6))
        sure_out = np.flatnonzero(tau < eps * (1 - 1e-6))
        assert np.isin(sure_in, idx).all(), ("missed", threads)
        assert not np.isin(sure_out, idx).any(), ("extra", threads)

    # the Gram of a many-span block within its certified rounding (long-double reference)
    x = spread(20000, 24, 1e4, 3.0)
    assert len(split_rows(x.shape[0])) == min(4 * threads, -(-x.shape[0] // 2048)) > 2
    r = np.linalg.qr(x[:2000].astype(np.float64), mode="r")
    frame = make_frame(r)
    gram, _, bounds, xx, _ = gram_and_bounds(x, frame)
    xl = x.astype(np.longdouble)
    err = np.abs(gram.astype(np.longdouble) - xl.T @ xl).max()
    allowed = gamma(accumulation_length(x.shape[0])) * (np.abs(xl).T @ np.abs(xl)).max()
    assert 0 < err <= allowed, (err, allowed)
    assert np.allclose(xx, np.einsum("ij,ij->i", x.astype(np.float64), x.astype(np.float64)))

    # the exact set, one head in row spans: the Gram step (well-conditioned keys) and the
    # TRMM step (ill-conditioned keys with a common offset)
    for cond, offset, path in ((10.0, 0.0, "gram"), (1e5, 3.0, "trmm")):
        for affine in (False, True):
            x = spread(60000, 16, cond, offset)
            op = LeverageScores(LeverageSpec(0.002, affine))
            for a in range(0, x.shape[0], 16384):
                op.update(Block(a, x[a:a + 16384]))
            assert op.fold_stats[path + "_rows"] > 40000, (path, op.fold_stats)
            check(op.result()["indices"], offline(x, affine), 0.002)

    # a cache's heads dealt to `threads` lanes
    cache = np.stack([spread(12000, 8, 1e3, 0.0) for _ in range(2 * 3)], axis=1)
    cache = cache.reshape(12000, 2, 3, 8)
    multi = MultiHead.of([[LeverageScores(LeverageSpec(0.01)) for _ in range(3)]
                          for _ in range(2)])
    for a in range(0, 12000, 4096):
        multi.update(Block(a, cache[a:a + 4096]))
    for (lay, h), res in np.ndenumerate(np.array(multi.result(), dtype=object)):
        check(res["indices"], offline(cache[:, lay, h], False), 0.01)
    print("ok", threads)
"""


@pytest.mark.parametrize("threads", ["3", "5"])
def test_the_kernels_give_the_offline_answer_at_other_thread_counts(threads: str) -> None:
    assert child(KERNELS_AT_THREADS, STREAMATTN_STREAM_THREADS=threads).split() == [
        "ok", threads]


@pytest.mark.parametrize(("cores_here", "n_workers", "expected"), [
    (16, 2, "8"), (16, 3, "5"), (2, 2, "1"), (2, 3, "1"), (1, 1, "1"),
])
def test_a_local_cluster_worker_gets_its_share_of_the_cores(
        monkeypatch: pytest.MonkeyPatch, cores_here: int, n_workers: int, expected: str) -> None:
    from streamattn.engines import dask_engine

    monkeypatch.delenv("STREAMATTN_STREAM_THREADS", raising=False)
    monkeypatch.setattr(dask_engine, "usable_cores", lambda: cores_here)
    assert dask_engine.worker_env(n_workers) == {"STREAMATTN_STREAM_THREADS": expected}
    monkeypatch.setenv("STREAMATTN_STREAM_THREADS", "3")  # set here: the workers inherit it
    assert dask_engine.worker_env(n_workers) == {}


def test_dask_s_own_worker_count_decides_the_share(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("distributed")
    from distributed.deploy.utils import nprocesses_nthreads

    from streamattn.engines import dask_engine

    monkeypatch.delenv("STREAMATTN_STREAM_THREADS", raising=False)
    monkeypatch.setattr(dask_engine, "usable_cores", lambda: 16)
    workers = nprocesses_nthreads(16)[0]
    assert dask_engine.worker_env(None) == {"STREAMATTN_STREAM_THREADS": str(16 // workers)}


def _stream_threads() -> int:
    from streamattn.operators import gram_step

    return gram_step.STREAM_THREADS


def test_the_cluster_s_workers_run_with_their_share(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("distributed")
    from streamattn.engines.dask_engine import DaskOptions, dask_session

    monkeypatch.delenv("STREAMATTN_STREAM_THREADS", raising=False)
    options = DaskOptions(scheduler="local-cluster", n_workers=2, threads_per_worker=1,
                          dashboard=False)
    with dask_session(options) as client:
        got = client.run(_stream_threads)
    assert sorted(got.values()) == [max(1, cores.usable_cores() // 2)] * 2
