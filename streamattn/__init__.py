"""streamattn: the heavy parts of attention over key matrices far longer than memory.

Public API: ``open_keys`` (validated read-only key stores), ``universal_set`` /
``universal_sets`` (the LevAttention universal set, exact, one pass), the operator
protocol (``Operator``) and ``run_operators`` (engines); exact attention ground truth
(``GroundTruth``; selectors in ``streamattn.recipes.selectors``, coverage in
``streamattn.recipes.evaluate``); whole KV caches (``open_kv``, ``MultiHeadResult``,
attention masks ``Mask``, per-key scores ``key_scores``; docs/real-caches.md) and
resumable passes (``Checkpointer``); reduced embeddings (``reduce_embeddings``) and column
sparsifiers for d >> n (``sparsify_columns``); weighted leverage samples with (1 ± ε)
spectral error (``leverage_sample``); kernel-regression solvers (``streamattn.solve``) and
the one-layer attention fit (``streamattn.fit``).
"""

from importlib.metadata import PackageNotFoundError, version

try:  # the one version string is pyproject.toml's
    __version__ = version("streamattn")
except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
    __version__ = "0+unknown"

from streamattn import fit, solve
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
from streamattn.io.checkpoint import Checkpointer
from streamattn.masks import Mask
from streamattn.operators import GroundTruth, GroundTruthSpec, LeverageScores, Operator, TopScores
from streamattn.operators.multihead import MultiHead
from streamattn.recipes.columns import ColumnSelection, sparsify_columns
from streamattn.recipes.embeddings import ReduceConfig, ReducedEmbeddings, reduce_embeddings
from streamattn.recipes.key_scores import key_scores
from streamattn.recipes.lp import lp_universal_set, softmax_entry_bound
from streamattn.recipes.ridge import ridge_universal_set
from streamattn.recipes.samplers import (
    LeverageSample,
    LeverageSampler,
    approximate_universal_set,
    leverage_sample,
)
from streamattn.recipes.selection import Selection
from streamattn.recipes.sliding_window import SlidingWindow
from streamattn.recipes.universal import universal_set, universal_sets
from streamattn.results import MultiHeadResult, UniversalSet
from streamattn.sources import Block, KeySource, MultiHeadSource, open_keys, open_kv

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
    "LeverageSample",
    "LeverageSampler",
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
    "approximate_universal_set",
    "fit",
    "key_scores",
    "leverage_sample",
    "lp_universal_set",
    "open_keys",
    "open_kv",
    "reduce_embeddings",
    "ridge_universal_set",
    "run_operators",
    "softmax_entry_bound",
    "solve",
    "sparsify_columns",
    "universal_set",
    "universal_sets",
]
