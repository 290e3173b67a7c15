"""Functional API with ``torch.nn.functional``'s signatures, backed by the fused ops."""

from __future__ import annotations

import torch
from torch.nn import _reduction

from ._ops import check_device, ops
from .autograd import _flatten, _unflatten

__all__ = ["binary_cross_entropy_with_logits", "linear", "linear_relu"]


def _check_tensor(value: object, name: str, fn: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{fn}(): argument '{name}' must be Tensor, not {type(value).__name__}")


def _check_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fn: str) -> None:
    _check_tensor(input, "input", fn)
    _check_tensor(weight, "weight", fn)
    if bias is not None:
        _check_tensor(bias, "bias", fn)
    if input.dim() == 0:
        raise RuntimeError(f"{fn}(): input must have at least 1 dimension, got a 0-D tensor")
    check_device(input, weight, bias)


def _kernel_layout(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """The kernels take nn.Linear's layout: weight [out, in], bias [out] or None.
    torch.nn.functional.linear also accepts a 1-D weight and a broadcast bias;
    those rare forms are computed by torch itself."""
    return weight.dim() == 2 and (bias is None or (bias.dim() == 1 and bias.shape[0] == weight.shape[0]))


def _one_layer(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool) -> torch.Tensor:
    """One layer as a chain of one: ``fastmlp::mlp``, whose autograd is in C++
    (the math of :class:`torch_fastmlp.LinearReLUFunction` / ``LinearFunction``)."""
    return _unflatten(ops.mlp(_flatten(input), [weight], [bias], relu), input.shape)


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``input @ weight.T + bias`` like :func:`torch.nn.functional.linear`, with the
    bias add fused into the GEMM epilogue. ``input`` is ``[*, in_features]``."""
    _check_linear(input, weight, bias, "linear")
    if not _kernel_layout(weight, bias):
        return torch.nn.functional.linear(input, weight, bias)
    return _one_layer(input, weight, bias, relu=False)


def linear_relu(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``relu(input @ weight.T + bias)`` in one fused op, forward and backward."""
    _check_linear(input, weight, bias, "linear_relu")
    if not _kernel_layout(weight, bias):
        return torch.relu(torch.nn.functional.linear(input, weight, bias))
    return _one_layer(input, weight, bias, relu=True)


def _pattern(t: torch.Tensor | None, shape: torch.Size, name: str) -> torch.Tensor | None:
    """``t`` broadcast to ``shape`` as the shortest flat pattern that repeats along
    the flattened input: e.g. a per-class ``[C]`` pos_weight over ``[B, C]`` stays
    ``C`` values, a full ``[B, C]`` weight becomes ``B * C`` values."""
    if t is None:
        return None
    _check_tensor(t, name, "binary_cross_entropy_with_logits")
    # Broadcasts to exactly `shape` (torch.broadcast_shapes costs ~10 µs a call).
    trailing = zip(reversed(t.shape), reversed(shape), strict=False)  # t may have fewer dims
    fits = t.dim() <= len(shape) and all(a in (1, b) for a, b in trailing)
    if not fits:
        raise RuntimeError(
            f"binary_cross_entropy_with_logits: {name} of shape {tuple(t.shape)} cannot be "
            f"broadcast to the input's shape {tuple(shape)}"
        )
    padded = t.reshape((1,) * (len(shape) - t.dim()) + tuple(t.shape))
    lead = next((i for i, size in enumerate(padded.shape) if size != 1), len(shape))
    return padded.expand(shape)[(0,) * lead].reshape(-1)


def _own_pattern(t: torch.Tensor | None, input: torch.Tensor) -> bool:
    """None, or a per-class ``[C]`` weight over ``[..., C]`` logits that is
    already its own flat pattern (``_pattern`` would return it as it is), on the
    input's dtype and device and without a gradient to refuse."""
    if t is None:
        return True
    return (
        type(t) is torch.Tensor
        and t.dim() == 1
        and t.shape[0] == input.shape[-1]
        and t.dtype is input.dtype
        and t.is_contiguous()
        and (t.is_cpu and input.is_cpu or t.device == input.device)
        and not (t.requires_grad and torch.is_grad_enabled())
    )


def binary_cross_entropy_with_logits(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    pos_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same signature, defaults, errors and results as
    :func:`torch.nn.functional.binary_cross_entropy_with_logits`, computed by the
    fused kernels (the loss and its input gradient in one pass; the op
    ``fastmlp::bce_loss``, whose autograd is in C++: the same math as
    :class:`torch_fastmlp.BCEWithLogitsFunction` at a lower cost per call)."""
    if (
        size_average is None
        and reduce is None
        and type(input) is torch.Tensor
        and type(target) is torch.Tensor
        and input.dtype == target.dtype
        and input.is_floating_point()
        and input.shape == target.shape
        and input.numel() > 0
        and _own_pattern(weight, input)
        and _own_pattern(pos_weight, input)
    ):
        # The everyday call (no weights or per-class ones, same dtype and shape):
        # the checks below would all pass; a small batch would pay for them more
        # than for the loss.
        check_device(input, target)
        return ops.bce_loss(input, target, weight, pos_weight, _reduction.get_enum(reduction))
    fn = "binary_cross_entropy_with_logits"
    _check_tensor(input, "input", fn)
    _check_tensor(target, "target", fn)
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    reduction_enum = _reduction.get_enum(reduction)  # ValueError for a bad string, as torch
    if target.size() != input.size():
        raise ValueError(f"Target size ({target.size()}) must be the same as input size ({input.size()})")
    for name, t in (("weight", weight), ("pos_weight", pos_weight)):
        if t is None:
            continue
        _check_tensor(t, name, fn)
        if t.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                f"The function 'binary_cross_entropy_with_logits' is not differentiable with respect to "
                f"argument '{name}'. This input cannot have requires_grad True."
            )
    check_device(input, target, weight, pos_weight)
    if not input.is_floating_point() or any(
        t is not None and t.dtype != input.dtype for t in (target, weight, pos_weight)
    ):
        # Integer or mixed dtypes: torch's own type promotion (its result takes
        # the target's dtype) and errors, exactly, by torch's own code.
        return torch.nn.functional.binary_cross_entropy_with_logits(
            input, target, weight, reduction=reduction, pos_weight=pos_weight
        )
    empty = input.numel() == 0  # weights are irrelevant (and may not broadcast to a 0-size shape)
    return ops.bce_loss(
        input,
        target,
        None if empty else _pattern(weight, input.shape, "weight"),
        None if empty else _pattern(pos_weight, input.shape, "pos_weight"),
        reduction_enum,
    )
