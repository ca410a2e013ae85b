"""A kvpress press backed by streamattn selectors (needs ``kvpress``, ``torch``).

>>> from streamattn.models.press import StreamattnPress          # doctest: +SKIP
>>> press = StreamattnPress(compression_ratio=0.5, selector="leverage-affine")  # doctest: +SKIP
>>> with press(model):                                           # doctest: +SKIP
...     model(input_ids=context_ids, past_key_values=cache)

:class:`StreamattnPress` is a kvpress ``ScorerPress``: during the prefill each attention layer's
keys (B, H_kv, n, d) — post-RoPE, as the cache holds them — are scored per batch row and KV
head by :func:`streamattn.models.scoring.head_scores` (1 for the keys the streamattn
selector keeps at kvpress's budget ``compute_n_kept(n, compression_ratio)``, 0 for the
others), and kvpress keeps the top-scored keys. So the press keeps exactly the set streamattn's
selector chooses (tested against the downstream adapter), inside the tool people already use.
Every selector of :data:`streamattn.models.scoring.SELECTORS` works; ``prior-attention`` needs
``prior=`` (a :class:`streamattn.models.learned.QueryPrior`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from streamattn.models.downstream import import_kvpress
from streamattn.models.scoring import check_selectors, head_scores

import_kvpress()
from kvpress import ScorerPress  # noqa: E402
from kvpress.utils import compute_n_kept  # noqa: E402


@dataclass
class StreamattnPress(ScorerPress):
    """kvpress press: keep the keys a streamattn selector picks, per layer and KV head."""

    selector: str = "leverage-affine"
    seed: int = 0
    prior: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_selectors([self.selector])

    def score(self, module: Any, hidden_states: Any, keys: Any, values: Any, attentions: Any,
              kwargs: dict[str, Any]) -> Any:
        bsz, heads, n, _ = keys.shape
        budget = compute_n_kept(n, self.compression_ratio)
        extra = {} if self.prior is None else {"prior": self.prior}
        out = np.zeros((bsz, heads, n))
        for b in range(bsz):
            for h in range(heads):
                out[b, h] = head_scores(self.selector, keys[b, h].detach().float().cpu().numpy(),
                                        budget, layer=int(module.layer_idx), head=h,
                                        seed=self.seed, **extra)
        return torch.as_tensor(out, dtype=keys.dtype, device=keys.device)
