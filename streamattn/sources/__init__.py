"""Key sources: validated read-only stores streamed in row blocks (with read-ahead).

``keys`` holds ``Block``, the shared ``BlockStream`` and the single-head ``KeySource``;
``kvcache`` the multi-layer multi-head ``MultiHeadSource``; ``open`` the one dispatcher
(``open_keys`` / ``open_source``) that picks between them.
"""

from streamattn.sources.keys import (
    DEFAULT_BLOCK_ROWS,
    TARGET_BLOCK_BYTES,
    Block,
    BlockStream,
    KeySource,
    open_key_source,
)
from streamattn.sources.kvcache import HeadView, MultiHeadSource, is_multihead, open_kv
from streamattn.sources.open import open_keys, open_source

__all__ = [
    "DEFAULT_BLOCK_ROWS",
    "TARGET_BLOCK_BYTES",
    "Block",
    "BlockStream",
    "HeadView",
    "KeySource",
    "MultiHeadSource",
    "is_multihead",
    "open_key_source",
    "open_keys",
    "open_kv",
    "open_source",
]
