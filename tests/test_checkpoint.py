"""Checkpoints: resume is bit-identical, faults lose nothing, corrupt files are refused."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from conftest import svd_leverage

import streamattn as sa
import streamattn.io.checkpoint as ck
from streamattn.cli import main
from streamattn.errors import InvalidInputError, OutputWriteError, StateFormatError
from streamattn.io.checkpoint import Checkpointer, read_state_file, write_state_file
from streamattn.operators import LeverageSpec
from streamattn.operators.protocol import decode_state, encode_state
from streamattn.recipes.universal import load_universal_set
from streamattn.sources import KeySource

N, D, ROWS = 3000, 8, 50  # 60 blocks


def make_store(path: Path, n: int = N, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, 3)) @ rng.standard_normal((3, D))
         + 0.1 * rng.standard_normal((n, D)) + 2.0).astype(np.float32)
    x[::97] *= 9.0
    arr = zarr.create_array(str(path), shape=x.shape, dtype=x.dtype, chunks=(ROWS, D),
                            compressors=None)
    arr[...] = x
    return path


def write_config(tmp: Path, store: Path, out: str, *, budget: bool = True,
                 every_blocks: int = 4, eps: float = 0.05) -> Path:
    sets = f"  - name: plain\n    eps: {eps}\n"
    sets += "  - name: affine\n    eps: 0.03\n    variant: affine\n"
    if budget:  # exact top-B: needs the second pass on this store
        sets += "  - name: top\n    budget: 40\n    variant: affine\n"
    cfg = tmp / f"{out}.yaml"
    cfg.write_text(
        f"input:\n  path: {store}\nselect:\n{sets}engine:\n  chunk_rows: {ROWS}\n"
        f"output:\n  dir: {tmp / out}\n  overwrite: true\nprogress: false\n"
        f"checkpoint:\n  every_blocks: {every_blocks}\n  every_seconds: null\n"
    )
    return cfg


NAMES = ("plain", "affine", "top")


def assert_same_outputs(a: Path, b: Path, names: tuple[str, ...] = NAMES) -> None:
    for name in names:
        x, y = load_universal_set(a, name), load_universal_set(b, name)
        np.testing.assert_array_equal(x.indices, y.indices)
        np.testing.assert_array_equal(x.scores, y.scores)  # bit for bit
        np.testing.assert_array_equal(x.rows, y.rows)


class Crash(Exception):
    pass


def crash_after(monkeypatch: pytest.MonkeyPatch, reads: int) -> list[tuple[int, int]]:
    """Make KeySource.read raise after ``reads`` reads; return the log of read ranges."""
    log: list[tuple[int, int]] = []
    original = KeySource.read

    def read(self: KeySource, start: int, stop: int) -> Any:
        if len(log) >= reads:
            raise Crash(f"simulated crash before rows [{start}, {stop})")
        log.append((start, stop))
        return original(self, start, stop)

    monkeypatch.setattr(KeySource, "read", read)
    return log


def count_reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    return crash_after(monkeypatch, 10**9)


def test_kill_during_a_run_then_resume_is_bit_identical(tmp_path: Path) -> None:
    store = make_store(tmp_path / "k.zarr")
    cfg = write_config(tmp_path, store, "out", budget=False, every_blocks=2)
    ckdir = tmp_path / "out.checkpoint"
    # The child is slowed deterministically (50 ms after each block), so it is still
    # folding blocks when the parent sees the first checkpoint and SIGKILLs it.
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import sys, time
        import streamattn.io.checkpoint as ck
        step = ck.Checkpointer.step
        def slow(self, *a, **k):
            time.sleep(0.05)
            return step(self, *a, **k)
        ck.Checkpointer.step = slow
        from streamattn.cli import main
        sys.exit(main(["run", {str(cfg)!r}, "--quiet"]))
    """))
    child = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (ckdir / "pass0.npz").exists():
            assert child.poll() is None, child.stderr.read().decode()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no checkpoint within 60 s"
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert not (tmp_path / "out").exists()  # killed before any output
    meta, _ = ck.unpack_operators(read_state_file(ckdir / "pass0.npz"))
    position = meta["position"]
    assert 0 < position < N

    log: list[tuple[int, int]] = []
    original = KeySource.read

    def counted(self: KeySource, start: int, stop: int) -> Any:
        log.append((start, stop))
        return original(self, start, stop)

    KeySource.read = counted  # type: ignore[method-assign]
    try:
        assert main(["run", str(cfg), "--quiet", "--resume"]) == 0
    finally:
        KeySource.read = original  # type: ignore[method-assign]
    assert min(a for a, _ in log) == position  # rows before the checkpoint not reread
    assert sum(b - a for a, b in log) == N - position
    assert not ckdir.exists()  # discarded once the output is written
    ref = write_config(tmp_path, store, "ref", budget=False, every_blocks=2)
    assert main(["run", str(ref), "--quiet"]) == 0
    assert_same_outputs(tmp_path / "out", tmp_path / "ref", ("plain", "affine"))
    assert_offline(tmp_path / "out", store, {"plain": 0.05, "affine": 0.03})


def assert_offline(out: Path, store: Path, eps: dict[str, float]) -> None:
    """Saved sets against the independent reference: a dense SVD of the whole store."""
    x = np.asarray(zarr.open_array(str(store), mode="r")[...], dtype=np.float64)
    for name, e in eps.items():
        tau, _ = svd_leverage(x, name == "affine")
        u = load_universal_set(out, name)
        np.testing.assert_array_equal(u.indices, np.flatnonzero(tau >= e))
        np.testing.assert_allclose(u.scores, tau[u.indices], rtol=1e-7, atol=1e-9)


def test_crash_in_the_second_pass_resumes_without_redoing_the_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(tmp_path / "k.zarr")
    cfg = write_config(tmp_path, store, "out")
    blocks = N // ROWS
    crash_after(monkeypatch, blocks + 25)  # pass 1 done, pass 2 at block 25
    with pytest.raises(Crash):
        main(["run", str(cfg), "--quiet"])
    monkeypatch.undo()
    assert (tmp_path / "out.checkpoint" / "pass1.npz").exists()
    log = count_reads(monkeypatch)
    assert main(["run", str(cfg), "--quiet", "--resume"]) == 0
    assert log[0][0] == 24 * ROWS and len(log) == blocks - 24  # pass 2 from its checkpoint
    monkeypatch.undo()
    ref = write_config(tmp_path, store, "ref")
    assert main(["run", str(ref), "--quiet"]) == 0
    assert_same_outputs(tmp_path / "out", tmp_path / "ref")
    assert load_universal_set(tmp_path / "out", "top").certificate["passes"] == 2


def test_kv_cache_resume_is_bit_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamattn.sources.kvcache import MultiHeadSource
    from streamattn.synthetic import SyntheticSpec, generate_kv_store

    spec = SyntheticSpec(n=2000, d=6, rank=3, chunk_rows=100, outliers=3, compressor="none")
    store = generate_kv_store(tmp_path / "kv.zarr", spec, layers=2, heads=2)
    sels = [sa.Selection(eps=0.05), sa.Selection(budget=10, variant="affine")]
    original = MultiHeadSource.read
    kw: dict[str, Any] = {"chunk_rows": 100}
    calls = []

    def read(self: MultiHeadSource, a: int, b: int) -> Any:
        if len(calls) == 13:
            raise Crash("crash")
        calls.append(a)
        return original(self, a, b)

    monkeypatch.setattr(MultiHeadSource, "read", read)
    with pytest.raises(Crash):
        sa.universal_sets(store, sels, checkpoint=Checkpointer(tmp_path / "ck", every_blocks=3),
                          **kw)
    monkeypatch.undo()
    resumed = sa.universal_sets(
        store, sels, checkpoint=Checkpointer(tmp_path / "ck", every_blocks=3, resume=True), **kw
    )
    fresh = sa.universal_sets(store, sels, **kw)
    for r, f in zip(resumed, fresh, strict=True):
        for (lay, h), u in r:
            np.testing.assert_array_equal(u.indices, f[lay, h].indices)
            np.testing.assert_array_equal(u.scores, f[lay, h].scores)


def test_dask_engine_resumes_from_completed_segments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import streamattn.engines as engines

    store = make_store(tmp_path / "k.zarr")
    sels = [sa.Selection(eps=0.05), sa.Selection(eps=0.03, variant="affine")]
    opts: dict[str, Any] = dict(engine="dask", chunk_rows=ROWS, scheduler="threads")
    original = engines.run_dask
    segments: list[tuple[int, int]] = []
    crash = [True]

    def run_dask(source: Any, ops: Any, **kw: Any) -> Any:
        rng = source.block_ranges(kw["chunk_rows"])
        if crash[0] and len(segments) == 3:
            raise Crash("cluster lost")
        segments.append((rng[0][0], rng[-1][1]))
        return original(source, ops, **kw)

    monkeypatch.setattr(engines, "run_dask", run_dask)
    with pytest.raises(Crash):
        sa.universal_sets(store, sels, checkpoint=Checkpointer(tmp_path / "ck", every_blocks=8),
                          **opts)
    assert segments == [(0, 400), (400, 800), (800, 1200)]  # 8 blocks of 50 rows each
    segments.clear()
    crash[0] = False
    resumed = sa.universal_sets(
        store, sels, checkpoint=Checkpointer(tmp_path / "ck", every_blocks=8, resume=True),
        **opts,
    )
    assert segments[0] == (1200, 1600)  # the three completed segments were not redone
    segments.clear()
    fresh = sa.universal_sets(store, sels, checkpoint=Checkpointer(None, every_blocks=8), **opts)
    local = sa.universal_sets(store, sels, chunk_rows=ROWS)
    for r, f, lo in zip(resumed, fresh, local, strict=True):
        np.testing.assert_array_equal(r.indices, f.indices)
        np.testing.assert_array_equal(r.scores, f.scores)  # same segments, same merge order
        np.testing.assert_array_equal(r.indices, lo.indices)
        np.testing.assert_allclose(r.scores, lo.scores, rtol=1e-9)


def test_corrupt_checkpoint_is_refused_not_restarted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store = make_store(tmp_path / "k.zarr")
    cfg = write_config(tmp_path, store, "out", budget=False)
    crash_after(monkeypatch, 10)
    with pytest.raises(Crash):
        main(["run", str(cfg), "--quiet"])
    monkeypatch.undo()
    path = tmp_path / "out.checkpoint" / "pass0.npz"
    good = path.read_bytes()
    # 1: bytes flipped on disk (the zip's CRC or the sha256 catches it)
    from test_update import flip_payload_byte

    flip_payload_byte(path)
    bad = path.read_bytes()
    assert main(["run", str(cfg), "--quiet", "--resume"]) == 2
    err = capsys.readouterr().err.lower()
    assert str(path).lower() in err and "corrupt" in err and "refusing" in err
    assert path.read_bytes() == bad and not (tmp_path / "out").exists()
    # 2: a well-formed archive whose content no longer matches its stored sha256
    with np.load(io_bytes(good)) as npz:
        data = {k: npz[k] for k in npz.files}
    key = next(k for k in data if k.endswith("state.r"))
    data[key] = data[key] * (1 + 1e-12)
    with open(path, "wb") as fh:
        np.savez(fh, **data)
    with pytest.raises(StateFormatError, match="checksum mismatch"):
        read_state_file(path)
    assert main(["run", str(cfg), "--quiet", "--resume"]) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def io_bytes(raw: bytes) -> Any:
    import io

    return io.BytesIO(raw)


def test_existing_checkpoint_needs_resume_and_the_same_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store = make_store(tmp_path / "k.zarr")
    cfg = write_config(tmp_path, store, "out", budget=False)
    crash_after(monkeypatch, 10)
    with pytest.raises(Crash):
        main(["run", str(cfg), "--quiet"])
    monkeypatch.undo()
    assert main(["run", str(cfg), "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err
    other = write_config(tmp_path, store, "out", budget=False, eps=0.07)
    assert main(["run", str(other), "--quiet", "--resume"]) == 2
    assert "other operators or settings" in capsys.readouterr().err
    assert (tmp_path / "out.checkpoint" / "pass0.npz").exists()


@pytest.mark.parametrize("when", ["at a checkpoint", "at the end of the pass"])
def test_store_changed_during_the_run_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    when: str,
) -> None:
    store = make_store(tmp_path / "k.zarr")
    every = 4 if when == "at a checkpoint" else 10**6
    cfg = write_config(tmp_path, store, "out", budget=False, every_blocks=every)
    original = KeySource.read
    seen: list[int] = []

    def read(self: KeySource, start: int, stop: int) -> Any:
        seen.append(start)
        if len(seen) == 6:  # another process appends rows mid-run
            arr = zarr.open_array(str(store), mode="r+")
            arr.resize((N + 10, D))
            arr[N:] = 0.5
        return original(self, start, stop)

    monkeypatch.setattr(KeySource, "read", read)
    assert main(["run", str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "changed during the run" in err and "(3000, 8)" in err and "(3010, 8)" in err
    assert not (tmp_path / "out").exists()
    src = sa.open_keys(store)
    with pytest.raises(InvalidInputError, match="changed during the run"):
        ck.check_unchanged(src, {"shape": [N, D]})


@pytest.mark.parametrize("fault", ["enospc", "read-only directory"])
def test_output_write_failure_keeps_previous_output_and_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    fault: str,
) -> None:
    store = make_store(tmp_path / "k.zarr")
    runs = tmp_path / "runs"
    runs.mkdir()
    if fault == "read-only directory" and not chmod_blocks_writes(tmp_path / "probe"):
        pytest.skip("chmod does not block writes for this user (root); enospc covers it")
    cfg = write_config(runs, store, "out")
    assert main(["run", str(cfg), "--quiet"]) == 0
    sets = {name: load_universal_set(runs / "out", name) for name in NAMES}
    before = snapshot(runs / "out")
    if fault == "enospc":
        def full(*args: Any, **kwargs: Any) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr("streamattn.io.outputs.write_arrays", full)
        assert main(["run", str(cfg), "--quiet"]) == 2
        assert "No space left on device" in capsys.readouterr().err
        assert snapshot(runs / "out") == before  # the previous output is untouched
        ckpt = runs / "out.checkpoint"
        assert (ckpt / "pass0.npz").exists() and (ckpt / "pass1.npz").exists()
        monkeypatch.undo()
        log = count_reads(monkeypatch)
        assert main(["run", str(cfg), "--quiet", "--resume"]) == 0
        assert log == []  # both passes were complete in the checkpoint: nothing reread
        for name, uset in sets.items():
            again = load_universal_set(runs / "out", name)
            np.testing.assert_array_equal(again.indices, uset.indices)
            np.testing.assert_array_equal(again.scores, uset.scores)
    else:
        os.chmod(runs, 0o555)
        try:
            assert main(["run", str(cfg), "--quiet"]) == 2
            assert "Permission denied" in capsys.readouterr().err
        finally:
            os.chmod(runs, 0o755)
        assert snapshot(runs / "out") == before  # the previous output is untouched


def chmod_blocks_writes(where: Path) -> bool:
    where.mkdir()
    os.chmod(where, 0o555)
    try:
        (where / "x").write_text("x")
    except OSError:
        return True
    finally:
        os.chmod(where, 0o755)
    return False


def snapshot(out: Path) -> dict[Path, bytes]:
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_checkpoint_write_failure_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store = make_store(tmp_path / "k.zarr")
    cfg = write_config(tmp_path, store, "out", budget=False, every_blocks=4)
    path = tmp_path / "out.checkpoint" / "pass0.npz"
    saves: list[bytes] = []
    original = ck._write_payload

    def filling(fh: Any, data: Any) -> None:
        if len(saves) == 2:  # the disk fills while the third checkpoint is written
            fh.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        saves.append(b"")
        original(fh, data)

    monkeypatch.setattr(ck, "_write_payload", filling)
    assert main(["run", str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "pass0.npz" in err and "No space left" in err and "intact" in err
    saves.clear()
    with pytest.raises(OutputWriteError, match=r"s\.npz.*No space left.*previous.*intact"):
        for _ in range(3):
            write_state_file(tmp_path / "s.npz", {"a": np.zeros(3)})
    monkeypatch.undo()
    meta, _ = ck.unpack_operators(read_state_file(path))  # still valid: the second one
    assert meta["position"] == 8 * ROWS
    assert [p.name for p in path.parent.iterdir()] == ["pass0.npz"]  # no temp file left
    assert main(["run", str(cfg), "--quiet", "--resume"]) == 0
    ref = write_config(tmp_path, store, "ref", budget=False, every_blocks=4)
    assert main(["run", str(ref), "--quiet"]) == 0
    assert_same_outputs(tmp_path / "out", tmp_path / "ref", ("plain", "affine"))


def test_state_file_round_trip_and_time_trigger(tmp_path: Path) -> None:
    state = {"a": np.arange(5.0), "b": np.array("text"), "c": np.zeros((0, 3))}
    write_state_file(tmp_path / "s.npz", state)
    back = read_state_file(tmp_path / "s.npz")
    assert set(back) == set(state)
    for k in state:
        np.testing.assert_array_equal(back[k], state[k])
        assert back[k].shape == state[k].shape
    assert decode_state(encode_state(state))["b"].shape == ()
    # every_seconds: a checkpoint once the interval has passed (here: after every block)
    src = sa.open_keys(np.random.default_rng(0).standard_normal((400, 4)))
    op = sa.LeverageScores(LeverageSpec(0.1))
    ckpt = Checkpointer(tmp_path / "ck", every_seconds=1e-9)
    sa.run_operators(src, [op], chunk_rows=100, checkpoint=ckpt)
    meta, ops = ck.unpack_operators(read_state_file(tmp_path / "ck" / "pass0.npz"))
    assert meta["position"] == 400 and ops[0].n_rows == 400


def test_a_record_with_crc_checksums_is_refused_with_the_reason(tmp_path: Path) -> None:
    # Format 4 records XXH3-64 digests; a format-2/3 record's CRC-32s would otherwise make
    # an unchanged store fail as "the store changed" (or its read log fail to load).
    from streamattn.errors import StateFormatError
    from streamattn.io.checkpoint import FORMAT, split_reads
    from streamattn.operators.block_digests import BlockDigests, BlockDigestsSpec

    def meta(version: int, layout: str) -> dict:
        return {"format": version, "reads": True, "position": 0, "chunk_rows": 10,
                "fingerprint": {"layout": layout}}

    for version in (2, 3):
        for layout in ("kv-layers-2x3", "2d"):
            with pytest.raises(StateFormatError, match=r"CKPT: .*format \d.*CRC-32.*XXH3-64"):
                split_reads(meta(version, layout), [BlockDigests(BlockDigestsSpec(4))], "CKPT")
    rec = split_reads(meta(FORMAT, "2d"), [BlockDigests(BlockDigestsSpec(4))], "CKPT")
    assert rec.position == 0 and rec.chunk_rows == 10
    # a format-3 checkpoint on disk (its read log a format-1 operator state of CRC-32s):
    # resuming refuses it with the reason before its operators are rebuilt
    import json

    src = sa.open_keys(np.random.default_rng(0).standard_normal((400, 4)))
    sa.run_operators(src, [sa.LeverageScores(LeverageSpec(0.1))], chunk_rows=100,
                     checkpoint=Checkpointer(tmp_path / "ck", every_blocks=1))
    path = tmp_path / "ck" / "pass0.npz"
    payload = read_state_file(path)
    old = json.loads(str(payload[ck.META_KEY]))
    old["format"] = 3
    payload[ck.META_KEY] = np.array(json.dumps(old, sort_keys=True))
    log = old["n_ops"] - 1
    payload[f"op{log}|format_version"] = np.array(1, dtype=np.int64)
    payload[f"op{log}|state.crcs"] = payload.pop(f"op{log}|state.digests").astype(np.uint32)
    write_state_file(path, payload)
    with pytest.raises(StateFormatError, match=r"pass0.npz: .*record format 3.*CRC-32"):
        sa.run_operators(src, [sa.LeverageScores(LeverageSpec(0.1))], chunk_rows=100,
                         checkpoint=Checkpointer(tmp_path / "ck", resume=True))
