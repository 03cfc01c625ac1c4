"""Analysis tools, not needed to train or run a model: ahead-of-time compilation of every Triton kernel for a
GPU target (``aot.py``, ``python -m litliger.tools.aot``), the launch specialisations the published configs
use (``kernel_specs.py``), the bytes each kernel moves (``traffic.py``) and the per-kernel resource report
(``kernel_report.py``, ``python -m litliger.tools.kernel_report``), and the loss curves of runs (``plot.py``,
``litliger plot``; matplotlib, an optional extra).

May import: anything in litliger; nothing in litliger imports it (but the CLI).
"""
