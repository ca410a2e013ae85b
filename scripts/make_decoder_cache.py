"""Write a KV cache in the documented layout (docs/real-caches.md) from a small
random-weights transformer (streamattn.decoder_cache; numpy only).

    python scripts/make_decoder_cache.py data/decoder-cache.zarr --n 16384 --segment 2048 \
        --layers 4 --q-heads 8 --kv-heads 2 --head-dim 64
"""

from __future__ import annotations

import argparse
import time

from streamattn.decoder_cache import DecoderSpec, write_decoder_cache


def main() -> None:
    d = DecoderSpec()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--n", type=int, default=d.n)
    p.add_argument("--segment", type=int, default=d.segment)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--q-heads", type=int, default=d.q_heads)
    p.add_argument("--kv-heads", type=int, default=d.kv_heads)
    p.add_argument("--head-dim", type=int, default=d.head_dim)
    p.add_argument("--chunk-rows", type=int, default=d.chunk_rows)
    p.add_argument("--bidirectional", action="store_true", help="an encoder (no causal mask)")
    p.add_argument("--seed", type=int, default=d.seed)
    a = p.parse_args()
    spec = DecoderSpec(n=a.n, segment=a.segment, layers=a.layers, q_heads=a.q_heads,
                       kv_heads=a.kv_heads, head_dim=a.head_dim, causal=not a.bidirectional,
                       seed=a.seed, chunk_rows=a.chunk_rows)
    t0 = time.perf_counter()
    write_decoder_cache(a.out, spec, overwrite=True)
    print(f"wrote {a.out}: n = {spec.n}, {spec.layers} layers, {spec.q_heads} query heads on "
          f"{spec.kv_heads} KV heads, head_dim {spec.head_dim}, segments of {spec.segment}, "
          f"{'causal' if spec.causal else 'bidirectional'}, in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
