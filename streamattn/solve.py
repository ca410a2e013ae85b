"""Public module ``streamattn.solve`` (``sa.solve``): the kernel-regression solvers.

The implementation is the recipe :mod:`streamattn.recipes.solve` (its docstring states the
methods and their guarantees); this module is the stable import path.
"""

from streamattn.recipes.solve import (
    KERNEL_METHODS,
    METHODS,
    SolveResult,
    a_gram_power,
    attention_kernel,
    gram_power,
    kernel_matvec_bound,
    pcg,
)

__all__ = [
    "KERNEL_METHODS",
    "METHODS",
    "SolveResult",
    "a_gram_power",
    "attention_kernel",
    "gram_power",
    "kernel_matvec_bound",
    "pcg",
]
