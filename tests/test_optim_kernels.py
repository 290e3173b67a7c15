"""fastmlp::optimizer_step (the CPU kernel) and its CUDA kernels run by the CPU
harness (cuda/optim.cuh), against torch.optim's own step on the same gradients:
SGD and Adam/AdamW options, gradient clipping, parameters spanning several
chunks of the multi-tensor kernel."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from test_emu import emu, emu_lib  # noqa: F401  (fixtures: the harness extension)

OPTIMIZERS: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.2, weight_decay=0.01),
    "sgd-nesterov-maximize": lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9, nesterov=True, maximize=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adam-wd-amsgrad": lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=0.1, amsgrad=True),
    "adam-maximize-lerp-large": lambda p: torch.optim.Adam(p, lr=1e-3, betas=(0.3, 0.99), maximize=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05),
}
# Several chunks (4096 elements) in one parameter, a chunk boundary, tiny ones.
SHAPES = [(5000,), (30, 7), (1,), (4096,), (2, 4097)]


def op_arguments(opt: torch.optim.Optimizer) -> tuple[list, list, list, int, list[float]]:
    """The op's (params, grads, state, optimizer, hyper) for every parameter of ``opt``."""
    params, grads, state, hyper = [], [], [], []
    adam = isinstance(opt, torch.optim.Adam)  # AdamW is a subclass
    for group in opt.param_groups:
        for p in group["params"]:
            params.append(p)
            grads.append(p.grad)
            st = opt.state[p]
            if adam:
                state += [st["step"], st["exp_avg"], st["exp_avg_sq"], st.get("max_exp_avg_sq", p.new_empty(0))]
                hyper += [group["lr"], *group["betas"], group["eps"], group["weight_decay"], float(group["amsgrad"]),
                          float(group["maximize"]), float(group["decoupled_weight_decay"])]  # fmt: skip
            else:
                state.append(st.get("momentum_buffer") if group["momentum"] else p.new_empty(0))
                hyper += [group["lr"], group["momentum"], group["dampening"], group["weight_decay"],
                          float(group["nesterov"]), float(group["maximize"]), 0.0, 0.0]  # fmt: skip
    return params, grads, state, 1 if adam else 0, [float(h) for h in hyper]


def train(make_opt, dtype: torch.dtype, clip: float | None, step_fn: Callable | None, steps: int = 4):
    """``steps`` updates from fixed gradients: torch.optim's when step_fn is None,
    else the first by torch.optim (it makes the state) and the rest by step_fn."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in SHAPES]
    grads = [[torch.randn(s, generator=g, dtype=dtype) * 0.1 for s in SHAPES] for _ in range(steps)]
    opt = make_opt(params)
    with torch.no_grad():
        for i in range(steps):
            for p, gr in zip(params, grads[i], strict=True):
                p.grad = gr.clone()
            if step_fn is None or i == 0:
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, clip)
                opt.step()
            else:
                step_fn(*op_arguments(opt), clip)
    return [p.detach() for p in params], [p.grad for p in params], opt.state_dict()


def assert_same(got, expected, dtype: torch.dtype) -> None:
    rtol, atol = (1e-12, 1e-13) if dtype == torch.float64 else (2e-6, 1e-7)
    for a, b in zip(got[0] + got[1], expected[0] + expected[1], strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    assert got[2]["param_groups"] == expected[2]["param_groups"]
    for k, st in expected[2]["state"].items():
        for name, v in st.items():
            torch.testing.assert_close(got[2]["state"][k][name], v, rtol=rtol, atol=atol)


@pytest.mark.parametrize("clip", [None, 0.5, 1e9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_cpu_kernel_matches_torch(name: str, dtype: torch.dtype, clip: float | None) -> None:
    expected = train(OPTIMIZERS[name], dtype, clip, None)
    got = train(OPTIMIZERS[name], dtype, clip, torch.ops.fastmlp.optimizer_step)
    assert_same(got, expected, dtype)


@pytest.mark.parametrize("clip", [None, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_cuda_kernel_in_harness_matches_torch(emu: Any, name: str, dtype: torch.dtype, clip: float | None) -> None:  # noqa: F811
    expected = train(OPTIMIZERS[name], dtype, clip, None, steps=3)
    got = train(OPTIMIZERS[name], dtype, clip, emu.optimizer_step, steps=3)
    assert_same(got, expected, dtype)


ADAMS = [name for name in OPTIMIZERS if name.startswith("adam")]


@pytest.mark.parametrize("step_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("clip", [None, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ADAMS)
def test_device_step_counts_in_harness(
    emu: Any,  # noqa: F811
    name: str,
    dtype: torch.dtype,
    clip: float | None,
    step_dtype: torch.dtype,
) -> None:
    """Adam's step count kept on the device (capturable=True, fused=True on CUDA): the kernels
    advance it and compute the bias corrections from it, with the host path's results (the same
    double math) and torch's; one launch more (the count), nothing read on the host."""

    def device_steps(params, grads, state, optimizer, hyper, max_norm):  # noqa: ANN001, ANN202
        steps = state[0::4]
        for i, t in enumerate(steps):
            state[4 * i] = t.to(step_dtype)
        before = [float(t) for t in steps]
        launches = emu.stats()[1]
        emu.optimizer_step_device_steps(params, grads, state, optimizer, hyper, max_norm)
        assert emu.stats()[1] - launches == (2 if max_norm is None else 4)
        assert [float(t) for t in state[0::4]] == [b + 1 for b in before]
        for i, t in enumerate(steps):  # back into torch's state, in its dtype
            t.copy_(state[4 * i])

    expected = train(OPTIMIZERS[name], dtype, clip, None, steps=3)
    host = train(OPTIMIZERS[name], dtype, clip, emu.optimizer_step, steps=3)
    got = train(OPTIMIZERS[name], dtype, clip, device_steps, steps=3)
    assert_same(got, expected, dtype)
    for a, b in zip(got[0] + got[1], host[0] + host[1], strict=True):
        assert torch.equal(a, b)  # the same double math, on the host or in the kernel


def test_bad_arguments_raise() -> None:
    p = torch.zeros(3)
    ok = [torch.tensor(1.0), torch.zeros(3), torch.zeros(3), torch.empty(0)]
    hyper = [1e-3, 0.9, 0.999, 1e-8, 0.0, 0.0, 0.0, 0.0]
    with pytest.raises(RuntimeError, match="expected 4 state tensors"):
        torch.ops.fastmlp.optimizer_step([p], [torch.zeros(3)], ok[:3], 1, hyper, None)
    with pytest.raises(RuntimeError, match="exp_avg of parameter 0"):
        torch.ops.fastmlp.optimizer_step([p], [torch.zeros(3)], [ok[0], torch.zeros(2), ok[2], ok[3]], 1, hyper, None)
    with pytest.raises(RuntimeError, match="optimizer must be 0"):
        torch.ops.fastmlp.optimizer_step([p], [torch.zeros(3)], ok, 7, hyper, None)
    step = torch.tensor(5.0)
    with pytest.raises(RuntimeError, match="grad of parameter 0"):
        torch.ops.fastmlp.optimizer_step([p], [torch.zeros(4)], [step, *ok[1:]], 1, hyper, None)
    assert step.item() == 5.0  # nothing moved before the check failed
