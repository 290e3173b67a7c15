"""fastmlp::mlp_loss_step (the single-pass step with an MSE or cross-entropy
loss) against torch autograd over the reference chain: the loss and every
gradient, for every path (row partials, tiles, the generic composition), loss
option, dtype and device; determinism, opcheck and torch's errors."""

from __future__ import annotations

import pytest
import torch
from conftest import reference_mlp, tol
from torch import nn

import torch_fastmlp  # noqa: F401  (registers the ops)

ops = torch.ops.fastmlp
BCE, MSE, CE = 0, 1, 2
REDUCTIONS = {"mean": 1, "sum": 2}

# name -> (kind, loss-module kwargs, target kind): "index" class indices,
# "prob" probabilities, "real" regression targets
LOSSES = {
    "mse": (MSE, {}, "real"),
    "ce": (CE, {}, "index"),
    "ce-weight-ignore": (CE, {"weight": True, "ignore_index": 2}, "index"),
    "ce-smoothing-weight": (CE, {"weight": True, "label_smoothing": 0.2}, "index"),
    "ce-smoothing-ignore": (CE, {"ignore_index": 0, "label_smoothing": 0.1}, "index"),
    "ce-prob": (CE, {}, "prob"),
    "ce-prob-weight-smoothing": (CE, {"weight": True, "label_smoothing": 0.3}, "prob"),
}


def make_case(name: str, sizes: list[int], batch: int, reduction: str, dtype, device, seed=0):
    """The reference model, the torch loss module, input, target and the op's loss arguments."""
    kind, kw, target_kind = LOSSES[name]
    g = torch.Generator().manual_seed(seed)
    classes = sizes[-1]
    model = reference_mlp(sizes, dtype=dtype).to(device)
    x = torch.randn(batch, sizes[0], generator=g, dtype=dtype).to(device)
    if target_kind == "real":
        y = torch.randn(batch, classes, generator=g, dtype=dtype)
    elif target_kind == "index":
        y = torch.randint(0, classes, (batch,), generator=g)
    else:
        y = torch.softmax(torch.randn(batch, classes, generator=g, dtype=dtype), 1)
    y = y.to(device)
    kw = dict(kw)
    weight = torch.rand(classes, generator=g, dtype=dtype).to(device) + 0.1 if kw.pop("weight", False) else None
    if kind == MSE:
        loss_fn = nn.MSELoss(reduction=reduction)
    else:
        loss_fn = nn.CrossEntropyLoss(weight=weight, reduction=reduction, **kw)
    args = (kind, weight, None, REDUCTIONS[reduction], kw.get("ignore_index", -100), kw.get("label_smoothing", 0.0))
    return model, loss_fn, x, y, args


def run_op(model, x, y, args, input_grad=False, weight_mask=None, bias_mask=None):
    linears = [m for m in model if isinstance(m, nn.Linear)]
    ws = [m.weight for m in linears]
    bs = [m.bias for m in linears]
    wm = weight_mask if weight_mask is not None else [True] * len(ws)
    bm = bias_mask if bias_mask is not None else [b is not None for b in bs]
    with torch.no_grad():
        return ops.mlp_loss_step(x, y, ws, bs, False, *args, input_grad, wm, bm)


def check_against_autograd(model, loss_fn, x, y, args, dtype, input_grad=False) -> None:
    xr = x.clone().requires_grad_(input_grad)
    model.zero_grad()
    ref = loss_fn(model(xr), y)
    ref.backward()
    loss, grad_input, grad_w, grad_b = run_op(model, x, y, args, input_grad)
    t = tol(dtype, x.shape[0] * x.shape[1])
    torch.testing.assert_close(loss, ref.detach(), equal_nan=True, **t)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    for layer, gw, gb in zip(linears, grad_w, grad_b, strict=True):
        torch.testing.assert_close(gw, layer.weight.grad, **t)
        torch.testing.assert_close(gb, layer.bias.grad, **t)
    if input_grad:
        torch.testing.assert_close(grad_input, xr.grad, **t)
    else:
        assert grad_input.numel() == 0


# [50, 20, 10]: row partials up to 256 rows, tiles past that; [30, 200, 10]: the generic composition
@pytest.mark.parametrize("sizes", [[50, 20, 10], [30, 200, 7], [12, 9, 8, 5]], ids=["narrow", "wide", "deep"])
@pytest.mark.parametrize("batch", [1, 64, 300, 2100])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_matches_autograd(device: str, name: str, reduction: str, batch: int, sizes: list[int]) -> None:
    model, loss_fn, x, y, args = make_case(name, sizes, batch, reduction, torch.float32, device)
    check_against_autograd(model, loss_fn, x, y, args, torch.float32)


@pytest.mark.parametrize("batch", [5, 64, 700])
@pytest.mark.parametrize("name", list(LOSSES))
def test_float64_and_input_gradient(device: str, name: str, batch: int) -> None:
    model, loss_fn, x, y, args = make_case(name, [20, 16, 6], batch, "mean", torch.float64, device, seed=3)
    check_against_autograd(model, loss_fn, x, y, args, torch.float64, input_grad=True)


@pytest.mark.parametrize("name", ["mse", "ce-weight-ignore", "ce-prob"])
def test_empty_batch(device: str, name: str) -> None:
    """Batch 0: torch's NaN mean (0 / 0) or 0 sum, zero gradients."""
    for reduction in ("mean", "sum"):
        model, loss_fn, x, y, args = make_case(name, [8, 6, 4], 0, reduction, torch.float32, device)
        check_against_autograd(model, loss_fn, x, y, args, torch.float32)


def test_every_row_ignored(device: str) -> None:
    """A mean over no rows is NaN, and every gradient 0, as torch gives."""
    model, loss_fn, x, y, args = make_case("ce-weight-ignore", [8, 6, 4], 40, "mean", torch.float32, device)
    y.fill_(2)
    loss, _, grad_w, grad_b = run_op(model, x, y, args)
    assert torch.isnan(loss)
    assert all(bool((g == 0).all()) for g in grad_w + grad_b)
    check_against_autograd(model, loss_fn, x, y, args, torch.float32)


def test_frozen_layers_and_masks(device: str) -> None:
    model, loss_fn, x, y, args = make_case("ce-smoothing-weight", [20, 12, 10, 5], 96, "mean", torch.float32, device)
    model.zero_grad()
    loss_fn(model(x), y).backward()
    _, _, grad_w, grad_b = run_op(model, x, y, args, weight_mask=[False, True, True], bias_mask=[False, False, True])
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert grad_w[0].numel() == 0 and grad_b[0].numel() == 0 and grad_b[1].numel() == 0
    torch.testing.assert_close(grad_w[1], linears[1].weight.grad)
    torch.testing.assert_close(grad_w[2], linears[2].weight.grad)
    torch.testing.assert_close(grad_b[2], linears[2].bias.grad)


@pytest.mark.parametrize("batch", [100, 300, 3000])
@pytest.mark.parametrize("name", ["mse", "ce-smoothing-weight", "ce-prob"])
def test_deterministic_over_threads(name: str, batch: int) -> None:
    model, _, x, y, args = make_case(name, [64, 32, 10], batch, "mean", torch.float32, "cpu")
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results.append(run_op(model, x, y, args))
    for other in results[1:]:
        for a, b in zip([results[0][0], *results[0][2], *results[0][3]], [other[0], *other[2], *other[3]], strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["mse", "ce-weight-ignore", "ce-prob-weight-smoothing"])
def test_opcheck(name: str) -> None:
    model, _, x, y, args = make_case(name, [10, 8, 4], 9, "mean", torch.float32, "cpu")
    linears = [m for m in model if isinstance(m, nn.Linear)]
    op_args = (x, y, [m.weight.detach() for m in linears], [m.bias.detach() for m in linears], False, *args, True,
               [True, True], [True, False])  # fmt: skip
    torch.library.opcheck(ops.mlp_loss_step.default, op_args)


def test_bce_kind_is_mlp_bce_step() -> None:
    model = reference_mlp([10, 8, 3])
    x, y = torch.randn(40, 10), torch.rand(40, 3)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    ws, bs = [m.weight for m in linears], [m.bias for m in linears]
    pw = torch.rand(3) + 0.5
    a = ops.mlp_loss_step(x, y, ws, bs, False, BCE, None, pw, 1, -100, 0.0, True, [True] * 2, [True] * 2)
    b = ops.mlp_bce_step(x, y, ws, bs, False, None, pw, 1, True, [True] * 2, [True] * 2)
    for u, v in zip([a[0], a[1], *a[2], *a[3]], [b[0], b[1], *b[2], *b[3]], strict=True):
        assert torch.equal(u, v)


def test_errors() -> None:
    model, _, x, y, args = make_case("ce", [10, 8, 4], 12, "mean", torch.float32, "cpu")
    bad = y.clone()
    bad[3] = 4
    with pytest.raises(IndexError, match="Target 4 is out of bounds"):
        run_op(model, x, bad, args)
    bad[3] = -1
    with pytest.raises(IndexError, match="out of bounds"):
        run_op(model, x, bad, (CE, None, None, 2, -100, 0.0))  # the check runs for a sum too
    with pytest.raises(RuntimeError, match="class index target of shape"):
        run_op(model, x, y[:5], args)
    with pytest.raises(RuntimeError, match="weight tensor should be defined"):
        run_op(model, x, y, (CE, torch.ones(3), None, 1, -100, 0.0))
    with pytest.raises(RuntimeError, match="label_smoothing must be between"):
        run_op(model, x, y, (CE, None, None, 1, -100, 1.5))
    with pytest.raises(RuntimeError, match="pos_weight is a BCE option"):
        run_op(model, x, y, (CE, None, torch.ones(4), 1, -100, 0.0))
    with pytest.raises(RuntimeError, match="reduction must be 1"):
        run_op(model, x, y, (CE, None, None, 0, -100, 0.0))
    with pytest.raises(RuntimeError, match="loss must be 0"):
        run_op(model, x, y, (7, None, None, 1, -100, 0.0))
    real = torch.randn(12, 4)
    with pytest.raises(RuntimeError, match="expected target of shape"):
        run_op(model, x, real[:, :1], (MSE, None, None, 1, -100, 0.0))
    with pytest.raises(RuntimeError, match="MSE takes no weight"):
        run_op(model, x, real, (MSE, torch.ones(4), None, 1, -100, 0.0))
    with pytest.raises(RuntimeError, match="same dtype"):
        run_op(model, x, real.double(), (MSE, None, None, 1, -100, 0.0))
