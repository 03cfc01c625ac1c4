"""Inference: the decoding loop over the KV cache and ``litliger generate`` (``generate.py``), choosing the next
token (``sampling.py``), loading a checkpoint for inference (``loading.py``) and ``litliger chat`` (``chat.py``).
``litliger.generate`` is the decoding function ``generate.generate``.

May import: ``litliger.util``, ``kernels``, ``nn``, ``model``, ``checkpoint``, ``data``. Never the training
engine: ``litliger generate`` and ``chat`` load neither Lightning nor torch.distributed.checkpoint.
"""
