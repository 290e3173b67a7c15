"""torch_fastmlp: fused CPU/CUDA kernels for minibatch MLP training, as drop-in
replacements for ``torch.nn.Sequential`` and ``torch.nn.BCEWithLogitsLoss``."""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import functional
from ._ops import CPU_ISA, CUDA_ARCHS, WITH_CUDA
from .autograd import BCEWithLogitsFunction, LinearFunction, LinearReLUFunction, MLPBCEFunction, MLPFunction
from .modules import (
    MLP,
    BCEWithLogitsLoss,
    CrossEntropyLoss,
    FusedBCEClassifier,
    FusedLinearReLU,
    MSELoss,
    Sequential,
    fuse,
)

__version__ = "0.1.0"

__all__ = [
    "BCEWithLogitsFunction",
    "BCEWithLogitsLoss",
    "CPU_ISA",
    "CUDA_ARCHS",
    "FusedBCEClassifier",
    "FusedLinearReLU",
    "LinearFunction",
    "LinearReLUFunction",
    "MLP",
    "MLPBCEFunction",
    "MLPFunction",
    "Sequential",
    "WITH_CUDA",
    "functional",
    "fuse",
]
__all__ += ["CrossEntropyLoss", "MSELoss"]  # issue 20
