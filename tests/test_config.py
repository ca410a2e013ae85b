"""Configs: the shipped YAML equals the embedded default, every shipped config loads, and
unknown or mistyped keys are refused with their dotted path (typos never pass silently)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from streamattn.config import RunConfig, from_dict, load_config, to_dict
from streamattn.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_default_yaml_is_exactly_the_embedded_default() -> None:
    assert load_config(CONFIGS / "default.yaml") == RunConfig()
    assert load_config(None) == RunConfig()


def schemas() -> list[tuple[type, Callable[[Path], Any]]]:
    """Every config schema with its loader: `streamattn run` and `streamattn evaluate`."""
    from streamattn.recipes.evaluate import EvaluateConfig, load_evaluate_config

    return [(RunConfig, load_config), (EvaluateConfig, load_evaluate_config)]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    errors = []
    for schema, load in schemas():
        try:
            cfg = load(path)
        except ConfigError as exc:
            errors.append(str(exc))
            continue
        assert isinstance(cfg, schema)
        assert from_dict(schema, to_dict(cfg)) == cfg  # plain-data round trip
        return
    pytest.fail(f"{path.name} fits no config schema:\n" + "\n".join(errors))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("inptu: {path: x}\n", r"config: unknown key 'inptu' \(did you mean 'input'\?\)"),
        (
            "select:\n  - {name: a, eps: 0.1}\n  - {name: b, epss: 0.1}\n",
            r"config\.select\[1\]: unknown key 'epss' \(did you mean 'eps'\?\)",
        ),
        (
            "input: {path: x, generate: {n: 10, dd: 4}}\n",
            r"config\.input\.generate: unknown key 'dd' \(did you mean 'd'\?\)",
        ),
        ("engine: {kind: local, chunkrows: 5}\n", r"config\.engine: unknown key 'chunkrows'"),
        ("output: {dir: 3}\n", r"config\.output\.dir: expected str, got 3"),
        ("select: [{name: a, eps: abc}]\n", r"config\.select\[0\]\.eps: expected float"),
        ("select: [{name: a, budget: 2.5}]\n", r"config\.select\[0\]\.budget: expected int"),
        ("progress: yes please\n", r"config\.progress: expected bool"),
        ("select: {name: a}\n", r"config\.select: expected a list"),
        ("engine: local\n", r"config\.engine: expected a mapping"),
        ("select: [{eps: 0.1}]\n", r"config\.select\[0\]: .*name"),
        ("select: [{name: a, eps: 0}]\n", r"select\[0\] \(a\): eps must be in \(0, 1\]"),
        ("select: [{name: a, eps: 1.5}]\n", r"eps must be in \(0, 1\]"),
        ("select: [{name: a, budget: 0}]\n", r"budget must be an integer >= 1"),
        ("select: [{name: a}]\n", r"give eps"),
        ("select: [{name: a, eps: 0.1, variant: affin}]\n", r"variant must be one of"),
        ("select: [{name: a, eps: 0.1}, {name: a, eps: 0.2}]\n", r"names must be unique"),
        ("engine: {chunk_rows: 0}\n", r"engine\.chunk_rows must be >= 1"),
        ("input: {generate: {d: 4, rank: 9}}\n", r"generate\.rank must be in \[0, d=4\]"),
        ("- 1\n- 2\n", r"mapping at the top level"),
        ("input: [unclosed\n", r"not valid YAML"),
    ],
)
def test_bad_configs_are_refused_naming_the_key(tmp_path: Path, text: str, pattern: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_partial_config_keeps_the_other_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "select: [{name: x, eps: 1e-2, rtol: 1e-12}]\n"))
    assert cfg.select[0].eps == 0.01 and cfg.select[0].rtol == 1e-12  # "1e-2" is a YAML str
    assert cfg.input == RunConfig().input and cfg.engine == RunConfig().engine
    assert load_config(write(tmp_path, "")) == RunConfig()
