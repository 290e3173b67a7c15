"""Hardening: bad input, edge shapes, 64-bit index math, determinism, memory,
threads, and a property-based fuzz of every public API against torch.nn.

Every comparison is against eager PyTorch (``torch.nn`` / ``torch.nn.functional``)
computing the same thing: the promise is "drop-in", so wherever torch accepts an
input we must give its result, and wherever torch raises we must raise the same
exception type (with a message naming the argument when the error is ours).

Everything here runs in well under a minute on 2 CPU cores; nothing needs more
than a few hundred MB.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as TF
from conftest import assert_close, reference_mlp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import torch_fastmlp as fm
from torch_fastmlp import functional as FF

ops = torch.ops.fastmlp


REPO = Path(__file__).resolve().parent.parent


# --- helpers ---------------------------------------------------------------------


def fused_copy(ref: nn.Sequential) -> fm.Sequential:
    """A torch_fastmlp.Sequential of deep copies of ``ref``'s modules."""
    return fm.Sequential(*copy.deepcopy(list(ref)))


def outcome(fn: Callable[[], object]) -> tuple[str, object]:
    """("ok", result) or ("raised", exception)."""
    try:
        return "ok", fn()
    except Exception as e:  # noqa: BLE001
        return "raised", e


def same_error_kind(got: BaseException, expected: BaseException) -> bool:
    """The same exception class, or a subclass of it; torch's NotImplementedError
    and our RuntimeError both count as RuntimeError (NotImplementedError is one)."""
    if isinstance(got, type(expected)):
        return True
    return isinstance(got, RuntimeError) and isinstance(expected, RuntimeError)


def assert_same_behaviour(
    fused: Callable[[], object], eager: Callable[[], object], what: str, dtype: torch.dtype | None = None
) -> BaseException | None:
    """Both raise an exception of the same kind, or both succeed with equal results
    (within the tolerance of ``dtype``, default the result's)."""
    kind_f, res_f = outcome(fused)
    kind_e, res_e = outcome(eager)
    if kind_e == "raised":
        assert kind_f == "raised", f"{what}: torch raises {type(res_e).__name__}({res_e}) but torch_fastmlp returned"
        assert same_error_kind(res_f, res_e), (
            f"{what}: torch raises {type(res_e).__name__}({res_e}); torch_fastmlp raises "
            f"{type(res_f).__name__}({res_f})"
        )
        return res_f  # type: ignore[return-value]
    assert kind_f == "ok", f"{what}: torch succeeds but torch_fastmlp raises {type(res_f).__name__}: {res_f}"
    assert isinstance(res_f, torch.Tensor) and isinstance(res_e, torch.Tensor)
    assert res_f.dtype == res_e.dtype and res_f.shape == res_e.shape, (
        f"{what}: got {res_f.dtype}{tuple(res_f.shape)}, torch gives {res_e.dtype}{tuple(res_e.shape)}"
    )
    if res_e.device.type != "meta":
        assert_close(res_f.detach(), res_e.detach(), 16, dtype=dtype, msg=what)
    return None


# Input layouts: name -> (base shape for batch b and features f, view of the base).
# The leading-dim layouts have 3 * b rows in all.
VIEWS: dict[str, tuple[Callable[[int, int], tuple[int, ...]], Callable[[torch.Tensor, int, int], torch.Tensor]]] = {
    "contiguous": (lambda b, f: (b, f), lambda t, b, f: t),
    "transposed": (lambda b, f: (f, b), lambda t, b, f: t.t()),
    "column_step": (lambda b, f: (b, 2 * f), lambda t, b, f: t[:, ::2]),
    "row_step": (lambda b, f: (2 * b, f), lambda t, b, f: t[::2]),
    "offset": (lambda b, f: (b + 1, f + 3), lambda t, b, f: t[1:, 3:]),
    "expanded_rows": (lambda b, f: (1, f), lambda t, b, f: t.expand(b, f)),
    "expanded_features": (lambda b, f: (b, 1), lambda t, b, f: t.expand(b, f)),
    "leading_dims": (lambda b, f: (3, b, f), lambda t, b, f: t),
    "channels_last_like": (lambda b, f: (3, f, b), lambda t, b, f: t.permute(0, 2, 1)),
    "leading_transposed": (lambda b, f: (b, 3, f), lambda t, b, f: t.transpose(0, 1)),
}


def make_input(
    view: str, batch: int, features: int, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 1
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """A base tensor (clone it into a leaf per run) and the function that views it."""
    shape_fn, view_fn = VIEWS[view]
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape_fn(batch, features), generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    return base, lambda t: view_fn(t, batch, features)


def fixed_randn(shape: Sequence[int], like: torch.Tensor, seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float64).to(device=like.device, dtype=like.dtype)


def run_chain(model: nn.Module, base: torch.Tensor, view: Callable[[torch.Tensor], torch.Tensor]) -> list:
    """Forward on ``view(leaf)``, backward with a fixed gradient: [output, dbase, dparams...]."""
    x = base.detach().clone().requires_grad_()
    out = model(view(x))
    out.backward(fixed_randn(out.shape, out))
    return [out.detach(), x.grad] + [p.grad for p in model.parameters()]


def run_loss(
    model_and_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    params: Sequence[torch.Tensor],
    base: torch.Tensor,
    view: Callable[[torch.Tensor], torch.Tensor],
    target: torch.Tensor,
) -> list:
    x = base.detach().clone().requires_grad_()
    loss = model_and_loss(view(x), target)
    loss.backward()
    return [loss.detach(), x.grad] + [p.grad for p in params]


def compare(got: list, expected: list, reduction: int, what: str, names: Sequence[str] | None = None) -> None:
    """Pairwise assert_close of [output or loss, input grad, param grads...] (or ``names``)."""
    if names is None:
        names = ["output/loss", "input grad"] + [f"param grad {i}" for i in range(len(expected) - 2)]
    assert len(got) == len(expected) == len(names)
    for name, g, e in zip(names, got, expected, strict=True):
        assert_close(g, e, reduction, msg=f"{what}: {name}")


def eager_classifier(ref: nn.Sequential, **loss_kw: object) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    loss_fn = nn.BCEWithLogitsLoss(**loss_kw)  # type: ignore[arg-type]
    return lambda x, y: loss_fn(ref(x), y)


# ===================================================================================
# 1. Bad input
# ===================================================================================

# (name, input builder for a model with in_features=5) -> torch's behaviour decides.
BAD_CHAIN_INPUTS: dict[str, Callable[[str], object]] = {
    "0-D": lambda d: torch.tensor(1.0, device=d),
    "feature mismatch": lambda d: torch.randn(4, 6, device=d),
    "float64 into float32 model": lambda d: torch.randn(4, 5, dtype=torch.float64, device=d),
    "float16 into float32 model": lambda d: torch.randn(4, 5, device=d).half(),
    "int64": lambda d: torch.randint(0, 3, (4, 5), device=d),
    "int32 leading dims": lambda d: torch.randint(0, 3, (2, 4, 5), device=d, dtype=torch.int32),
    "bool": lambda d: torch.rand(4, 5, device=d) > 0.5,
    "list": lambda d: [[0.0] * 5] * 4,
    "None": lambda d: None,
    "meta input on a real model": lambda d: torch.randn(4, 5, device="meta"),
}


def chain_modules(device: str) -> dict[str, tuple[nn.Module, nn.Module]]:
    """(fused, eager) pairs of every public chain module, in_features 5."""
    ref = reference_mlp([5, 7, 3], device=device)
    mlp = fm.MLP([5, 7, 3], device=device)
    mlp.load_state_dict(ref.state_dict())
    lin = fm.FusedLinearReLU(5, 3, device=device)
    lin_ref = nn.Linear(5, 3, device=device)
    lin_ref.load_state_dict(lin.state_dict())
    return {
        "Sequential": (fused_copy(ref), ref),
        "MLP": (mlp, ref),
        "FusedLinearReLU": (lin, nn.Sequential(lin_ref, nn.ReLU())),
    }


@pytest.mark.parametrize("case", list(BAD_CHAIN_INPUTS))
@pytest.mark.parametrize("module", ["Sequential", "MLP", "FusedLinearReLU"])
def test_modules_raise_like_torch_nn(device: str, module: str, case: str) -> None:
    fused, eager = chain_modules(device)[module]
    assert_same_behaviour(
        lambda: fused(BAD_CHAIN_INPUTS[case](device)),
        lambda: eager(BAD_CHAIN_INPUTS[case](device)),
        f"{module}({case})",
    )


def test_sequential_corrupted_parameters_raise_with_clear_messages(device: str) -> None:
    # A bias of the wrong size.
    ref = reference_mlp([5, 7, 3], device=device)
    ref[2].bias = nn.Parameter(torch.zeros(4, device=device))
    fused = fused_copy(ref)
    x = torch.randn(6, 5, device=device)
    err = assert_same_behaviour(lambda: fused(x), lambda: ref(x), "bias of the wrong size")
    assert str(err) == str(outcome(lambda: ref(x))[1])  # torch's own message: the modules ran
    # Layers that do not chain (7 -> 8): torch's own message too.
    ref = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(8, 3)).to(device)
    fused = fused_copy(ref)
    err = assert_same_behaviour(lambda: fused(x), lambda: ref(x), "layers that do not chain")
    assert str(err) == str(outcome(lambda: ref(x))[1])
    # One float64 layer in a float32 model.
    ref = reference_mlp([5, 7, 3], device=device)
    ref[2].double()
    fused = fused_copy(ref)
    assert_same_behaviour(lambda: fused(x), lambda: ref(x), "mixed-dtype layers")


BAD_LINEAR_ARGS: dict[str, Callable[[str], tuple]] = {
    "input 0-D": lambda d: (torch.tensor(1.0, device=d), torch.randn(3, 5, device=d), None),
    "weight 3-D": lambda d: (torch.randn(4, 5, device=d), torch.randn(3, 5, 1, device=d), None),
    "feature mismatch": lambda d: (torch.randn(4, 6, device=d), torch.randn(3, 5, device=d), None),
    "bias of the wrong size": lambda d: (
        torch.randn(4, 5, device=d),
        torch.randn(3, 5, device=d),
        torch.randn(4, device=d),
    ),
    "float64 input": lambda d: (torch.randn(4, 5, device=d, dtype=torch.float64), torch.randn(3, 5, device=d), None),
    "float64 bias": lambda d: (
        torch.randn(4, 5, device=d),
        torch.randn(3, 5, device=d),
        torch.randn(3, device=d).double(),
    ),
    "int input": lambda d: (torch.randint(0, 3, (4, 5), device=d), torch.randn(3, 5, device=d), None),
    "bool input": lambda d: (torch.rand(4, 5, device=d) > 0.5, torch.randn(3, 5, device=d), None),
    "meta bias": lambda d: (torch.randn(4, 5, device=d), torch.randn(3, 5, device=d), torch.randn(3, device="meta")),
    "meta input, real weight": lambda d: (
        torch.randn(4, 5, device="meta"),
        torch.randn(3, 5, device=d),
        torch.randn(3, device=d),
    ),
}


@pytest.mark.parametrize("case", list(BAD_LINEAR_ARGS))
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "linear_relu"])
def test_functional_linear_raises_like_torch(device: str, relu: bool, case: str) -> None:
    fused_fn = FF.linear_relu if relu else FF.linear

    def eager_fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        y = TF.linear(x, w, b)
        return torch.relu(y) if relu else y

    args = BAD_LINEAR_ARGS[case](device)
    err = assert_same_behaviour(lambda: fused_fn(*args), lambda: eager_fn(*args), f"linear({case})")
    if err is not None and "fastmlp" in str(err):
        # Our own messages name what is wrong.
        keywords = {
            "weight 3-D": ["weight", "3"],
            "feature mismatch": ["6", "5"],
            "bias of the wrong size": ["bias", "4"],
            "float64 input": ["Double", "Float"],
            "float64 bias": ["bias", "Double"],
            "int input": ["input", "Long"],
            "bool input": ["input", "Bool"],
        }.get(case, [])
        for word in keywords:
            assert word in str(err), f"{case}: {word!r} not in {err}"


@pytest.mark.parametrize(
    "case",
    ["weight 1-D (in_features,)", "bias of shape [1]", "bias 0-D"],
)
def test_functional_linear_accepts_what_torch_accepts(case: str) -> None:
    """torch.nn.functional.linear documents weight ``(out, in)`` or ``(in)`` and
    broadcasts the bias; a drop-in functional must compute the same."""
    x = torch.randn(4, 5, requires_grad=True)
    w = torch.randn(3, 5)
    b: torch.Tensor | None = None
    if case.startswith("weight 1-D"):
        w = torch.randn(5)
    elif case == "bias of shape [1]":
        b = torch.randn(1)
    else:
        b = torch.tensor(0.5)
    for fused_fn, eager_fn in ((FF.linear, TF.linear), (FF.linear_relu, lambda *a: torch.relu(TF.linear(*a)))):
        assert_same_behaviour(
            lambda f=fused_fn: f(x, w, b), lambda e=eager_fn: e(x, w, b), f"{fused_fn.__name__}: {case}"
        )


def test_non_tensor_arguments_raise_as_torch() -> None:
    """A non-Tensor argument raises what the torch counterpart raises (TypeError
    for linear's arguments, AttributeError for BCE's input and target)."""
    x, w, b = torch.randn(4, 5), torch.randn(3, 5), torch.randn(3)
    logits, target = torch.randn(4, 3), torch.rand(4, 3)
    as_list = [[0.0] * 5] * 4
    torch.manual_seed(0)
    mlp = fm.MLP([5, 3])
    ref = nn.Sequential(*mlp)
    tf_bce = torch.nn.functional.binary_cross_entropy_with_logits
    calls: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
        "linear(input=list)": (lambda: FF.linear(as_list, w, b), lambda: TF.linear(as_list, w, b)),
        "linear(weight=list)": (lambda: FF.linear(x, w.tolist(), b), lambda: TF.linear(x, w.tolist(), b)),
        "linear(bias=list)": (lambda: FF.linear(x, w, b.tolist()), lambda: TF.linear(x, w, b.tolist())),
        "linear_relu(input=list)": (lambda: FF.linear_relu(as_list, w, b), lambda: TF.linear(as_list, w, b)),
        "linear_relu(weight=None)": (lambda: FF.linear_relu(x, None, b), lambda: TF.linear(x, None, b)),
        "bce(input=list)": (
            lambda: FF.binary_cross_entropy_with_logits(logits.tolist(), target),
            lambda: tf_bce(logits.tolist(), target),
        ),
        "bce(target=list)": (
            lambda: FF.binary_cross_entropy_with_logits(logits, target.tolist()),
            lambda: tf_bce(logits, target.tolist()),
        ),
        "bce(weight=list)": (
            lambda: FF.binary_cross_entropy_with_logits(logits, target, weight=[1.0, 2.0, 3.0]),
            lambda: tf_bce(logits, target, weight=[1.0, 2.0, 3.0]),
        ),
        "bce(pos_weight=list)": (
            lambda: FF.binary_cross_entropy_with_logits(logits, target, pos_weight=[1.0, 2.0, 3.0]),
            lambda: tf_bce(logits, target, pos_weight=[1.0, 2.0, 3.0]),
        ),
        "BCEWithLogitsLoss(target=list)": (
            lambda: fm.BCEWithLogitsLoss()(logits, target.tolist()),
            lambda: nn.BCEWithLogitsLoss()(logits, target.tolist()),
        ),
        "Sequential(list)": (lambda: mlp(as_list), lambda: ref(as_list)),
        "FusedLinearReLU(list)": (lambda: fm.FusedLinearReLU(5, 3)(as_list), lambda: nn.Linear(5, 3)(as_list)),
        "FusedBCEClassifier(input=list)": (
            lambda: fm.FusedBCEClassifier(mlp)(as_list, target),
            lambda: nn.BCEWithLogitsLoss()(ref(as_list), target),
        ),
        "FusedBCEClassifier(target=list)": (
            lambda: fm.FusedBCEClassifier(mlp)(x, target.tolist()),
            lambda: nn.BCEWithLogitsLoss()(ref(x), target.tolist()),
        ),
    }
    wrong = {}
    for name, (ours, theirs) in calls.items():
        kind, res = outcome(ours)
        kind_t, res_t = outcome(theirs)
        assert kind_t == "raised", name
        if not (kind == "raised" and type(res) is type(res_t) and str(res) == str(res_t)):
            wrong[name] = ("returned" if kind == "ok" else f"{type(res).__name__}: {res}", repr(res_t))
    assert not wrong, f"expected torch's own exception, got: {wrong}"


BAD_BCE_ARGS: dict[str, Callable[[str], tuple[tuple, dict]]] = {
    "target shape": lambda d: ((torch.randn(4, 3, device=d), torch.rand(3, 3, device=d)), {}),
    "int input": lambda d: ((torch.randint(0, 2, (4, 3), device=d), torch.rand(4, 3, device=d)), {}),
    "int target": lambda d: ((torch.randn(4, 3, device=d), torch.randint(0, 2, (4, 3), device=d)), {}),
    "bool target": lambda d: ((torch.randn(4, 3, device=d), torch.rand(4, 3, device=d) > 0.5), {}),
    "weight does not broadcast": lambda d: (
        (torch.randn(4, 3, device=d), torch.rand(4, 3, device=d)),
        {"weight": torch.rand(2, device=d)},
    ),
    "pos_weight does not broadcast": lambda d: (
        (torch.randn(4, 3, device=d), torch.rand(4, 3, device=d)),
        {"pos_weight": torch.rand(4, device=d)},
    ),
    "bad reduction": lambda d: ((torch.randn(4, 3, device=d), torch.rand(4, 3, device=d)), {"reduction": "avg"}),
    "weight requires grad": lambda d: (
        (torch.randn(4, 3, device=d, requires_grad=True), torch.rand(4, 3, device=d)),
        {"weight": torch.rand(3, device=d, requires_grad=True)},
    ),
    "meta input, real target": lambda d: ((torch.randn(4, 3, device="meta"), torch.rand(4, 3, device=d)), {}),
}


@pytest.mark.parametrize("case", list(BAD_BCE_ARGS))
def test_bce_raises_like_torch(device: str, case: str) -> None:
    args, kw = BAD_BCE_ARGS[case](device)
    assert_same_behaviour(
        lambda: FF.binary_cross_entropy_with_logits(*args, **kw),
        lambda: TF.binary_cross_entropy_with_logits(*args, **kw),
        f"binary_cross_entropy_with_logits({case})",
    )
    module_kw = {k: v for k, v in kw.items() if k != "weight" or not v.requires_grad}
    assert_same_behaviour(
        lambda: fm.BCEWithLogitsLoss(**module_kw)(*args),
        lambda: nn.BCEWithLogitsLoss(**module_kw)(*args),
        f"BCEWithLogitsLoss({case})",
    )


@pytest.mark.parametrize(
    "case", ["float64 target", "float64 pos_weight", "float64 weight", "float64 logits, float32 target"]
)
@pytest.mark.parametrize("api", ["functional", "BCEWithLogitsLoss", "FusedBCEClassifier"])
def test_bce_mixed_dtypes_promote_like_torch(api: str, case: str) -> None:
    """torch's BCE-with-logits type-promotes its arguments (a float64 target from
    NumPy with float32 logits is common); a drop-in must give the same result."""
    logits_dtype = torch.float64 if case.startswith("float64 logits") else torch.float32
    target = torch.rand(6, 3, dtype=torch.float64 if case == "float64 target" else torch.float32)
    weight = torch.rand(3, dtype=torch.float64) if case == "float64 weight" else None
    pos_weight = torch.rand(3, dtype=torch.float64) * 2 if case == "float64 pos_weight" else None
    x = torch.randn(6, 4, dtype=logits_dtype)
    ref = reference_mlp([4, 5, 3], dtype=logits_dtype)
    eager = nn.BCEWithLogitsLoss(weight=weight, pos_weight=pos_weight)
    if api == "functional":
        logits = ref(x)
        fused = lambda: FF.binary_cross_entropy_with_logits(logits, target, weight, pos_weight=pos_weight)  # noqa: E731
    elif api == "BCEWithLogitsLoss":
        logits = ref(x)
        fused = lambda: fm.BCEWithLogitsLoss(weight=weight, pos_weight=pos_weight)(logits, target)  # noqa: E731
    else:
        clf = fm.FusedBCEClassifier(fused_copy(ref), pos_weight=pos_weight, weight=weight)
        fused = lambda: clf(x, target)  # noqa: E731
    # The logits carry the precision of the model (float32 when the target alone is float64).
    assert_same_behaviour(fused, lambda: eager(ref(x), target), f"{api}: {case}", dtype=logits_dtype)


BAD_CLASSIFIER_CALLS: dict[str, Callable[[], tuple]] = {
    "feature mismatch": lambda: (torch.randn(4, 6), torch.rand(4, 3)),
    "float64 input": lambda: (torch.randn(4, 5, dtype=torch.float64), torch.rand(4, 3)),
    "int input": lambda: (torch.randint(0, 3, (4, 5)), torch.rand(4, 3)),
    "0-D input": lambda: (torch.tensor(1.0), torch.rand(3)),
    "target shape": lambda: (torch.randn(4, 5), torch.rand(4, 2)),
    "target 1-D": lambda: (torch.randn(4, 5), torch.rand(12)),
    "int target": lambda: (torch.randn(4, 5), torch.randint(0, 2, (4, 3))),
    "target on meta": lambda: (torch.randn(4, 5), torch.rand(4, 3, device="meta")),
}


@pytest.mark.parametrize("batch", [4, 1500])
@pytest.mark.parametrize("case", list(BAD_CLASSIFIER_CALLS))
def test_classifier_raises_like_eager(case: str, batch: int) -> None:
    ref = reference_mlp([5, 7, 3])
    clf = fm.FusedBCEClassifier(fused_copy(ref))
    loss = nn.BCEWithLogitsLoss()
    x, y = BAD_CLASSIFIER_CALLS[case]()
    if batch != 4 and x.dim() == 2:  # the row-tiled CPU path
        x = x.repeat(batch // 4, 1)
        y = y.repeat(batch // 4, *([1] * (y.dim() - 1)))
    assert_same_behaviour(lambda: clf(x, y), lambda: loss(ref(x), y), f"FusedBCEClassifier({case})")


def test_classifier_constructor_and_buffers() -> None:
    with pytest.raises(ValueError, match="reduction"):
        fm.FusedBCEClassifier(fm.MLP([5, 3]), reduction="none")
    with pytest.raises(ValueError, match="reduction"):
        fm.FusedBCEClassifier(fm.MLP([5, 3]), reduction="avg")
    x, y = torch.randn(4, 5), torch.rand(4, 3)
    ref = reference_mlp([5, 3])
    for kw in ({"pos_weight": torch.rand(2)}, {"weight": torch.rand(4, 2)}):
        clf = fm.FusedBCEClassifier(fused_copy(ref), **kw)
        eager = nn.BCEWithLogitsLoss(**kw)
        assert_same_behaviour(lambda c=clf: c(x, y), lambda e=eager: e(ref(x), y), f"buffer {kw}")


# --- NaN / Inf propagate exactly as eager -----------------------------------------------

NONFINITE = {
    "nan": float("nan"),
    "+inf": float("inf"),
    "-inf": float("-inf"),
}


def _poison(t: torch.Tensor, value: float, where: str) -> None:
    with torch.no_grad():
        flat = t.view(-1)
        if where == "one":
            flat[flat.numel() // 2] = value
        else:  # a whole row (or column block for weights)
            t[0] = value


@pytest.mark.parametrize("where", ["one", "row"])
@pytest.mark.parametrize("value", list(NONFINITE))
@pytest.mark.parametrize("target", ["input", "weight0", "bias0", "weight_last"])
@pytest.mark.parametrize("sizes", [[6, 9, 4], [20, 100, 3]], ids=["narrow", "wide"])
def test_nonfinite_propagate_like_eager(device: str, sizes: list[int], target: str, value: str, where: str) -> None:
    ref = reference_mlp(sizes, device=device)
    x = torch.randn(8, sizes[0], device=device)
    if target == "input":
        _poison(x, NONFINITE[value], where)
    else:
        p = {"weight0": ref[0].weight, "bias0": ref[0].bias, "weight_last": ref[2].weight}[target]
        _poison(p, NONFINITE[value], where)
    fused = fused_copy(ref)
    base, view = x, (lambda t: t)
    compare(run_chain(fused, base, view), run_chain(ref, base, view), 16, f"Sequential {target}={value}")
    # The fused classifier: loss and every gradient.
    ref.zero_grad(set_to_none=True)
    y = torch.rand(8, sizes[-1], device=device)
    pw = torch.rand(sizes[-1], device=device) * 2
    clf = fm.FusedBCEClassifier(fused_copy(ref), pos_weight=pw)
    got = run_loss(clf, list(clf.parameters()), base, view, y)
    expected = run_loss(eager_classifier(ref, pos_weight=pw), list(ref.parameters()), base, view, y)
    compare(got, expected, 16, f"FusedBCEClassifier {target}={value}")


@pytest.mark.parametrize("value", list(NONFINITE))
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_nonfinite_bce_like_eager(device: str, value: str, reduction: str) -> None:
    logits = torch.randn(5, 4, device=device)
    logits[1, 2] = NONFINITE[value]
    logits[3] = NONFINITE[value]
    target = torch.rand(5, 4, device=device)
    target[3, 0], target[3, 1] = 0.0, 1.0
    pw = torch.rand(4, device=device) * 2
    w = torch.rand(4, device=device)
    results = []
    for fn in (FF.binary_cross_entropy_with_logits, TF.binary_cross_entropy_with_logits):
        x, t = logits.clone().requires_grad_(), target.clone().requires_grad_()
        loss = fn(x, t, w, pos_weight=pw, reduction=reduction)
        loss.backward(fixed_randn(loss.shape, loss))
        results.append([loss.detach(), x.grad, t.grad])
    compare(results[0], results[1], 16, f"bce {value} {reduction}", ["loss", "input grad", "target grad"])


# --- raw ops: bad arguments raise RuntimeError naming the argument, never crash -----

_RAW_SETUP = """
import torch, torch_fastmlp
ops = torch.ops.fastmlp
torch.manual_seed(0)
B, K, N = 64, 5, 8
x = torch.randn(B, K); w1 = torch.randn(N, K); w2 = torch.randn(2, N); b1 = torch.randn(N); b2 = torch.randn(2)
out, hidden = ops.mlp_forward(x, [w1, w2], [b1, b2], True)
g = torch.randn(B, 2)
y = ops.linear_act(x, w1, b1, True); gy = torch.randn(B, N)
lg = torch.randn(B, 2); t = torch.rand(B, 2)
xt = torch.randn(2000, K); tt = torch.rand(2000, 2)
M = lambda v: v.to("meta")
T2 = [True, True]; T3 = [True, True, True]
def step(xx, tt_, weight=None, pos_weight=None, reduction=1, wm=T2, bm=T2, ws=None, bs=None):
    return ops.mlp_bce_step(xx, tt_, ws or [w1, w2], bs or [b1, b2], False, weight, pos_weight, reduction, True, wm, bm)
"""

# name -> (expression, words the RuntimeError's message must contain, case-insensitive)
RAW_CASES: dict[str, tuple[str, list[str]]] = {
    # linear_act
    "linear_act: input 3-D": ("ops.linear_act(x[None], w1, b1, False)", ["input", "[1, 64, 5]"]),
    "linear_act: weight 1-D": ("ops.linear_act(x, w1[0], b1, False)", ["weight", "[5]"]),
    "linear_act: feature mismatch": ("ops.linear_act(torch.randn(B, 6), w1, b1, False)", ["6", "5"]),
    "linear_act: bias size": ("ops.linear_act(x, w1, b1[:3], False)", ["bias", "[3]"]),
    "linear_act: bias dtype": ("ops.linear_act(x, w1, b1.double(), False)", ["bias", "double"]),
    "linear_act: weight dtype": ("ops.linear_act(x.double(), w1, None, False)", ["weight", "double", "float"]),
    "linear_act: int input": ("ops.linear_act(x.long(), w1.long(), None, False)", ["input", "long"]),
    "linear_act: weight on meta": ("ops.linear_act(x, M(w1), b1, False)", ["meta"]),
    "linear_act: bias on meta": ("ops.linear_act(x, w1, M(b1), False)", ["meta"]),
    # linear_act_backward
    "linear_act_backward: grad_output shape": (
        "ops.linear_act_backward(gy[:, :3], x, w1, y, True, T3)",
        ["grad_output", "[64, 3]"],
    ),
    "linear_act_backward: grad_output dtype": (
        "ops.linear_act_backward(gy.double(), x, w1, y, True, T3)",
        ["grad_output", "double"],
    ),
    "linear_act_backward: output shape": ("ops.linear_act_backward(gy, x, w1, y[:3], True, T3)", ["output", "[3, 8]"]),
    "linear_act_backward: output dtype": (
        "ops.linear_act_backward(gy, x, w1, y.double(), True, T3)",
        ["output", "double"],
    ),
    "linear_act_backward: weight mismatch": ("ops.linear_act_backward(gy, x, w1[:, :3], y, True, T3)", ["weight", "3"]),
    "linear_act_backward: output on meta": ("ops.linear_act_backward(gy, x, w1, M(y), True, T3)", ["meta"]),
    # mlp_forward
    "mlp_forward: no layers": ("ops.mlp_forward(x, [], [], False)", ["layer"]),
    "mlp_forward: biases count": ("ops.mlp_forward(x, [w1, w2], [b1], False)", ["biases", "2", "1"]),
    "mlp_forward: input 1-D": ("ops.mlp_forward(x[0], [w1, w2], [b1, b2], False)", ["input", "[5]"]),
    "mlp_forward: weights[0] 3-D": ("ops.mlp_forward(x, [w1[None], w2], [b1, b2], False)", ["weights[0]", "[1, 8, 5]"]),
    "mlp_forward: layers do not chain": ("ops.mlp_forward(x, [w1, w1], [b1, b1], False)", ["weights[1]", "8"]),
    "mlp_forward: bias size": ("ops.mlp_forward(x, [w1, w2], [b1[:3], b2], False)", ["biases[0]", "[3]"]),
    "mlp_forward: bias dtype": ("ops.mlp_forward(x, [w1, w2], [b1.double(), b2], False)", ["bias", "double"]),
    "mlp_forward: weight dtype": ("ops.mlp_forward(x, [w1.double(), w2], [None, None], False)", ["weight", "double"]),
    "mlp_forward: int input": ("ops.mlp_forward(x.int(), [w1.int(), w2.int()], [None, None], False)", ["input", "int"]),
    "mlp_forward: bool input": ("ops.mlp_forward(x.bool(), [w1, w2], [None, None], False)", ["input", "bool"]),
    "mlp_forward: weight on meta": ("ops.mlp_forward(x, [M(w1), w2], [b1, b2], False)", ["meta"]),
    "mlp_forward: input on meta": ("ops.mlp_forward(M(x), [w1, w2], [b1, b2], False)", ["meta"]),
    # mlp_backward
    "mlp_backward: grad_output shape": (
        "ops.mlp_backward(g[:, :1], x, [w1, w2], hidden, out, True, True, T2, T2)",
        ["grad_output", "[64, 1]"],
    ),
    "mlp_backward: grad_output dtype": (
        "ops.mlp_backward(g.double(), x, [w1, w2], hidden, out, True, True, T2, T2)",
        ["grad_output", "double"],
    ),
    "mlp_backward: hidden size": (
        "ops.mlp_backward(g, x, [w1, w2], hidden[1:], out, True, True, T2, T2)",
        ["hidden", "511"],
    ),
    "mlp_backward: hidden dtype": (
        "ops.mlp_backward(g, x, [w1, w2], hidden.double(), out, True, True, T2, T2)",
        ["hidden", "double"],
    ),
    "mlp_backward: hidden 2-D": (
        "ops.mlp_backward(g, x, [w1, w2], hidden.view(B, N), out, True, True, T2, T2)",
        ["hidden"],
    ),
    "mlp_backward: output shape": (
        "ops.mlp_backward(g, x, [w1, w2], hidden, torch.ones(1, 1), True, True, T2, T2)",
        ["output", "[1, 1]"],
    ),
    "mlp_backward: output dtype": (
        "ops.mlp_backward(g, x, [w1, w2], hidden, out.double(), True, True, T2, T2)",
        ["output", "double"],
    ),
    "mlp_backward: missing output": ("ops.mlp_backward(g, x, [w1, w2], hidden, None, True, True, T2, T2)", ["output"]),
    "mlp_backward: weight_mask length": (
        "ops.mlp_backward(g, x, [w1, w2], hidden, out, True, True, [True], T2)",
        ["weight_mask"],
    ),
    "mlp_backward: weight dtype": (
        "ops.mlp_backward(g, x, [w1.double(), w2], hidden, out, True, True, T2, T2)",
        ["weight", "double"],
    ),
    "mlp_backward: hidden on meta": ("ops.mlp_backward(g, x, [w1, w2], M(hidden), out, True, True, T2, T2)", ["meta"]),
    # bce_with_logits
    "bce_with_logits: reduction 3": ("ops.bce_with_logits(lg, t, None, None, 3, True)", ["reduction", "3"]),
    "bce_with_logits: reduction -1": ("ops.bce_with_logits(lg, t, None, None, -1, True)", ["reduction", "-1"]),
    "bce_with_logits: target shape": ("ops.bce_with_logits(lg, t[:3], None, None, 1, True)", ["target", "[3, 2]"]),
    "bce_with_logits: target dtype": ("ops.bce_with_logits(lg, t.double(), None, None, 1, True)", ["target", "double"]),
    "bce_with_logits: weight does not tile": (
        "ops.bce_with_logits(lg, t, torch.ones(3), None, 1, True)",
        ["weight", "3"],
    ),
    "bce_with_logits: empty weight": ("ops.bce_with_logits(lg, t, torch.ones(0), None, 1, True)", ["weight", "0"]),
    "bce_with_logits: empty pos_weight": (
        "ops.bce_with_logits(lg, t, None, torch.ones(0), 1, True)",
        ["pos_weight", "0"],
    ),
    "bce_with_logits: pos_weight dtype": (
        "ops.bce_with_logits(lg, t, None, torch.ones(2).double(), 1, True)",
        ["pos_weight", "double"],
    ),
    "bce_with_logits: int input": ("ops.bce_with_logits(lg.long(), t.long(), None, None, 1, True)", ["input", "long"]),
    "bce_with_logits: target on meta": ("ops.bce_with_logits(lg, M(t), None, None, 1, True)", ["meta"]),
    # bce_with_logits_backward
    "bce_with_logits_backward: grad_output (reduced) shape": (
        "ops.bce_with_logits_backward(torch.ones(3), lg, t, None, None, 1, T2)",
        ["grad_output", "[3]"],
    ),
    "bce_with_logits_backward: grad_output (none) shape": (
        "ops.bce_with_logits_backward(torch.ones(B, 3), lg, t, None, None, 0, T2)",
        ["grad_output", "[64, 3]"],
    ),
    "bce_with_logits_backward: grad_output dtype": (
        "ops.bce_with_logits_backward(torch.ones(()).double(), lg, t, None, None, 1, T2)",
        ["grad_output", "double"],
    ),
    "bce_with_logits_backward: target shape": (
        "ops.bce_with_logits_backward(torch.ones(()), lg, t[:3], None, None, 1, T2)",
        ["target", "[3, 2]"],
    ),
}
for _path, _x, _t in (("generic", "x", "t"), ("row-tiled", "xt", "tt")):
    RAW_CASES.update(
        {
            f"mlp_bce_step ({_path}): reduction none": (f"step({_x}, {_t}, reduction=0)", ["reduction", "0"]),
            f"mlp_bce_step ({_path}): target shape": (f"step({_x}, {_t}[:, :1])", ["target", "1]"]),
            f"mlp_bce_step ({_path}): target 1-D": (f"step({_x}, {_t}.reshape(-1))", ["target"]),
            f"mlp_bce_step ({_path}): target dtype": (f"step({_x}, {_t}.double())", ["target", "double"]),
            f"mlp_bce_step ({_path}): weight does not tile": (
                f"step({_x}, {_t}, weight=torch.ones(3))",
                ["weight", "3"],
            ),
            f"mlp_bce_step ({_path}): empty weight": (f"step({_x}, {_t}, weight=torch.ones(0))", ["weight", "0"]),
            f"mlp_bce_step ({_path}): empty pos_weight": (
                f"step({_x}, {_t}, pos_weight=torch.ones(0))",
                ["pos_weight", "0"],
            ),
            f"mlp_bce_step ({_path}): pos_weight dtype": (
                f"step({_x}, {_t}, pos_weight=torch.ones(2).double())",
                ["pos_weight", "double"],
            ),
            f"mlp_bce_step ({_path}): weight_mask length": (f"step({_x}, {_t}, wm=[True])", ["weight_mask"]),
            f"mlp_bce_step ({_path}): bias_mask length": (f"step({_x}, {_t}, bm=[True, True, True])", ["bias_mask"]),
            f"mlp_bce_step ({_path}): input dtype": (f"step({_x}.double(), {_t}.double())", ["weight", "double"]),
            f"mlp_bce_step ({_path}): int input": (f"step({_x}.long(), {_t})", ["input", "long"]),
            f"mlp_bce_step ({_path}): layers do not chain": (f"step({_x}, {_t}, ws=[w1, w1])", ["weights[1]"]),
            f"mlp_bce_step ({_path}): target on meta": (f"step({_x}, M({_t}))", ["meta"]),
        }
    )

_RAW_WORKER = """
import json, sys, traceback
exec(sys.argv[1])
cases = json.loads(sys.stdin.read())
for name, expr in cases:
    print(json.dumps({"start": name}), flush=True)
    try:
        r = eval(expr)
        res = {"name": name, "kind": "returned"}
    except BaseException as e:
        res = {"name": name, "kind": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__],
               "msg": str(e).split("Exception raised from")[0][:600]}
    print(json.dumps(res), flush=True)
"""


@pytest.fixture(scope="module")
def raw_results() -> dict[str, dict]:
    """Runs every raw-op case in a child process (restarted after a crash, which
    is then recorded as the result of the case that was running)."""
    todo = list(RAW_CASES.items())
    results: dict[str, dict] = {}
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    while todo:
        proc = subprocess.run(
            [sys.executable, "-c", _RAW_WORKER, _RAW_SETUP],
            input=json.dumps([(name, expr) for name, (expr, _) in todo]),
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=300,
        )
        started = None
        for line in proc.stdout.splitlines():
            rec = json.loads(line)
            if "start" in rec:
                started = rec["start"]
            else:
                results[rec["name"]] = rec
                started = None
        if proc.returncode != 0:
            if started is None:
                raise AssertionError(f"raw-op worker failed outside a case:\n{proc.stderr[-3000:]}")
            results[started] = {
                "name": started,
                "kind": f"CRASH (exit code {proc.returncode})",
                "msg": proc.stderr[-500:],
            }
        todo = [(n, c) for n, c in todo if n not in results]
    return results


@pytest.mark.parametrize("case", list(RAW_CASES))
def test_raw_op_bad_argument(raw_results: dict[str, dict], case: str) -> None:
    expr, words = RAW_CASES[case]
    res = raw_results[case]
    assert res["kind"] != "returned", f"{expr} returned instead of raising"
    assert "RuntimeError" in res.get("mro", []), f"{expr}: expected RuntimeError, got {res['kind']}: {res.get('msg')}"
    msg = res["msg"].lower()
    missing = [w for w in words if w.lower() not in msg]
    assert not missing, f"{expr}: message does not name {missing}: {res['msg']!r}"


# ===================================================================================
# 2. Edge shapes and layouts
# ===================================================================================

EDGE_SIZES = [[1, 1], [1, 17, 1], [17, 33, 65, 1], [65, 129, 33, 2], [33, 64, 16], [3, 1, 5]]


@pytest.mark.parametrize("last_relu", [False, True])
@pytest.mark.parametrize("sizes", EDGE_SIZES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("batch", [0, 1, 2, 65])
def test_sequential_edge_shapes(device: str, batch: int, sizes: list[int], last_relu: bool) -> None:
    ref = reference_mlp(sizes, last_relu=last_relu, device=device)
    fused = fused_copy(ref)
    base, view = make_input("contiguous", batch, sizes[0], device=device)
    compare(run_chain(fused, base, view), run_chain(ref, base, view), max(batch, *sizes), f"{sizes} batch {batch}")


@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("sizes", [[17, 33, 3], [65, 129, 65]], ids=["narrow", "wide"])
def test_sequential_input_layouts(device: str, view: str, sizes: list[int]) -> None:
    ref = reference_mlp(sizes, device=device)
    fused = fused_copy(ref)
    base, v = make_input(view, 9, sizes[0], device=device)
    compare(run_chain(fused, base, v), run_chain(ref, base, v), 3 * 9 * 4, f"{view} {sizes}")


@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("api", ["linear", "linear_relu", "FusedLinearReLU"])
@pytest.mark.parametrize("out_features", [1, 17, 70])
def test_linear_input_layouts(device: str, view: str, api: str, out_features: int) -> None:
    in_features = 33
    base, v = make_input(view, 5, in_features, device=device)
    lin = nn.Linear(in_features, out_features, device=device)
    if api == "FusedLinearReLU":
        fused: nn.Module = fm.FusedLinearReLU(in_features, out_features, device=device)
        fused.load_state_dict(lin.state_dict())
        eager: nn.Module = nn.Sequential(lin, nn.ReLU())
    else:
        fn = FF.linear if api == "linear" else FF.linear_relu
        relu = api == "linear_relu"
        fused_lin = copy.deepcopy(lin)

        class Fused(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.lin = fused_lin

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return fn(x, self.lin.weight, self.lin.bias)

        fused = Fused()
        eager = nn.Sequential(lin, nn.ReLU()) if relu else lin
    compare(run_chain(fused, base, v), run_chain(eager, base, v), 60, f"{api} {view}")


@pytest.mark.parametrize(
    "view",
    ["contiguous", "transposed", "column_step", "row_step", "expanded_rows", "leading_dims", "channels_last_like"],
)
@pytest.mark.parametrize("batch", [1, 7, 1025, 2500])
def test_classifier_layouts_and_batches(device: str, view: str, batch: int) -> None:
    sizes = [33, 30, 3]
    ref = reference_mlp(sizes, device=device)
    base, v = make_input(view, batch, sizes[0], device=device)
    lead = v(base).shape[:-1]
    y = torch.rand(*lead, sizes[-1], device=device)
    pw = torch.rand(sizes[-1], device=device) * 2
    w = torch.rand(sizes[-1], device=device)
    clf = fm.FusedBCEClassifier(fused_copy(ref), pos_weight=pw, weight=w)
    got = run_loss(clf, list(clf.parameters()), base, v, y)
    expected = run_loss(eager_classifier(ref, pos_weight=pw, weight=w), list(ref.parameters()), base, v, y)
    compare(got, expected, max(y.numel(), 33), f"classifier {view} batch {batch}")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("buffers", ["none", "pos_weight", "weight", "both"])
@pytest.mark.parametrize("shape", [(0,), (2, 0)], ids=["batch0", "leading-dims-batch0"])
def test_classifier_empty_batch(device: str, shape: tuple[int, ...], buffers: str, reduction: str) -> None:
    """An empty batch gives eager's loss (NaN for mean, 0 for sum) and zero gradients."""
    sizes = [5, 7, 3]
    ref = reference_mlp(sizes, device=device)
    kw: dict[str, torch.Tensor] = {}
    if buffers in ("pos_weight", "both"):
        kw["pos_weight"] = torch.rand(3, device=device) + 0.5
    if buffers in ("weight", "both"):
        kw["weight"] = torch.rand(3, device=device)
    clf = fm.FusedBCEClassifier(fused_copy(ref), reduction=reduction, **kw)
    base = torch.randn(*shape, 5, device=device)
    y = torch.rand(*shape, 3, device=device)
    got = run_loss(clf, list(clf.parameters()), base, lambda t: t, y)
    expected = run_loss(eager_classifier(ref, reduction=reduction, **kw), list(ref.parameters()), base, lambda t: t, y)
    compare(got, expected, 1, f"empty batch {shape} {buffers} {reduction}")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("hidden", [30, 100])
@pytest.mark.parametrize("batch", [1025, 2500])
def test_classifier_row_tiled_path(device: str, batch: int, hidden: int, reduction: str) -> None:
    """Batches above 1024 rows take the row-tiled CPU step; per-class weight and
    pos_weight, input gradient included."""
    sizes = [50, hidden, 17, 4]
    ref = reference_mlp(sizes, device=device)
    pw = torch.rand(4, device=device) * 3
    w = torch.rand(4, device=device) + 0.5
    clf = fm.FusedBCEClassifier(copy.deepcopy(ref), pos_weight=pw, reduction=reduction, weight=w)
    base, v = make_input("contiguous", batch, 50, device=device)
    y = torch.randint(0, 2, (batch, 4), device=device).float()
    y[::7] = 0.25  # some soft targets
    got = run_loss(clf, list(clf.parameters()), base, v, y)
    expected = run_loss(
        eager_classifier(ref, pos_weight=pw, weight=w, reduction=reduction), list(ref.parameters()), base, v, y
    )
    compare(got, expected, y.numel(), f"row-tiled {batch}x{sizes} {reduction}")


@pytest.mark.parametrize(
    "weight_shape",
    [(4,), (1,), (5, 4), (5, 1), (3, 5, 4), (3, 1, 1)],
    ids=lambda s: "weight" + "x".join(map(str, s)),
)
@pytest.mark.parametrize("rows", [5, 400])
def test_classifier_broadcast_weights_with_leading_dims(device: str, weight_shape: tuple[int, ...], rows: int) -> None:
    """Input [3, rows, in]: weights broadcast per class, per position, per sample.
    rows=400 gives 1200 rows (the row-tiled path for per-class patterns)."""
    if len(weight_shape) >= 2 and weight_shape[-2] == 5:
        weight_shape = (*weight_shape[:-2], rows, weight_shape[-1])
    ref = reference_mlp([12, 20, 4], device=device)
    weight = torch.rand(weight_shape, device=device) + 0.1
    pos_weight = torch.rand(4, device=device) * 2
    clf = fm.FusedBCEClassifier(fused_copy(ref), pos_weight=pos_weight, weight=weight)
    base, v = make_input("leading_dims", rows, 12, device=device)
    y = torch.rand(3, rows, 4, device=device)
    got = run_loss(clf, list(clf.parameters()), base, v, y)
    expected = run_loss(eager_classifier(ref, pos_weight=pos_weight, weight=weight), list(ref.parameters()), base, v, y)
    compare(got, expected, y.numel(), f"weight {weight_shape}")


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shape", [(0, 3), (1, 1), (7,), (2, 3, 5), (4097, 1), (3, 0, 2)], ids=str)
def test_bce_edge_shapes(device: str, shape: tuple[int, ...], reduction: str) -> None:
    logits = torch.randn(shape, device=device)
    target = torch.rand(shape, device=device)
    pw = torch.rand(shape[-1], device=device) * 2 if shape[-1] > 0 else None
    w = torch.rand(shape[-1], device=device) if shape[-1] > 0 else None
    results = []
    for fn in (FF.binary_cross_entropy_with_logits, TF.binary_cross_entropy_with_logits):
        # Non-contiguous views too: a transposed copy viewed back.
        x = logits.clone().requires_grad_()
        t = target.clone().requires_grad_()
        xv = x.mT.contiguous().mT if x.dim() >= 2 else x
        loss = fn(xv, t, w, pos_weight=pw, reduction=reduction)
        loss.backward(fixed_randn(loss.shape, loss))
        results.append([loss.detach(), x.grad, t.grad])
    compare(
        results[0],
        results[1],
        max(1, logits.numel()),
        f"bce {shape} {reduction}",
        ["loss", "input grad", "target grad"],
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [9, 1100])
def test_half_precision_forward_like_eager(device: str, dtype: torch.dtype, batch: int) -> None:
    """Half types run the fused ops on CPU too (not the narrow kernels; on CUDA
    the fused chain kernels, float accumulation). Only values are compared: a
    ReLU mask may flip where a pre-activation rounds to either side of 0, which
    moves individual gradient entries by O(1)."""
    sizes = [17, 33, 3]
    ref = reference_mlp(sizes, dtype=dtype, device=device)
    x = torch.randn(batch, 17, device=device).to(dtype)
    y = torch.rand(batch, 3, device=device).to(dtype)
    assert_close(fused_copy(ref)(x).detach(), ref(x).detach(), 33)
    clf = fm.FusedBCEClassifier(fused_copy(ref))
    assert_close(clf(x, y).detach(), nn.BCEWithLogitsLoss()(ref(x), y).detach(), batch * 3)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_grad_and_inference_mode(device: str, mode: str) -> None:
    ref = reference_mlp([17, 33, 3], device=device)
    fused = fused_copy(ref)
    clf = fm.FusedBCEClassifier(fused_copy(ref), pos_weight=torch.rand(3, device=device))
    x = torch.randn(1100, 17, device=device, requires_grad=True)
    y = torch.rand(1100, 3, device=device)
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with ctx():
        out = fused(x)
        loss = clf(x, y)
        lin = FF.linear_relu(x, ref[0].weight, ref[0].bias)
        expected_loss = nn.BCEWithLogitsLoss(pos_weight=clf.pos_weight)(ref(x), y)
        expected_out = ref(x)
        expected_lin = torch.relu(ref[0](x))
    for t in (out, loss, lin):
        assert not t.requires_grad and t.grad_fn is None
    assert_close(out, expected_out, 33)
    assert_close(loss, expected_loss, 3300)
    assert_close(lin, expected_lin, 17)


@pytest.mark.parametrize("batch", [7, 1100])
def test_classifier_target_requiring_grad(device: str, batch: int) -> None:
    """A target that requires grad gets eager's target gradient (the classifier
    then runs the model and the loss separately)."""
    ref = reference_mlp([12, 20, 4], device=device)
    pw = torch.rand(4, device=device) + 0.5
    clf = fm.FusedBCEClassifier(fused_copy(ref), pos_weight=pw, reduction="sum")
    x = torch.randn(batch, 12, device=device)
    results = []
    for fn, params in (
        (clf, list(clf.parameters())),
        (eager_classifier(ref, pos_weight=pw, reduction="sum"), list(ref.parameters())),
    ):
        y = torch.rand(batch, 4, device=device, requires_grad=True)
        with torch.no_grad():
            y.copy_(torch.linspace(0, 1, batch * 4, device=device).reshape(batch, 4))
        loss = fn(x, y)
        loss.backward()
        results.append([loss.detach(), y.grad] + [p.grad for p in params])
    compare(
        results[0],
        results[1],
        batch * 4,
        "target requiring grad",
        ["loss", "target grad"] + [f"param {i}" for i in range(4)],
    )


# ===================================================================================
# 3. 64-bit index math
# ===================================================================================


HUGE = [(1 << 16, (1 << 15) + 3), (1 << 17, (1 << 15) + 3)]  # 2**31 + 196608 and 2**32 + 393216 elements
HUGE_IDS = ["2pow31", "2pow32"]


def _huge_expanded_input(k: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [rows, k] stride-0 view of one row of small integers: more than 2**31
    (or 2**32) logical elements that the kernels read row by row, 512 KiB real.
    Integer data keep every sum exact in float32, so results compare bitwise."""
    row = torch.randint(-2, 3, (1, k), generator=torch.Generator().manual_seed(3)).float()
    x = row.expand(rows, k)
    assert x.numel() > 2**31
    return row, x


@pytest.mark.parametrize("k,rows", HUGE, ids=HUGE_IDS)
def test_raw_weight_gradient_over_2pow31_logical_elements(k: int, rows: int) -> None:
    row, x = _huge_expanded_input(k, rows)
    gen = torch.Generator().manual_seed(4)
    w = torch.randint(-1, 2, (3, k), generator=gen).float()
    g = torch.randint(0, 2, (rows, 3), generator=gen).float()
    _, gw, gb = ops.linear_act_backward(g, x, w, g, False, [False, True, True])
    gsum = g.sum(0)
    assert torch.equal(gb, gsum)
    assert torch.equal(gw, gsum[:, None] * row)


@pytest.mark.parametrize("api", ["linear", "linear_relu", "Sequential"])
@pytest.mark.parametrize("k,rows", HUGE, ids=HUGE_IDS)
def test_forward_backward_over_2pow31_logical_elements(k: int, rows: int, api: str) -> None:
    row, x = _huge_expanded_input(k, rows)
    gen = torch.Generator().manual_seed(5)
    lin = nn.Linear(k, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.randint(-1, 2, (2, k), generator=gen).float())
        lin.bias.copy_(torch.tensor([1.0, -3.0]))
    if api == "Sequential":
        out = fm.Sequential(lin)(x)
    else:
        out = (FF.linear if api == "linear" else FF.linear_relu)(x, lin.weight, lin.bias)
    expected = (row @ lin.weight.detach().t() + lin.bias.detach()).expand(rows, 2)
    if api == "linear_relu":
        expected = expected.relu()
    assert torch.equal(out.detach(), expected)
    g = torch.randint(0, 2, (rows, 2), generator=gen).float()
    out.backward(g)
    if api == "linear_relu":
        g = g * (expected > 0)
    assert torch.equal(lin.bias.grad, g.sum(0))
    assert torch.equal(lin.weight.grad, g.sum(0)[:, None] * row)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_classifier_over_2pow31_logical_elements(reduction: str) -> None:
    """The row-tiled training step (32 tiles) on an expanded input of > 2**31 elements."""
    k, rows = HUGE[0]
    row, x = _huge_expanded_input(k, rows)
    lin = nn.Linear(k, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.randint(-1, 2, lin.weight.shape, generator=torch.Generator().manual_seed(6)).float())
        lin.weight[0, :8] = 0.0
        lin.bias.fill_(-float(row[0] @ lin.weight[0]) + 0.25)  # a logit of 0.25
    clf = fm.FusedBCEClassifier(fm.Sequential(lin), reduction=reduction)
    y = torch.randint(0, 2, (rows, 1), generator=torch.Generator().manual_seed(7)).float()
    loss = clf(x, y)
    loss.backward()
    logit = torch.tensor(0.25, dtype=torch.float64)
    positives = y.double().sum()
    scale = 1.0 / rows if reduction == "mean" else 1.0
    expected_loss = (TF.softplus(-logit) * positives + TF.softplus(logit) * (rows - positives)) * scale
    d = (torch.sigmoid(logit) * rows - positives) * scale  # d loss / d logit, summed over rows
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-4, atol=0)
    torch.testing.assert_close(lin.bias.grad.double(), d.reshape(1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lin.weight.grad.double(), d * row.double(), rtol=1e-4, atol=1e-6)


def test_classifier_many_tiles_uneven_partials(device: str) -> None:
    """70000 rows: 69 tiles of 1024 grouped into 14 partials of 5 (the last one
    short), 2.1 M hidden activations per layer."""
    sizes = [30, 30, 2]
    ref = reference_mlp(sizes, device=device)
    clf = fm.FusedBCEClassifier(fused_copy(ref), reduction="sum")
    base, v = make_input("contiguous", 70000, 30, device=device)
    y = torch.randint(0, 2, (70000, 2), device=device).float()
    got = run_loss(clf, list(clf.parameters()), base, v, y)
    expected = run_loss(eager_classifier(ref, reduction="sum"), list(ref.parameters()), base, v, y)
    compare(got, expected, y.numel(), "70000 rows")


# ===================================================================================
# 4. Determinism
# ===================================================================================


def _training_results(api: str, sizes: list[int], x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    ref = reference_mlp(sizes, seed=11)
    pw = torch.linspace(0.5, 2.0, sizes[-1])
    if api == "classifier":
        model: nn.Module = fm.FusedBCEClassifier(fused_copy(ref), pos_weight=pw)
        params = list(model.parameters())
        xl = x.clone().requires_grad_()
        loss = model(xl, y)
        logits = model.predict(xl).detach()
    else:
        model = fused_copy(ref)
        params = list(model.parameters())
        xl = x.clone().requires_grad_()
        logits = model(xl)
        loss = fm.BCEWithLogitsLoss(pos_weight=pw)(logits, y)
        logits = logits.detach()
    loss.backward()
    return [loss.detach(), logits, xl.grad] + [p.grad for p in params]


@pytest.mark.parametrize("sizes", [[784, 30, 1], [50, 100, 10]], ids=["784-30-1", "50-100-10"])
@pytest.mark.parametrize("batch", [64, 1000, 2500])
@pytest.mark.parametrize("api", ["Sequential+BCEWithLogitsLoss", "classifier"])
def test_bitwise_deterministic_over_runs_and_threads(api: str, batch: int, sizes: list[int]) -> None:
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(batch, sizes[0], generator=gen)
    y = torch.randint(0, 2, (batch, sizes[-1]), generator=gen).float()
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (2, 2, 1, 2):
            torch.set_num_threads(n)
            runs.append((n, _training_results(api, sizes, x, y)))
    finally:
        torch.set_num_threads(threads)
    names = ["loss", "logits", "input grad"] + [f"param grad {i}" for i in range(len(runs[0][1]) - 3)]
    for n, other in runs[1:]:
        for name, a, b in zip(names, runs[0][1], other, strict=True):
            assert torch.equal(a, b), f"{name} differs between a 2-thread run and a {n}-thread run"


# ===================================================================================
# 5. Memory
# ===================================================================================


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc")
def test_training_memory_stays_flat() -> None:
    """10,000 training steps (half FusedBCEClassifier, half Sequential +
    BCEWithLogitsLoss) of a tiny model at batch 8: resident memory does not grow."""
    torch.manual_seed(13)
    clf = fm.FusedBCEClassifier(fm.MLP([16, 12, 2]), pos_weight=torch.tensor([1.5, 0.5]))
    seq = fm.MLP([16, 12, 2])
    loss_fn = fm.BCEWithLogitsLoss()
    opt = torch.optim.SGD(list(clf.parameters()) + list(seq.parameters()), lr=1e-3)
    x, y = torch.randn(8, 16), torch.randint(0, 2, (8, 2)).float()

    def steps(n: int) -> None:
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            clf(x, y).backward()
            loss_fn(seq(x), y).backward()
            opt.step()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # light on a shared machine; tiny batches never fork anyway
    try:
        steps(500)  # warm-up: allocator caches, lazy init
        before = _rss_bytes()
        steps(4500)  # 9,000 more steps in all (2 per iteration)
        after = _rss_bytes()
    finally:
        torch.set_num_threads(threads)
    # One leaked [8, 12] float tensor per step would be 9000 * ~500 B = 4.3 MB.
    assert after - before < 1.5 * 2**20, f"RSS grew by {(after - before) / 2**20:.2f} MiB over 9,000 steps"


class _SavedBytes:
    """Bytes of the tensors autograd saves for backward, excluding module
    parameters and buffers (and their views), each storage counted once."""

    def __init__(self, *modules: nn.Module) -> None:
        self.exclude = {t.untyped_storage().data_ptr() for m in modules for t in [*m.parameters(), *m.buffers()]}
        self.seen: set[int] = set()
        self.total = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.exclude and ptr not in self.seen:
            self.seen.add(ptr)
            self.total += storage.nbytes()
        return t

    def __enter__(self) -> _SavedBytes:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


SAVED_SHAPES = [
    (64, [784, 30, 1]),
    (2500, [784, 30, 1]),
    (256, [50, 100, 10]),
    (3, [20, 16, 16, 4]),
    (8, [16, 12, 2]),
    (1, [784, 30, 1]),
]


@pytest.mark.parametrize("input_grad", [False, True])
@pytest.mark.parametrize("last_relu", [False, True])
@pytest.mark.parametrize("batch,sizes", SAVED_SHAPES, ids=[f"{b}x{'-'.join(map(str, s))}" for b, s in SAVED_SHAPES])
def test_sequential_saves_no_more_than_eager(batch: int, sizes: list[int], last_relu: bool, input_grad: bool) -> None:
    """Sequential alone, and Sequential + BCEWithLogitsLoss, against torch.nn."""
    ref = reference_mlp(sizes, last_relu=last_relu)
    fused = fused_copy(ref)
    pw = torch.rand(sizes[-1]) + 0.5
    x = torch.randn(batch, sizes[0], requires_grad=input_grad)
    y = torch.rand(batch, sizes[-1])
    with _SavedBytes(ref) as eager:
        ref(x)
    with _SavedBytes(fused) as ours:
        fused(x)
    assert ours.total <= eager.total, f"fused Sequential saves {ours.total} B, eager {eager.total} B"
    eager_loss, fused_loss = nn.BCEWithLogitsLoss(pos_weight=pw), fm.BCEWithLogitsLoss(pos_weight=pw)
    with _SavedBytes(ref, eager_loss) as eager:
        eager_loss(ref(x), y)
    with _SavedBytes(fused, fused_loss) as ours:
        fused_loss(fused(x), y)
    assert ours.total <= eager.total, f"fused Sequential + loss saves {ours.total} B, eager {eager.total} B"


@pytest.mark.parametrize("input_grad", [False, True])
@pytest.mark.parametrize("batch,sizes", SAVED_SHAPES, ids=[f"{b}x{'-'.join(map(str, s))}" for b, s in SAVED_SHAPES])
def test_classifier_saves_no_more_than_eager(batch: int, sizes: list[int], input_grad: bool) -> None:
    ref = reference_mlp(sizes)
    pw = torch.rand(sizes[-1]) + 0.5
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pw)
    clf = fm.FusedBCEClassifier(fused_copy(ref), pos_weight=pw)
    x = torch.randn(batch, sizes[0], requires_grad=input_grad)
    y = torch.rand(batch, sizes[-1])
    with _SavedBytes(ref, loss_fn) as eager:
        loss_fn(ref(x), y)
    with _SavedBytes(clf) as ours:
        clf(x, y)
    # By design the fused step holds the gradients it computed in forward: at most
    # the trainable parameters' gradients (which eager allocates in backward
    # anyway) and the input gradient when asked for, on top of what eager saves.
    allowance = sum(p.numel() * p.element_size() for p in clf.parameters() if p.requires_grad)
    allowance += x.numel() * x.element_size() if input_grad else 0
    assert ours.total <= eager.total + allowance, f"FusedBCEClassifier saves {ours.total} B, eager {eager.total} B"


# ===================================================================================
# 6. Threads
# ===================================================================================


def test_concurrent_calls_from_python_threads() -> None:
    """Four Python threads run the CPU ops at once (sharing one Sequential and
    one FusedBCEClassifier); every result matches the one computed alone."""
    torch.manual_seed(14)
    seq = fm.MLP([40, 33, 17, 3])
    clf = fm.FusedBCEClassifier(fm.MLP([40, 30, 2]), pos_weight=torch.tensor([2.0, 0.5]))
    w, b = torch.randn(70, 40, requires_grad=True), torch.randn(70, requires_grad=True)

    def work(seed: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        batch = [5, 64, 300, 1500][seed % 4]
        x = torch.randn(batch, 40, generator=gen, requires_grad=True)
        y = torch.randint(0, 2, (batch, 2), generator=gen).float()
        out = seq(x)
        lin = FF.linear_relu(x, w, b)
        loss = FF.binary_cross_entropy_with_logits(out, torch.rand(out.shape, generator=gen), pos_weight=torch.ones(3))
        total = loss + lin.square().mean() + clf(x, y)
        grads = torch.autograd.grad(total, [x, w, b, *seq.parameters(), *clf.parameters()])
        return [out.detach(), lin.detach(), total.detach(), *grads]

    seeds = list(range(16))
    expected = {s: work(s) for s in seeds}
    results: dict[int, list[torch.Tensor]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def thread_main(my_seeds: list[int]) -> None:
        try:
            barrier.wait()
            for _ in range(3):
                for s in my_seeds:
                    results[s] = work(s)
                    for i, (a, e) in enumerate(zip(results[s], expected[s], strict=True)):
                        assert_close(a, e, 16, msg=f"seed {s}: result {i} under concurrency")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=thread_main, args=(seeds[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors[0]
    # And the single-threaded results themselves match eager.
    for s in (0, 3):
        gen = torch.Generator().manual_seed(s)
        batch = [5, 64, 300, 1500][s % 4]
        x = torch.randn(batch, 40, generator=gen)
        ref = nn.Sequential(*copy.deepcopy(list(seq)))
        assert_close(expected[s][0], ref(x), 40)


# ===================================================================================
# 7. Property-based fuzzing against PyTorch
# ===================================================================================

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ_VIEWS = [
    "contiguous",
    "transposed",
    "column_step",
    "row_step",
    "offset",
    "expanded_rows",
    "leading_dims",
    "channels_last_like",
]
DTYPES = [torch.float32, torch.float64]


@st.composite
def chain_case(draw: st.DrawFn) -> dict:
    depth = draw(st.integers(1, 3))
    return {
        "batch": draw(st.integers(0, 70)),
        "sizes": [draw(st.integers(1, 70)) for _ in range(depth + 1)],
        "dtype": draw(st.sampled_from(DTYPES)),
        "bias": draw(st.booleans()),
        "last_relu": draw(st.booleans()),
        "view": draw(st.sampled_from(FUZZ_VIEWS)),
        "api": draw(st.sampled_from(["Sequential", "MLP", "FusedLinearReLU-chain", "functional"])),
        "input_grad": draw(st.booleans()),
        "frozen": draw(st.lists(st.booleans(), min_size=2 * depth, max_size=2 * depth)),
    }


def _freeze(model: nn.Module, frozen: Sequence[bool]) -> None:
    """requires_grad_(False) on the parameters flagged (weights and biases in order)."""
    for p, f in zip(model.parameters(), frozen, strict=False):
        p.requires_grad_(not f)


class _FunctionalChain(nn.Module):
    """The chain computed with torch_fastmlp.functional.linear / linear_relu."""

    def __init__(self, ref: nn.Sequential, last_relu: bool) -> None:
        super().__init__()
        self.linears = nn.ModuleList(copy.deepcopy([m for m in ref if isinstance(m, nn.Linear)]))
        self.last_relu = last_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, lin in enumerate(self.linears):
            relu = i < len(self.linears) - 1 or self.last_relu
            x = (FF.linear_relu if relu else FF.linear)(x, lin.weight, lin.bias)
        return x


def _fused_model(
    api: str, ref: nn.Sequential, sizes: list[int], bias: bool, last_relu: bool, dtype: torch.dtype
) -> nn.Module:
    if api == "Sequential":
        return fused_copy(ref)
    if api == "MLP":
        mlp = fm.MLP(sizes, bias=bias, last_activation="relu" if last_relu else None, dtype=dtype)
        mlp.load_state_dict(ref.state_dict())
        return mlp
    if api == "functional":
        return _FunctionalChain(ref, last_relu)
    # Sequential of FusedLinearReLU (+ a plain Linear last when no last ReLU).
    layers: list[nn.Module] = []
    linears = [m for m in ref if isinstance(m, nn.Linear)]
    for i, lin in enumerate(linears):
        relu = i < len(linears) - 1 or last_relu
        new = (fm.FusedLinearReLU if relu else nn.Linear)(lin.in_features, lin.out_features, bias=bias, dtype=dtype)
        new.load_state_dict(lin.state_dict())
        layers.append(new)
    return fm.Sequential(*layers)


@FUZZ
@given(case=chain_case())
def test_fuzz_chain_modules(case: dict) -> None:
    sizes, dtype = case["sizes"], case["dtype"]
    ref = reference_mlp(sizes, bias=case["bias"], last_relu=case["last_relu"], dtype=dtype)
    fused = _fused_model(case["api"], ref, sizes, case["bias"], case["last_relu"], dtype)
    _freeze(ref, case["frozen"])
    _freeze(fused, case["frozen"])
    base, view = make_input(case["view"], case["batch"], sizes[0], dtype=dtype)

    def run(model: nn.Module) -> list:
        x = base.detach().clone().requires_grad_(case["input_grad"])
        out = model(view(x))
        if out.requires_grad:
            out.backward(fixed_randn(out.shape, out))
        return [out.detach(), x.grad] + [p.grad for p in model.parameters()]

    compare(run(fused), run(ref), max(case["batch"] * 3, *sizes), str(case))


@st.composite
def bce_case(draw: st.DrawFn) -> dict:
    lead = draw(st.sampled_from([(), (2,)]))
    batch = draw(st.integers(0, 70))
    classes = draw(st.integers(1, 8))
    shape = (*lead, batch, classes)
    weight_shape = draw(st.sampled_from([None, (classes,), (1,), (batch, 1), (batch, classes)]))
    pos_shape = draw(st.sampled_from([None, (classes,), (1,)]))
    return {
        "shape": shape,
        "weight": weight_shape,
        "pos_weight": pos_shape,
        "reduction": draw(st.sampled_from(["none", "mean", "sum"])),
        "dtype": draw(st.sampled_from(DTYPES)),
        "api": draw(st.sampled_from(["functional", "BCEWithLogitsLoss"])),
        "target_grad": draw(st.booleans()),
        "transposed": draw(st.booleans()),
        "scale": draw(st.sampled_from([1.0, 30.0])),
    }


@FUZZ
@given(case=bce_case())
def test_fuzz_bce(case: dict) -> None:
    gen = torch.Generator().manual_seed(15)
    dtype = case["dtype"]
    logits = (torch.randn(case["shape"], generator=gen, dtype=torch.float64) * case["scale"]).to(dtype)
    target = torch.rand(case["shape"], generator=gen, dtype=torch.float64).to(dtype)
    weight = torch.rand(case["weight"], generator=gen, dtype=torch.float64).to(dtype) if case["weight"] else None
    pos_weight = (
        (torch.rand(case["pos_weight"], generator=gen, dtype=torch.float64) * 3).to(dtype)
        if case["pos_weight"]
        else None
    )
    results = []
    for impl in ("fused", "eager"):
        x = logits.clone().requires_grad_()
        t = target.clone().requires_grad_(case["target_grad"])
        xv = x.mT.contiguous().mT if case["transposed"] and x.dim() >= 2 else x
        kw = {"weight": weight, "pos_weight": pos_weight, "reduction": case["reduction"]}
        if case["api"] == "functional":
            fn = FF.binary_cross_entropy_with_logits if impl == "fused" else TF.binary_cross_entropy_with_logits
            loss = fn(xv, t, **kw)
        else:
            loss = (fm.BCEWithLogitsLoss if impl == "fused" else nn.BCEWithLogitsLoss)(**kw)(xv, t)
        loss.backward(fixed_randn(loss.shape, loss))
        results.append([loss.detach(), x.grad, t.grad])
    compare(results[0], results[1], max(1, logits.numel()), str(case), ["loss", "input grad", "target grad"])


@st.composite
def classifier_case(draw: st.DrawFn) -> dict:
    depth = draw(st.integers(1, 3))
    sizes = [draw(st.integers(1, 70)) for _ in range(depth + 1)]
    batch = draw(st.integers(0, 70))
    classes = sizes[-1]
    return {
        "batch": batch,
        "sizes": sizes,
        "dtype": draw(st.sampled_from(DTYPES)),
        "bias": draw(st.booleans()),
        "last_relu": draw(st.booleans()),
        "view": draw(st.sampled_from(FUZZ_VIEWS)),
        "weight": draw(st.sampled_from([None, (classes,), (1,)])),
        "pos_weight": draw(st.sampled_from([None, (classes,), (1,)])),
        "reduction": draw(st.sampled_from(["mean", "sum"])),
        "model": draw(st.sampled_from(["nn.Sequential", "Sequential"])),
        "input_grad": draw(st.booleans()),
        "frozen": draw(st.lists(st.booleans(), min_size=2 * depth, max_size=2 * depth)),
    }


@FUZZ
@given(case=classifier_case())
def test_fuzz_classifier(case: dict) -> None:
    sizes, dtype = case["sizes"], case["dtype"]
    ref = reference_mlp(sizes, bias=case["bias"], last_relu=case["last_relu"], dtype=dtype)
    gen = torch.Generator().manual_seed(16)
    weight = torch.rand(case["weight"], generator=gen, dtype=torch.float64).to(dtype) if case["weight"] else None
    pos_weight = (
        (torch.rand(case["pos_weight"], generator=gen, dtype=torch.float64) * 3).to(dtype)
        if case["pos_weight"]
        else None
    )
    model = copy.deepcopy(ref) if case["model"] == "nn.Sequential" else fused_copy(ref)
    _freeze(ref, case["frozen"])
    _freeze(model, case["frozen"])
    clf = fm.FusedBCEClassifier(model, pos_weight=pos_weight, reduction=case["reduction"], weight=weight)
    base, view = make_input(case["view"], case["batch"], sizes[0], dtype=dtype)
    lead = view(base).shape[:-1]
    y = torch.rand(*lead, sizes[-1], generator=gen, dtype=torch.float64).to(dtype)
    eager = eager_classifier(ref, weight=weight, pos_weight=pos_weight, reduction=case["reduction"])

    def run(fn: Callable, params: list[torch.Tensor]) -> list:
        x = base.detach().clone().requires_grad_(case["input_grad"])
        loss = fn(view(x), y)
        if loss.requires_grad:
            loss.backward()
        return [loss.detach(), x.grad] + [p.grad for p in params]

    got = run(clf, list(clf.parameters()))
    expected = run(eager, list(ref.parameters()))
    compare(got, expected, max(y.numel(), *sizes), str(case))
