"""How the fused ops meet ``torch.compile``: PyTorch custom ops (``torch.library.custom_op``, namespace ``litliger``).

Each kernel file registers its Triton path as custom ops with a fake implementation (shapes, strides and dtypes
without running anything, for tracing) and an autograd formula whose backward is another custom op. Under
``torch.compile`` (``torch.compiler.is_compiling()``) the public ops call these (the choice is made in one place,
:func:`litliger.kernels.backend.dispatch`), so ``fullgraph=True`` traces a whole forward and backward: each op is
one opaque node, its kernels launched by the same launchers as in eager.

Eager calls the autograd Functions instead: the dispatcher adds ~20 us per call (measured on the CPU machine),
which a training step of small ops would pay hundreds of times. The twins (CPU path) are plain PyTorch that
torch.compile traces and fuses itself; the fused linear cross-entropy's twin walks its chunks in place with
buffer reuse that dynamo cannot trace, so it runs as the same custom op with ``triton=False``.

``litliger.kernels._custom_ops.OPS`` lists every registered op (the tests check each one's fake implementation).
"""

from __future__ import annotations

OPS = (
    "rms_norm",
    "rms_norm_bwd",
    "layer_norm",
    "layer_norm_bwd",
    "rope",
    "glu",
    "glu_bwd",
    "cross_entropy",
    "cross_entropy_bwd",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_bwd",
    "fused_linear_distillation",
    "fused_linear_preference",
)
