"""First-use autotuning (csrc/common/autotune.h, torch_fastmlp.tuning): the
decisions, their cache, the policy (off by default, never under deterministic
algorithms) and that either candidate gives torch's numbers."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

import torch_fastmlp
from torch_fastmlp import functional as FF


@pytest.fixture(autouse=True)
def fresh_tuner() -> Iterator[None]:
    torch_fastmlp.clear_autotune()
    yield
    torch_fastmlp.autotune(None)
    torch_fastmlp.clear_autotune()


def decisions(op: str) -> list[str]:
    return [d for d in torch_fastmlp.autotune_decisions() if d.startswith(op + ":")]


def test_off_by_default_and_under_deterministic_algorithms() -> None:
    if os.environ.get("FASTMLP_AUTOTUNE") != "1":
        assert not torch_fastmlp.autotune_enabled()
    x, w, b = torch.randn(64, 50), torch.randn(20, 50), torch.randn(20)
    torch_fastmlp.autotune(False)
    FF.linear_relu(x, w, b)
    assert decisions("cpu_linear_act") == []
    assert torch_fastmlp.autotune(True)
    torch.use_deterministic_algorithms(True)
    try:
        assert not torch_fastmlp.autotune_enabled()
        FF.linear_relu(x, w, b)
    finally:
        torch.use_deterministic_algorithms(False)
    assert decisions("cpu_linear_act") == []
    assert torch_fastmlp.autotune_enabled()


def test_environment_variable_turns_it_on() -> None:
    code = "import torch_fastmlp; print(torch_fastmlp.autotune_enabled())"
    for value, expected in (("1", "True"), ("0", "False")):
        env = {**os.environ, "FASTMLP_AUTOTUNE": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("relu", [False, True])
def test_forward_and_backward_decided_once_per_shape(dtype: torch.dtype, relu: bool) -> None:
    torch_fastmlp.autotune(True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 70, dtype=dtype, generator=g)
    w = torch.randn(24, 70, dtype=dtype, generator=g, requires_grad=True)
    b = torch.randn(24, dtype=dtype, generator=g, requires_grad=True)
    fn = FF.linear_relu if relu else FF.linear
    wr, br = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ref = F.linear(x, wr, br)
    ref = torch.relu(ref) if relu else ref
    grad = torch.randn(ref.shape, dtype=dtype, generator=g)
    ref.backward(grad)
    for _ in range(3):  # the first call times both candidates, the others reuse the decision
        w.grad = b.grad = None
        out = fn(x, w, b)
        out.backward(grad)
        tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
        torch.testing.assert_close(out, ref.detach(), **tol)
        torch.testing.assert_close(w.grad, wr.grad, **tol)
        torch.testing.assert_close(b.grad, br.grad, **tol)
    (forward,) = decisions("cpu_linear_act")
    (weight_grad,) = decisions("cpu_weight_grad")
    dtype_name = "Float" if dtype == torch.float32 else "Double"
    threads = torch.get_num_threads()
    assert forward.startswith(f"cpu_linear_act:300:70:24:{dtype_name}:cpu:{threads}: chose ")
    assert weight_grad.startswith(f"cpu_weight_grad:300:70:24:{dtype_name}:cpu:{threads}: chose ")
    assert "(heuristic 0), seconds " in forward and len(forward.split("seconds ")[1].split()) == 2


def test_each_shape_and_thread_count_its_own_decision() -> None:
    torch_fastmlp.autotune(True)
    w, b = torch.randn(16, 40), torch.randn(16)
    for rows in (8, 64, 8):
        FF.linear_relu(torch.randn(rows, 40), w, b)
    assert len(decisions("cpu_linear_act")) == 2
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        FF.linear_relu(torch.randn(8, 40), w, b)
    finally:
        torch.set_num_threads(threads)
    assert len(decisions("cpu_linear_act")) == 3
    torch_fastmlp.clear_autotune()
    assert torch_fastmlp.autotune_decisions() == []


def test_whole_chain_and_train_step_with_autotune() -> None:
    """A Sequential and a TrainStep give eager's numbers with autotuning on
    (whichever candidate each layer's timing chose)."""
    torch_fastmlp.autotune(True)
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(100, 40), torch.nn.ReLU(), torch.nn.Linear(40, 3))
    model = torch_fastmlp.Sequential(torch.nn.Linear(100, 40), torch.nn.ReLU(), torch.nn.Linear(40, 3))
    model.load_state_dict(ref.state_dict())
    x, y = torch.randn(500, 100), torch.randn(500, 3)
    for _ in range(2):
        for m in (ref, model):
            m.zero_grad()
            F.mse_loss(m(x), y).backward()
        for p, q in zip(ref.parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6)
    assert decisions("cpu_linear_act") and decisions("cpu_weight_grad")


@pytest.mark.parametrize("batch", [64, 700])
def test_train_step_with_autotune(batch: int) -> None:
    """TrainStep with autotuning: the step's first call of a shape times the
    rows-through-the-chain kernels against the layer by layer composition
    (cpu_loss_step, the update apart); later steps take the winner (with the
    update fused into the row partials when they won). Eager's training either way."""
    import copy

    torch_fastmlp.autotune(True)
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(200, 40), torch.nn.ReLU(), torch.nn.Linear(40, 1))
    model = torch_fastmlp.Sequential(*copy.deepcopy(list(ref)))
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    step = torch_fastmlp.TrainStep(model, torch.nn.BCEWithLogitsLoss(), torch.optim.Adam(model.parameters(), lr=1e-2))
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(batch, 200, generator=g), torch.randint(0, 2, (batch, 1), generator=g).float()
        ref_opt.zero_grad()
        expected = F.binary_cross_entropy_with_logits(ref(x), y)
        expected.backward()
        ref_opt.step()
        torch.testing.assert_close(step(x, y), expected.detach(), rtol=1e-5, atol=1e-6)
    for p, q in zip(ref.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6)
    (decision,) = decisions("cpu_loss_step")
    assert decision.startswith(f"cpu_loss_step:{batch}:200:40:1:")


def test_autotune_argument_checked() -> None:
    with pytest.raises(TypeError, match="enabled must be a bool or None"):
        torch_fastmlp.autotune(1)  # type: ignore[arg-type]
