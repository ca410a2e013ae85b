"""Recipes: the algorithms. Each proposes the operators of a pass, reads their results and
proposes the next pass or returns a typed result (:mod:`streamattn.results`).

``universal`` (p = 2 leverage sets, exact), ``lp`` (p != 2 via Lewis weights), ``ridge``
(large d), ``embeddings`` (reduced embeddings), ``selectors`` and ``evaluate`` (coverage
against exact attention), ``sliding_window``, ``columns`` (column sparsifiers, d >> n);
``selection`` holds the request type ``Selection`` and the guarantee texts; ``solve``
(kernel regressions (AᵀA)^j, A(AᵀA)^j, exp(β AAᵀ)) and ``fit`` (one-layer attention fit),
public as ``streamattn.solve`` and ``streamattn.fit``.
"""
