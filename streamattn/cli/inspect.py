"""``streamattn inspect INPUT``: shape, dtype, chunks and a sample of a key store."""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from streamattn.cli.common import HelpFormatter
from streamattn.sources import open_keys


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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    source = open_keys(args.input, array=args.array)
    info = source.describe()
    rows = source.read(0, min(source.n, 4096)).rows.astype(np.float64)
    norms = np.linalg.norm(rows, axis=1)
    info["sample_rows"] = int(rows.shape[0])
    info["sample_mean_norm"] = float(norms.mean())
    info["sample_mean_key_norm_ratio"] = float(np.linalg.norm(rows.mean(0)) / norms.mean())
    info["default_chunk_rows"] = source.default_chunk_rows()
    print(json.dumps(info, indent=2))
    return 0
