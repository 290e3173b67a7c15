"""Loads the compiled kernels and gives every ``fastmlp`` op a fake impl.

The fake impls describe output shapes without computing anything, which is
what ``torch.compile`` (FakeTensor tracing) and ``torch.library.opcheck`` need.
"""

from __future__ import annotations

import torch

from . import _C

ops = torch.ops.fastmlp

#: Whether this build compiled the CUDA kernels.
WITH_CUDA: bool = bool(_C.with_cuda)
#: The CUDA architectures the kernels were compiled for ("" for a CPU-only build).
CUDA_ARCHS: str = _C.cuda_archs
#: The vector ISA the CPU kernels run with here: "avx512", "avx2" or "baseline"
#: (the widest this CPU has, unless the FASTMLP_CPU_ISA environment variable
#: asks for a narrower one at import).
CPU_ISA: str = _C.cpu_isa


def check_device(*tensors: torch.Tensor | None) -> None:
    """Raise a clear error for a device this build has no kernels for."""
    for t in tensors:
        if t is None or t.is_cpu:
            continue
        kind = t.device.type
        if kind == "cuda" and not WITH_CUDA:
            raise RuntimeError(
                "torch_fastmlp was built without its CUDA kernels, so it cannot run on "
                f"{t.device}. Rebuild with a CUDA build of torch and nvcc available "
                "(FASTMLP_CUDA=1 pip install --no-build-isolation .); "
                "`python -m torch_fastmlp.info` shows how it was built."
            )
        if kind not in ("cpu", "cuda", "meta"):
            raise RuntimeError(f"torch_fastmlp has no kernels for device {t.device}")


def device_supported(device: torch.device) -> bool:
    """True when this build has kernels for ``device`` (meta: shapes only, via the fake impls)."""
    return device.type in ("cpu", "meta") or (device.type == "cuda" and WITH_CUDA)


def _same_device(input: torch.Tensor, **others: object) -> None:
    """The fake impls also serve calls that mix meta with real tensors: check
    the devices as the real kernels do, instead of returning uninitialised memory."""
    for name, t in others.items():
        tensors = t if isinstance(t, (list, tuple)) else [t]
        for u in tensors:
            if isinstance(u, torch.Tensor):
                torch._check(
                    u.device == input.device,
                    lambda name=name, u=u: (
                        f"fastmlp: expected {name} and input to be on the same device, "
                        f"but got {u.device} and {input.device}"
                    ),
                )


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,))


@torch.library.register_fake("fastmlp::linear_act")
def _linear_act_fake(input, weight, bias, relu):
    _same_device(input, weight=weight, bias=bias)
    torch._check(input.dim() == 2 and weight.dim() == 2)
    torch._check(input.shape[1] == weight.shape[1])
    return input.new_empty((input.shape[0], weight.shape[0]))


@torch.library.register_fake("fastmlp::linear_act_backward")
def _linear_act_backward_fake(grad_output, input, weight, output, relu, output_mask):
    _same_device(input, grad_output=grad_output, weight=weight, output=output)
    return (
        input.new_empty(input.shape) if output_mask[0] else _empty(input),
        input.new_empty(weight.shape) if output_mask[1] else _empty(input),
        input.new_empty((weight.shape[0],)) if output_mask[2] else _empty(input),
    )


@torch.library.register_fake("fastmlp::mlp_forward")
def _mlp_forward_fake(input, weights, biases, last_relu):
    _same_device(input, weights=weights, biases=biases)
    batch = input.shape[0]
    hidden = sum(batch * w.shape[0] for w in weights[:-1])
    return input.new_empty((batch, weights[-1].shape[0])), input.new_empty((hidden,))


@torch.library.register_fake("fastmlp::mlp_backward")
def _mlp_backward_fake(grad_output, input, weights, hidden, output, last_relu, input_grad, weight_mask, bias_mask):
    _same_device(input, grad_output=grad_output, weights=weights, hidden=hidden, output=output)
    grad_input = input.new_empty(input.shape) if input_grad else _empty(input)
    grad_weights = [input.new_empty(w.shape) if m else _empty(input) for w, m in zip(weights, weight_mask, strict=True)]
    grad_biases = [
        input.new_empty((w.shape[0],)) if m else _empty(input) for w, m in zip(weights, bias_mask, strict=True)
    ]
    return grad_input, grad_weights, grad_biases


@torch.library.register_fake("fastmlp::bce_with_logits")
def _bce_fake(input, target, weight, pos_weight, reduction, input_grad):
    _same_device(input, target=target, weight=weight, pos_weight=pos_weight)
    loss = input.new_empty(()) if reduction != 0 else input.new_empty(input.shape)
    grad = input.new_empty(input.shape) if (input_grad and reduction != 0) else _empty(input)
    return loss, grad


@torch.library.register_fake("fastmlp::bce_with_logits_backward")
def _bce_backward_fake(grad_output, input, target, weight, pos_weight, reduction, output_mask):
    _same_device(input, grad_output=grad_output, target=target, weight=weight, pos_weight=pos_weight)
    return (
        input.new_empty(input.shape) if output_mask[0] else _empty(input),
        input.new_empty(input.shape) if output_mask[1] else _empty(input),
    )


@torch.library.register_fake("fastmlp::mlp_bce_step")
def _mlp_bce_step_fake(
    input, target, weights, biases, last_relu, weight, pos_weight, reduction, input_grad, weight_mask, bias_mask
):
    _same_device(input, target=target, weights=weights, biases=biases, weight=weight, pos_weight=pos_weight)
    grad_input = input.new_empty(input.shape) if input_grad else _empty(input)
    grad_weights = [input.new_empty(w.shape) if m else _empty(input) for w, m in zip(weights, weight_mask, strict=True)]
    grad_biases = [
        input.new_empty((w.shape[0],)) if m else _empty(input) for w, m in zip(weights, bias_mask, strict=True)
    ]
    return input.new_empty(()), grad_input, grad_weights, grad_biases


@torch.library.register_fake("fastmlp::mlp_loss_step")
def _mlp_loss_step_fake(
    input,
    target,
    weights,
    biases,
    last_relu,
    loss,
    weight,
    pos_weight,
    reduction,
    ignore_index,
    label_smoothing,
    input_grad,
    weight_mask,
    bias_mask,
):
    return _mlp_bce_step_fake(
        input, target, weights, biases, last_relu, weight, pos_weight, reduction, input_grad, weight_mask, bias_mask
    )


@torch.library.register_fake("fastmlp::mlp_bce_loss")
def _mlp_bce_loss_fake(input, target, weights, biases, last_relu, weight, pos_weight, reduction):
    _same_device(input, target=target, weights=weights, biases=biases, weight=weight, pos_weight=pos_weight)
    return input.new_empty(())


@torch.library.register_fake("fastmlp::mlp_loss")
def _mlp_loss_fake(input, target, weights, biases, last_relu, loss, weight, pos_weight, reduction, ignore_index,
                   label_smoothing):  # fmt: skip
    _same_device(input, target=target, weights=weights, biases=biases, weight=weight, pos_weight=pos_weight)
    return input.new_empty(())


@torch.library.register_fake("fastmlp::mlp")
def _mlp_fake(input, weights, biases, last_relu):
    return _mlp_forward_fake(input, weights, biases, last_relu)[0]


@torch.library.register_fake("fastmlp::bce_loss")
def _bce_loss_fake(input, target, weight, pos_weight, reduction):
    return _bce_fake(input, target, weight, pos_weight, reduction, False)[0]


@torch.library.register_fake("fastmlp::optimizer_step")
def _optimizer_step_fake(params, grads, state, optimizer, hyper, max_grad_norm):
    if params:
        _same_device(params[0], params=params, grads=grads)
    return None


def _train_grads_fake(like, weights, weight_mask, bias_mask):
    grad_weights = [like.new_empty(w.shape) if m else _empty(like) for w, m in zip(weights, weight_mask, strict=True)]
    grad_biases = [
        like.new_empty((w.shape[0],)) if m else _empty(like) for w, m in zip(weights, bias_mask, strict=True)
    ]
    return grad_weights, grad_biases


@torch.library.register_fake("fastmlp::mlp_train_step")
def _mlp_train_step_fake(
    input,
    target,
    weights,
    biases,
    last_relu,
    loss,
    weight,
    pos_weight,
    reduction,
    ignore_index,
    label_smoothing,
    weight_mask,
    bias_mask,
    state,
    optimizer,
    hyper,
    max_grad_norm,
):
    _same_device(input, target=target, weights=weights, biases=biases, weight=weight, pos_weight=pos_weight)
    return (input.new_empty(()), *_train_grads_fake(input, weights, weight_mask, bias_mask))


@torch.library.register_fake("fastmlp::mlp_train_epoch")
def _mlp_train_epoch_fake(
    inputs,
    targets,
    order,
    batch_size,
    drop_last,
    weights,
    biases,
    last_relu,
    loss,
    weight,
    pos_weight,
    reduction,
    ignore_index,
    label_smoothing,
    weight_mask,
    bias_mask,
    state,
    optimizer,
    hyper,
    max_grad_norm,
):
    _same_device(inputs, targets=targets, order=order, weights=weights, biases=biases)
    rows = inputs.shape[0]
    batches = rows // batch_size if drop_last else -(-rows // batch_size)
    return (inputs.new_empty((batches,)), *_train_grads_fake(inputs, weights, weight_mask, bias_mask))


# --- MSE and softmax cross-entropy (issue 20) ---------------------------------------


@torch.library.register_fake("fastmlp::mse_forward")
def _mse_fake(input, target, reduction, input_grad):
    _same_device(input, target=target)
    loss = input.new_empty(()) if reduction != 0 else input.new_empty(input.shape)
    grad = input.new_empty(input.shape) if (input_grad and reduction != 0) else _empty(input)
    return loss, grad


@torch.library.register_fake("fastmlp::mse_backward")
def _mse_backward_fake(grad_output, input, target, reduction, output_mask):
    _same_device(input, grad_output=grad_output, target=target)
    return (
        input.new_empty(input.shape) if output_mask[0] else _empty(input),
        input.new_empty(input.shape) if output_mask[1] else _empty(input),
    )


@torch.library.register_fake("fastmlp::mse_loss")
def _mse_loss_fake(input, target, reduction):
    return _mse_fake(input, target, reduction, False)[0]


@torch.library.register_fake("fastmlp::cross_entropy_forward")
def _cross_entropy_fake(input, target, weight, reduction, ignore_index, label_smoothing, input_grad):
    _same_device(input, target=target, weight=weight)
    torch._check(input.dim() == 2, lambda: f"fastmlp.cross_entropy: expected 2-D input, got {input.dim()}-D")
    loss = input.new_empty(()) if reduction != 0 else input.new_empty((input.shape[0],))
    grad = input.new_empty(input.shape) if (input_grad and reduction != 0) else _empty(input)
    return loss, grad


@torch.library.register_fake("fastmlp::cross_entropy_backward")
def _cross_entropy_backward_fake(grad_output, input, target, weight, reduction, ignore_index, label_smoothing):
    _same_device(input, grad_output=grad_output, target=target, weight=weight)
    return input.new_empty(input.shape)


@torch.library.register_fake("fastmlp::cross_entropy_loss")
def _cross_entropy_loss_fake(input, target, weight, reduction, ignore_index, label_smoothing):
    return _cross_entropy_fake(input, target, weight, reduction, ignore_index, label_smoothing, False)[0]
