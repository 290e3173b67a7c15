"""The loss of a model as one fused op: :class:`FusedLoss`, and the planning of
``fastmlp::mlp_loss_step``'s loss that it shares with :class:`TrainStep`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import functional as F
from ._ops import ops
from .autograd import _flatten
from .modules import (
    BCEWithLogitsLoss,
    CrossEntropyLoss,
    MSELoss,
    _Chain,
    _chain_fusable,
    _has_hooks,
    _same_dtype_device,
    _whole_chain,
)

__all__ = ["FusedLoss"]

_BCE, _MSE, _CROSS_ENTROPY = 0, 1, 2  # mlp_loss_step's loss kinds
_LOSS_KINDS = {
    nn.BCEWithLogitsLoss: _BCE,
    BCEWithLogitsLoss: _BCE,
    nn.MSELoss: _MSE,
    MSELoss: _MSE,
    nn.CrossEntropyLoss: _CROSS_ENTROPY,
    CrossEntropyLoss: _CROSS_ENTROPY,
}
_REDUCTIONS = {"mean": 1, "sum": 2}


def _is_number(v: object) -> bool:
    return type(v) is float or type(v) is int


def step_loss_kind(loss_fn: nn.Module, input: Any, target: object, out_features: int) -> int | None:
    """The loss kind of mlp_loss_step for ``loss_fn(model(input), target)`` (a model
    with ``out_features`` outputs), or None where torch's loss must run (other
    losses or options, a target that broadcasts, requires grad or has another
    dtype, hooks)."""
    kind = _LOSS_KINDS.get(type(loss_fn))
    if kind is None or loss_fn.reduction not in _REDUCTIONS or _has_hooks((loss_fn,)):
        return None
    if not isinstance(target, torch.Tensor) or target.requires_grad or target.layout is not torch.strided:
        return None
    out_shape = (*input.shape[:-1], out_features)
    weight = loss_fn._buffers.get("weight")
    if kind == _CROSS_ENTROPY:
        # [B, C] logits only ([B, C, d...] has its classes in another dim); class
        # indices [B] or probabilities [B, C]
        smoothing = loss_fn.label_smoothing
        if input.dim() != 2 or not (_is_number(smoothing) and 0.0 <= smoothing <= 1.0):
            return None
        if not (type(loss_fn.ignore_index) is int and -(2**63) <= loss_fn.ignore_index < 2**63):
            return None
        if target.dtype is torch.int64:
            if target.device != input.device or tuple(target.shape) != out_shape[:1]:
                return None
        elif not (_same_dtype_device(target, input) and tuple(target.shape) == out_shape):
            return None
        elif loss_fn.ignore_index >= 0:
            return None  # probabilities: torch refuses ignore_index >= 0 ("not supported for floating point")
        return kind if weight is None or (
            _same_dtype_device(weight, input) and tuple(weight.shape) == out_shape[1:]
        ) else None  # fmt: skip
    if not _same_dtype_device(target, input) or tuple(target.shape) != out_shape:
        return None
    if kind == _MSE:
        return kind
    for buf in (weight, loss_fn._buffers.get("pos_weight")):
        if buf is not None and not (_same_dtype_device(buf, input) and F._broadcasts_to(buf, target.shape)):
            return None
    return kind


def step_loss_args(loss_fn: nn.Module, kind: int, target_shape: torch.Size) -> tuple[Any, ...]:
    """mlp_loss_step's loss arguments: (loss, weight, pos_weight, reduction,
    ignore_index, label_smoothing)."""
    reduction = _REDUCTIONS[loss_fn.reduction]
    if kind == _BCE:
        buffers = loss_fn._buffers
        weight, pos_weight = buffers.get("weight"), buffers.get("pos_weight")
        return (kind, F._pattern(weight, target_shape), F._pattern(pos_weight, target_shape), reduction, -100, 0.0)
    if kind == _MSE:
        return (kind, None, None, reduction, -100, 0.0)
    return (kind, loss_fn.weight, None, reduction, loss_fn.ignore_index, float(loss_fn.label_smoothing))


class FusedLoss(nn.Module):
    """``loss_fn(model(input), target)`` as one fused op, for any optimizer and loop.

    ``forward(input, target)`` returns the loss; the op that computes it (the
    chain forward, the loss and its logits gradient, the backward through every
    layer) also computes every gradient, so ``loss.backward()`` only scales the
    stored gradients: optimizers, clipping, DDP and ``torch.compile`` keep
    working. :class:`FusedBCEClassifier` is this for BCE with the loss options as
    arguments; ``FusedLoss`` takes the loss module itself.

    Args:
        model: ``nn.Sequential`` / :class:`Sequential` / :class:`MLP`, one
            Linear(+ReLU) chain for the fused path.
        loss_fn: ``BCEWithLogitsLoss``, ``MSELoss`` or ``CrossEntropyLoss``
            (``torch.nn``'s or torch_fastmlp's), reduction ``"mean"`` or ``"sum"``,
            with the options :class:`TrainStep` takes.

    Anything else (other modules, losses or options, hooks, a target that
    requires grad or broadcasts) runs ``loss_fn(model(input), target)``, with
    torch's results and errors. ``predict(input)`` returns ``model(input)``.
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def predict(self, input: torch.Tensor) -> torch.Tensor:
        """The model's output ``model(input)``."""
        return self.model(input)

    def _fused(self, input: object, target: object) -> tuple[_Chain, list, list, int] | None:
        chain = _whole_chain(self.model)
        if chain is None:
            return None
        params = _chain_fusable(chain, input)
        if params is None or input.numel() == 0:  # type: ignore[union-attr]
            return None
        kind = step_loss_kind(self.loss_fn, input, target, chain.linears[-1].out_features)
        if kind is None or target.numel() == 0:  # type: ignore[union-attr]
            return None
        return chain, params[0], params[1], kind

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        fused = self._fused(input, target)
        if fused is None:
            return self.loss_fn(self.model(input), target)
        chain, weights, biases, kind = fused
        x = _flatten(input)
        y = target if target.dim() == 2 or kind == _CROSS_ENTROPY else target.reshape(x.shape[0], -1)
        # fastmlp::mlp_loss has its autograd in C++: backward scales the gradients of forward
        return ops.mlp_loss(x, y, weights, biases, chain.last_relu, *step_loss_args(self.loss_fn, kind, target.shape))
