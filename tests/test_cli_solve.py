"""``streamattn solve``: outputs against a dense reference, clear errors."""

from __future__ import annotations

import json

import numpy as np

from streamattn.cli.main import main


def test_solve_commands_write_x_and_report(tmp_path, capsys) -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((800, 5)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", rng.standard_normal(5))
    np.save(tmp_path / "bn.npy", rng.standard_normal(800))
    u, s, vt = np.linalg.svd(a.astype(np.float64), full_matrices=False)
    out = tmp_path / "gp"
    rc = main(["solve", "gram-power", str(tmp_path / "a.npy"), "--b", str(tmp_path / "b.npy"),
               "--j", "2", "--out", str(out)])
    assert rc == 0
    b = np.load(tmp_path / "b.npy")
    ref = vt.T @ ((vt @ b) / s**4)
    x = np.load(out / "x.npy")
    assert np.linalg.norm(x - ref) / np.linalg.norm(ref) <= 1e-10
    report = json.loads((out / "report.json").read_text())
    assert report["info"]["method"] == "direct" and report["info"]["passes"] == 1
    out2 = tmp_path / "agp"
    rc = main(["solve", "a-gram-power", str(tmp_path / "a.npy"), "--b", str(tmp_path / "bn.npy"),
               "--j", "1", "--method", "sketch-precondition", "--compare", "--out", str(out2),
               "--engine", "dask", "--scheduler", "threads"])
    assert rc == 0
    bn = np.load(tmp_path / "bn.npy")
    ref2 = vt.T @ ((u.T @ bn) / s**3)
    x2 = np.load(out2 / "x.npy")
    assert np.linalg.norm(x2 - ref2) / np.linalg.norm(ref2) <= 1e-8
    info = json.loads((out2 / "report.json").read_text())["info"]
    assert info["unpreconditioned"]["iterations"] > 0
    out3 = tmp_path / "ak"
    rc = main(["solve", "attention-kernel", str(tmp_path / "a.npy"), "--b",
               str(tmp_path / "bn.npy"), "--ridge", "1e3", "--beta", "0.05", "--rank", "20",
               "--out", str(out3), "--quiet"])
    assert rc == 0
    k = np.exp(0.05 * a.astype(np.float64) @ a.T.astype(np.float64)) + 1e3 * np.eye(800)
    x3 = np.load(out3 / "x.npy")
    assert np.linalg.norm(k @ x3 - bn) / np.linalg.norm(bn) <= 1e-6
    capsys.readouterr()


def test_solve_bad_input_is_one_line(tmp_path, capsys) -> None:
    np.save(tmp_path / "a.npy", np.ones((10, 3)) + np.eye(10, 3))
    np.save(tmp_path / "b.npy", np.ones(4))
    rc = main(["solve", "gram-power", str(tmp_path / "a.npy"), "--b", str(tmp_path / "b.npy"),
               "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "shape (4,)" in err and "(3,)" in err and err.count("\n") == 1
    rc = main(["solve", "gram-power", str(tmp_path / "a.npy"), "--b", str(tmp_path / "b.npy"),
               "--j", "0", "--out", str(tmp_path / "o")])
    assert rc == 2 and "j" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
