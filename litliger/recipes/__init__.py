"""The recipes: ``litliger pretrain`` (``pretrain.py``) and ``litliger finetune`` (``finetune.py``), each
``setup -> main -> engine.fit``; what both need (tokenizer, data loaders, the end-of-run sample) lives once in
``common.py``.

May import: everything below (``engine``, ``eval``, ``inference``, ``data``, ``checkpoint``, ``model`` ...).
"""
