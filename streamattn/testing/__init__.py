"""Checks shipped for users' own operators: ``streamattn.testing.laws.check_operator_laws``.

Needs the ``dev`` extra (pytest, hypothesis): ``pip install 'streamattn[dev]'``.
"""
