"""Repository-level pytest settings: skip importing modules whose optional extra is absent."""

import importlib.util

collect_ignore = []
if importlib.util.find_spec("kvpress") is None or importlib.util.find_spec("torch") is None:
    # streamattn/models/press.py subclasses kvpress's ScorerPress at import time.
    collect_ignore.append("streamattn/models/press.py")
