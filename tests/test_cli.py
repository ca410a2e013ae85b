"""The command line end to end on small stores: run, select, generate, inspect; outputs
readable; existing outputs refused without --overwrite; bad input exits 2 with one line and
writes nothing. In-process through ``streamattn.cli.main`` plus one installed-entry-point run."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import svd_leverage

from streamattn import universal_set
from streamattn.cli import main
from streamattn.recipes.universal import load_universal_set
from streamattn.synthetic import SyntheticSpec, synthetic_rows

SMALL = {"n": 3000, "d": 8, "rank": 4, "outliers": 3, "chunk_rows": 500, "seed": 1}


def tree(path: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``path`` (or the file itself) with its bytes and mtime."""
    if not path.exists():
        return {}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


def small_config(tmp_path: Path, overwrite: bool = False) -> Path:
    gen = ", ".join(f"{k}: {v}" for k, v in SMALL.items())
    text = f"""
input:
  path: {tmp_path / "store.zarr"}
  generate: {{{gen}}}
select:
  - {{name: plain, eps: 0.05}}
  - {{name: affine, eps: 0.05, variant: affine}}
  - {{name: top7, budget: 7, variant: affine}}
output:
  dir: {tmp_path / "out"}
  overwrite: {str(overwrite).lower()}
progress: false
"""
    path = tmp_path / "small.yaml"
    path.write_text(text)
    return path


def stray_temporaries(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_run_writes_every_set_and_refuses_to_overwrite(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    cfg = small_config(tmp_path)
    assert main(["run", str(cfg)]) == 0
    out = tmp_path / "out"
    summary = capsys.readouterr().out
    assert "generated store" in summary and "3 universal set(s)" in summary
    store = tmp_path / "store.zarr"
    x = zarr.open_array(str(store / "keys"), mode="r")[...]
    np.testing.assert_array_equal(x, synthetic_rows(SyntheticSpec(**SMALL), 0, 3000))
    for name, variant in (("plain", "plain"), ("affine", "affine")):
        u = load_universal_set(out, name)
        tau, _ = svd_leverage(x, variant == "affine")
        np.testing.assert_array_equal(u.indices, np.flatnonzero(tau >= 0.05))
        np.testing.assert_allclose(u.scores, tau[u.indices], atol=1e-9)
        np.testing.assert_array_equal(u.rows, x[u.indices])
        assert u.certificate["variant"] == variant
    planted = zarr.open_group(str(store), mode="r").attrs["planted_outliers"]
    assert set(planted) <= set(load_universal_set(out, "affine").indices.tolist())
    top = load_universal_set(out, "top7")
    np.testing.assert_array_equal(
        top.indices, universal_set(store, budget=7, variant="affine").indices
    )
    report = json.loads((out / "report.json").read_text())
    assert set(report["sets"]) == {"plain", "affine", "top7"}
    assert report["config"]["select"][2]["budget"] == 7

    # a second run: the cached store is reused, the existing output is refused untouched
    before, store_before = tree(out), tree(store)
    assert main(["run", str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "output already exists" in err and len(err.splitlines()) == 1
    assert tree(out) == before and tree(store) == store_before

    # --overwrite replaces the whole directory atomically (a stray file does not survive)
    (out / "stray.txt").write_text("old")
    assert main(["run", str(cfg), "--overwrite", "--quiet"]) == 0
    assert not (out / "stray.txt").exists()
    assert load_universal_set(out, "top7").indices.tolist() == top.indices.tolist()
    assert not stray_temporaries(tmp_path)
    assert tree(store) == store_before  # the input is never written


@pytest.fixture
def npy_keys(tmp_path: Path) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 6)).astype(np.float32)
    x[[10, 200, 333]] *= 30.0
    path = tmp_path / "keys.npy"
    np.save(path, x)
    return path, x


@pytest.mark.parametrize(
    ("flags", "name", "kwargs"),
    [
        (["--eps", "0.05"], "plain-eps0.05", {"eps": 0.05}),
        (
            ["--eps", "0.05", "--variant", "affine"],
            "affine-eps0.05",
            {"eps": 0.05, "variant": "affine"},
        ),
        (["--budget", "5"], "plain-top5", {"budget": 5}),
        (
            ["--budget", "5", "--variant", "affine", "--chunk-rows", "64"],
            "affine-top5",
            {"budget": 5, "variant": "affine"},
        ),
        (["--eps", "0.01", "--budget", "4"], "plain-eps0.01-top4", {"eps": 0.01, "budget": 4}),
    ],
)
def test_select(
    flags: list[str], name: str, kwargs: dict, npy_keys, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    path, x = npy_keys
    out = tmp_path / "sel"
    assert main(["select", str(path), *flags, "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")  # --quiet: no summary, no progress bar
    got = load_universal_set(out, name)
    want = universal_set(x, **kwargs)
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-10)
    np.testing.assert_array_equal(got.rows, x[got.indices])
    assert got.certificate["source"]["path"] == str(path)


def test_select_refuses_existing_output_and_overwrites_atomically(
    npy_keys, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    path, _ = npy_keys
    out = tmp_path / "sel"
    args = ["select", str(path), "--eps", "0.05", "--out", str(out), "--quiet"]
    assert main(args) == 0
    before = tree(out)
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert tree(out) == before
    assert main([*args[:-1], "--overwrite", "--quiet"]) == 0
    assert tree(out).keys() == before.keys() and tree(out) != before
    assert not stray_temporaries(tmp_path)


def corrupt_store(tmp_path: Path) -> Path:
    path = tmp_path / "corrupt.zarr"
    arr = zarr.create_array(str(path), shape=(100, 4), dtype="float32", chunks=(10, 4))
    arr[...] = np.random.default_rng(0).standard_normal((100, 4))
    (path / "c" / "6" / "0").write_bytes(b"garbage")
    return path


def nan_store(tmp_path: Path) -> Path:
    x = np.random.default_rng(0).standard_normal((100, 4))
    x[77, 1] = np.nan
    np.save(tmp_path / "nan.npy", x)
    return tmp_path / "nan.npy"


@pytest.mark.parametrize(
    ("make", "flags", "message"),
    [
        (lambda t: t / "missing.zarr", ["--eps", "0.1"], "no such file or directory"),
        (nan_store, ["--eps", "0.1"], "key row 77 contains NaN"),
        (corrupt_store, ["--eps", "0.1"], r"rows \[60, 70\)"),
        (nan_store, ["--eps", "0"], r"eps must be in \(0, 1\]"),
        (nan_store, ["--eps", "1.5"], r"eps must be in \(0, 1\]"),
        (nan_store, ["--budget", "101"], "larger than the number of keys"),
        (nan_store, ["--budget", "0"], "budget must be an integer >= 1"),
        (nan_store, [], "give eps"),
        (
            lambda t: (t / "k.txt").write_text("x") and t / "k.txt",
            ["--eps", "0.1"],
            "not a key store",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    make, flags, message, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    work = tmp_path / "work"
    work.mkdir()
    src = make(work)
    before = tree(work)
    out = tmp_path / "out"
    assert main(["select", str(src), *flags, "--out", str(out), "--quiet"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamattn: error: "), captured.err
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists() and not stray_temporaries(tmp_path)
    assert tree(work) == before


def test_run_with_a_bad_config_exits_2(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"output: {{dir: {tmp_path / 'out'}}}\nselect: [{{name: a, epsilon: 0.1}}]\n")
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown key 'epsilon'" in err and "select[0]" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_argparse_rejects_unknown_choices(npy_keys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, _ = npy_keys
    with pytest.raises(SystemExit) as info:
        main(["select", str(path), "--eps", "0.1", "--variant", "centred", "--out", "o"])
    assert info.value.code == 2


def test_generate_and_inspect(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "gen.zarr"
    flags = ["--n", "1200", "--d", "6", "--rank", "3", "--chunk-rows", "256", "--outliers", "2"]
    assert main(["generate", str(out), *flags, "--seed", "5", "--quiet"]) == 0
    spec = SyntheticSpec(n=1200, d=6, rank=3, chunk_rows=256, outliers=2, seed=5)
    x = zarr.open_group(str(out), mode="r")["keys"][...]
    np.testing.assert_array_equal(x, synthetic_rows(spec, 0, 1200))
    before = tree(out)
    assert main(["generate", str(out), *flags, "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err and tree(out) == before
    assert main(["generate", str(out), *flags, "--seed", "6", "--overwrite", "--quiet"]) == 0
    assert not np.array_equal(zarr.open_group(str(out), mode="r")["keys"][...], x)

    assert main(["inspect", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["n"], info["d"], info["dtype"], info["storage_chunk_rows"]) == (
        1200,
        6,
        "float32",
        256,
    )
    assert info["array"] == "keys"
    assert main(["inspect", str(tmp_path / "nothing")]) == 2


def test_installed_entry_point(npy_keys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    exe = Path(sys.executable).parent / "streamattn"
    exe = exe if exe.exists() else Path(shutil.which("streamattn") or "streamattn")
    path, x = npy_keys
    out = tmp_path / "o"
    ok = subprocess.run(
        [str(exe), "select", str(path), "--eps", "0.05", "--variant", "affine", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert "affine-eps0.05: |U| =" in ok.stdout
    u = load_universal_set(out, "affine-eps0.05")
    np.testing.assert_array_equal(u.indices, universal_set(x, eps=0.05, variant="affine").indices)
    bad = subprocess.run(
        [str(exe), "select", str(tmp_path / "nope.npy"), "--eps", "0.05", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        f"streamattn: error: {tmp_path / 'nope.npy'}: no such file or directory."
    ]


def test_run_refuses_a_cached_store_made_from_other_parameters(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    cfg = small_config(tmp_path)
    assert main(["run", str(cfg), "--quiet"]) == 0
    store_before = tree(tmp_path / "store.zarr")
    cfg.write_text(cfg.read_text().replace("seed: 1", "seed: 2"))
    assert main(["run", str(cfg), "--quiet", "--overwrite"]) == 2
    assert "not generated from this generate spec" in capsys.readouterr().err
    assert tree(tmp_path / "store.zarr") == store_before


def test_select_chunk_rows_must_be_positive(npy_keys, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    path, _ = npy_keys
    out = tmp_path / "o"
    argv = ["select", str(path), "--eps", "0.1", "--chunk-rows", "0", "--out", str(out)]
    assert main([*argv, "--quiet"]) == 2
    assert "chunk_rows must be >= 1" in capsys.readouterr().err
    assert not out.exists()


def test_progress_bar_and_summary_without_quiet(npy_keys, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    path, _ = npy_keys
    assert main(["select", str(path), "--budget", "3", "--out", str(tmp_path / "o")]) == 0
    captured = capsys.readouterr()
    assert "row/s" in captured.err and "leverage" in captured.err  # tqdm: rate and ETA
    assert "plain-top3: |U| = 3" in captured.out and "passes" in captured.out


def test_a_failed_overwrite_leaves_the_previous_output_intact(
    npy_keys, tmp_path: Path, monkeypatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    import streamattn.io.outputs

    path, _ = npy_keys
    out = tmp_path / "sel"
    argv = ["select", str(path), "--eps", "0.05", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    before = tree(out)

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(streamattn.io.outputs, "write_json_atomic", disk_full)
    capsys.readouterr()
    assert main([*argv, "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "intact" in err[0]
    assert tree(out) == before  # the old output is untouched ...
    assert not stray_temporaries(tmp_path)  # ... and the half-written new one is gone


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--n", "0"], "generate.n must be >= 1"), (["--d", "0"], "generate.d must be >= 1")],
)
def test_generate_refuses_bad_parameters(
    flags: list[str], message: str, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    assert main(["generate", str(tmp_path / "g.zarr"), *flags, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert list(tmp_path.iterdir()) == []
