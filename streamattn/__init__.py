"""streamattn: the heavy parts of attention over key matrices far longer than memory.

Public API: ``open_keys`` (validated read-only key stores), ``universal_set`` /
``universal_sets`` (the LevAttention universal set, exact, one pass), the operator
protocol (``Operator``) and ``run_operators`` (engines); exact attention ground truth
(``GroundTruth``; selectors in ``streamattn.selectors``, coverage in
``streamattn.evaluate``); whole KV caches (``open_kv``, ``MultiHeadResult``, attention
masks ``Mask``, per-key scores ``key_scores``; docs/real-caches.md) and resumable passes
(``Checkpointer``); reduced embeddings (``reduce_embeddings``) and column sparsifiers
for d >> n (``sparsify_columns``).
"""

__version__ = "0.1.0"

from streamattn.checkpoint import Checkpointer
from streamattn.columns import ColumnSelection, sparsify_columns
from streamattn.embeddings import ReduceConfig, ReducedEmbeddings, reduce_embeddings
from streamattn.engines import run_operators
from streamattn.errors import (
    ConfigError,
    IncompatibleMergeError,
    InvalidInputError,
    MemoryBudgetError,
    OutputExistsError,
    OutputWriteError,
    StateFormatError,
    StreamattnError,
)
from streamattn.key_scores import key_scores
from streamattn.kvcache import MultiHead, MultiHeadResult, MultiHeadSource, open_kv
from streamattn.lp import lp_universal_set, softmax_entry_bound
from streamattn.masks import Mask
from streamattn.operators import GroundTruth, GroundTruthSpec, LeverageScores, Operator, TopScores
from streamattn.ridge import ridge_universal_set
from streamattn.sliding_window import SlidingWindow
from streamattn.source import Block, KeySource, open_keys
from streamattn.universal import Selection, UniversalSet, universal_set, universal_sets

__all__ = [
    "Block",
    "Checkpointer",
    "ColumnSelection",
    "ConfigError",
    "GroundTruth",
    "GroundTruthSpec",
    "IncompatibleMergeError",
    "InvalidInputError",
    "KeySource",
    "LeverageScores",
    "Mask",
    "MemoryBudgetError",
    "MultiHead",
    "MultiHeadResult",
    "MultiHeadSource",
    "Operator",
    "OutputExistsError",
    "OutputWriteError",
    "ReduceConfig",
    "ReducedEmbeddings",
    "Selection",
    "SlidingWindow",
    "StateFormatError",
    "StreamattnError",
    "TopScores",
    "UniversalSet",
    "__version__",
    "key_scores",
    "lp_universal_set",
    "open_keys",
    "open_kv",
    "reduce_embeddings",
    "ridge_universal_set",
    "run_operators",
    "softmax_entry_bound",
    "sparsify_columns",
    "universal_set",
    "universal_sets",
]
