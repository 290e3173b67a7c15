"""Shared helpers for the core test suite: the device list, per-dtype tolerances,
reference (pure torch.nn) models and small tensor factories."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import pytest
import torch
from torch import nn

import torch_fastmlp

#: Whether the CUDA variants of the tests can run here.
CUDA_OK: bool = bool(torch.cuda.is_available() and torch_fastmlp.WITH_CUDA)

#: Every op / module test is parametrized over these.
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not CUDA_OK, reason="needs a GPU and a build with the CUDA kernels"),
        ],
    ),
]

#: Base (rtol, atol) per dtype, for a reduction over ~16 terms.
_BASE_TOL: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 2e-2,
}


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """ "cpu", and "cuda" when a GPU and the CUDA kernels are there."""
    return request.param


@pytest.fixture(autouse=True)
def _seed() -> Iterator[None]:
    """Every test starts from the same RNG state (and leaves the thread count as it was)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tol(dtype: torch.dtype, reduction: int = 1) -> dict[str, float]:
    """``rtol``/``atol`` for ``dtype`` after summing ``reduction`` terms: the
    rounding error of a sum grows about like sqrt(terms)."""
    scale = max(1.0, math.sqrt(max(reduction, 1)) / 4)
    t = _BASE_TOL[dtype] * scale
    return {"rtol": t, "atol": t}


def assert_close(
    actual: torch.Tensor | None,
    expected: torch.Tensor | None,
    reduction: int = 1,
    dtype: torch.dtype | None = None,
    msg: str = "",
) -> None:
    """``torch.testing.assert_close`` with the tolerance of ``dtype`` (default:
    ``expected``'s) scaled to the reduction size; ``None`` must match ``None``."""
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{msg}: expected {expected!r}, got {actual!r}"
        return
    dtype = expected.dtype if dtype is None else dtype
    torch.testing.assert_close(
        actual, expected, **tol(dtype, reduction), equal_nan=True, msg=(lambda m: f"{msg}\n{m}") if msg else None
    )


def assert_grads_close(
    actual: Sequence[torch.Tensor | None],
    expected: Sequence[torch.Tensor | None],
    reduction: int = 1,
    names: Sequence[str] | None = None,
) -> None:
    """Pairwise :func:`assert_close` on gradient lists."""
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert_close(a, e, reduction, msg=f"gradient {names[i] if names else i}")


def reference_mlp(
    sizes: Sequence[int],
    bias: bool | Sequence[bool] = True,
    last_relu: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int | None = 0,
) -> nn.Sequential:
    """``nn.Sequential(Linear, ReLU, ..., Linear[, ReLU])`` of pure torch.nn modules,
    initialised from ``seed`` (so the same seed gives the same weights as a model
    built the same way with other module classes)."""
    if seed is not None:
        torch.manual_seed(seed)
    biases = [bias] * (len(sizes) - 1) if isinstance(bias, bool) else list(bias)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(fan_in, fan_out, bias=biases[i], dtype=dtype, device=device))
        if i < len(sizes) - 2 or last_relu:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def reference_chain(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    last_relu: bool,
) -> torch.Tensor:
    """The functional eager reference of ``fastmlp::mlp_forward``'s output."""
    h = x
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        h = nn.functional.linear(h, w, b)
        if i < len(weights) - 1 or last_relu:
            h = torch.relu(h)
    return h


def make_linear_params(
    in_features: int,
    out_features: int,
    bias: bool = True,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight/bias leaves initialised like ``nn.Linear`` (outputs O(1) for O(1) inputs)."""
    bound = 1.0 / math.sqrt(max(in_features, 1))
    w = torch.empty(out_features, in_features, dtype=torch.float64).uniform_(-bound, bound)
    b = torch.empty(out_features, dtype=torch.float64).uniform_(-bound, bound) if bias else None
    w = w.to(device=device, dtype=dtype).requires_grad_()
    b = b.to(device=device, dtype=dtype).requires_grad_() if b is not None else None
    return w, b


def leaf(t: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    """A fresh leaf copy of ``t``."""
    return t.detach().clone().requires_grad_(requires_grad)


def grads_of(tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """``.grad`` of each tensor (``None`` stays ``None``)."""
    return [None if t is None else t.grad for t in tensors]
