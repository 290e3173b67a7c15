"""torch_fastmlp: fused CPU/CUDA kernels for minibatch MLP training, as drop-in
replacements for ``torch.nn.Sequential`` and its losses (``BCEWithLogitsLoss``,
``MSELoss``, ``CrossEntropyLoss``), and the whole training step as one op
(:class:`TrainStep`)."""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import functional
from ._ops import CPU_ISA, CUDA_ARCHS, WITH_CUDA
from .autograd import BCEWithLogitsFunction, LinearFunction, LinearReLUFunction, MLPBCEFunction, MLPFunction
from .fused_loss import FusedLoss
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
from .train import TrainStep
from .tuning import autotune, autotune_decisions, autotune_enabled, clear_autotune

__version__ = "0.1.0"

__all__ = [
    "BCEWithLogitsFunction",
    "BCEWithLogitsLoss",
    "CPU_ISA",
    "CUDA_ARCHS",
    "CrossEntropyLoss",
    "FusedBCEClassifier",
    "FusedLinearReLU",
    "FusedLoss",
    "LinearFunction",
    "LinearReLUFunction",
    "MLP",
    "MLPBCEFunction",
    "MLPFunction",
    "MSELoss",
    "Sequential",
    "TrainStep",
    "WITH_CUDA",
    "autotune",
    "autotune_decisions",
    "autotune_enabled",
    "clear_autotune",
    "functional",
    "fuse",
]
