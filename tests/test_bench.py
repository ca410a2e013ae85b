"""``streamattn bench`` helpers: target checks, run directories, case sizes (no timing)."""

from __future__ import annotations

from pathlib import Path

from streamattn.bench import TARGETS, at_sizes, default_cases, fresh_run_dir, target_check


def test_target_check_applies_both_stated_limits() -> None:
    loop, par = TARGETS["uset-plain"]
    assert par is not None
    ok = {"ratio_to_zarr_loop": loop, "ratio_to_parallel_read": par}
    assert target_check("uset-plain", ok)["meets_target"] is True
    slow_par = {"ratio_to_zarr_loop": loop * 0.5, "ratio_to_parallel_read": par * 1.01}
    assert target_check("uset-plain", slow_par)["meets_target"] is False
    assert target_check("uset+jl", {"ratio_to_zarr_loop": 1.6})["meets_target"] is False
    assert target_check("zarr-loop", ok) == {}


def test_fresh_run_dir_never_reuses_an_existing_directory(tmp_path: Path) -> None:
    first = fresh_run_dir(tmp_path)
    first.mkdir(parents=True)
    second = fresh_run_dir(tmp_path)
    assert second != first and not second.exists() and second.parent == tmp_path


def test_at_sizes_keeps_every_store_kind_with_its_widest_configuration_list() -> None:
    cases = at_sizes(default_cases(big=False, quick=False), [2**18, 2**19])
    assert {(n, d, comp) for n, d, comp, _ in cases} == {
        (n, d, comp) for n in (2**18, 2**19) for d, comp in ((64, "none"), (128, "none"),
                                                             (128, "zstd"))
    }
    widest = max((k for n, d, c, k in cases if d == 128 and c == "none"), key=len)
    assert "uset+jl" in widest and "dask-threads" in widest
