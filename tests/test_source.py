"""The source layer: every bad input of issue 2 refused clearly, inputs never modified,
blocks aligned with storage chunks and yielded in order whatever the read-ahead."""

from __future__ import annotations

import os
from pathlib import Path

import dask.array as da
import numpy as np
import pytest

from streamattn import InvalidInputError, open_keys, universal_set
from streamattn.errors import ConfigError, StreamattnError


def keys(n: int = 120, d: int = 4, seed: int = 0, dtype: type = np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(dtype)


def snapshot(path: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of every file under ``path``."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"nope\.zarr: no such file or directory"):
        open_keys(tmp_path / "nope.zarr")


@pytest.mark.parametrize(
    "kind", ["text file", "empty dir", "garbage .npy", "object .npy", "truncated .npy"]
)
def test_not_an_array(tmp_path: Path, kind: str) -> None:
    if kind == "text file":
        path = tmp_path / "keys.txt"
        path.write_text("1 2 3\n")
    elif kind == "empty dir":
        path = tmp_path / "empty"
        path.mkdir()
    elif kind == "garbage .npy":
        path = tmp_path / "k.npy"
        path.write_bytes(b"not numpy at all")
    elif kind == "object .npy":
        path = tmp_path / "k.npy"
        np.save(path, np.array([[1, "a"]], dtype=object), allow_pickle=True)
    else:
        path = tmp_path / "k.npy"
        np.save(path, np.ones((1000, 8), dtype=np.float32))
        path.write_bytes(path.read_bytes()[:4000])
    with pytest.raises(InvalidInputError, match=str(path.name)):
        open_keys(path)


def test_zarr_group_without_the_named_array(zarr_store) -> None:  # type: ignore[no-untyped-def]
    path = zarr_store(keys(), group=True)
    with pytest.raises(InvalidInputError, match=r"no array 'k'.*arrays present: \['keys'\]"):
        open_keys(path, array="k")
    assert open_keys(path, array="keys").n == 120


@pytest.mark.parametrize("shape", [(10,), (2, 3, 4), ()])
def test_wrong_ndim(shape: tuple[int, ...], tmp_path: Path) -> None:
    x = np.ones(shape, dtype=np.float32)
    with pytest.raises(InvalidInputError, match=rf"expected a 2-D key matrix.*{len(shape)}-D"):
        open_keys(x)
    np.save(tmp_path / "k.npy", x)
    with pytest.raises(InvalidInputError, match=r"k\.npy.*2-D"):
        open_keys(tmp_path / "k.npy")


@pytest.mark.parametrize(
    ("dtype", "words"),
    [
        (np.int32, "integer dtype int32"),
        (np.uint8, "integer dtype uint8"),
        (np.bool_, "integer dtype bool"),
        (np.complex64, "complex dtype complex64"),
        (np.complex128, "complex dtype complex128"),
        (object, "dtype object"),
        (np.dtype("U3"), "dtype <U3"),
    ],
)
def test_bad_dtypes(dtype: object, words: str, zarr_store) -> None:  # type: ignore[no-untyped-def]
    x = np.zeros((5, 3), dtype=dtype)
    with pytest.raises(InvalidInputError, match=words):
        open_keys(x)
    if np.dtype(dtype).kind in "iubc":
        with pytest.raises(InvalidInputError, match=words):
            open_keys(zarr_store(x))
        with pytest.raises(InvalidInputError, match=words):
            open_keys(da.from_array(x, chunks=2))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("row", [0, 57, 119])
def test_nan_or_inf_names_the_first_bad_row(bad: float, row: int, zarr_store) -> None:  # type: ignore[no-untyped-def]
    x = keys()
    x[row, 2] = bad
    x[min(row + 5, 119), 1] = np.nan  # a later bad row must not be the one reported
    for src in (x, zarr_store(x, chunks=16), da.from_array(x, chunks=30)):
        for chunk_rows in (1, 50, None):
            with pytest.raises(InvalidInputError, match=rf"key row {row} contains NaN or Inf"):
                universal_set(src, eps=0.5, chunk_rows=chunk_rows)


def test_nan_in_values_is_named(zarr_store) -> None:  # type: ignore[no-untyped-def]
    v = keys(d=2)
    v[33, 0] = np.nan
    path = zarr_store(keys(), values=v, chunks=25)
    with pytest.raises(InvalidInputError, match=r"value row 33 contains NaN"):
        universal_set(path, eps=0.5)


@pytest.mark.parametrize("shape", [(0, 4), (4, 0), (0, 0)])
def test_empty_dimensions(shape: tuple[int, int], zarr_store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    x = np.zeros(shape, dtype=np.float32)
    what = "n = 0" if shape[0] == 0 else "d = 0"
    with pytest.raises(InvalidInputError, match=what):
        open_keys(x)
    np.save(tmp_path / "k.npy", x)
    with pytest.raises(InvalidInputError, match=what):
        open_keys(tmp_path / "k.npy")
    if shape[1] > 0:
        with pytest.raises(InvalidInputError, match=what):
            open_keys(zarr_store(x, chunks=4))


@pytest.mark.parametrize("eps", [0, -0.1, 1.0001, 2, float("nan"), "0.1", True])
def test_eps_outside_unit_interval(eps: object) -> None:
    with pytest.raises(ConfigError, match="eps must be in"):
        universal_set(keys(), eps=eps)  # type: ignore[arg-type]
    universal_set(keys(), eps=1.0)  # the closed end is valid


@pytest.mark.parametrize("budget", [0, -3, 121, 2.5, True])
def test_budget_outside_one_to_n(budget: object) -> None:
    with pytest.raises(ConfigError, match="budget"):
        universal_set(keys(), budget=budget)  # type: ignore[arg-type]
    assert len(universal_set(keys(), budget=120)) == 120


def test_no_mode_and_unknown_variant() -> None:
    with pytest.raises(ConfigError, match="give eps"):
        universal_set(keys())
    with pytest.raises(ConfigError, match="variant must be one of"):
        universal_set(keys(), eps=0.1, variant="centered")


@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("compressed", [True, False])
def test_corrupt_chunk_names_its_rows(zarr_format: int, compressed: bool, zarr_store) -> None:  # type: ignore[no-untyped-def]
    x = keys(n=100)
    path = zarr_store(x, chunks=10, zarr_format=zarr_format, compressed=compressed)
    chunk_file = path / ("c/4/0" if zarr_format == 3 else "4.0")
    assert chunk_file.is_file()
    chunk_file.write_bytes(b"\x00garbage")
    with pytest.raises(InvalidInputError, match=r"rows \[40, 50\).*corrupt or unreadable"):
        universal_set(path, eps=0.5, chunk_rows=30)


@pytest.mark.parametrize("variant", ["plain", "affine"])
def test_rank_deficient_inputs_are_valid(variant: str) -> None:
    short = keys(n=3, d=6)
    u = universal_set(short, eps=0.5, variant=variant)
    np.testing.assert_array_equal(u.indices, [0, 1, 2])
    assert u.certificate["numerical_rank"] == 3
    dup = np.vstack([keys(n=20)] * 3)
    u = universal_set(dup, eps=0.01, variant=variant, chunk_rows=7)
    assert u.certificate["numerical_rank"] == 4 + (variant == "affine")


def test_inputs_not_modified(zarr_store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    x = keys(n=90)
    v = keys(n=90, d=2, seed=1)
    store = zarr_store(x, chunks=16, values=v)
    npy = tmp_path / "k.npy"
    np.save(npy, x.astype(np.float64))
    before = {p: snapshot(p) for p in (store, npy)}
    arr = x.astype(np.float64)
    arr_copy = arr.copy()
    for src in (store, npy, arr):
        universal_set(src, eps=0.05, variant="affine", chunk_rows=10)
        universal_set(src, budget=5, chunk_rows=10)
    assert {p: snapshot(p) for p in (store, npy)} == before
    np.testing.assert_array_equal(arr, arr_copy)
    assert not [p for p in tmp_path.iterdir() if p.name not in (store.name, "k.npy")]


def test_npy_is_memory_mapped_read_only(tmp_path: Path) -> None:
    np.save(tmp_path / "k.npy", keys())
    src = open_keys(tmp_path / "k.npy")
    assert isinstance(src.keys, np.memmap) and not src.keys.flags.writeable


def test_blocks_align_with_storage_chunks_and_cover_every_row(zarr_store) -> None:  # type: ignore[no-untyped-def]
    x = keys(n=1000)
    src = open_keys(zarr_store(x, chunks=64))
    assert src.storage_chunk_rows == 64
    assert src.default_chunk_rows() % 64 == 0 or src.default_chunk_rows() == src.n
    for chunk_rows, prefetch in ((64, 0), (128, 1), (999, 2), (1, 3)):
        blocks = list(src.blocks(chunk_rows, prefetch=prefetch))
        assert [b.start for b in blocks] == list(range(0, 1000, chunk_rows))
        np.testing.assert_array_equal(np.vstack([b.rows for b in blocks]), x)
    part = list(src.blocks(100, start=250, stop=480))
    assert [(b.start, b.stop) for b in part] == [(250, 350), (350, 450), (450, 480)]
    with pytest.raises(InvalidInputError, match="outside"):
        src.read(990, 1001)
    with pytest.raises(InvalidInputError, match="chunk_rows must be >= 1"):
        list(src.blocks(0))


def test_values_and_queries_are_checked(zarr_store) -> None:  # type: ignore[no-untyped-def]
    x = keys()
    with pytest.raises(InvalidInputError, match="values have shape"):
        open_keys(zarr_store(x, values=keys(n=119, d=2)))
    with pytest.raises(InvalidInputError, match="queries have shape"):
        open_keys(zarr_store(x, queries=keys(n=5, d=3)))
    with pytest.raises(InvalidInputError, match=r"\(values\) has integer dtype"):
        open_keys(zarr_store(x, values=np.ones((120, 2), dtype=np.int16)))
    src = open_keys(zarr_store(x, values=keys(d=2), queries=keys(n=5)))
    assert src.values is not None and src.queries is not None


def test_every_error_is_a_streamattn_value_error() -> None:
    with pytest.raises(ValueError) as info:
        open_keys(os.devnull + "-missing")
    assert isinstance(info.value, StreamattnError)
    with pytest.raises(InvalidInputError, match="cannot open list"):
        open_keys([[1.0, 2.0]])
