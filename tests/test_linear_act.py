"""``fastmlp::linear_act`` and everything built on it: the functional API
(``linear``, ``linear_relu``), the autograd Functions and ``FusedLinearReLU``,
checked against ``torch.nn.functional.linear`` (+ ``torch.relu``)."""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, assert_close, leaf, make_linear_params, tol
from torch import nn

import torch_fastmlp
from torch_fastmlp import FusedLinearReLU, LinearFunction, LinearReLUFunction
from torch_fastmlp import functional as FF

ops = torch.ops.fastmlp

FUSED: dict[str, Callable[..., torch.Tensor]] = {"linear": FF.linear, "linear_relu": FF.linear_relu}
FUNCTIONS: dict[str, type[torch.autograd.Function]] = {"linear": LinearFunction, "linear_relu": LinearReLUFunction}


def eager(name: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = F.linear(x, w, b)
    return torch.relu(y) if name == "linear_relu" else y


def safe_grad_output(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, margin: float) -> torch.Tensor:
    """A random output gradient that is zero where the pre-activation is within
    ``margin`` of 0, so a ReLU mask that differs only by rounding there cannot
    make the fused and the eager gradients disagree."""
    z = F.linear(x.detach().double(), w.detach().double(), None if b is None else b.detach().double())
    g = torch.randn(z.shape, dtype=torch.float64, device=z.device)
    return g.masked_fill(z.abs() < margin, 0.0)


MARGIN = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2}


def check_against_eager(
    name: str,
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    leaves: tuple[torch.Tensor | None, ...] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Forward and every gradient of ``FUSED[name]`` vs eager in the same dtype
    (bfloat16: vs float64 math on the same bf16 values). ``x``/``w``/``b`` may be
    views of ``leaves`` (the tensors whose ``.grad`` is compared)."""
    leaves = (x, w, b) if leaves is None else leaves
    dtype = x.dtype if dtype is None else dtype
    k = max(w.shape[1], math.prod(x.shape[:-1]), w.shape[0])
    g = safe_grad_output(x, w, b, MARGIN[dtype]).to(dtype)

    out = FUSED[name](x, w, b)
    out.backward(g.reshape(out.shape))
    got = [out.detach()] + [None if t is None else t.grad for t in leaves]

    ref_dtype = torch.float64 if dtype == torch.bfloat16 else dtype

    def ref_copy(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().to(ref_dtype).requires_grad_(t.requires_grad)

    ref_leaves = [ref_copy(t) for t in leaves]
    # Rebuild the same views on the reference leaves.
    ref_args = []
    for arg, lf, rl in zip((x, w, b), leaves, ref_leaves, strict=True):
        if arg is None:
            ref_args.append(None)
        elif arg is lf:
            ref_args.append(rl)
        else:
            ref_args.append(rl.as_strided(arg.shape, arg.stride(), arg.storage_offset() - lf.storage_offset()))
    ref_out = eager(name, *ref_args)
    ref_out.backward(g.to(ref_dtype).reshape(ref_out.shape))
    expected = [ref_out.detach()] + [None if t is None else t.grad for t in ref_leaves]

    assert out.shape == ref_out.shape
    assert out.dtype == dtype
    for label, a, e in zip(("output", "grad input", "grad weight", "grad bias"), got, expected, strict=True):
        if a is not None and e is not None:
            a = a.to(e.dtype)
        assert_close(a, e, reduction=k, dtype=dtype, msg=f"{name} {label}")


def make_case(
    batch: int, fin: int, fout: int, bias: bool, dtype: torch.dtype, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    x = torch.randn(batch, fin, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
    w, b = make_linear_params(fin, fout, bias, dtype, device)
    return x, w, b


# --- forward and gradients over shapes ---------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(FUSED))
@pytest.mark.parametrize("batch", [0, 1, 7, 64])
@pytest.mark.parametrize("fin", [1, 7, 30, 33, 784])
def test_forward_backward_shapes(device: str, dtype: torch.dtype, name: str, batch: int, fin: int) -> None:
    for fout, bias in itertools.product([1, 7, 30, 32, 100], [True, False]):
        x, w, b = make_case(batch, fin, fout, bias, dtype, device)
        check_against_eager(name, x, w, b)


@pytest.mark.parametrize("name", list(FUSED))
@pytest.mark.parametrize("shape", [(7, 30, 32), (64, 784, 100), (1, 33, 7), (0, 7, 7)])
def test_bfloat16_cpu(name: str, shape: tuple[int, int, int]) -> None:
    batch, fin, fout = shape
    for bias in (True, False):
        x, w, b = make_case(batch, fin, fout, bias, torch.bfloat16, "cpu")
        check_against_eager(name, x, w, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(FUSED))
def test_autograd_functions_direct(device: str, name: str) -> None:
    """``LinearFunction.apply`` / ``LinearReLUFunction.apply`` equal the eager math too."""
    x, w, b = make_case(9, 20, 12, True, torch.float64, device)
    out = FUNCTIONS[name].apply(x, w, b)
    g = safe_grad_output(x, w, b, MARGIN[torch.float64])
    out.backward(g)
    xr, wr, br = leaf(x), leaf(w), leaf(b)
    ref = eager(name, xr, wr, br)
    ref.backward(g)
    assert_close(out, ref)
    for a, e in zip((x.grad, w.grad, b.grad), (xr.grad, wr.grad, br.grad), strict=True):
        assert_close(a, e)


# --- layouts ----------------------------------------------------------------------


def _noncontiguous_cases(device: str, dtype: torch.dtype) -> dict[str, tuple]:
    """name -> (x, w, b, leaves): operands as views of leaf tensors."""
    B, K, N = 13, 33, 30
    cases: dict[str, tuple] = {}

    xt = torch.randn(K, B, dtype=dtype, device=device, requires_grad=True)
    w, b = make_linear_params(K, N, True, dtype, device)
    cases["input_transposed"] = (xt.t(), w, b, (xt, w, b))

    xs = torch.randn(B, 2 * K, dtype=dtype, device=device, requires_grad=True)
    w, b = make_linear_params(K, N, True, dtype, device)
    cases["input_step_slice"] = (xs[:, ::2], w, b, (xs, w, b))

    xr = torch.randn(2 * B, K, dtype=dtype, device=device, requires_grad=True)
    w, b = make_linear_params(K, N, True, dtype, device)
    cases["input_row_step_slice"] = (xr[::2], w, b, (xr, w, b))

    xe = torch.randn(1, K, dtype=dtype, device=device, requires_grad=True)
    w, b = make_linear_params(K, N, True, dtype, device)
    cases["input_expanded_stride0"] = (xe.expand(B, K), w, b, (xe, w, b))

    x = torch.randn(B, K, dtype=dtype, device=device, requires_grad=True)
    wt = torch.randn(K, N, dtype=dtype, device=device).div(K**0.5).requires_grad_()
    bs = torch.randn(2 * N, dtype=dtype, device=device, requires_grad=True)
    cases["weight_transposed_bias_strided"] = (x, wt.t(), bs[::2], (x, wt, bs))

    x3 = torch.randn(3, 5, 2 * K, dtype=dtype, device=device, requires_grad=True)
    w, b = make_linear_params(K, N, True, dtype, device)
    cases["3d_input_sliced"] = (x3[..., K:], w, b, (x3, w, b))
    return cases


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(FUSED))
@pytest.mark.parametrize(
    "case",
    [
        "input_transposed",
        "input_step_slice",
        "input_row_step_slice",
        "input_expanded_stride0",
        "weight_transposed_bias_strided",
        "3d_input_sliced",
    ],
)
def test_noncontiguous(device: str, dtype: torch.dtype, name: str, case: str) -> None:
    x, w, b, leaves = _noncontiguous_cases(device, dtype)[case]
    check_against_eager(name, x, w, b, leaves)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(FUSED))
def test_expanded_grad_output(device: str, name: str) -> None:
    """``out.sum().backward()`` hands backward a stride-0 gradient."""
    x, w, b = make_case(10, 16, 8, True, torch.float64, device)
    FUSED[name](x, w, b).sum().backward()
    xr, wr, br = leaf(x), leaf(w), leaf(b)
    eager(name, xr, wr, br).sum().backward()
    for a, e in zip((x.grad, w.grad, b.grad), (xr.grad, wr.grad, br.grad), strict=True):
        assert_close(a, e)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(FUSED))
@pytest.mark.parametrize("lead", [(), (4,), (3, 5), (2, 3, 4), (0, 5), (3, 0)], ids=str)
def test_leading_dims(device: str, dtype: torch.dtype, name: str, lead: tuple[int, ...]) -> None:
    """``[*, in]`` inputs, as nn.Linear: 1-D, 2-D, [A, B, in], empty leading dims."""
    x = torch.randn(*lead, 17, dtype=dtype, device=device, requires_grad=True)
    w, b = make_linear_params(17, 6, True, dtype, device)
    out = FUSED[name](x, w, b)
    assert out.shape == (*lead, 6)
    check_against_eager(name, x, w, b)


# --- autograd checks ------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(FUSED))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "3d", "1d"])
def test_gradcheck(device: str, name: str, bias: bool, layout: str) -> None:
    w, b = make_linear_params(5, 4, bias, torch.float64, device)
    if layout == "contiguous":
        x = torch.randn(3, 5, dtype=torch.float64, device=device, requires_grad=True)
    elif layout == "transposed":
        x = torch.randn(5, 3, dtype=torch.float64, device=device).t().requires_grad_()
    elif layout == "3d":
        x = torch.randn(2, 3, 5, dtype=torch.float64, device=device, requires_grad=True)
    else:
        x = torch.randn(5, dtype=torch.float64, device=device, requires_grad=True)
    # Keep pre-activations away from the ReLU kink so finite differences are valid.
    with torch.no_grad():
        z = F.linear(x, w, b)
        if b is not None:
            b.add_(torch.where(z.reshape(-1, 4).abs().min(0).values < 0.05, 0.2, 0.0))
    args = (x, w) if b is None else (x, w, b)
    assert torch.autograd.gradcheck(FUSED[name], args, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(FUSED))
def test_gradgradcheck(name: str) -> None:
    """The functional ops (``fastmlp::mlp``, autograd in C++) are twice
    differentiable like eager; the Python Functions' backward is
    once-differentiable and must fail loudly."""
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    w, b = make_linear_params(5, 4, True, torch.float64, "cpu")
    assert torch.autograd.gradgradcheck(FUSED[name], (x, w, b))
    function = FUNCTIONS[name].apply
    with pytest.raises(RuntimeError):
        torch.autograd.gradgradcheck(function, (x, w, b))
    # The path gradgradcheck uses: grad outputs that require grad.
    v = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="differentiate twice|once_differentiable|double backward"):
        (gx,) = torch.autograd.grad(function(x, w, b), x, v, create_graph=True)
        gx.sum().backward()


@pytest.mark.parametrize("name", list(FUSED))
@pytest.mark.parametrize("loss_fn", ["sum", "square_sum"])
def test_double_backward_not_silently_wrong(name: str, loss_fn: str) -> None:
    """A gradient penalty: ``grad(loss, x, create_graph=True)`` then backward through
    ``loss + penalty``. Eager differentiates the penalty; the fused op may refuse
    (with a clear error), but must not hand back a gradient that silently cuts the
    graph, which would make the penalty contribute nothing to the parameters' grads."""
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    w, b = make_linear_params(5, 4, True, torch.float64, "cpu")
    try:
        out = FUSED[name](x, w, b)
        loss = out.sum() if loss_fn == "sum" else out.square().sum()
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        (loss + gx.pow(2).sum()).backward()
    except RuntimeError as e:
        assert any(s in str(e) for s in ("twice", "once_differentiable", "double backward")), (
            f"double backward failed with an unclear error: {e}"
        )
        return
    xr, wr, br = leaf(x), leaf(w), leaf(b)
    out_r = eager(name, xr, wr, br)
    loss_r = out_r.sum() if loss_fn == "sum" else out_r.square().sum()
    (gxr,) = torch.autograd.grad(loss_r, xr, create_graph=True)
    (loss_r + gxr.pow(2).sum()).backward()
    assert_close(w.grad, wr.grad, msg="weight grad of loss + gradient penalty")
    assert_close(b.grad, br.grad, msg="bias grad of loss + gradient penalty")


# --- opcheck -----------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_linear_act(device: str, relu: bool, bias: bool) -> None:
    x = torch.randn(7, 30, device=device)
    w = torch.randn(32, 30, device=device)
    b = torch.randn(32, device=device) if bias else None
    torch.library.opcheck(ops.linear_act.default, (x, w, b, relu))
    torch.library.opcheck(ops.linear_act.default, (torch.randn(0, 30, device=device), w, b, relu))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize(
    "mask",
    [[True, True, True], [True, False, False], [False, True, False], [False, False, True], [False, True, True]],
    ids=str,
)
def test_opcheck_linear_act_backward(device: str, relu: bool, mask: list[bool]) -> None:
    x = torch.randn(7, 30, device=device)
    w = torch.randn(32, 30, device=device)
    y = ops.linear_act(x, w, torch.randn(32, device=device), relu)
    g = torch.randn_like(y)
    torch.library.opcheck(ops.linear_act_backward.default, (g, x, w, y, relu, mask))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("relu", [True, False])
def test_backward_op_matches_eager(device: str, relu: bool) -> None:
    """The raw backward op, each output_mask entry alone and together."""
    x = torch.randn(9, 11, dtype=torch.float64, device=device)
    w, b = make_linear_params(11, 6, True, torch.float64, device)
    w, b = w.detach(), b.detach()
    y = ops.linear_act(x, w, b, relu)
    assert_close(y, eager("linear_relu" if relu else "linear", x, w, b))
    g = torch.randn_like(y)
    xr, wr, br = leaf(x), leaf(w), leaf(b)
    eager("linear_relu" if relu else "linear", xr, wr, br).backward(g)
    for mask in itertools.product([False, True], repeat=3):
        got = ops.linear_act_backward(g, x, w, y, relu, list(mask))
        for want, gr, ref in zip(mask, got, (xr.grad, wr.grad, br.grad), strict=True):
            if want:
                assert_close(gr, ref)
            else:
                assert gr.numel() == 0


# --- torch.compile -----------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device: str) -> None:
    def f(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        return FF.linear(FF.linear_relu(x, w1, b1), w2).square().sum()

    x = torch.randn(16, 20, device=device, requires_grad=True)
    w1, b1 = make_linear_params(20, 12, True, torch.float32, device)
    w2, _ = make_linear_params(12, 3, False, torch.float32, device)
    leaves = (x, w1, b1, w2)
    ref_leaves = [leaf(t) for t in leaves]
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(*leaves)
    loss.backward()
    ref = f(*ref_leaves)
    ref.backward()
    assert_close(loss, ref, reduction=20)
    for a, e in zip(leaves, ref_leaves, strict=True):
        assert_close(a.grad, e.grad, reduction=20)


# --- needs_input_grad / no_grad -------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(FUSED))
def test_needs_input_grad(device: str, name: str) -> None:
    x = torch.randn(8, 10, device=device)  # no grad
    w, b = make_linear_params(10, 5, True, torch.float32, device)
    w.requires_grad_(False)  # frozen weight
    out = FUSED[name](x, w, b)
    assert out.requires_grad
    out.sum().backward()
    assert w.grad is None and x.grad is None
    br = leaf(b)
    eager(name, x, w, br).sum().backward()
    assert_close(b.grad, br.grad, reduction=8)

    # Only the input needs a gradient.
    x = torch.randn(8, 10, device=device, requires_grad=True)
    w.requires_grad_(False)
    b.requires_grad_(False)
    b.grad = None
    FUSED[name](x, w, b).sum().backward()
    assert w.grad is None and b.grad is None
    xr = leaf(x)
    eager(name, xr, w, b).sum().backward()
    assert_close(x.grad, xr.grad, reduction=10)

    # Nothing needs a gradient: a plain tensor comes back.
    out = FUSED[name](x.detach(), w, b)
    assert not out.requires_grad and out.grad_fn is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(FUSED))
def test_no_grad(device: str, name: str) -> None:
    x, w, b = make_case(12, 20, 9, True, torch.float32, device)
    with torch.no_grad():
        out = FUSED[name](x, w, b)
        ref = eager(name, x, w, b)
    assert not out.requires_grad and out.grad_fn is None
    assert_close(out, ref, reduction=20)
    with torch.inference_mode():
        out = FUSED[name](x, w, b)
    assert_close(out, ref, reduction=20)


# --- NaN ------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(FUSED))
def test_nan_propagation(device: str, name: str) -> None:
    """relu(NaN) = NaN, and NaN outputs let the gradient through as eager's
    threshold_backward does (``output <= 0 ? 0 : grad``)."""
    x = torch.randn(6, 5, dtype=torch.float64, device=device)
    x[1, 2] = float("nan")
    x[4, 0] = float("inf")
    x = x.requires_grad_()
    w, b = make_linear_params(5, 3, True, torch.float64, device)
    with torch.no_grad():
        w[0, 0] = 0.0  # inf * 0 = NaN in one output column
        b[2] = float("nan")
    g = torch.randn(6, 3, dtype=torch.float64, device=device)
    out = FUSED[name](x, w, b)
    out.backward(g)
    xr, wr, br = leaf(x), leaf(w), leaf(b)
    ref = eager(name, xr, wr, br)
    ref.backward(g)
    assert torch.equal(out.isnan(), ref.isnan())
    assert_close(out, ref)
    for a, e in zip((x.grad, w.grad, b.grad), (xr.grad, wr.grad, br.grad), strict=True):
        assert torch.equal(a.isnan(), e.isnan())
        assert_close(a, e)


# --- FusedLinearReLU -------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
def test_fused_linear_relu_module(device: str, bias: bool) -> None:
    torch.manual_seed(3)
    ref = nn.Linear(30, 7, bias=bias, device=device)
    torch.manual_seed(3)
    mod = FusedLinearReLU(30, 7, bias=bias, device=device)
    assert isinstance(mod, nn.Linear)
    assert torch.equal(mod.weight, ref.weight)
    if bias:
        assert torch.equal(mod.bias, ref.bias)
    else:
        assert mod.bias is None
    assert list(mod.state_dict()) == list(ref.state_dict()) == (["weight", "bias"] if bias else ["weight"])
    assert repr(mod) == repr(ref).replace("Linear", "FusedLinearReLU", 1)
    assert repr(mod) == f"FusedLinearReLU(in_features=30, out_features=7, bias={bias})"

    x = torch.randn(2, 5, 30, device=device, requires_grad=True)
    xr = leaf(x)
    out = mod(x)
    expected = torch.relu(ref(xr))
    assert_close(out, expected, reduction=30)
    out.square().sum().backward()
    expected.square().sum().backward()
    assert_close(x.grad, xr.grad, reduction=30)
    assert_close(mod.weight.grad, ref.weight.grad, reduction=30)
    if bias:
        assert_close(mod.bias.grad, ref.bias.grad, reduction=30)

    # Loading nn.Linear's state into it (strict) and back.
    other = FusedLinearReLU(30, 7, bias=bias, device=device)
    other.load_state_dict(ref.state_dict())
    assert torch.equal(other.weight, ref.weight)


def test_fused_linear_relu_dtype_factory() -> None:
    mod = FusedLinearReLU(4, 3, dtype=torch.float64)
    assert mod.weight.dtype == torch.float64
    x = torch.randn(2, 4, dtype=torch.float64)
    assert_close(mod(x), torch.relu(F.linear(x, mod.weight, mod.bias)))


# --- errors -----------------------------------------------------------------------------


def test_error_wrong_rank() -> None:
    w, b = make_linear_params(4, 3)
    with pytest.raises(RuntimeError, match="at least 1D"):  # torch's own message
        FF.linear_relu(torch.tensor(1.0), w, b)


@pytest.mark.parametrize("name", list(FUSED))
def test_error_in_features_mismatch(name: str) -> None:
    w, b = make_linear_params(4, 3)
    with pytest.raises(RuntimeError, match=r"(?s)5.*4|4.*5"):
        FUSED[name](torch.randn(2, 5), w, b)
    with pytest.raises(RuntimeError, match=r"(?s)5.*4|4.*5"):
        FUSED[name](torch.randn(2, 3, 5), w, b)


@pytest.mark.parametrize("name", list(FUSED))
def test_error_dtype_mismatch(name: str) -> None:
    w, b = make_linear_params(4, 3)
    with pytest.raises(RuntimeError, match=r"(?i)dtype|Double|Float"):
        FUSED[name](torch.randn(2, 4, dtype=torch.float64), w, b)
    with pytest.raises(RuntimeError, match=r"(?i)dtype|Double|Float"):
        FUSED[name](torch.randn(2, 4), w, b.detach().double())


@pytest.mark.parametrize("name", list(FUSED))
def test_error_bias_wrong_size(name: str) -> None:
    """A bias that cannot broadcast raises like torch; one torch broadcasts works like torch."""
    w, _ = make_linear_params(4, 3)
    x = torch.randn(2, 4)
    with pytest.raises(RuntimeError):
        torch.nn.functional.linear(x, w, torch.randn(5))
    with pytest.raises(RuntimeError):
        FUSED[name](x, w, torch.randn(5))
    b = torch.randn(1, 3)
    assert_close(FUSED[name](x, w, b), eager(name, x, w, b))


@pytest.mark.parametrize("name", list(FUSED))
def test_weight_not_2d_like_torch(name: str) -> None:
    """A 1-D weight is accepted as by torch.nn.functional.linear; 3-D raises."""
    x, w = torch.randn(2, 4), torch.randn(4)
    assert_close(FUSED[name](x, w, None), eager(name, x, w, None))
    with pytest.raises(RuntimeError):
        FUSED[name](x, torch.randn(1, 3, 4), None)


def test_error_not_a_tensor() -> None:
    w, b = make_linear_params(4, 3)
    with pytest.raises(TypeError, match="input"):
        FF.linear_relu([[1.0, 2.0, 3.0, 4.0]], w, b)  # type: ignore[arg-type]


def test_integer_input_as_torch() -> None:
    """Integer tensors are torch's own call (the kernels are for floating types)."""
    x, w = torch.arange(8).view(2, 4), torch.arange(12).view(3, 4)
    out = FF.linear(x, w)
    assert out.dtype == torch.long and torch.equal(out, torch.nn.functional.linear(x, w))


def test_module_wrong_input_same_exception_type_as_nn() -> None:
    torch.manual_seed(0)
    mod = FusedLinearReLU(4, 3)
    ref = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    ref[0].load_state_dict(mod.state_dict())
    for bad in (torch.randn(2, 5), torch.randn(2, 4, dtype=torch.float64), torch.ones(2, 4, dtype=torch.long)):
        with pytest.raises(Exception) as expected:
            ref(bad)
        with warnings.catch_warnings(), pytest.raises(expected.type):
            warnings.simplefilter("ignore")
            mod(bad)


def test_tolerance_helper_can_fail() -> None:
    """The suite's comparisons are not vacuous: an off-by-ulp-scale error of 1e-3 fails."""
    a = torch.ones(10)
    with pytest.raises(AssertionError):
        assert_close(a + 1e-3, a, reduction=784)
    assert tol(torch.float32, 784)["rtol"] < 1e-3


def test_with_cuda_flag_is_bool() -> None:
    assert isinstance(torch_fastmlp.WITH_CUDA, bool)
