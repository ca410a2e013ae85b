"""streamattn: the heavy parts of attention over key matrices far longer than memory.

Public API: ``open_keys`` (validated read-only key stores), ``universal_set`` /
``universal_sets`` (the LevAttention universal set, exact, one pass), the operator
protocol (``Operator``) and ``run_operators`` (engines).
"""

__version__ = "0.1.0"

from streamattn.engines import run_operators
from streamattn.errors import (
    ConfigError,
    IncompatibleMergeError,
    InvalidInputError,
    MemoryBudgetError,
    OutputExistsError,
    StateFormatError,
    StreamattnError,
)
from streamattn.operators import LeverageScores, Operator, TopScores
from streamattn.source import Block, KeySource, open_keys
from streamattn.universal import Selection, UniversalSet, universal_set, universal_sets

__all__ = [
    "Block",
    "ConfigError",
    "IncompatibleMergeError",
    "InvalidInputError",
    "KeySource",
    "LeverageScores",
    "MemoryBudgetError",
    "Operator",
    "OutputExistsError",
    "Selection",
    "StateFormatError",
    "StreamattnError",
    "TopScores",
    "UniversalSet",
    "__version__",
    "open_keys",
    "run_operators",
    "universal_set",
    "universal_sets",
]
