"""Calls the fused kernels do not serve give torch's own results and errors.

The functional API and the modules hand such calls to torch itself: autocast,
torch.func transforms, jit tracing, integer/complex tensors, shapes or dtypes
that do not fit, weights that do not broadcast. The comparison is against the
torch.nn / torch.nn.functional call with the same arguments: the same result
(dtype included), or the same exception type and message."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as TF
from torch import nn
from torch.nn.utils import parametrize

import torch_fastmlp as fm

FF = fm.functional


def outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    """("ok", result) or (exception type name, message)."""
    try:
        return "ok", fn()
    except Exception as e:  # noqa: BLE001
        return type(e).__name__, str(e)


def assert_same(ours: Callable[[], Any], theirs: Callable[[], Any]) -> None:
    kind, got = outcome(ours)
    want_kind, want = outcome(theirs)
    assert kind == want_kind, (kind, got, want_kind, want)
    if kind != "ok":
        assert got == want
    elif isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want)
    else:
        assert got == want


X, W, B, T = torch.randn(4, 5), torch.randn(3, 5), torch.randn(3), torch.rand(4, 3)
LINEAR_CASES = {
    "int64": (torch.ones(2, 5, dtype=torch.long), torch.ones(3, 5, dtype=torch.long), None),
    "complex": (X.cfloat(), W.cfloat(), None),
    "list input": ([1.0], W, None),
    "0-D input": (torch.tensor(1.0), W, None),
    "wrong in_features": (torch.randn(4, 6), W, B),
    "dtype mismatch": (X.double(), W, B),
    "bias dtype mismatch": (X, W, B.double()),
    "1-D weight": (X, W[0], None),
    "broadcast bias": (X, W, B[:1]),
}


@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_unusual_arguments_as_torch(case: str) -> None:
    x, w, b = LINEAR_CASES[case]
    assert_same(lambda: FF.linear(x, w, b), lambda: TF.linear(x, w, b))
    assert_same(lambda: FF.linear_relu(x, w, b), lambda: torch.relu(TF.linear(x, w, b)))


def test_functional_under_autocast_as_torch() -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_same(lambda: FF.linear(X, W, B), lambda: TF.linear(X, W, B))
        assert_same(lambda: FF.linear_relu(X, W, B), lambda: torch.relu(TF.linear(X, W, B)))
        lo, tb = T.bfloat16(), T.bfloat16()
        assert_same(
            lambda: FF.binary_cross_entropy_with_logits(lo, tb), lambda: TF.binary_cross_entropy_with_logits(lo, tb)
        )


def test_functional_under_torch_func_and_jit_trace() -> None:
    x = X[:, :3]
    vmapped = torch.func.vmap(FF.linear, in_dims=(0, None, None))(X[None], W, B)
    torch.testing.assert_close(vmapped, torch.func.vmap(TF.linear, in_dims=(0, None, None))(X[None], W, B))
    torch.testing.assert_close(
        torch.func.grad(FF.binary_cross_entropy_with_logits)(x, T),
        torch.func.grad(TF.binary_cross_entropy_with_logits)(x, T),
    )
    torch.testing.assert_close(
        torch.func.grad(lambda w: FF.linear(X, w, B).sum())(W), torch.func.grad(lambda w: TF.linear(X, w, B).sum())(W)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(lambda a: FF.linear(a, W, B), (X,))
    torch.testing.assert_close(traced(X + 1), TF.linear(X + 1, W, B))


BCE_CASES: dict[str, tuple[Any, Any, Any, Any]] = {
    # input, target, weight, pos_weight
    "list input": ([0.1], T, None, None),
    "None target": (X[:, :3], None, None, None),
    "0-D input, [1] pos_weight": (torch.tensor(0.3), torch.tensor(1.0), None, torch.tensor([2.0])),
    "0-D input, [1] weight": (torch.tensor(0.3), torch.tensor(1.0), torch.tensor([2.0]), None),
    "empty input, weight that does not broadcast": (torch.randn(0, 3), torch.rand(0, 3), torch.ones(4), None),
    "weight that does not broadcast": (X[:, :3], T, torch.ones(4), None),
    "pos_weight that would enlarge the input": (X[:1, :3], T[:1], None, torch.ones(2, 3)),
    "non-tensor weight": (X[:, :3], T, [1.0, 2.0, 3.0], None),
}


@pytest.mark.parametrize("case", list(BCE_CASES))
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_bce_unusual_arguments_as_torch(case: str, reduction: str) -> None:
    x, t, w, pw = BCE_CASES[case]
    assert_same(
        lambda: FF.binary_cross_entropy_with_logits(x, t, w, reduction=reduction, pos_weight=pw),
        lambda: TF.binary_cross_entropy_with_logits(x, t, w, reduction=reduction, pos_weight=pw),
    )
    if isinstance(w, torch.Tensor | None) and isinstance(pw, torch.Tensor | None):
        assert_same(
            lambda: fm.BCEWithLogitsLoss(w, reduction=reduction, pos_weight=pw)(x, t),
            lambda: nn.BCEWithLogitsLoss(w, reduction=reduction, pos_weight=pw)(x, t),
        )


def test_classifier_weight_that_does_not_broadcast_as_torch() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    fused = fm.FusedBCEClassifier(model, pos_weight=torch.ones(4))
    assert_same(lambda: fused(X, T), lambda: nn.BCEWithLogitsLoss(pos_weight=torch.ones(4))(model(X), T))


def test_shape_mismatch_inside_a_chain_as_torch() -> None:
    torch.manual_seed(0)
    layers = [nn.Linear(4, 5), nn.ReLU(), nn.Linear(6, 2)]
    x = torch.randn(3, 4)
    assert_same(lambda: fm.Sequential(*layers)(x), lambda: nn.Sequential(*layers)(x))
    # a weight replaced by one of another width
    model = fm.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    ref = nn.Sequential(*model)
    model[2].weight = nn.Parameter(torch.randn(2, 7))
    assert_same(lambda: model(x), lambda: ref(x))
    layer = fm.FusedLinearReLU(5, 4)
    assert_same(lambda: layer(torch.randn(3, 6)), lambda: torch.relu(nn.Linear.forward(layer, torch.randn(3, 6))))


class _CountCalls(nn.Module):
    calls = 0

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        _CountCalls.calls += 1
        return w


@pytest.mark.parametrize("fallback", ["forward hook", "autocast", "none"])
def test_parametrization_runs_once_per_forward(fallback: str) -> None:
    """A parametrized weight is computed once per forward, as with nn.Sequential,
    also when the chain falls back to its modules (a hook, autocast)."""
    torch.manual_seed(0)
    model = fm.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(3, 5)
    model(x)  # the plan is made before the parametrization
    parametrize.register_parametrization(model[2], "weight", _CountCalls())
    if fallback == "forward hook":
        model[2].register_forward_hook(lambda *args: None)
    _CountCalls.calls = 0
    if fallback == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
    else:
        model(x)
    assert _CountCalls.calls == 1
