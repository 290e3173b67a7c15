"""``torch.autograd.Function`` subclasses over the fused kernel ops, for
composing them in Python. The modules and ``functional`` call the ops
``fastmlp::mlp`` / ``bce_loss`` / ``mlp_bce_loss`` instead, whose autograd is
the same math in C++ (csrc/autograd/): a Python Function costs ~40 µs more per
training step, as much as a batch-64 step's arithmetic here.

Each saves only what its backward reads and computes only the gradients
autograd asks for, so frozen layers and inputs that do not require grad cost
nothing extra. The per-layer, chain and loss Functions never save more than
eager ``torch.nn`` does; :class:`MLPBCEFunction` computes the gradients in
forward, so it holds them (at most the parameter gradients that eager
allocates in backward anyway, plus the input gradient when asked for) instead
of the activations.

They use the ``forward(ctx, ...)`` form: the ``setup_context`` form binds
arguments through ``inspect.signature`` on every call (~15 µs), which alone
would cost a small batch more than its kernels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from ._ops import ops


def _flatten(input: torch.Tensor) -> torch.Tensor:
    """``[*, in]`` -> ``[B, in]`` (a view when possible), as nn.Linear accepts."""
    return input if input.dim() == 2 else input.reshape(-1, input.shape[-1])


def _unflatten(out: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
    return out if len(input_shape) == 2 else out.reshape(*input_shape[:-1], out.shape[-1])


def _shape_only(like: torch.Tensor, cols: int) -> torch.Tensor:
    """A ``[rows, cols]`` stand-in that allocates nothing, for an operand the
    kernel will not read (it was not saved because its gradient is not needed)."""
    return like.new_zeros(()).expand(like.shape[0], cols)


def _first_order_only(backward: Callable[..., Any]) -> Callable[..., Any]:
    """Marks a backward as not differentiable, with a clear error for
    ``create_graph=True`` (like ``once_differentiable``, which alone raises only
    when the incoming gradient requires grad: a gradient penalty on
    ``autograd.grad(loss, x, create_graph=True)`` would otherwise get a
    non-differentiable gradient and a silently wrong result). Without
    ``create_graph`` autograd runs backward with grad mode off, so the backward
    is called as it is."""

    @functools.wraps(backward)
    def wrapper(ctx: Any, *grads: Any) -> Any:
        if torch.is_grad_enabled() and any(ctx.needs_input_grad):
            raise RuntimeError(
                "torch_fastmlp: double backward (create_graph=True) is not supported by the fused "
                "kernels; use the torch.nn modules for higher-order gradients"
            )
        return backward(ctx, *grads)

    return wrapper


def _is_unit_seed(grad_loss: torch.Tensor) -> bool:
    """Whether a scalar loss's incoming gradient is exactly 1 (``loss.backward()``):
    then gradients computed in forward are the answer as they are. Only checked
    eagerly on the CPU, where reading the scalar costs no device sync."""
    return not torch.compiler.is_compiling() and grad_loss.device.type == "cpu" and grad_loss.item() == 1.0


def _linear_act_forward(
    ctx: Any, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool
) -> torch.Tensor:
    output = ops.linear_act(_flatten(input), weight, bias, relu)
    need_input, need_weight, _ = ctx.needs_input_grad
    ctx.has_bias = bias is not None
    ctx.input_shape = input.shape
    # As eager: the input only for grad_weight, the output only for the ReLU mask.
    ctx.save_for_backward(
        input if need_weight else None,
        weight if need_input else None,
        output if relu else None,
    )
    return _unflatten(output, input.shape)


def _linear_act_backward(ctx: Any, grad_output: torch.Tensor, relu: bool) -> tuple[torch.Tensor | None, ...]:
    input, weight, output = ctx.saved_tensors
    need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and ctx.has_bias]
    if not any(need):
        return None, None, None
    grad_2d = _flatten(grad_output)
    in_features = ctx.input_shape[-1]
    input_2d = _flatten(input) if input is not None else _shape_only(grad_2d, in_features)
    if weight is None:
        weight = _shape_only(grad_2d.t(), in_features)
    output_2d = output if output is not None else grad_2d  # only read when relu
    gi, gw, gb = ops.linear_act_backward(grad_2d, input_2d, weight, output_2d, relu, need)
    return (
        gi.reshape(ctx.input_shape) if need[0] else None,
        gw if need[1] else None,
        gb if need[2] else None,
    )


class LinearReLUFunction(torch.autograd.Function):
    """``relu(input @ weight.T + bias)`` in one fused op, forward and backward.
    Saves only what backward reads: the input (for the weight gradient) and the
    output (the ReLU mask), as eager ``nn.Linear`` + ``nn.ReLU`` do."""

    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        return _linear_act_forward(ctx, input, weight, bias, True)

    @staticmethod
    @_first_order_only
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        return _linear_act_backward(ctx, grad_output, True)


class LinearFunction(torch.autograd.Function):
    """``input @ weight.T + bias`` with the bias add fused into the GEMM epilogue."""

    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        return _linear_act_forward(ctx, input, weight, bias, False)

    @staticmethod
    @_first_order_only
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        return _linear_act_backward(ctx, grad_output, False)


class MLPFunction(torch.autograd.Function):
    """A whole Linear(+ReLU) chain as one op: ReLU after every layer but the last
    (and after the last too when ``last_relu``). ``params`` alternates weight and
    bias (``None`` for a layer without bias)."""

    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, last_relu: bool, *params: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        weights = params[0::2]
        output, hidden = ops.mlp_forward(_flatten(input), weights, params[1::2], last_relu)
        ctx.last_relu = last_relu
        ctx.input_shape = input.shape
        ctx.has_bias = [b is not None for b in params[1::2]]
        # As eager: the input only for the first layer's weight gradient, the
        # output only for a final ReLU's mask; the hidden activations always.
        ctx.save_for_backward(
            input if ctx.needs_input_grad[2] else None,
            hidden,
            output if last_relu else None,
            *weights,
        )
        return _unflatten(output, input.shape)

    @staticmethod
    @_first_order_only
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        input, hidden, output, *weights = ctx.saved_tensors
        needs = ctx.needs_input_grad
        weight_mask = [bool(needs[2 + 2 * i]) for i in range(len(weights))]
        bias_mask = [bool(needs[3 + 2 * i]) and has for i, has in enumerate(ctx.has_bias)]
        input_grad = bool(needs[0])
        if not (input_grad or any(weight_mask) or any(bias_mask)):
            return (None,) * len(needs)
        grad_2d = _flatten(grad_output)
        input_2d = _flatten(input) if input is not None else _shape_only(grad_2d, ctx.input_shape[-1])
        gi, gws, gbs = ops.mlp_backward(
            grad_2d, input_2d, weights, hidden, output, ctx.last_relu, input_grad, weight_mask, bias_mask
        )
        grads: list[torch.Tensor | None] = [gi.reshape(ctx.input_shape) if input_grad else None, None]
        for gw, gb, mw, mb in zip(gws, gbs, weight_mask, bias_mask, strict=True):
            grads += [gw if mw else None, gb if mb else None]
        return tuple(grads)


class BCEWithLogitsFunction(torch.autograd.Function):
    """Binary cross-entropy with logits. ``weight`` / ``pos_weight`` are flat
    patterns repeating along the input (see
    :func:`torch_fastmlp.functional.binary_cross_entropy_with_logits`);
    ``reduction`` is 0 none, 1 mean, 2 sum. For a reduced loss the input
    gradient is computed in the forward pass and backward only scales it."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        input: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None,
        pos_weight: torch.Tensor | None,
        reduction: int,
    ) -> torch.Tensor:
        need_input, need_target = ctx.needs_input_grad[:2]
        reduced = reduction != 0
        loss, grad_input = ops.bce_with_logits(input, target, weight, pos_weight, reduction, need_input and reduced)
        ctx.reduction = reduction
        # The pre-computed input gradient replaces input and target unless the
        # elementwise backward needs them (no reduction, or a target gradient).
        elementwise = need_target or (need_input and not reduced)
        ctx.save_for_backward(
            grad_input if need_input and reduced else None,
            input if elementwise else None,
            target if elementwise else None,
            weight if elementwise else None,
            pos_weight if elementwise else None,
        )
        return loss

    @staticmethod
    @_first_order_only
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        stored_grad, input, target, weight, pos_weight = ctx.saved_tensors
        need_input, need_target = ctx.needs_input_grad[:2]
        grad_input = grad_target = None
        if need_input and stored_grad is not None:
            grad_input = stored_grad if _is_unit_seed(grad_loss) else stored_grad * grad_loss
        elementwise_input = need_input and stored_grad is None
        if elementwise_input or need_target:
            gi, gt = ops.bce_with_logits_backward(
                grad_loss, input, target, weight, pos_weight, ctx.reduction, [elementwise_input, need_target]
            )
            if elementwise_input:
                grad_input = gi
            if need_target:
                grad_target = gt
        return grad_input, grad_target, None, None, None


class MLPBCEFunction(torch.autograd.Function):
    """The loss of an MLP classifier, ``BCEWithLogits(chain(input), target)``
    reduced by mean or sum, with every gradient computed in the same op as the
    loss. Backward only scales the stored gradients by ``grad_output``.

    ``params`` alternates weight and bias like :class:`MLPFunction`; ``weight``
    and ``pos_weight`` are the loss's flat patterns."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        input: torch.Tensor,
        target: torch.Tensor,
        last_relu: bool,
        weight: torch.Tensor | None,
        pos_weight: torch.Tensor | None,
        reduction: int,
        *params: torch.Tensor | None,
    ) -> torch.Tensor:
        needs = ctx.needs_input_grad
        n_layers = len(params) // 2
        weight_mask = [bool(needs[6 + 2 * i]) for i in range(n_layers)]
        bias_mask = [bool(needs[7 + 2 * i]) and params[2 * i + 1] is not None for i in range(n_layers)]
        input_2d = _flatten(input)
        loss, grad_input, grad_weights, grad_biases = ops.mlp_bce_step(
            input_2d,
            target.reshape(input_2d.shape[0], -1),
            params[0::2],
            params[1::2],
            last_relu,
            weight,
            pos_weight,
            reduction,
            bool(needs[0]),
            weight_mask,
            bias_mask,
        )
        ctx.input_shape = input.shape
        ctx.masks = (bool(needs[0]), weight_mask, bias_mask)
        ctx.save_for_backward(grad_input, *grad_weights, *grad_biases)
        return loss

    @staticmethod
    @_first_order_only
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        input_grad, weight_mask, bias_mask = ctx.masks
        saved = ctx.saved_tensors
        n_layers = len(weight_mask)
        grad_input, grad_weights, grad_biases = saved[0], saved[1 : 1 + n_layers], saved[1 + n_layers :]

        unit = _is_unit_seed(grad_loss)

        def scaled(g: torch.Tensor) -> torch.Tensor:
            return g if unit else g * grad_loss

        grads: list[torch.Tensor | None] = [scaled(grad_input).reshape(ctx.input_shape) if input_grad else None]
        grads += [None] * 5
        for gw, gb, mw, mb in zip(grad_weights, grad_biases, weight_mask, bias_mask, strict=True):
            grads += [scaled(gw) if mw else None, scaled(gb) if mb else None]
        return tuple(grads)
