"""Mean squared error: ``functional.mse_loss`` and ``MSELoss`` against torch's
(loss, input and target gradients), the ops, errors, fallbacks, determinism."""

from __future__ import annotations

import copy
import inspect
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, assert_close, leaf
from torch import nn

import torch_fastmlp
from torch_fastmlp import MSELoss
from torch_fastmlp import functional as FF

ops = torch.ops.fastmlp

SHAPES = {"scalar": (), "B": (9,), "B1": (9, 1), "BC": (9, 10), "BCL": (5, 3, 4), "one": (1, 1)}
REDUCTIONS = ["none", "mean", "sum"]


def run_both(
    x: torch.Tensor, t: torch.Tensor, reduction: str, target_grad: bool = True
) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """(loss, grad input, grad target) from the fused function and from torch."""
    results = []
    g = None
    for fn in (FF.mse_loss, F.mse_loss):
        xi, ti = leaf(x), leaf(t, target_grad)
        loss = fn(xi, ti, reduction=reduction)
        if g is None:
            g = torch.rand_like(loss) + 0.5
        loss.backward(g)
        results.append([loss.detach(), xi.grad, ti.grad])
    return results[0], results[1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("target_grad", [False, True], ids=["t", "t_grad"])
def test_vs_torch(device: str, dtype: torch.dtype, shape: str, reduction: str, target_grad: bool) -> None:
    s = SHAPES[shape]
    x = (torch.randn(s, dtype=torch.float64) * 3).to(device=device, dtype=dtype)
    t = torch.randn(s, dtype=torch.float64).to(device=device, dtype=dtype)
    got, expected = run_both(x, t, reduction, target_grad)
    for label, a, e in zip(("loss", "grad input", "grad target"), got, expected, strict=True):
        if label == "grad target" and not target_grad:
            assert a is None and e is None
            continue
        assert a is not None and e is not None, label
        assert a.shape == e.shape and a.dtype == e.dtype, label
        assert_close(a, e, reduction=max(x.numel(), 1), msg=label)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 4), (0,)], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(device: str, shape: tuple[int, ...], reduction: str) -> None:
    """Empty input: mean NaN, sum 0, none empty (as torch); empty gradients."""
    x, t = torch.randn(shape, device=device), torch.randn(shape, device=device)
    got, expected = run_both(x, t, reduction)
    for a, e in zip(got, expected, strict=True):
        assert_close(a, e)
    if reduction == "mean":
        assert torch.isnan(got[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_noncontiguous_and_expanded(device: str, reduction: str) -> None:
    x = torch.randn(10, 7, dtype=torch.float64, device=device).t()  # [7, 10] transposed
    t = torch.randn(7, 1, dtype=torch.float64, device=device).expand(7, 10)  # stride 0
    got, expected = run_both(x, t, reduction)
    for a, e in zip(got, expected, strict=True):
        assert_close(a, e)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_large_input_many_chunks_and_vector_tails(device: str, dtype: torch.dtype) -> None:
    """More elements than one reduction chunk, a length that is no multiple of
    the vector width: accurate against float64 torch."""
    x = torch.randn(3, 70001, dtype=dtype, device=device) * 2
    t = torch.randn(3, 70001, dtype=dtype, device=device)
    close = {"rtol": 2e-5, "atol": 2e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for reduction in REDUCTIONS:
        xi, ti = leaf(x), leaf(t)
        loss = FF.mse_loss(xi, ti, reduction=reduction)
        g = torch.rand_like(loss)
        loss.backward(g)
        xd, td = leaf(x.double()), leaf(t.double())
        ref = F.mse_loss(xd, td, reduction=reduction)
        ref.backward(g.double())
        torch.testing.assert_close(loss.double(), ref.detach(), **close)
        torch.testing.assert_close(xi.grad.double(), xd.grad, **close)
        torch.testing.assert_close(ti.grad.double(), td.grad, **close)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(device: str, reduction: str) -> None:
    x = torch.randn(4, 3, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randn(4, 3, dtype=torch.float64, device=device, requires_grad=True)

    def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return FF.mse_loss(a, b, reduction=reduction)

    assert torch.autograd.gradcheck(fn, (x, t))
    assert torch.autograd.gradcheck(fn, (x, t.detach()))
    assert torch.autograd.gradcheck(fn, (x.detach(), t))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("input_grad", [False, True])
def test_opcheck_mse_forward(device: str, reduction: int, input_grad: bool) -> None:
    x, t = torch.randn(6, 4, device=device), torch.randn(6, 4, device=device)
    torch.library.opcheck(ops.mse_forward.default, (x, t, reduction, input_grad))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("mask", [[True, True], [True, False], [False, True]], ids=str)
def test_opcheck_mse_backward(device: str, reduction: int, mask: list[bool]) -> None:
    x, t = torch.randn(6, 4, device=device), torch.randn(6, 4, device=device)
    g = torch.rand((), device=device) if reduction else torch.rand(6, 4, device=device)
    torch.library.opcheck(ops.mse_backward.default, (g, x, t, reduction, mask))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_mse_loss(device: str) -> None:
    x = torch.randn(6, 4, device=device, requires_grad=True)
    t = torch.randn(6, 4, device=device, requires_grad=True)
    for reduction in (0, 1, 2):
        torch.library.opcheck(ops.mse_loss.default, (x, t, reduction))


@pytest.mark.parametrize("device", DEVICES)
def test_raw_ops_vs_torch(device: str) -> None:
    x = torch.randn(6, 5, dtype=torch.float64, device=device)
    t = torch.randn(6, 5, dtype=torch.float64, device=device)
    for reduction, name in ((0, "none"), (1, "mean"), (2, "sum")):
        loss, grad = ops.mse_forward(x, t, reduction, True)
        xr, tr = leaf(x), leaf(t)
        ref = F.mse_loss(xr, tr, reduction=name)
        assert_close(loss, ref.detach())
        g = torch.rand_like(ref) + 0.5
        ref.backward(g)
        if reduction:
            assert_close(grad, xr.grad / g)
        else:
            assert grad.numel() == 0
        gi, gt = ops.mse_backward(g, x, t, reduction, [True, True])
        assert_close(gi, xr.grad)
        assert_close(gt, tr.grad)


def test_op_errors() -> None:
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="shape"):
        ops.mse_forward(x, torch.randn(4, 1), 1, True)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.mse_forward(x, x.double(), 1, True)
    with pytest.raises(RuntimeError, match="reduction"):
        ops.mse_forward(x, x, 3, True)
    with pytest.raises(RuntimeError, match="floating"):
        ops.mse_forward(x.long(), x.long(), 1, True)
    with pytest.raises(RuntimeError, match="does not match the loss"):
        ops.mse_backward(torch.ones(2), x, x, 1, [True, False])


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device: str) -> None:
    def f(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return FF.mse_loss(x * 2, t) + FF.mse_loss(x, t, reduction="sum")

    x = torch.randn(8, 4, device=device, requires_grad=True)
    t = torch.randn(8, 4, device=device, requires_grad=True)
    xr, tr = leaf(x), leaf(t)
    torch._dynamo.reset()
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(x, t)
    loss.backward()
    ref = f(xr, tr)
    ref.backward()
    assert_close(loss, ref, reduction=32)
    assert_close(x.grad, xr.grad, reduction=32)
    assert_close(t.grad, tr.grad, reduction=32)


# --- what torch handles -------------------------------------------------------------


def test_bad_reduction_like_torch() -> None:
    x, t = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError) as expected:
        F.mse_loss(x, t, reduction="avg")
    with pytest.raises(ValueError) as got:
        FF.mse_loss(x, t, reduction="avg")
    assert str(got.value) == str(expected.value)
    with pytest.raises(ValueError):
        MSELoss(reduction="avg")(x, t)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_broadcasting_handed_to_torch(reduction: str) -> None:
    """Shapes that differ: torch's warning and broadcast result (and its error
    where they do not broadcast)."""
    x = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 1, requires_grad=True)
    with pytest.warns(UserWarning, match="different to the input size"):
        got = FF.mse_loss(x, t, reduction=reduction)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = F.mse_loss(x, t, reduction=reduction)
    assert_close(got, ref)
    assert torch.autograd.grad(got.sum(), t)[0].shape == t.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError) as expected:
            F.mse_loss(x, torch.randn(5))
        with pytest.raises(RuntimeError) as actual:
            FF.mse_loss(x, torch.randn(5))
    assert str(actual.value) == str(expected.value)


def test_unusual_arguments_as_torch() -> None:
    x = torch.randn(4, 3)
    # integer / mixed dtypes: torch's type promotion or error
    for a, b in ((x, x.double()), (x.double(), x), (x, x.half())):
        torch.testing.assert_close(FF.mse_loss(a, b), F.mse_loss(a, b))
    with pytest.raises(RuntimeError) as expected:
        F.mse_loss(x.long(), x.long())
    with pytest.raises(type(expected.value)) as got:
        FF.mse_loss(x.long(), x.long())
    assert str(got.value) == str(expected.value)
    # torch's per-element weight
    w = torch.rand(4, 3)
    torch.testing.assert_close(FF.mse_loss(x, x * 2, weight=w), F.mse_loss(x, x * 2, weight=w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(FF.mse_loss(x, x * 2), F.mse_loss(x, x * 2))
    t = torch.randn(4, 3)
    torch.testing.assert_close(
        torch.func.grad(FF.mse_loss)(x, t), torch.func.grad(F.mse_loss)(x, t), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("size_average", [None, True, False])
@pytest.mark.parametrize("reduce", [None, True, False])
def test_legacy_args_like_torch(size_average: bool | None, reduce: bool | None) -> None:
    x, t = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = F.mse_loss(x, t, size_average=size_average, reduce=reduce, reduction="sum")
        got = FF.mse_loss(x, t, size_average=size_average, reduce=reduce, reduction="sum")
        mod, ref_mod = MSELoss(size_average, reduce), nn.MSELoss(size_average, reduce)
    assert mod.reduction == ref_mod.reduction
    assert_close(got, ref)
    assert_close(mod(x, t), ref_mod(x, t))
    if size_average is not None or reduce is not None:
        with pytest.warns(UserWarning):
            FF.mse_loss(x, t, size_average=size_average, reduce=reduce)


def test_half_types_close_to_torch() -> None:
    for dtype in (torch.bfloat16, torch.float16):
        x, t = torch.randn(33, 5).to(dtype), torch.randn(33, 5).to(dtype)
        got, expected = run_both(x, t, "mean")
        for a, e in zip(got, expected, strict=True):
            torch.testing.assert_close(a, e, rtol=2e-2, atol=2e-3)


# --- module --------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_module_like_nn(reduction: str) -> None:
    assert inspect.signature(MSELoss.__init__) == inspect.signature(nn.MSELoss.__init__)
    mod, ref = MSELoss(reduction=reduction), nn.MSELoss(reduction=reduction)
    assert isinstance(mod, nn.MSELoss) and torch_fastmlp.MSELoss is MSELoss
    assert repr(mod) == repr(ref)
    assert mod.state_dict() == ref.state_dict() == {}
    x = torch.randn(6, 4, requires_grad=True)
    t = torch.randn(6, 4)
    xr = leaf(x)
    loss, ref_loss = mod(x, t), ref(xr, t)
    loss.backward(torch.ones_like(loss))
    ref_loss.backward(torch.ones_like(ref_loss))
    assert_close(loss, ref_loss)
    assert_close(x.grad, xr.grad)
    for clone in (pickle.loads(pickle.dumps(mod)), copy.deepcopy(mod)):
        assert type(clone) is MSELoss and clone.reduction == reduction
        assert_close(clone(x, t), ref_loss)
    scripted = torch.jit.script(mod)
    assert_close(scripted(x, t), ref_loss)


@pytest.mark.parametrize("device", DEVICES)
def test_module_cuda_and_double(device: str) -> None:
    mod = MSELoss(reduction="sum").to(device).double()
    x = torch.randn(7, 3, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randn(7, 3, dtype=torch.float64, device=device)
    loss = mod(x, t)
    loss.backward()
    assert_close(loss, F.mse_loss(x.detach(), t, reduction="sum"))
    assert_close(x.grad, 2 * (x.detach() - t))


def test_no_grad_and_double_backward_refused() -> None:
    x, t = torch.randn(5, 2, requires_grad=True), torch.randn(5, 2)
    with torch.no_grad():
        loss = FF.mse_loss(x, t)
    assert not loss.requires_grad
    loss = FF.mse_loss(x, t)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


# --- determinism -------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_same_bits_on_any_thread_count(reduction: str) -> None:
    x = torch.randn(77, 1001) * 3
    t = torch.randn(77, 1001)
    runs = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        xi, ti = leaf(x), leaf(t)
        loss = FF.mse_loss(xi, ti, reduction=reduction)
        loss.backward(torch.full_like(loss, 0.7))
        runs.append((loss.detach(), xi.grad, ti.grad))
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b)
