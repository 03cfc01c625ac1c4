"""Evaluation: ``litliger evaluate`` (``evaluate.py``: validation loss and perplexity as JSON), the scoring
functions it and lm-evaluation-harness use (``scoring.py``), and the harness adapter ``LitligerLM``
(``lm_eval.py``, imported only when asked for: it needs the ``lm_eval`` package).

May import: everything up to ``inference``; not the training engine.
"""
