"""Appended tokens: `streamattn update` folds new rows only and equals a fresh run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from conftest import svd_leverage

from streamattn.cli import main
from streamattn.errors import InvalidInputError, StateFormatError
from streamattn.io.update import STATE_FILE, update_output
from streamattn.recipes.universal import load_universal_set
from streamattn.sources import KeySource
from streamattn.sources.kvcache import MultiHeadSource
from streamattn.synthetic import SyntheticSpec, generate_kv_store

D, ROWS = 8, 64


def rows(n: int, seed: int, width: int = D) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3)) @ rng.standard_normal((3, width)) + 1.0
    x += 0.1 * rng.standard_normal((n, width))
    x[::113] *= 7.0
    return x.astype(np.float32)


def make_store(path: Path, n: int) -> Path:
    arr = zarr.create_array(str(path), shape=(n, D), dtype="float32", chunks=(ROWS, D))
    arr[...] = rows(n, 0)
    return path


def append(path: Path, extra: np.ndarray, name: str | None = None) -> None:
    """What a growing KV cache does: resize the array and write the new rows."""
    node = zarr.open(str(path), mode="r+")
    arr = node if name is None else node[name]
    n = arr.shape[0]
    arr.resize((n + extra.shape[0], arr.shape[1]))
    arr[n:] = extra


def config(tmp: Path, store: Path, out: str, *, budget: bool = False) -> Path:
    sets = "  - name: plain\n    eps: 0.05\n  - name: affine\n    eps: 0.03\n    variant: affine\n"
    if budget:
        sets += "  - name: top\n    budget: 30\n    variant: affine\n"
    cfg = tmp / f"{out}.yaml"
    cfg.write_text(f"input:\n  path: {store}\nselect:\n{sets}engine:\n  chunk_rows: {ROWS}\n"
                   f"output:\n  dir: {tmp / out}\n  save_state: true\nprogress: false\n")
    return cfg


def assert_equal_sets(a: Path, b: Path, names: list[str]) -> None:
    for name in names:
        x, y = load_universal_set(a, name), load_universal_set(b, name)
        np.testing.assert_array_equal(x.indices, y.indices)
        np.testing.assert_allclose(x.scores, y.scores, rtol=1e-9, atol=1e-15)
        np.testing.assert_array_equal(x.rows, y.rows)
        assert x.certificate["n"] == y.certificate["n"]


def flip_payload_byte(path: Path) -> None:
    """Flip one byte inside the data of the file's largest array (bit rot on disk)."""
    raw = bytearray(path.read_bytes())
    with np.load(path) as npz:
        data = max((npz[k] for k in npz.files), key=lambda a: a.nbytes).tobytes()
    at = bytes(raw).find(data) + len(data) // 2
    raw[at] ^= 0x55
    path.write_bytes(bytes(raw))


def logged_reads(monkeypatch: pytest.MonkeyPatch, cls: Any = KeySource) -> list[tuple[int, int]]:
    log: list[tuple[int, int]] = []
    original = cls.read

    def read(self: Any, start: int, stop: int) -> Any:
        log.append((start, stop))
        return original(self, start, stop)

    monkeypatch.setattr(cls, "read", read)
    return log


def test_update_folds_only_appended_rows_and_equals_a_fresh_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(tmp_path / "k.zarr", 1000)
    assert main(["run", str(config(tmp_path, store, "out")), "--quiet"]) == 0
    assert (tmp_path / "out" / STATE_FILE).exists()
    extra = rows(700, 1)
    extra[123] *= 30.0  # a new heavy key among the appended tokens
    append(store, extra)
    log = logged_reads(monkeypatch)
    assert main(["update", str(tmp_path / "out"), "--input", str(store), "--quiet"]) == 0
    # rows [0, 1000) are not folded again; only the last old block, whose chunk file the
    # append rewrote ([960, 1024) holds rows 960..999), is re-read to verify its checksum
    assert log[0] == (960, 1000)
    assert min(a for a, _ in log[1:]) == 1000 and sum(b - a for a, b in log[1:]) == 700
    monkeypatch.undo()
    assert main(["run", str(config(tmp_path, store, "fresh")), "--quiet"]) == 0
    assert_equal_sets(tmp_path / "out", tmp_path / "fresh", ["plain", "affine"])
    assert 1123 in load_universal_set(tmp_path / "out", "plain")
    # the independent reference: a dense SVD of all 1700 rows
    x = np.asarray(zarr.open_array(str(store), mode="r")[...], dtype=np.float64)
    for name, eps in (("plain", 0.05), ("affine", 0.03)):
        tau, _ = svd_leverage(x, name == "affine")
        u = load_universal_set(tmp_path / "out", name)
        np.testing.assert_array_equal(u.indices, np.flatnonzero(tau >= eps))
        np.testing.assert_allclose(u.scores, tau[u.indices], rtol=1e-7, atol=1e-9)
    # a second update with nothing new rewrites nothing
    assert update_output(tmp_path / "out", store)["sets"] == {}
    # and updates chain: append again, update again, still a fresh run's answer
    append(store, rows(300, 2))
    update_output(tmp_path / "out", store)
    assert main(["run", str(config(tmp_path, store, "fresh2")), "--quiet"]) == 0
    assert_equal_sets(tmp_path / "out", tmp_path / "fresh2", ["plain", "affine"])


def test_budget_mode_update_rereads_only_for_its_second_pass(tmp_path: Path) -> None:
    store = make_store(tmp_path / "k.zarr", 1500)
    assert main(["run", str(config(tmp_path, store, "out", budget=True)), "--quiet"]) == 0
    append(store, rows(500, 3))
    done = update_output(tmp_path / "out", store)
    info = done["report"]["update"]
    assert info["rows_read_pass1"] == 500
    assert load_universal_set(tmp_path / "out", "top").certificate["passes"] == 2
    assert info["second_pass_reread_rows"] == 2000  # the top-B pass needs every row: said so
    assert main(["run", str(config(tmp_path, store, "fresh", budget=True)), "--quiet"]) == 0
    assert_equal_sets(tmp_path / "out", tmp_path / "fresh", ["plain", "affine", "top"])


def test_kv_cache_update_equals_a_fresh_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = SyntheticSpec(n=900, d=6, rank=3, chunk_rows=ROWS, outliers=3)
    store = generate_kv_store(tmp_path / "kv.zarr", spec, layers=2, heads=2)
    assert main(["run", str(config(tmp_path, store, "out")), "--quiet"]) == 0
    for lay in range(2):
        append(store, rows(400, 10 + lay, width=12), f"keys/layer_{lay}")
    log = logged_reads(monkeypatch, MultiHeadSource)
    update_output(tmp_path / "out", store)
    assert log[0] == (896, 900)  # the last old block re-read: the append rewrote its chunk
    assert min(a for a, _ in log[1:]) == 900
    monkeypatch.undo()
    assert main(["run", str(config(tmp_path, store, "fresh")), "--quiet"]) == 0
    names = [f"{s}/layer_{lay}/head_{h}" for s in ("plain", "affine")
             for lay in range(2) for h in range(2)]
    assert_equal_sets(tmp_path / "out", tmp_path / "fresh", names)


def test_update_on_the_dask_engine_equals_a_fresh_run(tmp_path: Path) -> None:
    store = make_store(tmp_path / "k.zarr", 800)
    assert main(["run", str(config(tmp_path, store, "out")), "--quiet"]) == 0
    append(store, rows(400, 4))
    assert main(["update", str(tmp_path / "out"), "--input", str(store), "--quiet",
                 "--engine", "dask", "--scheduler", "threads"]) == 0
    assert main(["run", str(config(tmp_path, store, "fresh")), "--quiet"]) == 0
    assert_equal_sets(tmp_path / "out", tmp_path / "fresh", ["plain", "affine"])


def test_update_refuses_what_it_cannot_fold(tmp_path: Path, capsys: Any) -> None:
    store = make_store(tmp_path / "k.zarr", 500)
    assert main(["run", str(config(tmp_path, store, "out")), "--quiet"]) == 0
    before = (tmp_path / "out" / "report.json").read_bytes()
    # fewer rows than folded
    small = make_store(tmp_path / "small.zarr", 300)
    with pytest.raises(InvalidInputError, match="fewer than the 500 rows"):
        update_output(tmp_path / "out", small)
    # another width
    wide = zarr.create_array(str(tmp_path / "wide.zarr"), shape=(600, D + 1), dtype="float32")
    wide[...] = 1.0
    with pytest.raises(InvalidInputError, match="Refusing to combine"):
        update_output(tmp_path / "out", tmp_path / "wide.zarr")
    # a corrupt state file: refused with a message, through the CLI too
    state = tmp_path / "out" / STATE_FILE
    flip_payload_byte(state)
    append(store, rows(10, 5))
    with pytest.raises(StateFormatError, match="corrupt"):
        update_output(tmp_path / "out", store)
    assert main(["update", str(tmp_path / "out"), "--input", str(store)]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert (tmp_path / "out" / "report.json").read_bytes() == before  # nothing rewritten
    # an output without saved states
    state.unlink()
    with pytest.raises(InvalidInputError, match=r"state\.npz: not found"):
        update_output(tmp_path / "out", store)
