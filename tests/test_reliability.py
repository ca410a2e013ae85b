"""Issue 17, items 1-5 and 9: inputs never written, crash-safe and locked outputs,
detected store changes, missing chunks refused, umask permissions.

Every test here fails on the code before the fix (recorded in docs/reliability.md).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from streamattn.cli import main
from streamattn.errors import InvalidInputError
from streamattn.io import safety
from streamattn.sources import KeySource, open_keys

N, D, ROWS = 1200, 6, 100  # 12 blocks
REPO = Path(__file__).resolve().parents[1]


def keys(n: int = N, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3)) @ rng.standard_normal((3, D)) + 0.2 * rng.standard_normal(
        (n, D)
    )
    return (x + 1.0).astype(np.float32)


def make_store(path: Path, x: np.ndarray | None = None, *, compressed: bool = False) -> Path:
    x = keys() if x is None else x
    extra: dict[str, Any] = {} if compressed else {"compressors": None}
    arr = zarr.create_array(str(path), shape=x.shape, dtype=x.dtype, chunks=(ROWS, D), **extra)
    arr[...] = x
    return path


def tree_digest(path: Path) -> str:
    """sha256 over every file's relative path and bytes under ``path``."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def select(store: Path | str, out: Path | str, *extra: str) -> int:
    return main(["select", str(store), "--eps", "0.05", "--out", str(out), "--quiet", *extra])


def run_config(tmp: Path, store: Path, out: Path, *, overwrite: str | None = None,
               every_blocks: int | None = None) -> Path:
    text = (f"input:\n  path: {store}\nselect:\n  - name: plain\n    eps: 0.05\n"
            f"engine:\n  chunk_rows: {ROWS}\noutput:\n  dir: {out}\n")
    if overwrite is not None:
        text += f"  overwrite: {overwrite}\n"
    if every_blocks is not None:
        text += f"checkpoint:\n  every_blocks: {every_blocks}\n  every_seconds: null\n"
    text += "progress: false\n"
    cfg = tmp / f"cfg-{out.name}.yaml"
    cfg.write_text(text)
    return cfg


# ---------------------------------------------------------------------------- item 1
@pytest.mark.parametrize("how", ["same", "dotdot", "inside", "inside-deep", "symlinked-parent",
                                 "contains"])
def test_output_that_is_inside_or_around_the_input_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    store = make_store(tmp_path / "data" / "X.zarr")
    before = tree_digest(tmp_path / "data")
    (tmp_path / "sub").mkdir()
    os.symlink(store, tmp_path / "link")
    out = {
        "same": store,
        "dotdot": tmp_path / "sub" / ".." / "data" / "X.zarr",
        "inside": store / "res",
        "inside-deep": store / "c" / "out",
        "symlinked-parent": tmp_path / "link" / "res",
        "contains": tmp_path / "data",
    }[how]
    assert select(store, out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "the input" in err and "never writes" in err and "Traceback" not in err
    assert tree_digest(tmp_path / "data") == before  # not one byte written, nothing added
    assert store.is_dir()


def test_run_config_whose_output_is_the_input_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = make_store(tmp_path / "X.zarr")
    before = tree_digest(store)
    # output.overwrite defaults to true: no flag needed to hit the input
    assert main(["run", str(run_config(tmp_path, store, store)), "--quiet"]) == 2
    assert "the input" in capsys.readouterr().err
    assert tree_digest(store) == before


def test_checkpoint_path_that_is_an_input_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = make_store(tmp_path / "r.checkpoint")  # OUT.checkpoint of --out r
    before = tree_digest(store)
    assert select(store, tmp_path / "r") == 2
    assert "checkpoint" in capsys.readouterr().err
    assert tree_digest(store) == before and not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", ["reduce", "window"])
def test_other_commands_refuse_an_output_over_the_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    store = make_store(tmp_path / "X.zarr")
    before = tree_digest(store)
    argv = {
        "reduce": ["reduce", str(store), "--m", "2", "--method", "gaussian"],
        "window": ["window", str(store), "--window", "300", "--block", "100", "--eps", "0.1"],
    }[command]
    assert main([*argv, "--out", str(store), "--overwrite", "--quiet"]) == 2
    assert "the input" in capsys.readouterr().err
    assert tree_digest(store) == before


def test_overwrite_replaces_only_a_streamattn_output_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = make_store(tmp_path / "X.zarr")
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    # a config without output.overwrite (default true), like the embedded default job
    assert main(["run", str(run_config(tmp_path, store, mine)), "--quiet"]) == 2
    assert "streamattn did not write" in capsys.readouterr().err
    assert (mine / "thesis.tex").read_text() == "years of work"
    out = tmp_path / "res"
    assert main(["run", str(run_config(tmp_path, store, out))]) == 0
    capsys.readouterr()
    assert main(["run", str(run_config(tmp_path, store, out))]) == 0
    assert f"replacing {out}" in capsys.readouterr().out


# ---------------------------------------------------------------------------- item 4
KILL_BETWEEN_RENAMES = """
import os, sys
from pathlib import Path
import streamattn.io.outputs as outputs
real, calls = os.replace, []
def replace(a, b):
    calls.append((a, b))
    real(a, b)
    if len(calls) == 1:  # OUT moved aside; die before the new result is moved in
        os._exit(9)
outputs.os.replace = replace
with outputs.atomic_dir(sys.argv[1], overwrite=True) as tmp:
    (tmp / "result.txt").write_text("new")
"""


def _python(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_a_kill_between_the_two_renames_is_recovered_by_the_next_writer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from streamattn.io.outputs import atomic_dir

    out = tmp_path / "OUT"
    with atomic_dir(out) as tmp:
        (tmp / "result.txt").write_text("old")
    killed = _python(KILL_BETWEEN_RENAMES, str(out))
    assert killed.returncode == 9
    assert not out.exists() and list(tmp_path.glob(".OUT.old-*"))  # the window of the bug
    assert list(tmp_path.glob(".OUT.tmp-*"))  # and a half-built temporary
    # the next writer fails midway: the old result must be back at OUT all the same
    with pytest.raises(RuntimeError), atomic_dir(out, overwrite=True) as tmp:
        raise RuntimeError("the next run fails too")
    assert (out / "result.txt").read_text() == "old"
    assert "restored" in capsys.readouterr().err
    assert not list(tmp_path.glob(".OUT.old-*")) and not list(tmp_path.glob(".OUT.tmp-*"))


def test_stale_temporaries_of_dead_runs_are_removed(tmp_path: Path) -> None:
    from streamattn.io.outputs import atomic_dir

    out = tmp_path / "OUT"
    stale = tmp_path / ".OUT.tmp-999999-abcd"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"x" * 100)
    with atomic_dir(out) as tmp:
        (tmp / "result.txt").write_text("new")
    assert not stale.exists() and (out / "result.txt").read_text() == "new"


# ---------------------------------------------------------------------------- item 5
SLOW_SELECT = """
import sys, time
from pathlib import Path
from streamattn.sources import KeySource
from streamattn.cli import main
real = KeySource.read
def read(self, a, b):
    Path(sys.argv[3]).touch()
    time.sleep(0.15)
    return real(self, a, b)
KeySource.read = read
sys.exit(main(["select", sys.argv[1], "--eps", "0.05", "--chunk-rows", "100",
               "--out", sys.argv[2], "--quiet"]))
"""


def test_a_second_writer_of_the_same_output_gets_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = make_store(tmp_path / "X.zarr")
    out, started = tmp_path / "OUT", tmp_path / "started"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen([sys.executable, "-c", SLOW_SELECT, str(store), str(out),
                              str(started)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists()
        assert select(store, out, "--chunk-rows", "100") == 2
        err = capsys.readouterr().err
        assert "another streamattn process" in err and f"pid {first.pid}" in err
        assert "Traceback" not in err
    finally:
        _, first_err = first.communicate(timeout=120)
    assert first.returncode == 0, first_err
    assert (out / "result.zarr").is_dir()
    assert not (tmp_path / "OUT.checkpoint").exists()  # no stale checkpoint left behind
    assert not safety.lock_path(out).exists()  # the last holder removed its lock file


def test_a_waiter_that_locks_an_unlinked_lock_file_retries_on_the_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race that removing lock files opens: a waiter opens .OUT.lock, the holder
    # unlinks it and releases, the waiter wins the flock of the *unlinked* file while a
    # third process creates and locks a new .OUT.lock. The waiter must not count as holder.
    out = tmp_path / "OUT"
    path = safety.lock_path(out)
    original = safety._acquire_once
    calls = [0]

    def racing(p: Path, o: Any) -> int:
        calls[0] += 1
        fd = original(p, o)
        if calls[0] == 1:
            p.unlink()
            p.write_text("")  # someone else's fresh lock file
        return fd

    monkeypatch.setattr(safety, "_acquire_once", racing)
    with safety.output_lock(out):
        assert calls[0] == 2
        held = os.fstat(safety._HELD[str(safety.resolved(path))][0])
        assert (held.st_dev, held.st_ino) == (path.stat().st_dev, path.stat().st_ino)
    assert not path.exists()


MUTEX_WORKER = '''
import os, sys, time
from streamattn.errors import OutputLockedError
from streamattn.io import safety
out, inside = sys.argv[1], sys.argv[2]
done = 0
while done < 60:
    try:
        with safety.output_lock(out):
            fd = os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # fails if shared
            os.close(fd)
            time.sleep(0.001)
            os.unlink(inside)
            done += 1
    except OutputLockedError:
        time.sleep(0.0005)
'''


def test_removed_lock_files_still_admit_one_writer_at_a_time(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-c", MUTEX_WORKER, str(tmp_path / "OUT"), str(tmp_path / "inside")]
    procs = [subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errs


# ---------------------------------------------------------------------------- item 2
def _interrupt_after(monkeypatch: pytest.MonkeyPatch, reads: int) -> None:
    original = KeySource.read
    count = [0]

    def read(self: KeySource, start: int, stop: int) -> Any:
        count[0] += 1
        if count[0] > reads:
            raise KeyboardInterrupt
        return original(self, start, stop)

    monkeypatch.setattr(KeySource, "read", read)


def _planted() -> np.ndarray:
    x = keys()
    x[700] = 40.0 * np.linalg.norm(x[:5], axis=1).mean() * np.eye(D)[0]  # a heavy key
    return x


@pytest.mark.parametrize("change", ["rewritten in place", "replaced by another store"])
def test_resume_refuses_a_store_whose_read_part_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    change: str,
) -> None:
    store = make_store(tmp_path / "X.zarr", _planted())
    out = tmp_path / "OUT"
    cfg = run_config(tmp_path, store, out, every_blocks=1)
    _interrupt_after(monkeypatch, 9)  # rows [0, 900) folded and checkpointed
    assert main(["run", str(cfg), "--quiet"]) == 130
    monkeypatch.undo()
    assert (tmp_path / "OUT.checkpoint" / "pass0.npz").exists()
    if change == "rewritten in place":  # row 100 x 1000, before the checkpoint position
        arr = zarr.open_array(str(store), mode="r+")
        arr[100] = arr[100] * 1000.0
        first = "rows [100, 200)"
    else:  # same shape, other data, the heavy key elsewhere
        import shutil

        shutil.rmtree(store)
        make_store(store, keys(seed=5))
        first = "rows [0, 100)"
    assert main(["run", str(cfg), "--quiet", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "changed since" in err and first in err and "Traceback" not in err
    assert not out.exists()


def test_resume_of_an_unchanged_store_still_works_and_rereads_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(tmp_path / "X.zarr", _planted())
    out = tmp_path / "OUT"
    cfg = run_config(tmp_path, store, out, every_blocks=1)
    _interrupt_after(monkeypatch, 9)
    assert main(["run", str(cfg), "--quiet"]) == 130
    monkeypatch.undo()
    log: list[int] = []
    original = KeySource.read
    monkeypatch.setattr(KeySource, "read",
                        lambda self, a, b: (log.append(a), original(self, a, b))[1])
    assert main(["run", str(cfg), "--quiet", "--resume"]) == 0
    assert min(log) == 900  # the verified prefix was not re-read: its files are untouched
    from streamattn.recipes.universal import load_universal_set

    assert 700 in load_universal_set(out, "plain")


def test_update_with_another_store_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = make_store(tmp_path / "X.zarr")
    out = tmp_path / "OUT"
    assert main(["run", str(run_config(tmp_path, store, out)), "--quiet"]) == 0
    other = make_store(tmp_path / "Y.zarr", keys(N + 300, seed=3))  # same d, more rows
    before = tree_digest(out)
    assert main(["update", str(out), "--input", str(other), "--quiet"]) == 2
    assert "changed since" in capsys.readouterr().err
    assert tree_digest(out) == before
    # same rows, other content: not "up to date"
    same_n = make_store(tmp_path / "Z.zarr", keys(N, seed=4))
    assert main(["update", str(out), "--input", str(same_n), "--quiet"]) == 2
    assert "changed since" in capsys.readouterr().err


# ---------------------------------------------------------------------------- item 3
@pytest.mark.parametrize("compressed", [False, True])
def test_a_missing_chunk_file_is_an_error_naming_chunk_and_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], compressed: bool
) -> None:
    store = make_store(tmp_path / "X.zarr", compressed=compressed)
    os.remove(store / "c" / "3" / "0")
    assert select(store, tmp_path / "OUT") == 2
    err = capsys.readouterr().err
    assert "c/3/0" in err and "rows [300, 400)" in err and "missing" in err
    assert not (tmp_path / "OUT").exists()
    # an explicit opt-in reads the fill value (zeros) there
    src = open_keys(store, fill_missing=True)
    np.testing.assert_array_equal(src.read(300, 400).rows, 0.0)
    assert select(store, tmp_path / "OUT", "--fill-missing-chunks") == 0


def test_an_inner_chunk_left_out_of_a_shard_is_an_error_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # zarr leaves an all-fill inner chunk out of its shard and reads it back as fill:
    # the same silent zeros as a missing chunk file, detected from the shard's index.
    k = keys(1050, seed=5)
    k[500:600] = 0.0
    group = zarr.open_group(str(tmp_path / "S.zarr"), mode="w")
    arr = group.create_array("keys", shape=k.shape, chunks=(100, D), shards=(400, D),
                             dtype="float32", fill_value=0.0)
    arr[:] = k
    assert select(tmp_path / "S.zarr", tmp_path / "OUT") == 2
    err = capsys.readouterr().err
    assert "(5, 0) inside the shard file" not in err  # coordinates are within the shard
    assert "(1, 0) inside the shard file" in err and "c/1/0" in err
    assert "rows [500, 600)" in err and "Traceback" not in err
    src = open_keys(tmp_path / "S.zarr", fill_missing=True)
    np.testing.assert_array_equal(src.read(0, 1050).rows, k)
    # the last shard's inner chunks beyond row 1050 are never written: not "missing"
    k[500:600] = 1.0
    arr[:] = k
    np.testing.assert_array_equal(open_keys(tmp_path / "S.zarr").read(0, 1050).rows, k)


def test_an_inner_chunk_left_out_of_a_head_shard_names_head_rows(tmp_path: Path) -> None:
    from streamattn.sources.chunkfiles import ChunkFiles

    cache = np.ones((3, 800, D), dtype=np.float32)
    cache[2, 300:400] = 0.0  # head 2, rows [300, 400)
    arr = zarr.create_array(str(tmp_path / "H.zarr"), shape=cache.shape,
                            chunks=(1, 100, D), shards=(3, 400, D), dtype="float32",
                            fill_value=0.0)
    arr[:] = cache
    files = ChunkFiles.of(arr, row_axis=1)
    assert files is not None
    found = files.first_missing(0, 800)
    assert found is not None and found[1:] == (300, 400)
    assert str(found[0]).startswith("(2, 3, 0) inside the shard file")
    assert files.first_missing(400, 800) is None


@pytest.mark.parametrize("compressed", [False, True])
def test_a_chunk_file_vanishing_mid_run_is_an_error_locally_and_on_dask(
    tmp_path: Path, compressed: bool
) -> None:
    from streamattn.engines import run_operators
    from streamattn.operators import LeverageScores, LeverageSpec

    store = make_store(tmp_path / "X.zarr", compressed=compressed)
    src = open_keys(store)  # opened (and checked) while complete
    os.remove(store / "c" / "7" / "0")
    for engine in ("local", "dask"):
        with pytest.raises(InvalidInputError, match=r"c/7/0 \(rows \[700, 800\)\)"):
            run_operators(src, [LeverageScores(LeverageSpec(0.05))], engine=engine,
                          chunk_rows=ROWS)


# ---------------------------------------------------------------------------- item 9
def test_outputs_get_the_permissions_of_the_umask(tmp_path: Path) -> None:
    store = make_store(tmp_path / "X.zarr")
    old = os.umask(0o022)
    try:
        assert select(store, tmp_path / "OUT") == 0
    finally:
        os.umask(old)
    assert (tmp_path / "OUT").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "OUT" / "report.json").stat().st_mode & 0o777 == 0o644
    old = os.umask(0o077)
    try:
        assert select(store, tmp_path / "OUT2") == 0
    finally:
        os.umask(old)
    assert (tmp_path / "OUT2").stat().st_mode & 0o777 == 0o700


# ---------------------------------------------------------------------------- item 8
def _one_clean_line(err: str) -> None:
    assert err.startswith("streamattn: error: ") and "Traceback" not in err
    assert err.strip().count("\n") == 0


def test_unreadable_metadata_is_one_clean_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("keys", data=keys())
    # zarr.json with mode 000 (root can read anything, so the OS error is injected)
    def denied(self: Any, key: Any) -> bool:
        raise PermissionError(13, "Permission denied", str(tmp_path / "g.zarr/keys/zarr.json"))

    monkeypatch.setattr(zarr.Group, "__contains__", denied)
    assert select(tmp_path / "g.zarr", tmp_path / "OUT") == 2
    err = capsys.readouterr().err
    _one_clean_line(err)
    assert "Permission denied" in err
    monkeypatch.undo()
    # a data type zarr cannot read
    import json

    meta_path = tmp_path / "g.zarr" / "keys" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["data_type"] = "bfloat16"
    meta_path.write_text(json.dumps(meta))
    for extra in ([], ["--heads", "2"]):
        assert select(tmp_path / "g.zarr", tmp_path / "OUT", *extra) == 2
        err = capsys.readouterr().err
        _one_clean_line(err)
        assert "bfloat16" in err


def test_bad_npy_with_heads_and_bad_heads_attributes_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "ok.npy", keys()[:, :6])
    raw = (tmp_path / "ok.npy").read_bytes()
    (tmp_path / "truncated.npy").write_bytes(raw[:100])
    np.save(tmp_path / "object.npy", np.array([[1, "a"]], dtype=object), allow_pickle=True)
    for name in ("truncated.npy", "object.npy"):
        assert select(tmp_path / name, tmp_path / "OUT", "--heads", "2") == 2
        err = capsys.readouterr().err
        _one_clean_line(err)
        assert name in err
    for bad in ("abc", 2.5, 0):
        store = tmp_path / f"kv-{bad}.zarr"
        group = zarr.open_group(str(store), mode="w")
        layers = group.require_group("keys")
        layers.attrs["heads"] = bad
        layers.create_array("layer_0", data=np.ascontiguousarray(keys()[:, :6]))
        assert select(store, tmp_path / "OUT") == 2
        err = capsys.readouterr().err
        _one_clean_line(err)
        assert "'heads' attribute must be a whole number" in err  # 2.5 is not split into 2


@pytest.mark.parametrize("array", ["../X.zarr", "keys/../../X.zarr", "/abs", "a//b", "."])
def test_array_names_that_leave_the_store_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], array: str
) -> None:
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("keys", data=keys())
    make_store(tmp_path / "X.zarr")
    assert select(tmp_path / "g.zarr", tmp_path / "OUT", "--array", array) == 2
    err = capsys.readouterr().err
    _one_clean_line(err)
    assert "not a plain name inside the store" in err


@pytest.mark.parametrize("name", ["a/b", "..", "../evil", ".hidden", ""])
def test_selection_names_are_validated_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    store = make_store(tmp_path / "X.zarr")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"input:\n  path: {store}\nselect:\n  - name: '{name}'\n    eps: 0.05\n"
                   f"output:\n  dir: {tmp_path / 'OUT'}\nprogress: false\n")
    original = KeySource.read
    reads: list[int] = []
    KeySource.read = lambda self, a, b: (reads.append(a), original(self, a, b))[1]  # type: ignore[method-assign]
    try:
        assert main(["run", str(cfg), "--quiet"]) == 2
    finally:
        KeySource.read = original  # type: ignore[method-assign]
    err = capsys.readouterr().err
    _one_clean_line(err)
    assert "select[0].name" in err and reads == []
    assert not (tmp_path / "OUT.checkpoint").exists()  # nothing left to block a rerun


def test_empty_select_and_a_window_every_off_the_block_grid_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = make_store(tmp_path / "X.zarr")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"input:\n  path: {store}\nselect: []\noutput:\n  dir: {tmp_path / 'O'}\n")
    assert main(["run", str(cfg), "--quiet"]) == 2
    assert "select: is empty" in capsys.readouterr().err
    assert not (tmp_path / "O").exists()
    argv = ["window", str(store), "--window", "300", "--block", "100", "--every", "250",
            "--eps", "0.1", "--out", str(tmp_path / "W"), "--quiet"]
    assert main(argv) == 2
    assert "not a multiple of --block 100" in capsys.readouterr().err
    assert not (tmp_path / "W").exists()


def test_a_symlinked_checkpoint_directory_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = make_store(tmp_path / "X.zarr")
    elsewhere = tmp_path / "precious"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    os.symlink(elsewhere, tmp_path / "OUT.checkpoint")
    assert select(store, tmp_path / "OUT") == 2
    err = capsys.readouterr().err
    _one_clean_line(err)
    assert "symlink" in err
    assert (elsewhere / "keep.txt").read_text() == "mine" and not (tmp_path / "OUT").exists()
