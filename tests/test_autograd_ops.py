"""The differentiable ops with their autograd in C++ (``fastmlp::mlp``,
``fastmlp::bce_loss``, ``fastmlp::mlp_bce_loss``): what the modules call.
Each is checked against torch's own math and against the Python Function
with the same math, on every combination of gradients asked for."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import DEVICES, assert_close
from torch import nn

import torch_fastmlp
from torch_fastmlp import BCEWithLogitsFunction, MLPBCEFunction, MLPFunction

ops = torch.ops.fastmlp


def _chain(device: str, dtype: torch.dtype, sizes: tuple[int, ...], bias: list[bool]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (fi, fo) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(fi, fo, bias=bias[i], device=device, dtype=dtype))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _params(model: nn.Sequential) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    linears = [m for m in model if isinstance(m, nn.Linear)]
    return [m.weight for m in linears], [m.bias for m in linears]


BIAS_PATTERNS = [[True, True], [False, True], [True, False], [False, False]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", BIAS_PATTERNS, ids=str)
@pytest.mark.parametrize("frozen", [(), (0,), (1,), (0, 1)], ids=str)
@pytest.mark.parametrize("input_grad", [False, True])
def test_mlp_matches_torch(device: str, bias: list[bool], frozen: tuple[int, ...], input_grad: bool) -> None:
    model = _chain(device, torch.float64, (9, 5, 3), bias)
    for i in frozen:
        model[2 * i].requires_grad_(False)
    x = torch.randn(7, 9, device=device, dtype=torch.float64, requires_grad=input_grad)
    weights, biases = _params(model)
    out = ops.mlp(x, weights, biases, False)
    ref = model(x)
    assert_close(out, ref)
    leaves = [t for t in [x, *weights, *[b for b in biases if b is not None]] if t.requires_grad]
    if not leaves:
        assert not out.requires_grad
        return
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, leaves, g)
    want = torch.autograd.grad(ref, leaves, g)
    for a, b in zip(got, want, strict=True):
        assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", BIAS_PATTERNS, ids=str)
@pytest.mark.parametrize("reduction", [1, 2], ids=["mean", "sum"])
@pytest.mark.parametrize("loss_weights", ["none", "pos_weight", "both"])
def test_mlp_bce_loss_matches_torch(device: str, bias: list[bool], reduction: int, loss_weights: str) -> None:
    model = _chain(device, torch.float64, (9, 5, 2), bias)
    x = torch.randn(11, 9, device=device, dtype=torch.float64, requires_grad=True)
    y = torch.rand(11, 2, device=device, dtype=torch.float64)
    pw = torch.rand(2, device=device, dtype=torch.float64) + 0.5 if loss_weights != "none" else None
    w = torch.rand(2, device=device, dtype=torch.float64) if loss_weights == "both" else None
    weights, biases = _params(model)
    loss = ops.mlp_bce_loss(x, y, weights, biases, False, w, pw, reduction)
    ref = nn.functional.binary_cross_entropy_with_logits(
        model(x), y, weight=w, pos_weight=pw, reduction="mean" if reduction == 1 else "sum"
    )
    assert_close(loss, ref)
    leaves = [x, *weights, *[b for b in biases if b is not None]]
    for seed in (1.0, 0.37):  # exactly 1 takes the stored gradients as they are
        got = torch.autograd.grad(loss * seed if seed != 1.0 else loss, leaves, retain_graph=True)
        want = torch.autograd.grad(ref * seed, leaves, retain_graph=True)
        for a, b in zip(got, want, strict=True):
            assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", [0, 1, 2], ids=["none", "mean", "sum"])
@pytest.mark.parametrize("grads", list(itertools.product([False, True], repeat=2)), ids=str)
def test_bce_loss_matches_torch(device: str, reduction: int, grads: tuple[bool, bool]) -> None:
    x = torch.randn(6, 3, device=device, dtype=torch.float64, requires_grad=grads[0])
    y = torch.rand(6, 3, device=device, dtype=torch.float64, requires_grad=grads[1])
    pw = torch.rand(3, device=device, dtype=torch.float64) + 0.5
    loss = ops.bce_loss(x, y, None, pw, reduction)
    name = ["none", "mean", "sum"][reduction]
    ref = nn.functional.binary_cross_entropy_with_logits(x, y, pos_weight=pw, reduction=name)
    assert_close(loss, ref)
    leaves = [t for t in (x, y) if t.requires_grad]
    if not leaves:
        assert not loss.requires_grad
        return
    g = torch.rand_like(ref)
    for a, b in zip(torch.autograd.grad(loss, leaves, g), torch.autograd.grad(ref, leaves, g), strict=True):
        assert_close(a, b)


def test_same_gradients_as_the_python_functions() -> None:
    """The C++ and Python autograd of each op give bitwise the same gradients."""
    model = _chain("cpu", torch.float32, (30, 8, 1), [True, False])
    weights, biases = _params(model)
    flat = [p for pair in zip(weights, biases, strict=True) for p in pair]
    leaves = [p for p in flat if p is not None]
    x = torch.randn(40, 30)
    y = torch.rand(40, 1)

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.autograd.grad(loss, leaves))

    cpp = grads(ops.mlp(x, weights, biases, False).square().sum())
    py = grads(MLPFunction.apply(x, False, *flat).square().sum())
    assert all(torch.equal(a, b) for a, b in zip(cpp, py, strict=True))
    cpp = grads(ops.mlp_bce_loss(x, y, weights, biases, False, None, None, 1))
    py = grads(MLPBCEFunction.apply(x, y, False, None, None, 1, *flat))
    assert all(torch.equal(a, b) for a, b in zip(cpp, py, strict=True))
    logits = torch.randn(40, 3, requires_grad=True)
    t = torch.rand(40, 3)
    a = torch.autograd.grad(ops.bce_loss(logits, t, None, None, 1), logits)[0]
    b = torch.autograd.grad(BCEWithLogitsFunction.apply(logits, t, None, None, 1), logits)[0]
    assert torch.equal(a, b)


def test_gradcheck() -> None:
    model = _chain("cpu", torch.float64, (4, 3, 2), [True, False])
    weights, biases = _params(model)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.rand(5, 2, dtype=torch.float64)
    w0, w1, b0 = weights[0], weights[1], biases[0]
    assert torch.autograd.gradcheck(lambda x, a, b, c: ops.mlp(x, [a, b], [c, None], True), (x, w0, w1, b0))
    assert torch.autograd.gradcheck(
        lambda x, a, b, c: ops.mlp_bce_loss(x, y, [a, b], [c, None], False, None, None, 2), (x, w0, w1, b0)
    )
    yg = y.clone().requires_grad_()
    logits = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.bce_loss(a, b, None, None, 0), (logits, yg))


@pytest.mark.parametrize("bias", BIAS_PATTERNS, ids=str)
def test_opcheck(bias: list[bool]) -> None:
    model = _chain("cpu", torch.float32, (6, 4, 1), bias)
    weights, biases = _params(model)
    x = torch.randn(5, 6)
    y = torch.rand(5, 1)
    torch.library.opcheck(ops.mlp.default, (x, weights, biases, False))
    torch.library.opcheck(ops.mlp_bce_loss.default, (x, y, weights, biases, False, None, None, 1))
    logits = torch.randn(5, 3, requires_grad=True)
    torch.library.opcheck(ops.bce_loss.default, (logits, torch.rand(5, 3), None, None, 1))


@pytest.mark.parametrize("frozen_first", [False, True])
def test_mlp_double_backward_like_eager(frozen_first: bool) -> None:
    """A gradient penalty through the chain (create_graph=True, then backward
    through the penalty) gives eager's parameter gradients."""
    model = _chain("cpu", torch.float64, (6, 5, 4, 1), [True, False, True])
    if frozen_first:
        model[0].requires_grad_(False)
    weights, biases = _params(model)
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=not frozen_first)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def penalised(out: torch.Tensor) -> list[torch.Tensor]:
        wrt = [x] if x.requires_grad else trainable[:1]
        grads = torch.autograd.grad(out.square().sum(), wrt, create_graph=True)
        total = out.mean() + sum(g.pow(2).sum() for g in grads)
        return list(torch.autograd.grad(total, trainable))

    got = penalised(ops.mlp(x, weights, biases, False))
    want = penalised(model(x))
    for a, b in zip(got, want, strict=True):
        assert_close(a, b)


def test_mlp_gradgradcheck() -> None:
    model = _chain("cpu", torch.float64, (4, 3, 2), [True, False])
    weights, biases = _params(model)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda x, a, b, c: ops.mlp(x, [a, b], [c, None], True), (x, weights[0], weights[1], biases[0])
    )


def test_mlp_double_backward_without_the_input_is_a_clear_error() -> None:
    """First weight frozen (input not saved, as eager) but the input's gradient
    asked for twice: nothing to recompute the first layer from."""
    model = _chain("cpu", torch.float64, (6, 5, 1), [True, True])
    model[0].requires_grad_(False)
    weights, biases = _params(model)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(ops.mlp(x, weights, biases, False).sum(), x, create_graph=True)


def test_inference_and_no_grad() -> None:
    model = _chain("cpu", torch.float32, (6, 4, 1), [True, True])
    weights, biases = _params(model)
    x, y = torch.randn(5, 6), torch.rand(5, 1)
    ref = nn.functional.binary_cross_entropy_with_logits(model(x), y)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            out = ops.mlp(x, weights, biases, False)
            loss = ops.mlp_bce_loss(x, y, weights, biases, False, None, None, 1)
            bce = ops.bce_loss(out, y, None, None, 1)
        assert not out.requires_grad and not loss.requires_grad
        assert_close(loss, ref.detach())
        assert_close(bce, ref.detach())


def test_retain_graph_gives_the_same_gradients_twice() -> None:
    model = _chain("cpu", torch.float32, (6, 4, 1), [True, True])
    weights, biases = _params(model)
    x, y = torch.randn(5, 6), torch.rand(5, 1)
    loss = ops.mlp_bce_loss(x, y, weights, biases, False, None, None, 1)
    first = torch.autograd.grad(loss, weights, retain_graph=True)
    second = torch.autograd.grad(loss, weights)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_errors() -> None:
    model = _chain("cpu", torch.float32, (6, 4, 1), [True, True])
    weights, biases = _params(model)
    x, y = torch.randn(5, 6, requires_grad=True), torch.rand(5, 1)
    for loss in (
        ops.mlp_bce_loss(x, y, weights, biases, False, None, None, 1),
        ops.bce_loss(x, torch.rand(5, 6), None, None, 1),
    ):
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(loss, x, create_graph=True)
    pw = torch.ones(1, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'pos_weight'"):
        ops.mlp_bce_loss(x, y, weights, biases, False, None, pw, 1)
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
        ops.bce_loss(x, torch.rand(5, 6), torch.ones(6, requires_grad=True), None, 1)
    with pytest.raises(RuntimeError, match="no gradient for target"):
        ops.mlp_bce_loss(x, y.requires_grad_(), weights, biases, False, None, None, 1)


def test_modules_call_the_cpp_ops() -> None:
    """The modules' fast paths run the C++ autograd nodes, not Python Functions."""
    model = torch_fastmlp.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 1))
    x, y = torch.randn(5, 6), torch.rand(5, 1)
    assert model(x).grad_fn.name().endswith("::MLPFunction>")
    assert torch_fastmlp.FusedBCEClassifier(model)(x, y).grad_fn.name().endswith("::MLPLossFunction>")
    loss = torch_fastmlp.BCEWithLogitsLoss()(model(x), y)
    assert loss.grad_fn.name().endswith("::BCEWithLogitsFunction>")
