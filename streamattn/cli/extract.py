"""``streamattn extract``: a real model's q, k, v to the KV-cache layout (needs the [hf] extra)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    from streamattn.cli.common import HelpFormatter

    p = sub.add_parser(
        "extract", help="write a real model's q/k/v cache (zarr layout of 'inspect'/'evaluate')",
        description="Run a real model (needs the [hf] extra) over a text window by window and "
        "write each layer's queries, keys and values as they enter its attention kernel.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", required=True, help="smollm2 | minilm | HF directory | .gguf file")
    p.add_argument("--text", default="stdlib:argparse",
                   help="text file, or stdlib:NAME[+NAME...] (default stdlib:argparse)")
    p.add_argument("--tokens", type=int, required=True, help="n: tokens to extract")
    p.add_argument("--window", type=int, required=True,
                   help="tokens per forward pass (one segment each; positions restart)")
    p.add_argument("--layers", help="e.g. 0,7,15 or 0-3 (default all)")
    p.add_argument("--out", required=True, help="output zarr group")
    p.add_argument("--verify", action="store_true",
                   help="check softmax(q k^T scale + mask) from the store against the model")
    p.add_argument("--tolerance", type=float, default=1e-4, help="--verify max abs error")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from streamattn.models.extract import extract

    def say(line: str) -> None:
        if not args.quiet:
            print(line, flush=True)

    s = extract(args.model, args.text, args.tokens, args.window, args.out, layers=args.layers,
                verify=args.verify, tolerance=args.tolerance, overwrite=args.overwrite, say=say)
    m = s["model"]
    say(f"wrote {args.out}: {args.tokens} tokens x {len(s['extract']['layers'])} layers of "
        f"{m['name']} ({m['heads']} query / {m['kv_heads']} KV heads of {m['head_dim']}, "
        f"causal {m['causal']}) in {s['extract']['seconds']:.1f} s")
    if "verification" in s:
        v = s["verification"]
        say(f"verify (window 0, {v['rows']} rows): max |P - P_model| = "
            f"{v['max_abs_err_probs']:.2e}, max |Pv - out_model| = {v['max_abs_err_output']:.2e}"
            f" (tolerance {v['tolerance']:g}): {'passed' if v['passed'] else 'FAILED'}")
    return 0
