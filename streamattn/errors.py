"""One error root for streamattn, with specific subclasses.

Every error is a ``ValueError`` so callers that already catch bad-input errors keep
working; each message names the offending file, array, row or setting and says how to
fix it.
"""

from __future__ import annotations


class StreamattnError(ValueError):
    """Root of every error raised on purpose by streamattn."""


class InvalidInputError(StreamattnError):
    """A key store, array or block that cannot be used as input (shape, dtype, values)."""


class ConfigError(StreamattnError):
    """A setting that is missing, unknown, or outside its allowed range."""


class IncompatibleMergeError(StreamattnError):
    """Two operator states that cannot be merged (other spec, overlapping rows)."""


class StateFormatError(StreamattnError):
    """A serialised operator state or checkpoint that cannot be read back."""


class MemoryBudgetError(StreamattnError):
    """An operator whose projected memory exceeds the configured budget."""


class OutputExistsError(StreamattnError):
    """An output path that exists and would be overwritten without ``overwrite``."""


class OutputWriteError(StreamattnError):
    """An output or checkpoint that could not be written (disk full, permission denied)."""


class OutputLockedError(StreamattnError):
    """An output that another streamattn process is writing (its lock is held)."""
