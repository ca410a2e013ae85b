"""Public module ``streamattn.fit`` (``sa.fit``): the one-layer attention fit.

The implementation is the recipe :mod:`streamattn.recipes.fit` (its docstring states the
method and what is and is not guaranteed); this module is the stable import path.
"""

from streamattn.recipes.fit import FIT_METHODS, FitResult, attention_matrix, one_layer_attention

__all__ = ["FIT_METHODS", "FitResult", "attention_matrix", "one_layer_attention"]
