"""Binary cross-entropy with logits: ``functional.binary_cross_entropy_with_logits``,
``BCEWithLogitsLoss`` and ``BCEWithLogitsFunction`` against torch's."""

from __future__ import annotations

import inspect
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, assert_close, leaf
from torch import nn

import torch_fastmlp
from torch_fastmlp import BCEWithLogitsFunction, BCEWithLogitsLoss
from torch_fastmlp import functional as FF

ops = torch.ops.fastmlp

SHAPES = {"B": (9,), "B1": (9, 1), "BC": (9, 4), "BCL": (5, 3, 4)}
WEIGHTS = ["none", "class", "full", "one"]
POS_WEIGHTS = ["none", "class", "one"]
REDUCTIONS = ["none", "mean", "sum"]
REDUCTION_ENUM = {"none": 0, "mean": 1, "sum": 2}


def class_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A per-class weight's shape: the classes are dim 1 ([C, 1] for [B, C, L],
    as torch documents); the last dim for 1-D / 2-D inputs."""
    if len(shape) == 3:
        return (shape[1], 1)
    return shape[-1:]


def make_aux(kind: str, shape: tuple[int, ...], dtype: torch.dtype, device: str) -> torch.Tensor | None:
    if kind == "none":
        return None
    size = {"class": class_shape(shape), "full": shape, "one": (1,)}[kind]
    return (torch.rand(size, dtype=torch.float64) * 2 + 0.1).to(device=device, dtype=dtype)


def make_logits(shape: tuple[int, ...], dtype: torch.dtype, device: str, extreme: bool = True) -> torch.Tensor:
    x = torch.randn(shape, dtype=torch.float64) * 3
    flat = x.view(-1)
    if extreme and flat.numel() >= 8:
        flat[:8] = torch.tensor([1e4, -1e4, 100.0, -100.0, 0.0, 30.0, -30.0, 1e-3], dtype=torch.float64)
    return x.to(device=device, dtype=dtype)


def make_target(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> torch.Tensor:
    t = torch.rand(shape, dtype=torch.float64)
    flat = t.view(-1)
    if flat.numel() >= 4:
        flat[1:4] = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    return t.to(device=device, dtype=dtype)


def run_both(
    x: torch.Tensor,
    t: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    reduction: str,
    target_grad: bool = True,
) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """(loss, grad input, grad target) from the fused function and from torch."""
    results = []
    g = None
    for fn in (FF.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits):
        xi, ti = leaf(x), leaf(t, target_grad)
        loss = fn(xi, ti, weight, reduction=reduction, pos_weight=pos_weight)
        if g is None:
            g = torch.rand_like(loss) + 0.5
        loss.backward(g)
        results.append([loss.detach(), xi.grad, ti.grad])
    return results[0], results[1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("pos_weight", POS_WEIGHTS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_vs_torch(device: str, dtype: torch.dtype, shape: str, weight: str, pos_weight: str, reduction: str) -> None:
    s = SHAPES[shape]
    x = make_logits(s, dtype, device)
    t = make_target(s, dtype, device)
    w = make_aux(weight, s, dtype, device)
    pw = make_aux(pos_weight, s, dtype, device)
    got, expected = run_both(x, t, w, pw, reduction)
    n = max(x.numel(), 1)
    for label, a, e in zip(("loss", "grad input", "grad target"), got, expected, strict=True):
        assert a is not None and e is not None, label
        assert a.shape == e.shape and a.dtype == e.dtype, label
        assert torch.isfinite(a).all(), f"{label} has non-finite values"
        assert_close(a, e, reduction=n, msg=label)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 4), (0,), (2, 0, 3)], ids=str)
def test_empty_batch(device: str, shape: tuple[int, ...]) -> None:
    """An empty input with every weight / pos_weight variant: as torch (mean of
    nothing is NaN, sum 0, none an empty tensor; gradients empty)."""
    for reduction, weight, pos_weight in itertools.product(REDUCTIONS, WEIGHTS, POS_WEIGHTS):
        x = make_logits(shape, torch.float32, device)
        t = make_target(shape, torch.float32, device)
        w = make_aux(weight, shape, torch.float32, device)
        pw = make_aux(pos_weight, shape, torch.float32, device)
        got, expected = run_both(x, t, w, pw, reduction)
        for label, a, e in zip(("loss", "grad input", "grad target"), got, expected, strict=True):
            assert_close(a, e, msg=f"{label}, reduction={reduction}, weight={weight}, pos_weight={pos_weight}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_input_grad_only_and_target_grad_only(device: str, reduction: str) -> None:
    s = (6, 5)
    x = make_logits(s, torch.float64, device)
    t = make_target(s, torch.float64, device)
    pw = make_aux("class", s, torch.float64, device)
    got, expected = run_both(x, t, None, pw, reduction, target_grad=False)
    assert got[2] is None and expected[2] is None
    for a, e in zip(got[:2], expected[:2], strict=True):
        assert_close(a, e)
    # Target gradient only.
    tf, tr = leaf(t), leaf(t)
    FF.binary_cross_entropy_with_logits(x, tf, pos_weight=pw, reduction=reduction).sum().backward()
    F.binary_cross_entropy_with_logits(x, tr, pos_weight=pw, reduction=reduction).sum().backward()
    assert_close(tf.grad, tr.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_noncontiguous_operands(device: str, reduction: str) -> None:
    base = make_logits((5, 8), torch.float64, device)
    tbase = make_target((8, 10), torch.float64, device)
    x, t = base.t(), tbase[:, ::2]  # [8, 5]: transposed logits, step-sliced target
    pw = torch.rand(10, dtype=torch.float64, device=device)[::2] + 0.5  # strided [5]
    w = torch.rand(8, 1, dtype=torch.float64, device=device).expand(8, 5)  # stride-0 full weight
    got, expected = run_both(x, t, w, pw, reduction)
    for a, e in zip(got, expected, strict=True):
        assert_close(a, e)


@pytest.mark.parametrize("device", DEVICES)
def test_large_input_multichunk(device: str) -> None:
    """More elements than one reduction chunk, float32: the reduced loss stays accurate."""
    s = (64, 300)
    x = make_logits(s, torch.float32, device)
    t = make_target(s, torch.float32, device)
    for reduction in ("mean", "sum"):
        got, expected = run_both(x, t, None, make_aux("class", s, torch.float32, device), reduction)
        for a, e in zip(got, expected, strict=True):
            assert_close(a, e, reduction=x.numel())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weights", [("none", "none"), ("class", "class"), ("full", "one")], ids=str)
def test_gradcheck(device: str, reduction: str, weights: tuple[str, str]) -> None:
    s = (4, 3)
    x = torch.randn(s, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.rand(s, dtype=torch.float64, device=device, requires_grad=True)
    w = make_aux(weights[0], s, torch.float64, device)
    pw = make_aux(weights[1], s, torch.float64, device)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return FF.binary_cross_entropy_with_logits(x, t, w, reduction=reduction, pos_weight=pw)

    assert torch.autograd.gradcheck(fn, (x, t))
    assert torch.autograd.gradcheck(fn, (x, t.detach()))
    assert torch.autograd.gradcheck(fn, (x.detach(), t))


def test_bce_function_direct() -> None:
    """``BCEWithLogitsFunction.apply(input, target, weight_pattern, pos_weight_pattern, reduction)``."""
    s = (6, 4)
    x = make_logits(s, torch.float64, "cpu").requires_grad_()
    t = make_target(s, torch.float64, "cpu")
    pw = make_aux("class", s, torch.float64, "cpu")
    w = make_aux("full", s, torch.float64, "cpu")
    loss = BCEWithLogitsFunction.apply(x, t, w.reshape(-1), pw, 1)
    loss.backward()
    xr = leaf(x)
    ref = F.binary_cross_entropy_with_logits(xr, t, w, pos_weight=pw)
    ref.backward()
    assert_close(loss, ref)
    assert_close(x.grad, xr.grad)


# --- opcheck / compile ---------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("input_grad", [False, True])
@pytest.mark.parametrize("patterns", ["none", "class", "full"])
def test_opcheck_bce_with_logits(device: str, reduction: int, input_grad: bool, patterns: str) -> None:
    x = torch.randn(6, 4, device=device)
    t = torch.rand(6, 4, device=device)
    w = pw = None
    if patterns == "class":
        w, pw = torch.rand(4, device=device), torch.rand(4, device=device)
    elif patterns == "full":
        w, pw = torch.rand(24, device=device), torch.rand(1, device=device)
    torch.library.opcheck(ops.bce_with_logits.default, (x, t, w, pw, reduction, input_grad))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("mask", [[True, True], [True, False], [False, True]], ids=str)
def test_opcheck_bce_with_logits_backward(device: str, reduction: int, mask: list[bool]) -> None:
    x = torch.randn(6, 4, device=device)
    t = torch.rand(6, 4, device=device)
    g = torch.rand((), device=device) if reduction else torch.rand(6, 4, device=device)
    torch.library.opcheck(
        ops.bce_with_logits_backward.default, (g, x, t, torch.rand(4, device=device), None, reduction, mask)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_bce_ops_raw_vs_torch(device: str) -> None:
    x = make_logits((6, 4), torch.float64, device)
    t = make_target((6, 4), torch.float64, device)
    pw = make_aux("class", (6, 4), torch.float64, device)
    for reduction, name in ((0, "none"), (1, "mean"), (2, "sum")):
        loss, grad = ops.bce_with_logits(x, t, None, pw, reduction, True)
        xr, tr = leaf(x), leaf(t)
        ref = F.binary_cross_entropy_with_logits(xr, tr, pos_weight=pw, reduction=name)
        assert_close(loss, ref.detach())
        g = torch.rand_like(ref)
        ref.backward(g)
        if reduction:
            assert_close(grad, xr.grad / g)
        else:
            assert grad.numel() == 0
        gi, gt = ops.bce_with_logits_backward(g, x, t, None, pw, reduction, [True, True])
        assert_close(gi, xr.grad)
        assert_close(gt, tr.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device: str) -> None:
    pw = torch.rand(4, device=device) + 0.5

    def f(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return FF.binary_cross_entropy_with_logits(x * 2, t, pos_weight=pw) + FF.binary_cross_entropy_with_logits(
            x, t, reduction="sum"
        )

    x = torch.randn(8, 4, device=device, requires_grad=True)
    t = torch.rand(8, 4, device=device, requires_grad=True)
    xr, tr = leaf(x), leaf(t)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x, t)
    loss.backward()
    ref = f(xr, tr)
    ref.backward()
    assert_close(loss, ref, reduction=32)
    assert_close(x.grad, xr.grad, reduction=32)
    assert_close(t.grad, tr.grad, reduction=32)


# --- errors / legacy args ----------------------------------------------------------


def test_error_target_size_mismatch_like_torch() -> None:
    x, t = torch.randn(4, 3), torch.rand(4, 1)
    with pytest.raises(ValueError) as expected:
        F.binary_cross_entropy_with_logits(x, t)
    with pytest.raises(ValueError) as got:
        FF.binary_cross_entropy_with_logits(x, t)
    assert str(got.value) == str(expected.value)
    assert "Target size (torch.Size([4, 1])) must be the same as input size (torch.Size([4, 3]))" in str(got.value)
    with pytest.raises(ValueError, match="Target size"):
        BCEWithLogitsLoss()(x, t)


def test_error_bad_reduction_like_torch() -> None:
    x, t = torch.randn(4, 3), torch.rand(4, 3)
    with pytest.raises(ValueError) as expected:
        F.binary_cross_entropy_with_logits(x, t, reduction="avg")
    with pytest.raises(ValueError) as got:
        FF.binary_cross_entropy_with_logits(x, t, reduction="avg")
    assert str(got.value) == str(expected.value)
    with pytest.raises(ValueError):
        BCEWithLogitsLoss(reduction="avg")(x, t)


def test_error_weight_not_broadcastable() -> None:
    x, t = torch.randn(4, 3), torch.rand(4, 3)
    with pytest.raises(RuntimeError) as expected:
        F.binary_cross_entropy_with_logits(x, t, torch.rand(5))
    with pytest.raises(expected.type):
        FF.binary_cross_entropy_with_logits(x, t, torch.rand(5))
    with pytest.raises(RuntimeError):
        F.binary_cross_entropy_with_logits(x, t, pos_weight=torch.rand(2))
    with pytest.raises(RuntimeError):
        FF.binary_cross_entropy_with_logits(x, t, pos_weight=torch.rand(2))


@pytest.mark.parametrize("which", ["weight", "pos_weight"])
def test_weight_requiring_grad_like_torch(which: str) -> None:
    """torch refuses a weight / pos_weight that requires grad (it is not
    differentiable w.r.t. them); the fused version must not silently drop it."""
    x = torch.randn(4, 3, requires_grad=True)
    t = torch.rand(4, 3)
    kwargs = {which: torch.rand(3, requires_grad=True)}
    with pytest.raises(RuntimeError) as expected:
        F.binary_cross_entropy_with_logits(x, t, **kwargs).backward()
    with pytest.raises(expected.type, match=which):
        FF.binary_cross_entropy_with_logits(x, t, **kwargs).backward()


@pytest.mark.parametrize("size_average", [None, True, False])
@pytest.mark.parametrize("reduce", [None, True, False])
def test_legacy_args_like_torch(size_average: bool | None, reduce: bool | None) -> None:
    x = torch.randn(5, 3, dtype=torch.float64)
    t = torch.rand(5, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = F.binary_cross_entropy_with_logits(x, t, size_average=size_average, reduce=reduce)
        got = FF.binary_cross_entropy_with_logits(x, t, size_average=size_average, reduce=reduce)
        ref_mod = nn.BCEWithLogitsLoss(size_average=size_average, reduce=reduce)
        mod = BCEWithLogitsLoss(size_average=size_average, reduce=reduce)
    assert mod.reduction == ref_mod.reduction
    assert_close(got, ref)
    assert_close(mod(x, t), ref_mod(x, t))
    # Legacy args override reduction, as torch.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if size_average is not None or reduce is not None:
            assert_close(
                FF.binary_cross_entropy_with_logits(x, t, size_average=size_average, reduce=reduce, reduction="sum"),
                F.binary_cross_entropy_with_logits(x, t, size_average=size_average, reduce=reduce, reduction="sum"),
            )


def test_legacy_args_warn_like_torch() -> None:
    x, t = torch.randn(3), torch.rand(3)
    with pytest.warns(UserWarning):
        FF.binary_cross_entropy_with_logits(x, t, size_average=False)


# --- module ----------------------------------------------------------------------------


def test_module_signature_matches_nn() -> None:
    assert inspect.signature(BCEWithLogitsLoss.__init__) == inspect.signature(nn.BCEWithLogitsLoss.__init__)
    assert isinstance(BCEWithLogitsLoss(), nn.BCEWithLogitsLoss)


@pytest.mark.parametrize("weight", [False, True])
@pytest.mark.parametrize("pos_weight", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_module_state_dict_and_repr(weight: bool, pos_weight: bool, reduction: str) -> None:
    w = torch.rand(3) if weight else None
    pw = torch.rand(3) if pos_weight else None
    ref = nn.BCEWithLogitsLoss(weight=w, reduction=reduction, pos_weight=pw)
    mod = BCEWithLogitsLoss(weight=w, reduction=reduction, pos_weight=pw)
    assert repr(mod) == repr(ref)
    sd, ref_sd = mod.state_dict(), ref.state_dict()
    assert list(sd) == list(ref_sd)
    for k in sd:
        assert torch.equal(sd[k], ref_sd[k])
    assert [n for n, _ in mod.named_buffers()] == [n for n, _ in ref.named_buffers()]
    # Round trip into a fresh module of the other kind.
    other = nn.BCEWithLogitsLoss(
        weight=torch.zeros(3) if weight else None, pos_weight=torch.zeros(3) if pos_weight else None
    )
    other.load_state_dict(sd)
    x, t = torch.randn(4, 3), torch.rand(4, 3)
    assert_close(mod(x, t), ref(x, t))


@pytest.mark.parametrize("device", DEVICES)
def test_module_forward_backward(device: str) -> None:
    s = (7, 3)
    w = make_aux("class", s, torch.float32, device)
    pw = make_aux("class", s, torch.float32, device)
    mod = BCEWithLogitsLoss(weight=w, pos_weight=pw).to(device)
    ref = nn.BCEWithLogitsLoss(weight=w, pos_weight=pw).to(device)
    x = make_logits(s, torch.float32, device).requires_grad_()
    t = make_target(s, torch.float32, device)
    xr = leaf(x)
    loss, ref_loss = mod(x, t), ref(xr, t)
    loss.backward()
    ref_loss.backward()
    assert_close(loss, ref_loss, reduction=21)
    assert_close(x.grad, xr.grad, reduction=21)
    # .double() converts the buffers and still matches.
    mod64, ref64 = mod.double(), ref.double()
    assert_close(mod64(x.detach().double(), t.double()), ref64(x.detach().double(), t.double()))


def test_module_no_grad() -> None:
    x, t = torch.randn(5, 2), torch.rand(5, 2)
    with torch.no_grad():
        loss = BCEWithLogitsLoss()(x.requires_grad_(), t)
    assert not loss.requires_grad
    assert_close(loss, nn.BCEWithLogitsLoss()(x.detach(), t))


# --- determinism -------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_deterministic(reduction: str) -> None:
    s = (64, 1000)  # several reduction chunks
    x = make_logits(s, torch.float32, "cpu")
    t = make_target(s, torch.float32, "cpu")
    pw = make_aux("class", s, torch.float32, "cpu")
    runs = []
    for threads in (2, 2, 1):
        torch.set_num_threads(threads)
        xi, ti = leaf(x), leaf(t)
        loss = FF.binary_cross_entropy_with_logits(xi, ti, pos_weight=pw, reduction=reduction)
        loss.backward(torch.ones_like(loss))
        runs.append((loss.detach(), xi.grad, ti.grad))
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b)


def test_every_combination_is_parametrized() -> None:
    """Guard: the parametrization above covers every weight/pos_weight/reduction combination."""
    assert len(list(itertools.product(WEIGHTS, POS_WEIGHTS, REDUCTIONS))) == 36
    assert torch_fastmlp.BCEWithLogitsLoss is BCEWithLogitsLoss


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(1000, 7), (37, 3, 5), (2050, 1)], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_vectorised_patterns(dtype: torch.dtype, shape: tuple[int, ...], reduction: str) -> None:
    """weight / pos_weight patterns of periods that do not divide the vectors
    (16 float / 8 double lanes), over chunk boundaries, with logits out to the
    vector exp's clamp and past it, against torch in float64."""
    x = torch.randn(shape, dtype=dtype) * 5
    x.view(-1)[:6] = torch.tensor([800.0, -800.0, 700.0, -700.0, 1e-9, -1e-9])
    x.requires_grad_()
    y = torch.rand(shape, dtype=dtype)
    pos_weight = torch.rand(shape[-1], dtype=dtype) + 0.5
    weight = torch.rand(shape[0], *([1] * (len(shape) - 1)), dtype=dtype)
    got = torch_fastmlp.functional.binary_cross_entropy_with_logits(
        x, y, weight, reduction=reduction, pos_weight=pos_weight
    )
    xd = x.detach().double().requires_grad_()
    want = torch.nn.functional.binary_cross_entropy_with_logits(
        xd, y.double(), weight.double(), reduction=reduction, pos_weight=pos_weight.double()
    )
    close = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-13, "atol": 1e-13}
    torch.testing.assert_close(got.double(), want, **close)
    g = torch.rand_like(want)
    (gx,) = torch.autograd.grad(got, x, g.to(dtype))
    (gxd,) = torch.autograd.grad(want, xd, g)
    torch.testing.assert_close(gx.double(), gxd, **close)


@pytest.mark.parametrize(("dtype", "n"), [(torch.float64, 4099), (torch.float32, 10007)], ids=["f64", "f32"])
def test_elementwise_backward_same_bits_on_any_thread_count(dtype: torch.dtype, n: int) -> None:
    """reduction='none': which elements take the vector loop's scalar tail must
    not depend on how the elements are split between threads."""
    x = (torch.randn(n, dtype=dtype) * 4).requires_grad_()
    y = torch.rand(n, dtype=dtype)
    g = torch.rand(n, dtype=dtype)
    grads = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        loss = torch_fastmlp.functional.binary_cross_entropy_with_logits(x, y, reduction="none")
        grads.append(torch.autograd.grad(loss, x, g)[0])
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


def test_float64_nan_with_payload_stays_nan() -> None:
    """A NaN logit whose payload has low bits set gives NaN loss and gradient
    (the vector exp must not read the payload as an exponent)."""
    payloads = torch.tensor([0x7FF8000000000001, 0x7FF80000000003FF, 0x7FF8000123456789] * 6, dtype=torch.int64)
    x = payloads.view(torch.float64).clone().requires_grad_()
    for reduction in ("none", "sum"):
        loss = torch_fastmlp.functional.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction=reduction)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        assert torch.isnan(loss).all() and torch.isnan(grad).all(), reduction
