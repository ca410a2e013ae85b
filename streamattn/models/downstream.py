"""``streamattn downstream``: next-token loss of a model through a compressed KV cache.

Protocol (docs/architecture.md, note 2.11). ``ids`` = the text's token ids without special
tokens; context x_0..x_{C−1}, continuation x_C..x_{C+T−1}, targets x_{C+1}..x_{C+T}.

1. Prefill the context (eager attention) into a cache: per layer l and KV head h, post-RoPE
   keys K_lh (C × hd) and values.
2. Compress: keep B = ⌈(1 − r)·C⌉ keys (and their values) per layer and KV head, chosen by
   a streamattn selector (:mod:`streamattn.models.scoring`, one call per (l, h) on K_lh) or
   by a kvpress press (its own hooks during its own prefill of the same tokens).
3. Feed the T continuation tokens in one forward pass with ``position_ids`` C..C+T−1 (the
   positions of the uncompressed sequence, as kvpress's pipeline does); token C+i attends to
   the kept keys plus continuation keys 0..i.
4. loss = (1/T) Σ_i −log p(x_{C+i+1} | kept cache, x_C..x_{C+i}), ppl = exp(loss),
   delta_loss = loss − loss(full cache).

The full cache is the row with ratio 0 (selector ``full``, source ``model``); it equals the
model's own teacher-forced loss on the same tokens (one forward pass over x_0..x_{C+T−1}) to
float32 rounding (tested ≤ 1e-4). Outputs (atomically, in DIR): ``results.csv`` with
columns ``selector, source, ratio, kept_mean, loss, ppl, delta_loss, seconds``
(``kept_mean``: keys kept per layer and KV head, measured on the compressed cache;
``seconds``: selection + compression + continuation wall time), ``report.md``,
``delta_loss.png`` and ``settings.json``.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamattn.errors import ConfigError
from streamattn.io.outputs import atomic_dir, check_writable, write_json_atomic
from streamattn.models.loading import load_model, read_text, resolve_model, text_ids
from streamattn.models.scoring import check_selectors, select_head

COLUMNS = ("selector", "source", "ratio", "kept_mean", "loss", "ppl", "delta_loss", "seconds")
STREAMATTN_DEFAULT = (
    "leverage-plain", "leverage-affine", "universal-budget", "sinks-window", "hybrid",
    "key-norm", "random", "prior-attention",
)
#: kvpress presses that run offline on a Llama model (constructor name, extra kwargs).
KVPRESS_PEERS: dict[str, tuple[str, dict[str, Any]]] = {
    "StreamingLLM": ("StreamingLLMPress", {}),
    "Knorm": ("KnormPress", {}),
    "SnapKV": ("SnapKVPress", {}),
    "ExpectedAttention": ("ExpectedAttentionPress", {}),
    "ObservedAttention": ("ObservedAttentionPress", {}),
    "LeverageScore": ("LeverageScorePress", {}),
    "Compactor": ("CompactorPress", {}),
    "TOVA": ("TOVAPress", {}),
    "KeyDiff": ("KeyDiffPress", {}),
    "CUR": ("CURPress", {}),
    "Random": ("RandomPress", {"seed": 0}),
}
#: kvpress presses left out, and why (reported in report.md).
KVPRESS_SKIPPED = {
    "QFilter": "downloads learned query filters from the Hugging Face hub",
    "DuoAttention": "downloads per-head patterns (or a calibration data set)",
    "KVzap": "downloads its scoring model",
    "KVzip": "needs the kvpress pipeline's context-reconstruction prefill",
    "PyramidKV/AdaKV": "per-layer / per-head budgets; not one ratio per head",
}


@dataclass(frozen=True)
class Row:
    selector: str
    source: str
    ratio: float
    kept_mean: float
    loss: float
    ppl: float
    delta_loss: float
    seconds: float


def kept_per_head(context: int, ratio: float) -> int:
    """B = ⌈(1 − r)·C⌉ (at least 1), with a guard against float fuzz (0.5·2048 → 1024)."""
    return max(1, math.ceil(round((1.0 - ratio) * context, 9)))


def _targets(ids: Sequence[int], context: int, continuation: int) -> Any:
    import torch

    return torch.tensor(ids[context + 1:context + continuation + 1], dtype=torch.long)


def _mean_nll(logits: Any, targets: Any) -> float:
    import torch

    logp = torch.log_softmax(logits.double(), dim=-1)
    return float(-logp.gather(1, targets[:, None]).mean())


def teacher_forced_loss(model: Any, ids: Sequence[int], context: int, continuation: int) -> float:
    """The model's own loss on x_{C+1..C+T} given x_0..x_{C+i}: one forward pass, no cache."""
    import torch

    x = torch.tensor([list(ids[:context + continuation])], dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=x, use_cache=False, logits_to_keep=continuation).logits[0]
    return _mean_nll(logits, _targets(ids, context, continuation))


@dataclass
class Prefill:
    """The full cache after the context (never continued) and, per layer, the attention
    module's inputs (hidden states and forward kwargs) for replaying kvpress presses."""

    cache: Any
    inputs: list[tuple[Any, dict[str, Any]]]


def attention_modules(model: Any) -> list[Any]:
    return [layer.self_attn for layer in model.base_model.layers]


def prefill(model: Any, ids: Sequence[int], context: int) -> Prefill:
    """Run the context x_0..x_{C−1} once; keep the cache and each layer's attention inputs."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    inputs: list[tuple[Any, dict[str, Any]]] = []

    def hook(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        inputs.append((kwargs["hidden_states"], dict(kwargs)))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in attention_modules(model)]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([list(ids[:context])]), past_key_values=cache,
                  use_cache=True, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return Prefill(cache, inputs)


def cache_tensors(cache: Any) -> list[tuple[Any, Any]]:
    """[(keys, values)] per layer, each (1, H_kv, n, hd)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def compressed(model: Any, cache: Any, keep: list[np.ndarray]) -> Any:
    """A new DynamicCache holding, per layer l, the keys/values at indices keep[l] (H_kv, B)."""
    import torch
    from transformers import DynamicCache

    data = []
    for (k, v), idx in zip(cache_tensors(cache), keep, strict=True):
        ix = torch.as_tensor(idx, dtype=torch.long)[None, :, :, None]
        data.append((k.gather(2, ix.expand(-1, -1, -1, k.shape[-1])).contiguous(),
                     v.gather(2, ix.expand(-1, -1, -1, v.shape[-1])).contiguous()))
    return DynamicCache(ddp_cache_data=data, config=model.config)


def kept_mean(cache: Any) -> float:
    return float(np.mean([k.shape[2] for k, _ in cache_tensors(cache)]))


def continuation_loss(model: Any, cache: Any, ids: Sequence[int], context: int,
                      continuation: int) -> float:
    """Feed x_C..x_{C+T−1} at positions C..C+T−1 after ``cache``; mean next-token NLL."""
    import torch

    x = torch.tensor([list(ids[context:context + continuation])], dtype=torch.long)
    pos = torch.arange(context, context + continuation)[None, :]
    with torch.no_grad():
        logits = model(input_ids=x, past_key_values=cache, position_ids=pos,
                       use_cache=True).logits[0]
    return _mean_nll(logits, _targets(ids, context, continuation))


def streamattn_keep(cache: Any, selector: str, budget: int, seed: int = 0,
                    **extra: Any) -> list[np.ndarray]:
    """Per layer, the (H_kv, B) indices chosen by ``selector`` on each KV head's keys."""
    keep = []
    for lay, (k, _) in enumerate(cache_tensors(cache)):
        keys = k[0].detach().float().numpy()
        keep.append(np.stack([select_head(selector, keys[h], budget, layer=lay, head=h,
                                          seed=seed, **extra) for h in range(keys.shape[0])]))
    return keep


def tuning_prior(model: Any, tok: Any, context: int) -> Any:
    """The query prior of ``prior-attention``, fitted on the first C tokens of TUNE_TEXTS[0]."""
    from streamattn.models.learned import fit_prior
    from streamattn.models.loading import TUNE_TEXTS

    body, label = read_text(TUNE_TEXTS[0])
    return fit_prior(model, text_ids(tok, body, context, label), label)


def kvpress_available() -> bool:
    return importlib.util.find_spec("kvpress") is not None


def import_kvpress() -> Any:
    """``import kvpress`` (its dependencies import the deprecated ``pipes``: silenced)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import kvpress
    return kvpress


def make_press(name: str, ratio: float) -> Any:
    kvpress = import_kvpress()
    cls, extra = KVPRESS_PEERS[name]
    return getattr(kvpress, cls)(compression_ratio=ratio, **extra)


#: Presses that read the attention probabilities of the prefill itself: they run with their
#: own prefill (hooks active). The others are replayed on the shared prefill.
OWN_PREFILL = ("ObservedAttention",)


def replay_press(model: Any, press: Any, pre: Prefill) -> Any:
    """A press's ``compress`` applied to each layer of the shared prefill, as its hook would.

    kvpress compresses layer l right after layer l's attention ran on the full context, and
    no later layer reads the compressed cache during the prefill, so calling
    ``press.compress(module, hidden_states, keys, values, None, kwargs)`` per layer on the
    uncompressed cache gives the cache of a compressed prefill (tested against
    :func:`press_cache`); presses then compute any attention they need from the hidden
    states themselves.
    """
    import torch
    from transformers import DynamicCache

    press.post_init_from_model(model)
    data = []
    with torch.no_grad():
        for module, layer, (hs, kw) in zip(attention_modules(model), pre.cache.layers,
                                           pre.inputs, strict=True):
            module.rotary_emb = model.base_model.rotary_emb
            k, v = press.compress(module, hs, layer.keys, layer.values, None, kw)
            data.append((k.contiguous(), v.contiguous()))
    return DynamicCache(ddp_cache_data=data, config=model.config)


def seed_torch(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def press_cache(model: Any, press: Any, ids: Sequence[int], context: int) -> Any:
    """Prefill the context with a kvpress press's hooks active: the press compresses."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(input_ids=torch.tensor([list(ids[:context])]), past_key_values=cache,
              use_cache=True, logits_to_keep=1)
    return cache


def parse_ratios(arg: str) -> list[float]:
    try:
        ratios = [float(r) for r in arg.split(",") if r.strip()]
    except ValueError as exc:
        raise ConfigError(f"--ratios {arg!r}: expected e.g. 0.5,0.75,0.9.") from exc
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise ConfigError(f"--ratios {arg!r}: every ratio must lie in (0, 1).")
    return ratios


def run_downstream(
    model: str,
    text: str,
    context: int,
    continuation: int,
    ratios: Sequence[float],
    *,
    selectors: Sequence[str] = STREAMATTN_DEFAULT,
    peers: Sequence[str] = (),
    seed: int = 0,
    say: Callable[[str], None] | None = None,
    loaded: tuple[Any, Any] | None = None,
) -> tuple[list[Row], dict[str, Any]]:
    """All rows (full cache first) and the run's settings. ``peers``: kvpress press names."""
    say = say or (lambda _line: None)
    check_selectors(list(selectors))
    unknown = [p for p in peers if p not in KVPRESS_PEERS]
    if unknown:
        raise ConfigError(f"unknown kvpress peer(s) {unknown}; choose from {list(KVPRESS_PEERS)}.")
    if peers and not kvpress_available():
        raise ConfigError("--peers kvpress needs kvpress: pip install --no-deps kvpress==0.5.5 "
                          "(and its light dependencies, see docs/real-models.md).")
    if context < 2 or continuation < 1:
        raise ConfigError(f"--context must be >= 2 and --continuation >= 1, got {context}, "
                          f"{continuation}.")
    ref = resolve_model(model)
    body, label = read_text(text)
    net, tok = loaded if loaded is not None else load_model(ref, attn_implementation="eager")
    ids = text_ids(tok, body, context + continuation + 1, label)
    t0 = time.perf_counter()
    pre = prefill(net, ids, context)
    every = [np.tile(np.arange(context), (k.shape[1], 1)) for k, _ in cache_tensors(pre.cache)]
    base = continuation_loss(net, compressed(net, pre.cache, every), ids, context, continuation)
    rows = [Row("full", "model", 0.0, float(context), base, math.exp(base), 0.0,
                time.perf_counter() - t0)]
    say(f"  full cache: loss {base:.4f}")

    def add(selector: str, source: str, ratio: float, cache: Any, t: float) -> None:
        kept = kept_mean(cache)
        loss = continuation_loss(net, cache, ids, context, continuation)
        rows.append(Row(selector, source, ratio, kept, loss, math.exp(loss),
                        loss - base, time.perf_counter() - t))
        say(f"  {source:10s} {selector:18s} r={ratio:<5g} kept {kept:g} loss {loss:.4f} "
            f"(delta {loss - base:+.4f})")

    extra: dict[str, Any] = {}
    if "prior-attention" in selectors:
        extra["prior"] = tuning_prior(net, tok, context)
        say(f"  prior-attention: query prior fitted on {extra['prior'].source}")
    for ratio in ratios:
        budget = kept_per_head(context, ratio)
        for name in selectors:
            t = time.perf_counter()
            keep = streamattn_keep(pre.cache, name, budget, seed, **extra)
            add(name, "streamattn", ratio, compressed(net, pre.cache, keep), t)
        for name in peers:
            t = time.perf_counter()
            press = make_press(name, ratio)
            seed_torch(seed)  # LeverageScore / Compactor draw random sketches
            cache = (press_cache(net, press, ids, context) if name in OWN_PREFILL
                     else replay_press(net, press, pre))
            add(name, "kvpress", ratio, cache, t)
    settings = {
        "model": ref.name, "text": label, "context": context, "continuation": continuation,
        "ratios": list(ratios), "selectors": list(selectors), "peers": list(peers),
        "seed": seed, "tokens_used": context + continuation + 1,
        "prior_fitted_on": extra["prior"].source if "prior" in extra else None,
        "kvpress_skipped": KVPRESS_SKIPPED if peers else {},
    }
    return rows, settings


def write_rows(path: Path, rows: Sequence[Row]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([r.selector, r.source, f"{r.ratio:g}", f"{r.kept_mean:.6g}",
                        f"{r.loss:.6f}", f"{r.ppl:.6f}", f"{r.delta_loss:.6f}",
                        f"{r.seconds:.3f}"])


def report_lines(rows: Sequence[Row], settings: dict[str, Any]) -> list[str]:
    ratios = sorted({r.ratio for r in rows if r.ratio > 0})
    names = sorted({(r.source, r.selector) for r in rows if r.ratio > 0})
    table = {(r.source, r.selector, r.ratio): r for r in rows}
    full = rows[0]
    lines = [
        f"# Downstream loss: {settings['model']} on {settings['text']}",
        "",
        f"Context C = {settings['context']} tokens, continuation T = {settings['continuation']}"
        f" tokens; full-cache loss {full.loss:.4f} (ppl {full.ppl:.3f}). Compression ratio r "
        "keeps ceil((1 - r) C) keys per layer and KV head; the continuation is fed with the "
        "positions of the uncompressed sequence. Cells: delta loss (loss - full).",
        "",
        "| selector | source | " + " | ".join(f"r = {r:g}" for r in ratios) + " |",
        "|---|---|" + "---:|" * len(ratios),
    ]
    def first_loss(sn: tuple[str, str]) -> tuple[int, float]:
        at = [table[(sn[0], sn[1], r)].loss for r in ratios if (sn[0], sn[1], r) in table]
        return (len(ratios) - len(at), at[0] if at else math.inf)

    order = sorted(names, key=first_loss)
    for src, sel in order:
        cells = [f"{table[(src, sel, r)].delta_loss:+.4f}" if (src, sel, r) in table else "-"
                 for r in ratios]
        lines.append(f"| {sel} | {src} | " + " | ".join(cells) + " |")
    for r in ratios:
        at = [table[(s, n, r)] for s, n in names if (s, n, r) in table]
        best = min(at, key=lambda x: x.loss)
        lines.append("")
        lines.append(f"At r = {r:g} the lowest loss is {best.selector} ({best.source}), "
                     f"{best.loss:.4f}.")
    if settings.get("kvpress_skipped"):
        lines += ["", "kvpress presses not run (offline machine or other protocol):"]
        lines += [f"- {k}: {v}" for k, v in settings["kvpress_skipped"].items()]
    return lines


def plot(path: Path, rows: Sequence[Row], settings: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    markers = "osD^v<>pPX*h"
    names = sorted({(r.source, r.selector) for r in rows if r.ratio > 0})
    for i, (src, sel) in enumerate(names):
        pts = sorted((r.ratio, r.delta_loss) for r in rows if (r.source, r.selector) == (src, sel))
        ax.plot([0.0] + [p[0] for p in pts], [0.0] + [p[1] for p in pts],
                linestyle="-" if src == "streamattn" else "--", marker=markers[i % len(markers)],
                label=f"{sel} ({src})")
    ax.set_xlabel("compression ratio r (fraction of context keys dropped)")
    ax.set_ylabel("delta next-token loss vs full cache (nats)")
    ax.set_yscale("symlog", linthresh=0.01)
    ax.set_title(f"{settings['model']}, {settings['text']}: C = {settings['context']}, "
                 f"T = {settings['continuation']}")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out: str | Path, rows: Sequence[Row], settings: dict[str, Any],
                  overwrite: bool = False) -> Path:
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_rows(tmp / "results.csv", rows)
        (tmp / "report.md").write_text("\n".join(report_lines(rows, settings)) + "\n")
        plot(tmp / "delta_loss.png", rows, settings)
        write_json_atomic(tmp / "settings.json", {**settings, "rows": [asdict(r) for r in rows]})
    return out


def downstream(model: str, text: str, context: int, continuation: int, ratios: Sequence[float],
               out: str | Path, *, overwrite: bool = False, **kw: Any) -> list[Row]:
    """Run the whole comparison and write ``out`` (results.csv, report.md, plot)."""
    check_writable(Path(out), overwrite)
    rows, settings = run_downstream(model, text, context, continuation, ratios, **kw)
    write_outputs(out, rows, settings, overwrite=overwrite)
    return rows


def read_rows(path: Path) -> list[Row]:
    with open(path, newline="") as fh:
        return [Row(r["selector"], r["source"], float(r["ratio"]), float(r["kept_mean"]),
                    float(r["loss"]), float(r["ppl"]), float(r["delta_loss"]), float(r["seconds"]))
                for r in csv.DictReader(fh)]


def merge_runs(parts: Sequence[str | Path], out: str | Path, *, overwrite: bool = False,
               tolerance: float = 1e-6) -> list[Row]:
    """One output from runs of the same model, text, C and T (e.g. run in parallel).

    Refuses parts whose settings or full-cache losses differ (by more than ``tolerance``).
    """
    import json

    settings = [json.loads((Path(p) / "settings.json").read_text()) for p in parts]
    keys = ("model", "text", "context", "continuation")
    first = settings[0]
    for p, st in zip(parts, settings, strict=True):
        if any(st[k] != first[k] for k in keys):
            raise ConfigError(f"{p}: other {keys} than {parts[0]}; cannot merge.")
    tables = [read_rows(Path(p) / "results.csv") for p in parts]
    full = tables[0][0]
    for p, t in zip(parts, tables, strict=True):
        if abs(t[0].loss - full.loss) > tolerance:
            raise ConfigError(f"{p}: full-cache loss {t[0].loss} != {full.loss}; cannot merge.")
    rows = [full] + [r for t in tables for r in t[1:]]
    merged = {
        **first,
        "ratios": sorted({r for st in settings for r in st["ratios"]}),
        "selectors": sorted({x for st in settings for x in st["selectors"]}),
        "peers": sorted({x for st in settings for x in st["peers"]}),
        "kvpress_skipped": next((st["kvpress_skipped"] for st in settings
                                 if st["kvpress_skipped"]), {}),
        "prior_fitted_on": next((st["prior_fitted_on"] for st in settings
                                 if st.get("prior_fitted_on")), None),
        "merged_from": [str(p) for p in parts],
    }
    merged.pop("rows", None)
    write_outputs(out, rows, merged, overwrite=overwrite)
    return rows
