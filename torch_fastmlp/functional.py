"""Functional API with ``torch.nn.functional``'s signatures, backed by the fused ops."""

from __future__ import annotations

import warnings

import torch
from torch.nn import _reduction

from ._ops import check_device, device_supported, ops
from .autograd import _flatten, _unflatten

__all__ = ["binary_cross_entropy_with_logits", "linear", "linear_relu"]


_warned_devices: set[str] = set()


def _fast_path_ok(input: object) -> bool:
    """Whether the fused kernels can serve a call on ``input``; otherwise the
    module or function runs torch's own code (which then also gives torch's own
    results under autocast and torch.func, and raises torch's own errors)."""
    if not isinstance(input, torch.Tensor) or not input.is_floating_point() or input.layout is not torch.strided:
        return False  # sparse inputs: torch.nn's sparse matmuls
    if torch._C._are_functorch_transforms_active() or torch.jit.is_tracing():
        return False  # torch.func (grad, vmap, ...) and torch.jit.trace run the torch.nn code
    if input.is_cpu:  # the everyday case, without building a torch.device
        return not torch.is_autocast_enabled("cpu")
    device = input.device
    if not device_supported(device):
        if device.type not in _warned_devices:
            _warned_devices.add(device.type)
            warnings.warn(
                f"torch_fastmlp has no kernels for {device.type} in this build; "
                "falling back to torch.nn (see `python -m torch_fastmlp.info`)",
                stacklevel=3,
            )
        return False
    # meta (shapes only) has no autocast state to ask about
    return device.type == "meta" or not torch.is_autocast_enabled(device.type)


def _fused_linear_ok(input: object, weight: object, bias: object) -> bool:
    """Whether the fused op computes ``linear(input, weight, bias)`` exactly as
    torch would: nn.Linear's layout (weight [out, in], bias [out] or None), one
    floating dtype and device, matching features. Anything else (integer or
    complex tensors, a 1-D weight, a broadcast bias, mismatches that torch
    reports with its own messages) is torch's own call."""
    if not (_fast_path_ok(input) and isinstance(weight, torch.Tensor)) or input.dim() == 0:  # type: ignore[union-attr]
        return False
    if weight.dim() != 2 or input.shape[-1] != weight.shape[1] or weight.dtype is not input.dtype:  # type: ignore[union-attr]
        return False
    if bias is not None and not (
        isinstance(bias, torch.Tensor)
        and bias.dim() == 1
        and bias.shape[0] == weight.shape[0]
        and bias.dtype is input.dtype  # type: ignore[union-attr]
        and bias.device == weight.device
    ):
        return False
    return weight.device == input.device  # type: ignore[union-attr]


def _one_layer(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool) -> torch.Tensor:
    """One layer as a chain of one: ``fastmlp::mlp``, whose autograd is in C++
    (the math of :class:`torch_fastmlp.LinearReLUFunction` / ``LinearFunction``)."""
    return _unflatten(ops.mlp(_flatten(input), [weight], [bias], relu), input.shape)


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``input @ weight.T + bias`` like :func:`torch.nn.functional.linear`, with the
    bias add fused into the GEMM epilogue. ``input`` is ``[*, in_features]``.
    Calls the kernels do not serve run :func:`torch.nn.functional.linear` itself."""
    if not _fused_linear_ok(input, weight, bias):
        return torch.nn.functional.linear(input, weight, bias)
    return _one_layer(input, weight, bias, relu=False)


def linear_relu(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``relu(input @ weight.T + bias)`` in one fused op, forward and backward
    (or ``torch.relu(torch.nn.functional.linear(...))`` where the kernels do not serve the call)."""
    if not _fused_linear_ok(input, weight, bias):
        return torch.relu(torch.nn.functional.linear(input, weight, bias))
    return _one_layer(input, weight, bias, relu=True)


def _broadcasts_to(t: torch.Tensor, shape: torch.Size) -> bool:
    """``t`` broadcasts to exactly ``shape`` (torch.broadcast_shapes costs ~10 µs a call)."""
    trailing = zip(reversed(t.shape), reversed(shape), strict=False)  # t may have fewer dims
    return t.dim() <= len(shape) and all(a in (1, b) for a, b in trailing)


def _pattern(t: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    """``t`` broadcast to ``shape`` as the shortest flat pattern that repeats along
    the flattened input: e.g. a per-class ``[C]`` pos_weight over ``[B, C]`` stays
    ``C`` values, a full ``[B, C]`` weight becomes ``B * C`` values. Callers check
    ``_broadcasts_to`` first (and hand a weight that fails it to torch, for its error)."""
    if t is None:
        return None
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
        and input.dim() > 0
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
        and input.shape == target.shape
        and input.numel() > 0
        and _own_pattern(weight, input)
        and _own_pattern(pos_weight, input)
        and _fast_path_ok(input)
    ):
        # The everyday call (no weights or per-class ones, same dtype and shape):
        # the checks below would all pass; a small batch would pay for them more
        # than for the loss.
        return ops.bce_loss(input, target, weight, pos_weight, _reduction.get_enum(reduction))

    def by_torch() -> torch.Tensor:
        """torch's own function: its result, type promotion and errors, exactly."""
        return torch.nn.functional.binary_cross_entropy_with_logits(
            input, target, weight, size_average, reduce, reduction, pos_weight
        )

    tensors = (input, target, *(t for t in (weight, pos_weight) if t is not None))
    if not all(isinstance(t, torch.Tensor) for t in tensors) or not _fast_path_ok(input):
        return by_torch()  # non-tensors, integer input, autocast, torch.func, tracing
    if any(t.dtype != input.dtype for t in tensors) or input.numel() == 0:
        return by_torch()  # mixed dtypes promote as torch does; batch 0 needs no kernel
    if target.size() != input.size():
        raise ValueError(f"Target size ({target.size()}) must be the same as input size ({input.size()})")
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)  # warns as torch does
        size_average = reduce = None
    reduction_enum = _reduction.get_enum(reduction)  # ValueError for a bad string, as torch
    for name, t in (("weight", weight), ("pos_weight", pos_weight)):
        if t is None:
            continue
        if t.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                f"The function 'binary_cross_entropy_with_logits' is not differentiable with respect to "
                f"argument '{name}'. This input cannot have requires_grad True."
            )
        if not _broadcasts_to(t, input.shape):
            return by_torch()  # torch's broadcasting error
    check_device(*tensors)
    return ops.bce_loss(
        input,
        target,
        _pattern(weight, input.shape),
        _pattern(pos_weight, input.shape),
        reduction_enum,
    )


# --- MSE and softmax cross-entropy (issue 20) ---------------------------------------

__all__ += ["cross_entropy", "mse_loss"]


# The differentiable ops as OpOverloads (a call skips the overload lookup of ops.<name>(...)).
_MSE_LOSS = ops.mse_loss.default
_CROSS_ENTROPY_LOSS = ops.cross_entropy_loss.default


def _same_device(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.is_cpu and b.is_cpu) or a.device == b.device


def mse_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same signature, defaults, errors and results as :func:`torch.nn.functional.mse_loss`,
    computed by the fused kernels (the op ``fastmlp::mse_loss``: the loss and its
    input gradient in one pass, the target's gradient is its negative; autograd in
    C++). Calls the kernels do not serve run torch's own function: shapes that
    differ (torch broadcasts them, with a warning), mixed dtypes or devices, a
    per-element ``weight``, integer tensors, autocast, torch.func transforms."""
    if size_average is not None or reduce is not None:
        if weight is not None:
            return torch.nn.functional.mse_loss(input, target, size_average, reduce, reduction, weight)
        reduction = _reduction.legacy_get_string(size_average, reduce)  # warns as torch does
    if (
        weight is None
        and type(input) is torch.Tensor
        and type(target) is torch.Tensor
        and input.dtype == target.dtype
        and input.shape == target.shape
        and _fast_path_ok(input)
        and _same_device(input, target)
    ):
        # _fast_path_ok has checked the device has kernels
        return _MSE_LOSS(input, target, _reduction.get_enum(reduction))  # ValueError for a bad string
    return torch.nn.functional.mse_loss(input, target, reduction=reduction, weight=weight)


def _ce_weight_ok(weight: object, input: torch.Tensor, classes: int) -> bool:
    """None, or a per-class ``[C]`` weight the kernels take as it is (torch's
    checks and messages for any other, and its gradient for one that requires grad)."""
    if weight is None:
        return True
    return (
        type(weight) is torch.Tensor
        and weight.dim() == 1
        and weight.shape[0] == classes
        and weight.dtype is input.dtype
        and _same_device(weight, input)
        and not (weight.requires_grad and torch.is_grad_enabled())
    )


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Same signature, defaults, errors and results as
    :func:`torch.nn.functional.cross_entropy`, computed by the fused kernels:
    log-softmax and NLL (class weights, ``ignore_index``, label smoothing) and the
    logits' gradient in one pass (the op ``fastmlp::cross_entropy_loss``, autograd
    in C++). Served: logits ``[B, C]`` or ``[C]`` with class indices (int64
    ``[B]`` / ``[]``) or class probabilities of the logits' shape and dtype.
    Everything else runs torch's own function: ``[B, C, d...]`` inputs, other
    target dtypes, probability targets that require grad, a weight that requires
    grad or does not fit, legacy ``size_average`` / ``reduce``, autocast,
    torch.func transforms, mixed devices."""

    def by_torch() -> torch.Tensor:
        """torch's own function: its result, type promotion and errors, exactly."""
        return torch.nn.functional.cross_entropy(
            input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing
        )

    if (
        size_average is not None
        or reduce is not None
        or type(input) is not torch.Tensor
        or type(target) is not torch.Tensor
        or not _fast_path_ok(input)
        or input.dim() not in (1, 2)
        or not _same_device(input, target)
        or not isinstance(label_smoothing, float | int)
        or not 0.0 <= label_smoothing <= 1.0
        or type(ignore_index) is not int
    ):
        return by_torch()
    classes = input.shape[-1]
    if classes == 0 or not _ce_weight_ok(weight, input, classes):
        return by_torch()
    if target.shape == input.shape:  # class probabilities, as torch decides
        if target.dtype is not input.dtype or ignore_index >= 0 or (target.requires_grad and torch.is_grad_enabled()):
            return by_torch()
    elif target.dtype is not torch.int64 or target.dim() != input.dim() - 1 or target.shape[:1] != input.shape[:-1]:
        return by_torch()
    reduction_enum = _reduction.get_enum(reduction)  # ValueError for a bad string, as torch
    if input.dim() == 1:  # unbatched: one row
        loss = _CROSS_ENTROPY_LOSS(
            input.unsqueeze(0), target.unsqueeze(0), weight, reduction_enum, ignore_index, float(label_smoothing)
        )
        return loss.squeeze(0) if reduction_enum == 0 else loss
    return _CROSS_ENTROPY_LOSS(input, target, weight, reduction_enum, ignore_index, float(label_smoothing))
