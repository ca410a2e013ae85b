"""Real models in the loop (optional extra ``[hf]``: torch, transformers, gguf, accelerate).

- :mod:`streamattn.models.loading`: locate and load a model (``smollm2``, ``minilm``, a local
  HF directory or a ``.gguf`` file) offline, its tokenizer, and the built-in text corpus.
- :mod:`streamattn.models.capture`: an attention function registered with transformers'
  attention interface that records q, k, v exactly as they enter the attention kernel.
- :mod:`streamattn.models.extract`: ``streamattn extract``, the KV-cache layout written window
  by window, with ``--verify``.
- :mod:`streamattn.models.scoring`: streamattn selectors as per-(layer, KV head) key sets.
- :mod:`streamattn.models.downstream`: ``streamattn downstream``, next-token loss through a
  compressed cache, streamattn selectors and kvpress presses side by side.
- :mod:`streamattn.models.press`: :class:`StreamattnPress`, a kvpress ``ScorerPress`` backed
  by streamattn scores (needs kvpress).

Nothing here is imported by ``import streamattn``: torch is only needed by these modules.
"""
