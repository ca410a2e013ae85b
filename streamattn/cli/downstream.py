"""``streamattn downstream``: next-token loss through compressed caches (needs the [hf] extra)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    from streamattn.cli.common import HelpFormatter
    from streamattn.models.downstream import STREAMATTN_DEFAULT

    p = sub.add_parser(
        "downstream", help="model next-token loss with each selector's compressed KV cache",
        description="Prefill a context, compress each layer's cache per KV head with every "
        "selector (and kvpress press), feed the continuation and report the next-token loss "
        "(needs the [hf] extra; kvpress for --peers kvpress).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", default="smollm2", help="smollm2 | HF directory | .gguf file")
    p.add_argument("--text", default="stdlib:inspect", help="text file or stdlib:NAME")
    p.add_argument("--context", type=int, default=2048, help="C: prefilled tokens")
    p.add_argument("--continuation", type=int, default=512, help="T: tokens fed afterwards")
    p.add_argument("--ratios", default="0.5,0.75,0.9", help="compression ratios r")
    p.add_argument("--selectors", default=",".join(STREAMATTN_DEFAULT),
                   help="streamattn selectors (comma-separated)")
    p.add_argument("--peers", choices=["none", "kvpress"], default="none",
                   help="also run the kvpress presses on the same tokens")
    p.add_argument("--presses", help="kvpress subset (default: every offline press)")
    p.add_argument("--seed", type=int, default=0, help="random selector and torch seed")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from streamattn.models.downstream import KVPRESS_PEERS, downstream, parse_ratios

    def say(line: str) -> None:
        if not args.quiet:
            print(line, flush=True)

    peers: list[str] = []
    if args.peers == "kvpress":
        peers = args.presses.split(",") if args.presses else list(KVPRESS_PEERS)
    selectors = [s for s in args.selectors.split(",") if s]
    rows = downstream(args.model, args.text, args.context, args.continuation,
                      parse_ratios(args.ratios), args.out, overwrite=args.overwrite,
                      selectors=selectors, peers=peers, seed=args.seed, say=say)
    say(f"wrote {args.out}/results.csv ({len(rows)} rows), report.md, delta_loss.png")
    return 0
