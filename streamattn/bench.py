"""Benchmarks: the one-pass engine against the read limit of the store and Dask peers.

Every configuration runs in a fresh Python process (``python -m streamattn.bench --one``)
that reports its wall time and its own peak RSS (``ru_maxrss``, plus that of the
processes it waited for, e.g. LocalCluster workers), so memory is measured per
configuration. Times are compared with a plain zarr loop over every chunk of the same
store, measured in the same run. On a shared machine the timings are noisy: each
configuration runs ``repeat`` times and the fastest run is reported, together with the
CPU idle share seen during the run (``/proc/stat``), so contention is visible.

Configurations (``KINDS``): ``zarr-loop`` (``arr[a:b]`` per storage chunk), ``parallel-read``
(the chunk files' bytes read by 4 threads into preallocated buffers, decompressed there
when the store is zstd-compressed: the read limit), ``uset-plain`` / ``uset-affine`` (the
one-pass exact universal set, eps = 0.01), ``uset+jl`` (universal set and SRHT embeddings
in one pass), ``ground-truth`` (exact heavy attention for 256 queries), ``dask-threads`` /
``dask-cluster`` (the Dask engine), and the peers ``dask-gram`` (two passes: Gram K^T K
by dask.array, then scores by map_blocks) and ``dask-tsqr`` (``da.linalg.tsqr``, row
norms of Q).

Each configuration with a target of issue 16 (``TARGETS``: the exact one-pass set ≤ 1.0×
the zarr loop and ≤ 2.0× the parallel read; with JL embeddings ≤ 1.5× the loop) gets a
``target`` and ``meets_target`` entry. Results go to ``--out`` (default: a fresh
``runs/bench-<UTC time>``, never over earlier results); generated stores live in
``--data-dir`` and are reused by later runs, or deleted at the end with ``--remove-data``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from streamattn.memory import peak_rss_bytes

EPS = 0.01
KINDS = (
    "zarr-loop",
    "parallel-read",
    "uset-plain",
    "uset-affine",
    "uset+jl",
    "ground-truth",
    "dask-threads",
    "dask-cluster",
    "dask-gram",
    "dask-tsqr",
)
READ_THREADS = 4
#: Issue 16's single-head targets: (max × zarr loop, max × parallel read) per configuration.
TARGETS: dict[str, tuple[float, float | None]] = {
    "uset-plain": (1.0, 2.0),
    "uset-affine": (1.0, 2.0),
    "uset+jl": (1.5, None),
}


class NotAvailable(Exception):
    """A configuration whose module is not part of this installation."""


# ---------------------------------------------------------------------------- stores
def store_path(data_dir: Path, n: int, d: int, compressor: str) -> Path:
    return data_dir / f"keys-n{n}-d{d}-{compressor}.zarr"


def ensure_bench_store(data_dir: Path, n: int, d: int, compressor: str) -> Path:
    """The synthetic store for (n, d, compressor), generated once (65536-row chunks)."""
    from streamattn.synthetic import SyntheticSpec, ensure_store

    path = store_path(data_dir, n, d, compressor)
    spec = SyntheticSpec(n=n, d=d, chunk_rows=65536, compressor=compressor)
    ensure_store(path, spec)
    return path


# ---------------------------------------------------------------------------- runners
def _zarr_array(path: Path) -> Any:
    import zarr

    group: Any = zarr.open(str(path), mode="r")
    return group["keys"]


def run_zarr_loop(path: Path) -> dict[str, Any]:
    arr = _zarr_array(path)
    step = int(arr.chunks[0])
    total = 0.0
    for a in range(0, arr.shape[0], step):
        total += float(arr[a : a + step][0, 0])
    return {}


def run_parallel_read(path: Path) -> dict[str, Any]:
    """Chunk files read (and zstd-decoded) by threads into preallocated buffers."""
    arr = _zarr_array(path)
    n, d = arr.shape
    step = int(arr.chunks[0])
    root = path / "keys"
    codecs = [type(c).__name__ for c in arr.metadata.codecs]
    compressed = "ZstdCodec" in codecs
    decoder = None
    if compressed:
        from numcodecs import Zstd

        decoder = Zstd()
    bufs = [np.empty((step, d), dtype=arr.dtype) for _ in range(READ_THREADS)]

    def read(i: int) -> None:
        buf = bufs[i % READ_THREADS]
        fname = root / arr.metadata.encode_chunk_key((i, 0))
        with open(fname, "rb", buffering=0) as fh:
            if decoder is None:
                fh.readinto(buf.reshape(-1).view(np.uint8).data)
            else:
                decoder.decode(fh.read(), out=buf)

    with ThreadPoolExecutor(READ_THREADS) as pool:
        list(pool.map(read, range(-(-n // step))))
    return {"threads": READ_THREADS, "decompress": compressed}


def run_uset(path: Path, variant: str, **engine: Any) -> dict[str, Any]:
    from streamattn.recipes.universal import universal_set
    from streamattn.results import UniversalSet

    u = universal_set(str(path), eps=EPS, variant=variant, **engine)
    assert isinstance(u, UniversalSet)  # the bench stores are single-head
    return {"selected": len(u), "rank": u.certificate["numerical_rank"]}


def run_uset_jl(path: Path) -> dict[str, Any]:
    """A universal set and reduced embeddings from one read (the runner fuses them)."""
    try:
        from streamattn.recipes.embeddings import Embeddings, ReduceConfig
    except ImportError as exc:
        raise NotAvailable(str(exc)) from exc
    from streamattn.recipes.selection import Selection
    from streamattn.recipes.universal import LeverageSet
    from streamattn.runner import run_recipes

    cfg = ReduceConfig()
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        uset, _ = run_recipes(
            str(path), [LeverageSet(Selection(EPS)), Embeddings(cfg, Path(tmp) / "emb.zarr")]
        ).results
    return {"selected": len(uset), "m": cfg.m, "method": cfg.method}


def run_ground_truth(path: Path) -> dict[str, Any]:
    try:
        from streamattn.operators.ground_truth import GroundTruth, GroundTruthSpec
    except ImportError as exc:
        raise NotAvailable(str(exc)) from exc
    from streamattn.runner import run_pass
    from streamattn.sources import open_keys

    src = open_keys(str(path))
    q = np.random.default_rng(0).standard_normal((256, src.d))
    (op,) = run_pass(src, [GroundTruth(GroundTruthSpec(q, eps=EPS))])
    return {"queries": 256, "heavy": int(op.result()["counts"].sum())}


def _row_scores(block: np.ndarray, w: np.ndarray) -> np.ndarray:
    y = block @ w
    return np.einsum("ij,ij->i", y, y)


def run_dask_gram(path: Path) -> dict[str, Any]:
    """Peer: two Dask passes, G = KᵀK (float64), then τ = ‖k W‖² by map_blocks."""
    import dask
    import dask.array as da

    k = da.from_zarr(str(path), component="keys").astype(np.float64)
    with dask.config.set(scheduler="threads"):
        g = (k.T @ k).compute()
        s, v = np.linalg.eigh(g)
        keep = s > 1e-10 * s[-1]
        w = v[:, keep] / np.sqrt(s[keep])
        scores = k.map_blocks(_row_scores, w, drop_axis=1, dtype=np.float64)
        idx = da.flatnonzero(scores >= EPS).compute()
    return {"selected": int(idx.size)}


def run_dask_tsqr(path: Path) -> dict[str, Any]:
    """Peer: Dask's TSQR, τ_j = ‖Q_j‖² (full column rank)."""
    import dask
    import dask.array as da

    k = da.from_zarr(str(path), component="keys").astype(np.float64)
    with dask.config.set(scheduler="threads"):
        q, _ = da.linalg.tsqr(k)
        idx = da.flatnonzero((q * q).sum(axis=1) >= EPS).compute()
    return {"selected": int(idx.size)}


def run_one(kind: str, path: Path) -> dict[str, Any]:
    if kind == "zarr-loop":
        return run_zarr_loop(path)
    if kind == "parallel-read":
        return run_parallel_read(path)
    if kind in ("uset-plain", "uset-affine"):
        return run_uset(path, kind.split("-")[1])
    if kind == "uset+jl":
        return run_uset_jl(path)
    if kind == "ground-truth":
        return run_ground_truth(path)
    if kind in ("dask-threads", "dask-cluster"):
        scheduler = "threads" if kind == "dask-threads" else "local-cluster"
        opts: dict[str, Any] = {"engine": "dask", "scheduler": scheduler}
        if scheduler == "local-cluster":
            opts.update(n_workers=2, threads_per_worker=1)
        return run_uset(path, "plain", **opts)
    if kind == "dask-gram":
        return run_dask_gram(path)
    if kind == "dask-tsqr":
        return run_dask_tsqr(path)
    raise ValueError(f"unknown configuration {kind!r}; choose from {list(KINDS)}")


def _cpu_idle() -> tuple[int, int]:
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)
    except OSError:  # not Linux
        return 0, 0


def child_main(kind: str, path: str) -> None:
    """Run one configuration in this (fresh) process; print one JSON line."""
    idle0, total0 = _cpu_idle()
    t0 = time.perf_counter()
    try:
        info = run_one(kind, Path(path))
        status = "ok"
    except NotAvailable as exc:
        info, status = {"reason": str(exc)}, "not available"
    seconds = time.perf_counter() - t0
    idle1, total1 = _cpu_idle()
    self_rss = peak_rss_bytes()  # VmHWM: ru_maxrss would inherit the parent's peak
    child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    busy = total1 - total0
    print(
        json.dumps(
            {
                "status": status,
                "seconds": seconds,
                "peak_rss_bytes": max(self_rss, child_rss),
                "cpu_idle_share": (idle1 - idle0) / busy if busy else None,
                **info,
            }
        )
    )


# ---------------------------------------------------------------------------- driver
def measure(kind: str, path: Path, repeat: int, timeout: float = 1800) -> dict[str, Any]:
    """Fastest of ``repeat`` fresh-process runs of one configuration."""
    runs = []
    for _ in range(repeat):
        proc = subprocess.run(
            [sys.executable, "-m", "streamattn.bench", "--one", kind, str(path)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-3:]
            return {"status": "failed", "error": " | ".join(tail)}
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        if runs[-1]["status"] != "ok":
            return runs[-1]
    best = min(runs, key=lambda r: r["seconds"])
    best["all_seconds"] = [r["seconds"] for r in runs]
    best["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in runs)
    return best


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
    }
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = [
            {k: p.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
            for p in threadpool_info()
        ]
    except ImportError:
        cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["blas"] = [{"name": cfg.get("name"), "version": cfg.get("version")}]
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu"] = next(
                (ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), None
            )
    except OSError:
        info["cpu"] = None
    return info


def bench_rows(
    cases: list[tuple[int, int, str, list[str]]], data_dir: Path, repeat: int, log: Any = print
) -> list[dict[str, Any]]:
    """Measure each (n, d, compressor, kinds) case; ratios against its own zarr loop."""
    rows: list[dict[str, Any]] = []
    for n, d, comp, kinds in cases:
        path = ensure_bench_store(data_dir, n, d, comp)
        nbytes = n * d * 4
        base: dict[str, float] = {}
        for kind in kinds:
            res = measure(kind, path, repeat)
            row = {"n": n, "d": d, "compressor": comp, "config": kind, **res}
            if res.get("status") == "ok":
                sec = res["seconds"]
                base.setdefault(kind, sec)
                row["rows_per_s"] = n / sec
                row["gb_per_s"] = nbytes / sec / 1e9
                if "zarr-loop" in base:
                    row["ratio_to_zarr_loop"] = sec / base["zarr-loop"]
                if "parallel-read" in base:
                    row["ratio_to_parallel_read"] = sec / base["parallel-read"]
                row.update(target_check(kind, row))
            rows.append(row)
            log(format_row(row))
    return rows


def target_check(kind: str, row: dict[str, Any]) -> dict[str, Any]:
    """``target`` (the stated limits) and ``meets_target`` for a configuration that has one."""
    if kind not in TARGETS or "ratio_to_zarr_loop" not in row:
        return {}
    loop, par = TARGETS[kind]
    ok = row["ratio_to_zarr_loop"] <= loop
    text = f"≤ {loop:g}× loop"
    if par is not None and "ratio_to_parallel_read" in row:
        ok = ok and row["ratio_to_parallel_read"] <= par
        text += f", ≤ {par:g}× parallel read"
    return {"target": text, "meets_target": bool(ok)}


def format_row(row: dict[str, Any]) -> str:
    if row.get("status") != "ok":
        why = row.get("reason") or row.get("error") or ""
        return f"n=2^{int(np.log2(row['n']))} d={row['d']} {row['compressor']:4s} "\
            f"{row['config']:14s} {row.get('status')}: {why}"
    return (
        f"n=2^{int(np.log2(row['n']))} d={row['d']} {row['compressor']:4s} {row['config']:14s} "
        f"{row['seconds']:8.2f} s  x{row.get('ratio_to_zarr_loop', float('nan')):5.2f} loop  "
        f"x{row.get('ratio_to_parallel_read', float('nan')):5.2f} par  "
        f"{row['gb_per_s']:5.2f} GB/s  RSS {row['peak_rss_bytes'] / 2**20:7.0f} MiB  "
        f"idle {100 * (row.get('cpu_idle_share') or 0):3.0f}%"
        + ("" if "meets_target" not in row else
           f"  target {'met' if row['meets_target'] else 'MISSED'}")
    )


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| n | d | store | configuration | time (s) | × zarr loop | × parallel read | "
        "rows/s | GB/s | peak RSS (MiB) | CPU idle | target |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        cells = [f"2^{int(np.log2(r['n']))}", str(r["d"]), r["compressor"], r["config"]]
        if r.get("status") != "ok":
            lines.append("| " + " | ".join(cells + [r.get("status", "?")] + [""] * 7) + " |")
            continue
        cells += [
            f"{r['seconds']:.2f}",
            f"{r['ratio_to_zarr_loop']:.2f}" if "ratio_to_zarr_loop" in r else "",
            f"{r['ratio_to_parallel_read']:.2f}" if "ratio_to_parallel_read" in r else "",
            f"{r['rows_per_s'] / 1e6:.2f} M",
            f"{r['gb_per_s']:.2f}",
            f"{r['peak_rss_bytes'] / 2**20:.0f}",
            f"{100 * r['cpu_idle_share']:.0f}%" if r.get("cpu_idle_share") is not None else "",
            "" if "meets_target" not in r else
            f"{r['target']}: {'met' if r['meets_target'] else 'missed'}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, rows: list[dict[str, Any]], extra: dict[str, Any]) -> None:
    from streamattn.io.outputs import to_jsonable, write_json_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    payload = {"machine": machine_info(), "commit": commit or None, **extra, "rows": rows}
    write_json_atomic(out_dir / "results.json", to_jsonable(payload))
    info = payload["machine"]
    blas = ", ".join(f"{b.get('internal_api') or b.get('name')} {b.get('version')} "
                     f"({b.get('architecture', '')}, {b.get('num_threads', '?')} threads)"
                     for b in info["blas"])
    md = (
        f"Machine: {info['cpu']}, {info['cpu_count']} cores, BLAS: {blas}, "
        f"numpy {info['numpy']}, Python {info['python']}; commit {payload['commit']}. "
        "CPU idle: share of the machine's CPU time left idle during the run (0%: "
        "contended by other work).\n\n"
        f"Command: `{extra.get('command', '')}`\n\n" + markdown_table(rows)
    )
    tmp = out_dir / "results.md.tmp"
    tmp.write_text(md)
    tmp.replace(out_dir / "results.md")


MAIN_KINDS = list(KINDS)
SIDE_KINDS = ["zarr-loop", "parallel-read", "uset-plain", "uset-affine"]
ZSTD_KINDS = ["zarr-loop", "parallel-read", "uset-plain"]


def default_cases(big: bool, quick: bool) -> list[tuple[int, int, str, list[str]]]:
    """d = 64 and 128, n = 2^20 and 2^22 (2^24 with ``big``); everything at d=128, n=2^22."""
    if quick:
        return [(2**20, 128, "none", [*SIDE_KINDS, "dask-gram"])]
    cases = [
        (2**20, 64, "none", SIDE_KINDS),
        (2**22, 64, "none", SIDE_KINDS),
        (2**20, 128, "none", SIDE_KINDS),
        (2**22, 128, "none", MAIN_KINDS),
        (2**22, 128, "zstd", ZSTD_KINDS),
    ]
    if big:
        cases.append((2**24, 128, "none", SIDE_KINDS))
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="streamattn bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return cmd_bench(args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--one", nargs=2, metavar=("KIND", "STORE"), help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", default="data/bench",
                        help="where stores are generated (reused by later runs)")
    parser.add_argument("--out", default=None,
                        help="results directory (default: a fresh runs/bench-<UTC time>)")
    parser.add_argument("--remove-data", action="store_true",
                        help="delete the stores this run generated when it ends")
    parser.add_argument("--log2n", type=int, nargs="+", default=None,
                        help="row counts as powers of two (default: 20 22)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration (min)")
    parser.add_argument("--big", action="store_true", help="also n = 2^24 (8 GB store)")
    parser.add_argument("--quick", action="store_true", help="one small store only")
    parser.add_argument(
        "--only", nargs="+", choices=KINDS, help="run only these configurations (d=128, 2^22)"
    )


def at_sizes(
    cases: list[tuple[int, int, str, list[str]]], sizes: list[int]
) -> list[tuple[int, int, str, list[str]]]:
    """Each (d, store) of ``cases`` with its largest configuration list, at every size."""
    widest: dict[tuple[int, str], list[str]] = {}
    for _, d, comp, kinds in cases:
        if len(kinds) > len(widest.get((d, comp), [])):
            widest[(d, comp)] = kinds
    return [(n, d, comp, kinds) for n in sizes for (d, comp), kinds in widest.items()]


def fresh_run_dir(root: Path) -> Path:
    """A new, not yet existing ``root/bench-<UTC time>[-k]`` (never over earlier results)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = root / f"bench-{stamp}"
    k = 1
    while path.exists():
        path = root / f"bench-{stamp}-{k}"
        k += 1
    return path


def cmd_bench(args: argparse.Namespace) -> int:
    if args.one:
        child_main(*args.one)
        return 0
    cases = default_cases(args.big, args.quick)
    if args.only:
        cases = [(2**22, 128, "none", ["zarr-loop", "parallel-read", *args.only])]
    if args.log2n:
        cases = at_sizes(cases, [2**k for k in args.log2n])
    out = Path(args.out) if args.out else fresh_run_dir(Path("runs"))
    data_dir = Path(args.data_dir)
    made = [store_path(data_dir, n, d, comp) for n, d, comp, _ in cases
            if not store_path(data_dir, n, d, comp).exists()]
    try:
        rows = bench_rows(cases, data_dir, args.repeat)
    finally:
        if args.remove_data:
            for path in made:
                shutil.rmtree(path, ignore_errors=True)
    command = "streamattn bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else
                                             sys.argv[1:])
    write_results(out, rows, {"command": command.strip(), "eps": EPS, "repeat": args.repeat})
    print(f"wrote {out}/results.json and results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
