"""``streamattn inspect INPUT``: shape, dtype, chunks and a sample of a key store."""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from streamattn.cli.common import HelpFormatter, add_cache_flags
from streamattn.sources import MultiHeadSource, open_source


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "inspect",
        help="describe a key store (shape, dtype, chunks)",
        description="Print a key store's description (shape, dtype, storage chunks, block "
        "size) and statistics of its first rows, as JSON.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("input", help="zarr array/group or .npy file")
    p.add_argument("--array", help="key array name inside a zarr group (default keys)")
    add_cache_flags(p, heads_help="KV cache: KV heads to describe, e.g. 0,2 (default all)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Describe a store; the key-norm figures are over a sample of the first 4096 rows.

    ``sample_mean_key_norm_ratio`` = ‖mean_j k_j‖ / mean_j ‖k_j‖ (≤ 1 by the triangle
    inequality): near 1, keys share a large common offset (softmax ignores it, plain
    leverage does not). For a KV cache it is computed per (layer, head), over rows.
    """
    source = open_source(args.input, array=args.array, n_heads=args.n_heads,
                         layers=args.layers, heads=args.heads, batch=args.batch,
                         fill_missing=getattr(args, "fill_missing_chunks", False))
    info = source.describe()
    rows = source.read(0, min(source.n, 4096)).rows.astype(np.float64)
    norms = np.linalg.norm(rows, axis=-1)  # (r,) or (r, layers, heads)
    ratio = np.linalg.norm(rows.mean(axis=0), axis=-1) / np.maximum(norms.mean(axis=0),
                                                                    1e-300)
    info["sample_rows"] = int(rows.shape[0])
    info["sample_mean_norm"] = float(norms.mean())
    info["sample_mean_key_norm_ratio"] = float(ratio.mean())
    if isinstance(source, MultiHeadSource):
        info["per_head"] = [
            {"layer": lay, "head": h, "mean_norm": float(norms[:, li, hi].mean()),
             "mean_key_norm_ratio": float(ratio[li, hi])}
            for li, lay in enumerate(source.layer_ids)
            for hi, h in enumerate(source.head_ids)
        ]
    info["default_chunk_rows"] = source.default_chunk_rows()
    print(json.dumps(info, indent=2))
    return 0
