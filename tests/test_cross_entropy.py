"""Softmax cross-entropy: ``functional.cross_entropy`` and ``CrossEntropyLoss``
against torch's, with every option (class weights, ignore_index, label
smoothing, probability targets, reductions), the ops, errors, fallbacks and
determinism."""

from __future__ import annotations

import copy
import inspect
import itertools
import pickle
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, assert_close, leaf
from torch import nn

import torch_fastmlp
from torch_fastmlp import CrossEntropyLoss
from torch_fastmlp import functional as FF

ops = torch.ops.fastmlp

REDUCTIONS = ["none", "mean", "sum"]
REDUCTION_ENUM = {"none": 0, "mean": 1, "sum": 2}


def make_logits(rows: int, classes: int, dtype: torch.dtype, device: str, extreme: bool = True) -> torch.Tensor:
    x = torch.randn(rows, classes, dtype=torch.float64) * 3
    if extreme and rows >= 3 and classes >= 2:
        x[0, 0], x[1, 1], x[2, :] = 60.0, -60.0, 0.0  # saturated and uniform rows
    return x.to(device=device, dtype=dtype)


def make_index_target(rows: int, classes: int, device: str, ignore: int | None = None, every: int = 3) -> torch.Tensor:
    t = torch.randint(0, classes, (rows,))
    if ignore is not None:
        t[::every] = ignore
    return t.to(device)


def make_prob_target(rows: int, classes: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    p = torch.rand(rows, classes, dtype=torch.float64)
    p = p / p.sum(1, keepdim=True)
    if rows >= 2 and classes >= 2:
        p[1] = 0.0
        p[1, 0] = 1.0  # a one-hot row
    return p.to(device=device, dtype=dtype)


def make_weight(classes: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return (torch.rand(classes, dtype=torch.float64) * 2 + 0.1).to(device=device, dtype=dtype)


def run_both(
    x: torch.Tensor, t: torch.Tensor, reduction: str, **kwargs: object
) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """(loss, grad input) from the fused function and from torch."""
    results = []
    g = None
    for fn in (FF.cross_entropy, F.cross_entropy):
        xi = leaf(x)
        loss = fn(xi, t, reduction=reduction, **kwargs)
        if g is None:
            g = torch.rand_like(loss) + 0.5
        if loss.requires_grad:
            loss.backward(g)
        results.append([loss.detach(), xi.grad])
    return results[0], results[1]


def check_both(x: torch.Tensor, t: torch.Tensor, reduction: str, msg: str = "", **kwargs: object) -> None:
    got, expected = run_both(x, t, reduction, **kwargs)
    for label, a, e in zip(("loss", "grad input"), got, expected, strict=True):
        if e is None:
            assert a is None, f"{msg} {label}"
            continue
        assert a is not None and a.shape == e.shape and a.dtype == e.dtype, f"{msg} {label}"
        assert_close(a, e, reduction=max(x.numel(), 1), msg=f"{msg} {label}")


# --- parity -----------------------------------------------------------------------------

TARGETS = ["index", "index_ignored", "index_ignore_class", "prob"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("weight", [False, True], ids=["w0", "w"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("classes", [1, 10, 37])
def test_vs_torch(
    device: str, dtype: torch.dtype, target: str, weight: bool, smoothing: float, reduction: str, classes: int
) -> None:
    rows = 37  # float rows run 16 (double 8) at a time on CPU, the rest one by one: both paths
    x = make_logits(rows, classes, dtype, device)
    kwargs: dict[str, object] = {"label_smoothing": smoothing}
    if weight:
        kwargs["weight"] = make_weight(classes, dtype, device)
    if target == "prob":
        t = make_prob_target(rows, classes, dtype, device)
    elif target == "index":
        t = make_index_target(rows, classes, device)
    elif target == "index_ignored":
        t = make_index_target(rows, classes, device, ignore=-100)
    else:  # ignore_index is a real class
        t = make_index_target(rows, classes, device)
        kwargs["ignore_index"] = 0
    check_both(x, t, reduction, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight", [False, True], ids=["w0", "w"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored(device: str, weight: bool, smoothing: float, reduction: str) -> None:
    """Every target ignored: mean is NaN (0 / 0, as torch), sum 0; gradient zero."""
    x = make_logits(21, 4, torch.float32, device)
    t = torch.full((21,), -100, device=device)
    w = make_weight(4, torch.float32, device) if weight else None
    got, expected = run_both(x, t, reduction, weight=w, label_smoothing=smoothing)
    for a, e in zip(got, expected, strict=True):
        assert_close(a, e)
    if reduction == "mean":
        assert torch.isnan(got[0])
    assert torch.equal(got[1], torch.zeros_like(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("target", ["index", "prob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("rows", "classes"), [(0, 5), (1, 5), (1, 1), (4, 1)], ids=str)
def test_small_batches_and_one_class(device: str, target: str, reduction: str, rows: int, classes: int) -> None:
    x = make_logits(rows, classes, torch.float64, device)
    w = make_weight(classes, torch.float64, device)
    t = (
        make_index_target(rows, classes, device)
        if target == "index"
        else make_prob_target(rows, classes, torch.float64, device)
    )
    for kwargs in ({}, {"weight": w, "label_smoothing": 0.25}):
        check_both(x, t, reduction, msg=str(kwargs), **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("target", ["index", "ignored", "prob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_unbatched_input(device: str, target: str, reduction: str) -> None:
    """[C] logits with a 0-D class index or [C] probabilities, as torch (0-D losses)."""
    x = torch.randn(6, dtype=torch.float64, device=device)
    if target == "prob":
        t = torch.rand(6, dtype=torch.float64, device=device).softmax(0)
    else:
        t = torch.tensor(-100 if target == "ignored" else 4, device=device)
    for kwargs in ({}, {"weight": make_weight(6, torch.float64, device), "label_smoothing": 0.1}):
        check_both(x, t, reduction, msg=str(kwargs), **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("target", ["index", "prob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_noncontiguous_and_expanded(device: str, target: str, reduction: str) -> None:
    base = make_logits(10, 8, torch.float64, device)
    xs = {"transposed": base.t(), "expanded": base[:1].expand(8, 8), "sliced": base[::2, 1:]}
    w = make_weight(20, torch.float64, device)[::2]  # strided weight of 10
    for name, x in xs.items():
        rows, classes = x.shape
        if target == "index":
            t = make_index_target(2 * rows, classes, device, ignore=-100)[::2]
        else:
            t = make_prob_target(rows, classes, torch.float64, device).t().contiguous().t()
        check_both(x, t, reduction, msg=name, weight=w[:classes], label_smoothing=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("target", ["index", "prob"])
@pytest.mark.parametrize("classes", [3, 8, 16, 17, 100, 1000])
def test_vector_widths_and_tails(dtype: torch.dtype, target: str, classes: int) -> None:
    """Class counts around the vector widths (16 floats / 8 doubles), wide rows,
    logits far apart: against float64 torch."""
    rows = 70
    x = torch.randn(rows, classes, dtype=dtype) * 8
    x[0, 0] = 90.0
    t = (
        make_index_target(rows, classes, "cpu", ignore=-100)
        if target == "index"
        else make_prob_target(rows, classes, dtype, "cpu")
    )
    w = make_weight(classes, dtype, "cpu")
    close = {"rtol": 2e-5, "atol": 2e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-13}
    for reduction, smoothing in itertools.product(REDUCTIONS, (0.0, 0.15)):
        xi = leaf(x)
        loss = FF.cross_entropy(xi, t, w, reduction=reduction, label_smoothing=smoothing)
        g = torch.rand_like(loss)
        loss.backward(g)
        xd = leaf(x.double())
        td = t if target == "index" else t.double()
        ref = F.cross_entropy(xd, td, w.double(), reduction=reduction, label_smoothing=smoothing)
        ref.backward(g.double())
        torch.testing.assert_close(loss.double(), ref.detach(), **close)
        torch.testing.assert_close(xi.grad.double(), xd.grad, **close)


def test_infinite_logits_as_torch() -> None:
    """-inf logits off the target give a finite NLL (torch's NLL reads only the
    target's log-probability); with smoothing or probabilities they give what torch gives."""
    x = torch.randn(20, 5, dtype=torch.float64)  # rows in blocks of 8 and one by one
    x[0, 1] = x[2, 3] = x[17, 0] = float("-inf")
    t = torch.tensor([0, 2, 1, 4] * 5)
    for kwargs in ({}, {"label_smoothing": 0.1}):
        for reduction in REDUCTIONS:
            got = FF.cross_entropy(x, t, reduction=reduction, **kwargs)
            ref = F.cross_entropy(x, t, reduction=reduction, **kwargs)
            torch.testing.assert_close(got, ref, equal_nan=True)
    assert torch.isfinite(FF.cross_entropy(x, t))
    nan_row = x.clone()
    nan_row[1, 0] = nan_row[18, 2] = float("nan")
    torch.testing.assert_close(
        FF.cross_entropy(nan_row, t, reduction="none"), F.cross_entropy(nan_row, t, reduction="none"), equal_nan=True
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", ["index", "index_weight_smoothing_ignore", "prob", "prob_weight_smoothing"])
def test_gradcheck(device: str, reduction: str, case: str) -> None:
    x = torch.randn(5, 4, dtype=torch.float64, device=device, requires_grad=True)
    w = make_weight(4, torch.float64, device) if "weight" in case else None
    smoothing = 0.2 if "smoothing" in case else 0.0
    if case.startswith("prob"):
        t = make_prob_target(5, 4, torch.float64, device)
    else:
        t = make_index_target(5, 4, device, ignore=-100 if "ignore" in case else None)

    def fn(a: torch.Tensor) -> torch.Tensor:
        return FF.cross_entropy(a, t, w, reduction=reduction, label_smoothing=smoothing)

    assert torch.autograd.gradcheck(fn, (x,))


# --- ops ---------------------------------------------------------------------------------


def op_args(device: str, target: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(6, 5, device=device)
    if target == "prob":
        t = torch.rand(6, 5, device=device).softmax(1)
    else:
        t = torch.tensor([0, 4, -100, 2, 2, 1], device=device)
    return x, t, torch.rand(5, device=device) + 0.5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("target", ["index", "prob"])
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("input_grad", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_opcheck_forward(device: str, target: str, reduction: int, input_grad: bool, weighted: bool) -> None:
    x, t, w = op_args(device, target)
    args = (x, t, w if weighted else None, reduction, -100, 0.1, input_grad)
    torch.library.opcheck(ops.cross_entropy_forward.default, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("target", ["index", "prob"])
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck_backward_and_loss(device: str, target: str, reduction: int) -> None:
    x, t, w = op_args(device, target)
    g = torch.rand((), device=device) if reduction else torch.rand(6, device=device)
    torch.library.opcheck(ops.cross_entropy_backward.default, (g, x, t, w, reduction, -100, 0.1))
    torch.library.opcheck(ops.cross_entropy_loss.default, (x.requires_grad_(), t, w, reduction, -100, 0.1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("target", ["index", "prob"])
def test_raw_ops_vs_torch(device: str, target: str) -> None:
    x, t, w = op_args(device, target)
    x = x.double()
    w = w.double()
    if target == "prob":
        t = t.double()
    for reduction, name in ((0, "none"), (1, "mean"), (2, "sum")):
        loss, grad = ops.cross_entropy_forward(x, t, w, reduction, -100, 0.1, True)
        xr = leaf(x)
        ref = F.cross_entropy(xr, t, w, reduction=name, label_smoothing=0.1)
        assert_close(loss, ref.detach())
        g = torch.rand_like(ref) + 0.5
        ref.backward(g)
        if reduction:
            assert_close(grad, xr.grad / g)
        else:
            assert grad.numel() == 0
        assert_close(ops.cross_entropy_backward(g, x, t, w, reduction, -100, 0.1), xr.grad)


def test_op_errors() -> None:
    x = torch.randn(4, 3)
    t = torch.tensor([0, 1, 2, 0])
    cases = [
        ((x[0], t, None, 1, -100, 0.0, True), "shape \\[batch, classes\\]"),
        ((x, t[:3], None, 1, -100, 0.0, True), "class index target of shape"),
        ((x, t.int(), None, 1, -100, 0.0, True), "int64 class indices"),
        ((x, torch.rand(4, 2), None, 1, -100, 0.0, True), "probability target of shape"),
        ((x, t, torch.ones(4), 1, -100, 0.0, True), "weight tensor should be defined"),
        ((x, t, torch.ones(3).double(), 1, -100, 0.0, True), "dtype"),
        ((x, t, None, 5, -100, 0.0, True), "reduction"),
        ((x, t, None, 1, -100, 1.5, True), "label_smoothing must be between"),
        ((x.long(), t, None, 1, -100, 0.0, True), "floating"),
    ]
    for args, match in cases:
        with pytest.raises(RuntimeError, match=match):
            ops.cross_entropy_forward(*args)
    for bad in (3, -1, -101):
        with pytest.raises(IndexError, match=f"Target {bad} is out of bounds."):
            ops.cross_entropy_forward(x, torch.tensor([0, bad, 1, 1]), None, 1, -100, 0.0, True)
    x_grad = x.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="no gradient for the target"):
        ops.cross_entropy_loss(x_grad, torch.rand(4, 3, requires_grad=True), None, 1, -100, 0.0)
    with pytest.raises(RuntimeError, match="no gradient for the class weight"):
        ops.cross_entropy_loss(x_grad, t, torch.ones(3, requires_grad=True), 1, -100, 0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device: str) -> None:
    w = torch.rand(5, device=device) + 0.5

    def f(x: torch.Tensor, t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return FF.cross_entropy(x * 2, t, w, label_smoothing=0.1) + FF.cross_entropy(x, p, reduction="sum")

    x = torch.randn(8, 5, device=device, requires_grad=True)
    t = torch.randint(0, 5, (8,), device=device)
    p = torch.rand(8, 5, device=device).softmax(1)
    xr = leaf(x)
    torch._dynamo.reset()
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(x, t, p)
    loss.backward()
    ref = f(xr, t, p)
    ref.backward()
    assert_close(loss, ref, reduction=40)
    assert_close(x.grad, xr.grad, reduction=40)


# --- errors and what torch handles -------------------------------------------------------


def outcome(fn: Callable[[], torch.Tensor]) -> tuple[str, object]:
    """("ok", result) or (exception type name, message)."""
    try:
        return "ok", fn()
    except Exception as e:  # noqa: BLE001
        return type(e).__name__, str(e)


def same_error(ours: Callable[[], torch.Tensor], theirs: Callable[[], torch.Tensor]) -> None:
    """The same exception type and message as torch (or, where torch accepts
    the call, e.g. a negative label_smoothing with class indices, its result)."""
    kind, got = outcome(ours)
    want_kind, want = outcome(theirs)
    assert kind == want_kind, (kind, got, want_kind, want)
    if kind == "ok":
        torch.testing.assert_close(got, want)
    else:
        assert got == want


ERROR_CASES = {
    "target out of bounds": (torch.randn(4, 3), torch.tensor([0, 3, 1, 1]), {}),
    "negative target": (torch.randn(4, 3), torch.tensor([0, -1, 1, 1]), {}),
    "bad reduction": (torch.randn(4, 3), torch.tensor([0, 1, 1, 1]), {"reduction": "avg"}),
    "label smoothing > 1": (torch.randn(4, 3), torch.tensor([0, 1, 1, 1]), {"label_smoothing": 1.5}),
    "label smoothing < 0": (torch.randn(4, 3), torch.tensor([0, 1, 1, 1]), {"label_smoothing": -0.1}),
    "label smoothing < 0, probabilities": (torch.randn(4, 3), torch.rand(4, 3), {"label_smoothing": -0.1}),
    "weight of the wrong size": (torch.randn(4, 3), torch.tensor([0, 1, 1, 1]), {"weight": torch.ones(4)}),
    "int32 target": (torch.randn(4, 3), torch.tensor([0, 1, 1, 1], dtype=torch.int32), {}),
    "float target of another shape": (torch.randn(4, 3), torch.rand(4), {}),
    "prob target with ignore_index": (torch.randn(4, 3), torch.rand(4, 3), {"ignore_index": 1}),
    "integer prob target": (torch.randn(4, 3), torch.ones(4, 3, dtype=torch.long), {}),
    "target batch mismatch": (torch.randn(4, 3), torch.tensor([0, 1, 1]), {}),
    "no classes": (torch.randn(4, 0), torch.tensor([0, 1, 1, 1]), {}),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_like_torch(case: str) -> None:
    x, t, kwargs = ERROR_CASES[case]
    same_error(lambda: FF.cross_entropy(x, t, **kwargs), lambda: F.cross_entropy(x, t, **kwargs))
    mod_kwargs = {k: v for k, v in kwargs.items() if k != "reduction"}
    if "reduction" in kwargs:
        same_error(
            lambda: CrossEntropyLoss(reduction=kwargs["reduction"])(x, t),
            lambda: nn.CrossEntropyLoss(reduction=kwargs["reduction"])(x, t),
        )
    else:
        same_error(lambda: CrossEntropyLoss(**mod_kwargs)(x, t), lambda: nn.CrossEntropyLoss(**mod_kwargs)(x, t))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_spatial_input_handed_to_torch(reduction: str) -> None:
    """[B, C, d...] logits (and their [B, d...] / [B, C, d...] targets): torch's results."""
    x = torch.randn(3, 4, 5, 2, dtype=torch.float64)
    w = make_weight(4, torch.float64, "cpu")
    index = torch.randint(0, 4, (3, 5, 2))
    index[0, 0, 0] = -100
    prob = torch.rand(3, 4, 5, 2, dtype=torch.float64).softmax(1)
    for t in (index, prob):
        check_both(x, t, reduction, weight=w, label_smoothing=0.1)


def test_fallbacks_as_torch() -> None:
    """Autocast, torch.func, mixed dtypes, a target probability or weight that
    requires grad, legacy arguments: torch's own results, gradients and errors."""
    x = torch.randn(6, 4)
    t = torch.randint(0, 4, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(FF.cross_entropy(x, t), F.cross_entropy(x, t))
    torch.testing.assert_close(torch.func.grad(FF.cross_entropy)(x, t), torch.func.grad(F.cross_entropy)(x, t))
    same_error(
        lambda: FF.cross_entropy(x.double(), t, torch.ones(4)), lambda: F.cross_entropy(x.double(), t, torch.ones(4))
    )
    same_error(lambda: FF.cross_entropy(x.double(), t.double()), lambda: F.cross_entropy(x.double(), t.double()))
    p = torch.rand(6, 4).softmax(1).requires_grad_()
    (gp,) = torch.autograd.grad(FF.cross_entropy(x, p, label_smoothing=0.1), p)
    (rp,) = torch.autograd.grad(F.cross_entropy(x, p, label_smoothing=0.1), p)
    torch.testing.assert_close(gp, rp)
    w = torch.rand(4, requires_grad=True)  # torch: not differentiable w.r.t. weight
    same_error(
        lambda: FF.cross_entropy(x, t, w, label_smoothing=0.2), lambda: F.cross_entropy(x, t, w, label_smoothing=0.2)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for size_average, reduce in ((False, None), (None, False), (True, True)):
            torch.testing.assert_close(
                FF.cross_entropy(x, t, size_average=size_average, reduce=reduce),
                F.cross_entropy(x, t, size_average=size_average, reduce=reduce),
            )


def test_half_types_close_to_torch() -> None:
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(33, 10).to(dtype)
        t = make_index_target(33, 10, "cpu", ignore=-100)
        got, expected = run_both(x, t, "mean", weight=make_weight(10, dtype, "cpu"), label_smoothing=0.1)
        for a, e in zip(got, expected, strict=True):
            torch.testing.assert_close(a, e, rtol=2e-2, atol=2e-3)


# --- module ------------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("ignore_index", "smoothing"), [(-100, 0.0), (2, 0.3)])
def test_module_like_nn(weight: bool, reduction: str, ignore_index: int, smoothing: float) -> None:
    assert inspect.signature(CrossEntropyLoss.__init__) == inspect.signature(nn.CrossEntropyLoss.__init__)
    w = torch.rand(5) + 0.5 if weight else None
    kwargs = {"weight": w, "ignore_index": ignore_index, "reduction": reduction, "label_smoothing": smoothing}
    mod, ref = CrossEntropyLoss(**kwargs), nn.CrossEntropyLoss(**kwargs)
    assert isinstance(mod, nn.CrossEntropyLoss) and torch_fastmlp.CrossEntropyLoss is CrossEntropyLoss
    assert repr(mod) == repr(ref)
    sd, ref_sd = mod.state_dict(), ref.state_dict()
    assert list(sd) == list(ref_sd) and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    assert [n for n, _ in mod.named_buffers()] == [n for n, _ in ref.named_buffers()]
    x = torch.randn(7, 5, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3, 4, 2, 1])
    xr = leaf(x)
    loss, ref_loss = mod(x, t), ref(xr, t)
    loss.backward(torch.ones_like(loss))
    ref_loss.backward(torch.ones_like(ref_loss))
    assert_close(loss, ref_loss, reduction=35)
    assert_close(x.grad, xr.grad, reduction=35)
    other = nn.CrossEntropyLoss(weight=torch.zeros(5) if weight else None)
    other.load_state_dict(sd)
    back = CrossEntropyLoss(weight=torch.zeros(5) if weight else None)
    back.load_state_dict(ref_sd)
    for clone in (pickle.loads(pickle.dumps(mod)), copy.deepcopy(mod), back):
        assert type(clone) is CrossEntropyLoss
        clone.reduction, clone.ignore_index, clone.label_smoothing = reduction, ignore_index, smoothing
        assert_close(clone(x.detach(), t), ref_loss.detach(), reduction=35)
    assert_close(torch.jit.script(mod)(x.detach(), t), ref_loss.detach(), reduction=35)


@pytest.mark.parametrize("device", DEVICES)
def test_module_to_device_and_double(device: str) -> None:
    w = torch.rand(4) + 0.5
    mod = CrossEntropyLoss(weight=w, label_smoothing=0.1).to(device).double()
    ref = nn.CrossEntropyLoss(weight=w, label_smoothing=0.1).to(device).double()
    x = torch.randn(9, 4, dtype=torch.float64, device=device)
    t = torch.randint(0, 4, (9,), device=device)
    assert mod.weight.dtype == torch.float64
    assert_close(mod(x, t), ref(x, t))


def test_no_grad_and_double_backward_refused() -> None:
    x, t = torch.randn(5, 3, requires_grad=True), torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        loss = FF.cross_entropy(x, t)
    assert not loss.requires_grad
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(FF.cross_entropy(x, t), x, create_graph=True)


# --- determinism -------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["index", "prob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("classes", [10, 300])
def test_same_bits_on_any_thread_count(target: str, reduction: str, classes: int) -> None:
    rows = 5000  # many chunks of rows
    x = torch.randn(rows, classes) * 4
    t = (
        make_index_target(rows, classes, "cpu", ignore=-100, every=7)
        if target == "index"
        else make_prob_target(rows, classes, torch.float32, "cpu")
    )
    w = make_weight(classes, torch.float32, "cpu")
    runs = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        xi = leaf(x)
        loss = FF.cross_entropy(xi, t, w, reduction=reduction, label_smoothing=0.05)
        loss.backward(torch.full_like(loss, 0.3))
        runs.append((loss.detach(), xi.grad))
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b)
