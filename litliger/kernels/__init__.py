"""litliger's fused kernels: a functional API whose ops run Triton kernels or their PyTorch twins.

One file per op (Triton kernels, launcher, autograd Function; the twin beside it or in ``<op>_twin.py``);
``backend.dispatch`` is the one place that picks Triton, the custom op under ``torch.compile``, or the twin
(see :mod:`litliger.kernels.backend`). Runtime ops only: the analysis tools are in ``litliger.tools``.

May import: torch and triton only; nothing else of litliger. Nothing here knows about models.
"""

from .backend import BACKENDS, get_backend, use_backend
from .cross_entropy import cross_entropy, cross_entropy_torch
from .distillation import DISTILLATION_LOSSES, fused_linear_distillation, fused_linear_distillation_torch
from .fused_linear_cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_torch
from .glu import geglu, geglu_torch, swiglu, swiglu_torch
from .glu_linear import glu_linear
from .layer_norm import layer_norm, layer_norm_torch
from .preference import PREFERENCE_LOSSES, fused_linear_preference, fused_linear_preference_torch
from .rms_norm import add_rms_norm, add_rms_norm_torch, rms_norm, rms_norm_torch
from .rope import rope, rope_torch

__all__ = [
    "BACKENDS",
    "DISTILLATION_LOSSES",
    "PREFERENCE_LOSSES",
    "add_rms_norm",
    "add_rms_norm_torch",
    "cross_entropy",
    "cross_entropy_torch",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_torch",
    "fused_linear_distillation",
    "fused_linear_distillation_torch",
    "fused_linear_preference",
    "fused_linear_preference_torch",
    "geglu",
    "geglu_torch",
    "get_backend",
    "glu_linear",
    "layer_norm",
    "layer_norm_torch",
    "rms_norm",
    "rms_norm_torch",
    "rope",
    "rope_torch",
    "swiglu",
    "swiglu_torch",
    "use_backend",
]
