"""TrainStep and TrainStep.epoch against the eager training loop: the same
losses, parameters, gradients and optimizer state, step after step."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.optim.optimizer as _optim_module
from conftest import CUDA_OK, reference_mlp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torch_fastmlp
from torch_fastmlp import TrainStep

OptFactory = Callable[[list], torch.optim.Optimizer]

OPTIMIZERS: dict[str, OptFactory] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "sgd-dampening-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.01),
    "sgd-nesterov-maximize": lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9, nesterov=True, maximize=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adam-betas-eps-wd": lambda p: torch.optim.Adam(p, lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05),
    "adam-amsgrad-maximize": lambda p: torch.optim.Adam(p, lr=1e-3, amsgrad=True, maximize=True),
    "adam-lerp-large": lambda p: torch.optim.Adam(p, lr=1e-3, betas=(0.3, 0.9)),  # lerp's other form
    "adam-fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2),
    "adamw-amsgrad-wd": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, amsgrad=True),
}


class EagerCounter:
    """Counts the steps a TrainStep runs through its eager lines."""

    def __init__(self, step: TrainStep) -> None:
        self.calls = 0
        original = step.eager_step

        def counted(*args: object) -> torch.Tensor:
            self.calls += 1
            return original(*args)  # type: ignore[arg-type]

        step.eager_step = counted  # type: ignore[method-assign]


def eager_step(model: nn.Module, loss_fn: nn.Module, opt: torch.optim.Optimizer, x, y, clip=None) -> torch.Tensor:
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return loss.detach()


def twins(sizes, make_opt: OptFactory, dtype=torch.float32, fused_cls=torch_fastmlp.Sequential, **loss_kw):
    """An eager model + optimizer and a TrainStep over a copy of both."""
    ref = reference_mlp(sizes, dtype=dtype)
    model = fused_cls(*copy.deepcopy(list(ref)))
    ref_opt, opt = make_opt(list(ref.parameters())), make_opt(list(model.parameters()))
    return ref, ref_opt, TrainStep(model, torch_fastmlp.BCEWithLogitsLoss(**loss_kw), opt)


def assert_same_training(ref: nn.Module, ref_opt, step: TrainStep, rtol=2e-5, atol=2e-6) -> None:
    for (name, p), q in zip(ref.named_parameters(), step.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=rtol, atol=atol, msg=lambda m, name=name: f"param {name}: {m}")
        if p.grad is None:
            assert q.grad is None, name
        else:
            torch.testing.assert_close(q.grad, p.grad, rtol=rtol, atol=atol, msg=lambda m, n=name: f"grad {n}: {m}")
    a, b = ref_opt.state_dict(), step.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert a["state"][k].keys() == b["state"][k].keys()
        for name, v in a["state"][k].items():
            w = b["state"][k][name]
            assert type(v) is type(w)
            assert not isinstance(v, torch.Tensor) or (v.dtype, v.device) == (w.dtype, w.device)
            torch.testing.assert_close(w, v, rtol=rtol, atol=atol, msg=lambda m, k=k, n=name: f"state {k}.{n}: {m}")


def data(rows: int, sizes, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, sizes[0], generator=g, dtype=dtype)
    y = torch.randint(0, 2, (rows, sizes[-1]), generator=g).to(dtype)
    return x, y


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("batch", [1, 64, 700])
def test_steps_match_eager(opt_name: str, batch: int) -> None:
    sizes = [40, 16, 3]
    ref, ref_opt, step = twins(sizes, OPTIMIZERS[opt_name])
    counter = EagerCounter(step)
    loss_fn = nn.BCEWithLogitsLoss()
    for i in range(5):
        x, y = data(batch, sizes, seed=i)
        expected = eager_step(ref, loss_fn, ref_opt, x, y)
        got = step(x, y)
        assert got.shape == () and not got.requires_grad
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-6)
    assert_same_training(ref, ref_opt, step)
    assert counter.calls == (1 if ref_opt.state else 0)  # only a first step that makes the optimizer's state


@pytest.mark.parametrize("opt_name", ["sgd-momentum", "adam-amsgrad-maximize", "adamw-amsgrad-wd"])
def test_float64(opt_name: str) -> None:
    sizes = [30, 20, 20, 2]
    ref, ref_opt, step = twins(sizes, OPTIMIZERS[opt_name], dtype=torch.float64)
    counter = EagerCounter(step)
    loss_fn = nn.BCEWithLogitsLoss()
    for i in range(4):
        x, y = data(50, sizes, dtype=torch.float64, seed=i)
        torch.testing.assert_close(step(x, y), eager_step(ref, loss_fn, ref_opt, x, y), rtol=1e-12, atol=1e-13)
    assert_same_training(ref, ref_opt, step, rtol=1e-11, atol=1e-12)
    assert counter.calls == (1 if ref_opt.state else 0)


@pytest.mark.parametrize("clip", [0.05, 1e6])
@pytest.mark.parametrize("opt_name", ["sgd-momentum", "adam"])
def test_clipping(opt_name: str, clip: float) -> None:
    sizes = [20, 12, 1]
    ref, ref_opt, step = twins(sizes, OPTIMIZERS[opt_name])
    step.max_grad_norm = clip
    counter = EagerCounter(step)
    loss_fn = nn.BCEWithLogitsLoss()
    for i in range(4):
        x, y = data(33, sizes, seed=i)
        torch.testing.assert_close(step(x, y), eager_step(ref, loss_fn, ref_opt, x, y, clip=clip))
    assert_same_training(ref, ref_opt, step)
    assert counter.calls == 1


def test_loss_options_and_no_bias() -> None:
    torch.manual_seed(0)
    sizes = [16, 8, 4]
    pos_weight, weight = torch.rand(4) * 3, torch.rand(4)
    ref = nn.Sequential(nn.Linear(16, 8, bias=False), nn.ReLU(), nn.Linear(8, 4))
    model = copy.deepcopy(ref)  # a plain nn.Sequential is served too
    ref_opt, opt = torch.optim.Adam(ref.parameters(), lr=1e-2), torch.optim.Adam(model.parameters(), lr=1e-2)
    ref_loss = nn.BCEWithLogitsLoss(weight=weight, pos_weight=pos_weight, reduction="sum")
    step = TrainStep(model, nn.BCEWithLogitsLoss(weight=weight, pos_weight=pos_weight, reduction="sum"), opt)
    counter = EagerCounter(step)
    for i in range(4):
        x, _ = data(20, sizes, seed=i)
        y = torch.rand(20, 4)  # soft targets
        torch.testing.assert_close(step(x, y), eager_step(ref, ref_loss, ref_opt, x, y))
    assert_same_training(ref, ref_opt, step)
    assert counter.calls == 1


def test_param_groups_frozen_and_outside_params() -> None:
    """Per-group options, a frozen layer, an optimizer parameter outside the model."""
    sizes = [24, 16, 8, 1]

    def build(ref: nn.Sequential) -> tuple[nn.Sequential, torch.optim.Optimizer, torch.Tensor]:
        ref[2].weight.requires_grad_(False)  # frozen, but still in the optimizer
        extra = torch.zeros(3, requires_grad=True)
        extra.grad = torch.ones(3)  # zero_grad() must clear it
        opt = torch.optim.Adam(
            [
                {"params": [ref[0].weight, ref[0].bias], "lr": 1e-2},
                {"params": [ref[2].weight, ref[2].bias, extra], "lr": 3e-3, "weight_decay": 0.1},
                {"params": [ref[4].weight, ref[4].bias], "lr": 5e-3, "amsgrad": True},
            ]
        )
        return ref, opt, extra

    ref, ref_opt, ref_extra = build(reference_mlp(sizes))
    model, opt, extra = build(torch_fastmlp.Sequential(*copy.deepcopy(list(reference_mlp(sizes)))))
    step = TrainStep(model, nn.BCEWithLogitsLoss(), opt)
    counter = EagerCounter(step)
    frozen = model[2].weight.detach().clone()
    for i in range(4):
        x, y = data(40, sizes, seed=i)
        torch.testing.assert_close(step(x, y), eager_step(ref, nn.BCEWithLogitsLoss(), ref_opt, x, y))
    assert_same_training(ref, ref_opt, step)
    assert torch.equal(model[2].weight, frozen) and model[2].weight.grad is None
    assert extra.grad is None and ref_extra.grad is None
    assert model[2].weight not in opt.state  # no state for a frozen parameter
    assert counter.calls == 1


def test_shared_weight_runs_eager() -> None:
    """A weight shared by two layers gets the sum of both gradients and one update, as in eager."""
    ref = reference_mlp([8, 8, 8, 1])
    ref[2].weight = ref[0].weight
    model = copy.deepcopy(ref)
    assert model[2].weight is model[0].weight
    ref_opt, opt = torch.optim.Adam(ref.parameters(), lr=1e-2), torch.optim.Adam(model.parameters(), lr=1e-2)
    step = TrainStep(model, nn.BCEWithLogitsLoss(), opt)
    for i in range(3):
        x, y = data(8, [8, 8, 8, 1], seed=i)
        torch.testing.assert_close(step(x, y), eager_step(ref, nn.BCEWithLogitsLoss(), ref_opt, x, y))
    assert_same_training(ref, ref_opt, step)


def test_trainable_param_outside_optimizer_runs_eager() -> None:
    """Eager would accumulate into such a parameter's .grad: the step runs the eager lines."""
    sizes = [10, 6, 1]
    ref = reference_mlp(sizes)
    model = copy.deepcopy(ref)
    ref_opt = torch.optim.SGD(list(ref.parameters())[:2], lr=0.1)
    step = TrainStep(model, nn.BCEWithLogitsLoss(), torch.optim.SGD(list(model.parameters())[:2], lr=0.1))
    counter = EagerCounter(step)
    for i in range(3):
        x, y = data(8, sizes, seed=i)
        torch.testing.assert_close(step(x, y), eager_step(ref, nn.BCEWithLogitsLoss(), ref_opt, x, y))
    assert_same_training(ref, ref_opt, step)
    assert counter.calls == 3


def test_scheduler_and_switching_with_eager() -> None:
    """An LR scheduler between steps, and eager steps mixed in at any point."""
    sizes = [12, 10, 1]
    ref, ref_opt, step = twins(sizes, OPTIMIZERS["adam"])
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.5)
    sched = torch.optim.lr_scheduler.StepLR(step.optimizer, step_size=2, gamma=0.5)
    loss_fn = nn.BCEWithLogitsLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        for i in range(8):
            x, y = data(16, sizes, seed=i)
            expected = eager_step(ref, loss_fn, ref_opt, x, y)
            # Every third step: the user's own eager step on the TrainStep's model and optimizer.
            got = eager_step(step.model, step.loss_fn, step.optimizer, x, y) if i % 3 == 2 else step(x, y)
            torch.testing.assert_close(got, expected)
            ref_sched.step()
            sched.step()
    assert step.optimizer.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] == 1e-2 * 0.5**4
    assert_same_training(ref, ref_opt, step)


def _reset_state(opt: torch.optim.Optimizer) -> None:
    opt.state.clear()


def _replace_state_dict(opt: torch.optim.Optimizer) -> None:
    p = opt.param_groups[0]["params"][0]
    opt.state[p] = {k: v.clone() * 0.5 for k, v in opt.state[p].items()}


def _replace_state_tensor(opt: torch.optim.Optimizer) -> None:
    p = opt.param_groups[0]["params"][1]
    opt.state[p]["exp_avg"] = torch.zeros_like(opt.state[p]["exp_avg"])


def _reload_state(opt: torch.optim.Optimizer) -> None:
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))


def _new_betas(opt: torch.optim.Optimizer) -> None:
    opt.param_groups[0]["betas"] = (0.5, 0.9)


def _amsgrad_on(opt: torch.optim.Optimizer) -> None:
    opt.param_groups[0]["amsgrad"] = True


def _new_lr(opt: torch.optim.Optimizer) -> None:
    opt.param_groups[0]["lr"] = 0.003


def _swap_in_group(opt: torch.optim.Optimizer) -> None:
    params = opt.param_groups[0]["params"]
    opt.param_groups[0]["params"] = params[:2]
    opt.add_param_group({"params": params[2:], "lr": 0.02})


# Changes between two fused steps of one TrainStep, made to the model (m) and
# optimizer (o) of the TrainStep and of the eager twin alike.
PLAN_CHANGES: dict[str, Callable[[nn.Module, torch.optim.Optimizer], object]] = {
    "freeze": lambda m, o: m[0].weight.requires_grad_(False),
    "new-param-object": lambda m, o: setattr(m[2], "bias", nn.Parameter(m[2].bias.detach() + 0.1)),
    "replaced-layer": lambda m, o: m.__setitem__(2, copy.deepcopy(m[2])),
    "data-non-contiguous": lambda m, o: setattr(m[2].weight, "data", m[2].weight.detach().t().contiguous().t()),
    "data-same-shape": lambda m, o: setattr(m[0].weight, "data", m[0].weight.detach() * 0.5),
    "to-float64": lambda m, o: (m.double(), _reset_state(o)),  # float32 state would fail eager's update
    "state-cleared": lambda m, o: _reset_state(o),
    "state-dict-replaced": lambda m, o: _replace_state_dict(o),
    "state-tensor-replaced": lambda m, o: _replace_state_tensor(o),
    "optimizer-reloaded": lambda m, o: _reload_state(o),
    "lr": lambda m, o: _new_lr(o),
    "betas": lambda m, o: _new_betas(o),
    "amsgrad": lambda m, o: _amsgrad_on(o),
    "regrouped": lambda m, o: _swap_in_group(o),
}


@pytest.mark.parametrize("in_cpp", [True, False], ids=["runner", "python-plan"])
@pytest.mark.parametrize("change", list(PLAN_CHANGES))
def test_plan_of_the_last_step_is_not_reused_after_a_change(change: str, in_cpp: bool) -> None:
    """TrainStep reuses the previous step's plan while what it was read from is
    unchanged: a change to the model's parameters or the optimizer's groups,
    options or state between two steps gives the eager loop's training (or
    its error). Both ways a plan is kept: as a C++ StepRunner, and as the Python
    plan (BCE's pos_weight makes no runner: its pattern follows the batch)."""
    sizes = [12, 10, 3]
    kw = {} if in_cpp else {"pos_weight": torch.tensor([1.5, 0.5, 2.0])}
    ref, ref_opt, step = twins(sizes, OPTIMIZERS["adam"], **kw)
    loss_fn = nn.BCEWithLogitsLoss(**kw)
    dtype = torch.float32
    for i in range(6):
        if i == 2:
            assert (step._runner is not None) == in_cpp and (step._last_plan is not None)
        if i == 3:
            PLAN_CHANGES[change](ref, ref_opt)
            PLAN_CHANGES[change](step.model, step.optimizer)
            dtype = ref[0].weight.dtype
        x, y = data(16, sizes, seed=i, dtype=dtype)
        try:
            expected = eager_step(ref, loss_fn, ref_opt, x, y)
        except Exception as e:  # amsgrad turned on: torch's Adam has no max_exp_avg_sq to read
            with pytest.raises(type(e)):
                step(x, y)
            return
        torch.testing.assert_close(step(x, y), expected)
    assert_same_training(ref, ref_opt, step)


class _Calls:
    """A hook that counts its calls (returns None: changes nothing), for one
    object's calls when ``of`` is given (a global hook sees the eager twin's too)."""

    def __init__(self, of: object = None) -> None:
        self.n = 0
        self.of = of

    def __call__(self, *args: object, **kwargs: object) -> None:
        if self.of is None or args[0] is self.of:
            self.n += 1


# Changes between two fused steps that must make the next steps run as eager
# ones (a hook must fire), applied to a TrainStep after its plan went to C++.
# Each returns the counter of a hook that must have fired once per later step,
# or None.
def _global_forward_hook(step: TrainStep) -> _Calls:
    calls = _Calls(of=step.model[0])
    handle = torch.nn.modules.module.register_module_forward_hook(calls)
    step._test_cleanup = handle.remove  # type: ignore[attr-defined]
    return calls


def _global_optimizer_hook(step: TrainStep) -> _Calls:
    calls = _Calls(of=step.optimizer)
    handle = _optim_module.register_optimizer_step_post_hook(calls)
    step._test_cleanup = handle.remove  # type: ignore[attr-defined]
    return calls


def _hook(register: Callable[[_Calls], object]) -> Callable[[TrainStep], _Calls]:
    def add(step: TrainStep) -> _Calls:
        calls = _Calls()
        register(calls)
        return calls

    return add


HOOKS_ADDED: dict[str, Callable[[TrainStep], _Calls]] = {
    "model-forward-hook": lambda s: _hook(s.model.register_forward_hook)(s),
    "linear-forward-pre-hook": lambda s: _hook(s.model[0].register_forward_pre_hook)(s),
    "relu-forward-hook": lambda s: _hook(s.model[1].register_forward_hook)(s),
    "loss-forward-hook": lambda s: _hook(s.loss_fn.register_forward_hook)(s),
    "optimizer-step-pre-hook": lambda s: _hook(s.optimizer.register_step_pre_hook)(s),
    "global-forward-hook": _global_forward_hook,
    "global-optimizer-hook": _global_optimizer_hook,
}


@pytest.mark.parametrize("hook", list(HOOKS_ADDED))
def test_hook_added_between_steps_runs_the_eager_step(hook: str) -> None:
    sizes = [12, 10, 1]
    ref, ref_opt, step = twins(sizes, OPTIMIZERS["adam"])
    loss_fn = nn.BCEWithLogitsLoss()
    calls = None
    try:
        for i in range(6):
            if i == 3:
                calls = HOOKS_ADDED[hook](step)
            x, y = data(16, sizes, seed=i)
            expected = eager_step(ref, loss_fn, ref_opt, x, y)
            torch.testing.assert_close(step(x, y), expected)
    finally:
        getattr(step, "_test_cleanup", lambda: None)()
    assert calls is not None and calls.n >= 3  # the hook saw every step after it was added
    assert_same_training(ref, ref_opt, step)


def test_options_changed_between_steps() -> None:
    """The loss's options, TrainStep's own attributes and a new optimizer between
    steps: the steps after them train as the eager loop with the same changes."""
    sizes = [12, 10, 2]
    ref, ref_opt, step = twins(sizes, OPTIMIZERS["sgd-momentum"])
    loss_fn = nn.BCEWithLogitsLoss()
    clip = None
    for i in range(12):
        if i == 3:
            loss_fn.reduction = step.loss_fn.reduction = "sum"
        if i == 5:
            step.max_grad_norm = clip = 0.05
        if i == 7:
            loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0, 0.5]))
            step.loss_fn = torch_fastmlp.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0, 0.5]))
        if i == 9:
            loss_fn = nn.MSELoss()
            step.loss_fn = nn.MSELoss()
        if i == 10:
            ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
            step.optimizer = torch.optim.Adam(step.model.parameters(), lr=1e-2)
        x, y = data(16, sizes, seed=i)
        torch.testing.assert_close(step(x, y), eager_step(ref, loss_fn, ref_opt, x, y, clip=clip))
    assert_same_training(ref, ref_opt, step)


def test_contexts_and_inputs_after_the_plan_went_to_cpp() -> None:
    """After steps that made the plan's C++ runner: no_grad, a tensor subclass, a
    TorchFunctionMode and autocast are served as eager would serve them, a short last batch and a
    non-contiguous input train as eager, a bad target raises torch's error with
    the gradients cleared as eager's zero_grad leaves them."""
    sizes = [10, 6, 3]
    ref, ref_opt, step = twins(sizes, OPTIMIZERS["adam"])
    loss_fn = nn.BCEWithLogitsLoss()
    for i in range(3):
        x, y = data(8, sizes, seed=i)
        torch.testing.assert_close(step(x, y), eager_step(ref, loss_fn, ref_opt, x, y))
    assert step._runner is not None
    with torch.no_grad(), pytest.raises(RuntimeError, match="does not require grad"):
        step(x, y)
    x, y = data(5, sizes, seed=7)  # a short batch
    torch.testing.assert_close(step(x, y), eager_step(ref, loss_fn, ref_opt, x, y))
    wide, y = data(5, [20, 6, 3], seed=8)
    x = wide[:, ::2]  # every other column: not contiguous
    torch.testing.assert_close(step(x, y), eager_step(ref, loss_fn, ref_opt, x, y))

    class Tagged(torch.Tensor):
        calls = 0

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001
            cls.calls += 1
            return super().__torch_function__(func, types, args, kwargs)

    x, y = data(8, sizes, seed=9)
    torch.testing.assert_close(step(x.as_subclass(Tagged), y), eager_step(ref, loss_fn, ref_opt, x, y))
    assert Tagged.calls > 0  # the subclass saw the step's functions: not run past it in C++

    class Seen(torch.overrides.TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            self.calls += 1
            return func(*args, **(kwargs or {}))

    x, y = data(8, sizes, seed=10)
    expected = eager_step(ref, loss_fn, ref_opt, x, y)
    with Seen() as seen:
        got = step(x, y)
    torch.testing.assert_close(got, expected)
    assert seen.calls > 0  # the mode saw the step's functions: not run past it in C++
    x, y = data(8, sizes, seed=11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = eager_step(ref, loss_fn, ref_opt, x, y)
        got = step(x, y)
    torch.testing.assert_close(got, expected)
    assert_same_training(ref, ref_opt, step)
    with pytest.raises(ValueError, match="must be the same as input size"):
        step(x, torch.zeros(8, 4))
    assert all(p.grad is None for p in step.model.parameters())  # zero_grad(), as the eager lines' first


def test_cross_entropy_index_error_after_the_plan_went_to_cpp() -> None:
    """A class index out of range in a step served in C++ raises torch's
    IndexError, with the gradients as the eager lines leave them."""
    sizes = [10, 6, 4]
    model = torch_fastmlp.Sequential(*reference_mlp(sizes))
    step = TrainStep(model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    x = torch.randn(8, 10)
    for _ in range(3):
        step(x, torch.randint(0, 4, (8,)))
    assert step._runner is not None
    with pytest.raises(IndexError):
        step(x, torch.full((8,), 4))
    assert all(p.grad is None for p in model.parameters())


def test_plan_reused_while_nothing_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps after the first that made the state reuse one plan: in Python (a
    pos_weight loss makes no runner) and as one C++ runner."""
    sizes = [12, 10, 1]
    _, _, step = twins(sizes, OPTIMIZERS["adam"], pos_weight=torch.tensor([2.0]))
    x, y = data(16, sizes)
    step(x, y)
    step(x, y)
    plan = step._last_plan
    made = []
    original = TrainStep._plan_params
    monkeypatch.setattr(TrainStep, "_plan_params", lambda self, p: made.append(p) or original(self, p))
    for _ in range(3):
        step(x, y)
    assert step._last_plan is plan and not made and step._runner is None
    _, _, step = twins(sizes, OPTIMIZERS["adam"])
    for _ in range(2):
        step(x, y)
    runner = step._runner
    made.clear()
    for _ in range(3):
        step(x, y)
    assert step._runner is runner and runner.steps == 3 and not made
    assert copy.deepcopy(step)._last_plan is None and copy.deepcopy(step)._runner is None  # copies plan afresh


def test_runner_options_changed_in_place_and_devices() -> None:
    """Options that can change while they stay the same object (betas as a list,
    a tensor flag) make no runner; nor does a meta-device step (shapes only)."""
    sizes = [12, 10, 1]
    ref, ref_opt, step = twins(sizes, OPTIMIZERS["adam"])
    for opt in (ref_opt, step.optimizer):
        opt.param_groups[0]["betas"] = [0.9, 0.999]
    loss_fn = nn.BCEWithLogitsLoss()
    for i in range(5):
        if i == 3:
            ref_opt.param_groups[0]["betas"][0] = step.optimizer.param_groups[0]["betas"][0] = 0.5
        x, y = data(16, sizes, seed=i)
        torch.testing.assert_close(step(x, y), eager_step(ref, loss_fn, ref_opt, x, y))
    assert step._runner is None
    assert_same_training(ref, ref_opt, step)
    model = torch_fastmlp.Sequential(*reference_mlp(sizes)).to("meta")
    step = TrainStep(model, nn.MSELoss(), torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = torch.empty(16, 12, device="meta"), torch.empty(16, 1, device="meta")
    for _ in range(3):
        assert step(x, y).device.type == "meta"
    assert step._runner is None


@pytest.mark.parametrize("when", [0, 3], ids=["from-the-start", "after-the-runner"])
def test_parameter_tensor_hooks_run_the_eager_step(when: int) -> None:
    """A trainable parameter's tensor hooks (register_hook, which may change its
    gradient, and register_post_accumulate_grad_hook) run in the autograd
    engine: the steps run the eager lines, and the hooks see every step."""
    sizes = [12, 10, 1]
    ref, ref_opt, step = twins(sizes, OPTIMIZERS["sgd-momentum"])
    loss_fn = nn.BCEWithLogitsLoss()
    seen = []
    for i in range(6):
        if i == when:
            for model in (ref, step.model):
                model[0].weight.register_hook(lambda g: g * 2.0)
            step.model[2].bias.register_post_accumulate_grad_hook(lambda p: seen.append(1))
        x, y = data(16, sizes, seed=i)
        torch.testing.assert_close(step(x, y), eager_step(ref, loss_fn, ref_opt, x, y))
    assert len(seen) == 6 - when
    assert_same_training(ref, ref_opt, step)


def test_sparse_input_runs_the_eager_step() -> None:
    sizes = [12, 10, 1]
    ref, ref_opt, step = twins(sizes, OPTIMIZERS["adam"])
    loss_fn = nn.BCEWithLogitsLoss()
    for i in range(4):
        x, y = data(16, sizes, seed=i)
        x = x.relu().to_sparse() if i % 2 else x
        torch.testing.assert_close(step(x, y), eager_step(ref, loss_fn, ref_opt, x, y))
    assert_same_training(ref, ref_opt, step)


def test_runner_in_a_reference_cycle_is_collected() -> None:
    """A model that holds its own TrainStep (a cycle through the C++ runner) is
    freed by the garbage collector like any Python cycle."""
    import gc
    import weakref

    sizes = [12, 10, 1]
    _, _, step = twins(sizes, OPTIMIZERS["sgd-momentum"])
    x, y = data(16, sizes)
    for _ in range(3):
        step(x, y)
    assert step._runner is not None
    step.model.trainer = step
    alive = weakref.ref(step.model)
    del step
    gc.collect()
    assert alive() is None


def test_new_owner_attribute_drops_the_runner() -> None:
    """Assigning TrainStep's model, loss, optimizer or max_grad_norm drops the
    runner and plan at once (they would hold the old objects until the next step)."""
    sizes = [12, 10, 1]
    _, _, step = twins(sizes, OPTIMIZERS["adam"])
    x, y = data(16, sizes)
    for _ in range(3):
        step(x, y)
    assert step._runner is not None and step._last_plan is not None
    step.optimizer = torch.optim.Adam(step.model.parameters())
    assert step._runner is None and step._last_plan is None


def test_checkpoint_resume(tmp_path) -> None:
    sizes = [12, 10, 1]
    ref, ref_opt, step = twins(sizes, OPTIMIZERS["adamw-amsgrad-wd"])
    loss_fn = nn.BCEWithLogitsLoss()
    for i in range(3):
        x, y = data(16, sizes, seed=i)
        eager_step(ref, loss_fn, ref_opt, x, y)
        step(x, y)
    torch.save({"model": step.model.state_dict(), "opt": step.optimizer.state_dict()}, tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt")
    model = torch_fastmlp.Sequential(*copy.deepcopy(list(reference_mlp(sizes, seed=5))))
    model.load_state_dict(ck["model"])
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    opt.load_state_dict(ck["opt"])
    resumed = TrainStep(model, nn.BCEWithLogitsLoss(), opt)
    counter = EagerCounter(resumed)
    for i in range(3, 6):
        x, y = data(16, sizes, seed=i)
        torch.testing.assert_close(resumed(x, y), eager_step(ref, loss_fn, ref_opt, x, y))
    assert_same_training(ref, ref_opt, resumed)
    assert counter.calls == 0  # the loaded state is used as it is


def test_unsupported_runs_eager() -> None:
    """Another optimizer, a tensor lr, a hook, an unreduced loss: the eager lines, same results and errors."""
    sizes = [10, 6, 1]
    cases = [
        lambda p: torch.optim.RMSprop(p, lr=1e-2),
        lambda p: torch.optim.Adam(p, lr=torch.tensor(1e-2)),
        lambda p: torch.optim.SGD(p, lr=torch.tensor(0.1), momentum=0.5),
    ]
    for make_opt in cases:
        ref, ref_opt, step = twins(sizes, make_opt)
        counter = EagerCounter(step)
        for i in range(3):
            x, y = data(8, sizes, seed=i)
            torch.testing.assert_close(step(x, y), eager_step(ref, nn.BCEWithLogitsLoss(), ref_opt, x, y))
        assert_same_training(ref, ref_opt, step)
        assert counter.calls == 3
    ref, ref_opt, step = twins(sizes, OPTIMIZERS["adam"])
    seen = []
    step.optimizer.register_step_post_hook(lambda opt, args, kwargs: seen.append(1))
    step(*data(8, sizes))
    step(*data(8, sizes))
    assert len(seen) == 2
    step = TrainStep(copy.deepcopy(ref), nn.BCEWithLogitsLoss(reduction="none"), torch.optim.SGD(ref.parameters()))
    with pytest.raises(RuntimeError, match="grad can be implicitly created only for scalar outputs"):
        step(*data(8, sizes))


def test_input_grad_and_no_grad_run_eager() -> None:
    """An input that requires grad gets its .grad, and under no_grad backward fails, as in eager."""
    sizes = [10, 6, 1]
    ref, ref_opt, step = twins(sizes, OPTIMIZERS["adam"])
    x, y = data(8, sizes)
    step(x, y)
    eager_step(ref, nn.BCEWithLogitsLoss(), ref_opt, x, y)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.testing.assert_close(step(xa, y), eager_step(ref, nn.BCEWithLogitsLoss(), ref_opt, xb, y))
    torch.testing.assert_close(xa.grad, xb.grad)
    assert_same_training(ref, ref_opt, step)
    with torch.no_grad(), pytest.raises(RuntimeError, match="does not require grad"):
        step(x, y)


def test_updated_tensors_count_as_modified_in_place() -> None:
    """A graph that saved a parameter before the step fails in backward, as in eager."""
    sizes = [10, 6, 1]
    _, _, step = twins(sizes, OPTIMIZERS["adam"])
    x, y = data(8, sizes)
    step(x, y)
    model = step.model
    versions = [p._version for p in model.parameters()]
    saved = (model[0].weight ** 2).sum()  # pow saves the weight for backward
    step(x, y)
    assert all(p._version > v for p, v in zip(model.parameters(), versions, strict=True))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()


def test_bad_target_gives_torchs_error() -> None:
    sizes = [10, 6, 2]
    _, _, step = twins(sizes, OPTIMIZERS["sgd"])
    x, _ = data(8, sizes)
    with pytest.raises(ValueError, match="must be the same as input size"):
        step(x, torch.zeros(8, 3))


@pytest.mark.parametrize("opt_name", ["sgd-momentum", "adam"])
def test_bitwise_across_thread_counts(opt_name: str) -> None:
    sizes = [64, 32, 1]
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        _, _, step = twins(sizes, OPTIMIZERS[opt_name])
        losses = [step(*data(300, sizes, seed=i)) for i in range(3)]
        results.append([*losses, *(p.detach().clone() for p in step.model.parameters())])
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


def profiled_fastmlp_ops(step: TrainStep, x: torch.Tensor, y: torch.Tensor) -> set[str]:
    """The fastmlp ops the dispatcher records while ``step(x, y)`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(x, y)
    return {e.name for e in prof.events() if e.name.startswith("fastmlp::")}


FUSED_UPDATE_CASES = [
    ([300, 60, 20, 1], 200),  # 4 row partials, the reduction in parallel
    ([300, 60, 20, 1], 4),  # one partial: the update on the calling thread
    ([700, 100, 1], 4),  # one partial, 70k trainable elements: the update in parallel
]


@pytest.mark.parametrize("opt_name", ["sgd", "sgd-momentum", "adam", "adam-amsgrad-maximize", "adamw-amsgrad-wd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("sizes", "batch"), FUSED_UPDATE_CASES)
def test_fused_update_is_the_separate_update_bitwise(opt_name: str, dtype: torch.dtype, sizes, batch) -> None:
    """The CPU step runs a small batch's update inside its gradient reduction
    (the profiler then records no mlp_loss_step or optimizer_step inside it);
    it equals the gradients (mlp_loss_step) followed by optimizer_step bit for
    bit, at every thread count, a frozen layer without bias included."""
    from torch_fastmlp._ops import ops

    results = []
    default_threads = torch.get_num_threads()
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        try:
            _, _, step = twins(sizes, OPTIMIZERS[opt_name], dtype=dtype)
            step.model[2].bias = None  # a layer without bias
            step.model[2].weight.requires_grad_(False)  # and a frozen one
            step.optimizer = OPTIMIZERS[opt_name]([p for p in step.model.parameters() if p.requires_grad])
            twin = copy.deepcopy(step)
            for i in range(3):
                x, y = data(batch, sizes, seed=i, dtype=dtype)
                if i == 0:
                    step(x, y)  # a fresh optimizer: torch makes its state
                else:
                    assert profiled_fastmlp_ops(step, x, y) == {"fastmlp::mlp_train_step"}
                plan = twin._plan(x, y)
                if plan is None or plan.fresh:
                    twin(x, y)
                    continue
                loss_args = twin._loss_args(plan.loss, y.shape)
                with torch.no_grad():
                    _, _, gw, gb = ops.mlp_loss_step(x, y, plan.weights, plan.biases, plan.chain.last_relu,
                                                     *loss_args, False, plan.weight_mask, plan.bias_mask)  # fmt: skip
                    twin._set_grads(plan, gw, gb)
                    grads = [p.grad for p in plan.trainable]
                    ops.optimizer_step(plan.trainable, grads, plan.state, plan.kind, plan.hyper, None)
            for p, q in zip(step.model.parameters(), twin.model.parameters(), strict=True):
                assert torch.equal(p, q)
                assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)
            ours, theirs = step.optimizer.param_groups[0]["params"], twin.optimizer.param_groups[0]["params"]
            for p, q in zip(ours, theirs, strict=True):
                for key, v in step.optimizer.state[p].items():
                    assert torch.equal(v, twin.optimizer.state[q][key]), key
            results.append([p.detach().clone() for p in step.model.parameters()])
        finally:
            torch.set_num_threads(default_threads)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize(("sizes", "batch"), FUSED_UPDATE_CASES)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fused_update_that_cannot_run_writes_nothing(sizes, batch: int, threads: int) -> None:
    """The update's checks come after the partials, inside the step's one
    parallel region, on whichever worker sets it up: a state tensor of the wrong
    shape raises torch's RuntimeError from the op, and no parameter or optimizer
    state tensor (step counts included) has moved."""
    from torch_fastmlp._ops import ops

    torch.set_num_threads(threads)  # (conftest's autouse fixture restores it)
    _, _, step = twins(sizes, OPTIMIZERS["adam"])
    x, y = data(batch, sizes)
    step(x, y)  # a fresh optimizer: torch makes its state
    plan = step._plan(x, y)
    state = list(plan.state)
    state[-3] = torch.zeros(3)  # the last parameter's exp_avg
    before = [t.clone() for t in (*step.model.parameters(), *plan.state)]
    with pytest.raises(RuntimeError, match="exp_avg"):
        ops.mlp_train_step(x, y, plan.weights, plan.biases, plan.chain.last_relu,
                           *step._loss_args(plan.loss, y.shape), plan.weight_mask, plan.bias_mask,
                           state, plan.kind, plan.hyper, None)  # fmt: skip
    for a, b in zip(before, (*step.model.parameters(), *plan.state), strict=True):
        assert torch.equal(a, b)
    step(x, y)  # and the next step runs as usual


def test_update_apart_where_the_fused_one_does_not_serve() -> None:
    """Clipping, or a batch past the row partials, runs the gradients and then
    the update (the profiler sees both ops inside the step)."""
    sizes = [50, 20, 1]
    for clip, batch in ((1.0, 64), (None, 300)):
        ref, ref_opt, step = twins(sizes, OPTIMIZERS["adam"])
        step.max_grad_norm = clip
        x, y = data(batch, sizes)
        for _ in range(2):
            eager_step(ref, torch.nn.BCEWithLogitsLoss(), ref_opt, x, y, clip=clip)
            seen = profiled_fastmlp_ops(step, x, y)
        assert {"fastmlp::mlp_train_step", "fastmlp::mlp_loss_step"} <= seen
        assert_same_training(ref, ref_opt, step)


# --- epoch ------------------------------------------------------------------


def loader_epoch(model, loss_fn, opt, x, y, batch_size, clip=None, **kw) -> torch.Tensor:
    loader = DataLoader(TensorDataset(x, y), batch_size, **kw)
    return torch.stack([eager_step(model, loss_fn, opt, xb, yb, clip=clip) for xb, yb in loader])


@pytest.mark.parametrize(
    "kw",
    [
        {"shuffle": True, "generator": "g"},
        {"shuffle": True},
        {"shuffle": False},
        {"shuffle": True, "generator": "g", "drop_last": True},
        {"shuffle": False, "drop_last": True},
    ],
    ids=["gen", "global-rng", "no-shuffle", "gen-drop-last", "no-shuffle-drop-last"],
)
@pytest.mark.parametrize("opt_name", ["sgd-momentum", "adam"])
def test_epoch_matches_dataloader_loop(opt_name: str, kw: dict) -> None:
    sizes = [20, 12, 1]
    ref, ref_opt, step = twins(sizes, OPTIMIZERS[opt_name])
    x, y = data(203, sizes)
    loss_fn = nn.BCEWithLogitsLoss()
    for epoch in range(2):  # the first epoch's first batch makes the optimizer state eagerly
        kw_ref, kw_got = dict(kw), dict(kw)
        if kw.get("generator"):
            kw_ref["generator"] = torch.Generator().manual_seed(epoch)
            kw_got["generator"] = torch.Generator().manual_seed(epoch)
        torch.manual_seed(10 + epoch)
        expected = loader_epoch(ref, loss_fn, ref_opt, x, y, 32, **kw_ref)
        ref_global = torch.get_rng_state()
        torch.manual_seed(10 + epoch)
        got = step.epoch(x, y, 32, **kw_got)
        assert torch.equal(torch.get_rng_state(), ref_global)
        if kw.get("generator"):
            assert torch.equal(kw_got["generator"].get_state(), kw_ref["generator"].get_state())
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-6)
    assert_same_training(ref, ref_opt, step)


def test_epoch_fallback_and_edge_cases() -> None:
    sizes = [8, 4, 1]
    ref, ref_opt, step = twins(sizes, OPTIMIZERS["sgd"])
    x, y = data(10, sizes)
    # A batch larger than the data with drop_last: no step at all.
    assert step.epoch(x, y, 16, drop_last=True).shape == (0,)
    assert all(p.grad is None for p in step.model.parameters())
    # torch's own errors for what DataLoader refuses.
    with pytest.raises(ValueError, match="batch_size should be a positive integer"):
        step.epoch(x, y, 0)
    with pytest.raises(ValueError, match="num_samples should be a positive integer"):
        step.epoch(x[:0], y[:0], 4)
    # 1-D targets: the loss's own error, from the DataLoader loop.
    with pytest.raises(ValueError, match="must be the same as input size"):
        step.epoch(x, y[:, 0], 4)


def test_op_registered_and_opcheck() -> None:
    sizes = [6, 5, 1]
    _, _, step = twins(sizes, OPTIMIZERS["adam"])
    x, y = data(9, sizes)
    step(x, y)  # makes the state
    plan = step._plan(x, y)
    assert plan is not None and not plan.fresh
    args = (x, y, plan.weights, plan.biases, False, 0, None, None, 1, -100, 0.0, plan.weight_mask, plan.bias_mask,
            plan.state, plan.kind, plan.hyper, None)  # fmt: skip
    torch.library.opcheck(torch.ops.fastmlp.mlp_train_step.default, args,
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip


def test_train_op_runs_below_autograd_in_grad_mode() -> None:
    """The training ops are not differentiable: under grad mode they update the
    parameters (which require grad) as under no_grad, record no graph, return
    detached results and count the updates as in-place modifications."""
    sizes = [6, 5, 1]
    results = []
    for grad_mode in (False, True):
        _, _, step = twins(sizes, OPTIMIZERS["adam"])
        x, y = data(9, sizes)
        step(x, y)
        plan = step._plan(x, y)
        versions = [p._version for p in plan.trainable]
        args = (x, y, plan.weights, plan.biases, False, 0, None, None, 1, -100, 0.0, plan.weight_mask,
                plan.bias_mask, plan.state, plan.kind, plan.hyper, None)  # fmt: skip
        with torch.set_grad_enabled(grad_mode):
            loss, grad_w, grad_b = torch.ops.fastmlp.mlp_train_step(*args)
        assert all(not t.requires_grad and t.grad_fn is None for t in (loss, *grad_w, *grad_b))
        assert all(p._version > v for p, v in zip(plan.trainable, versions, strict=True))
        results.append([loss, *[p.detach().clone() for p in plan.trainable]])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_update_and_epoch_ops_opcheck() -> None:
    sizes = [6, 5, 1]
    _, _, step = twins(sizes, OPTIMIZERS["sgd-momentum"])
    x, y = data(9, sizes)
    step(x, y)  # makes the momentum buffers
    plan = step._plan(x, y)
    assert plan is not None and not plan.fresh
    grads = [p.grad.clone() for p in plan.trainable]
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(
        torch.ops.fastmlp.optimizer_step.default,
        (plan.trainable, grads, plan.state, plan.kind, plan.hyper, 1.0),
        test_utils=utils,
    )
    args = (x, y, torch.randperm(9), 4, False, plan.weights, plan.biases, False, 0, None, None, 1, -100, 0.0,
            plan.weight_mask, plan.bias_mask, plan.state, plan.kind, plan.hyper, None)  # fmt: skip
    torch.library.opcheck(torch.ops.fastmlp.mlp_train_epoch.default, args, test_utils=utils)


@pytest.mark.parametrize("seed", range(30))
def test_random_configurations_match_eager(seed: int) -> None:
    """Random chains (widths, biases, final ReLU, frozen parameters), losses and optimizer options."""
    rng = torch.Generator().manual_seed(seed)

    def pick(*options):
        return options[int(torch.randint(len(options), (1,), generator=rng))]

    depth = pick(1, 2, 3)
    sizes = [int(torch.randint(1, 40, (1,), generator=rng)) for _ in range(depth + 1)]
    ref = reference_mlp(sizes, bias=[pick(True, False) for _ in range(depth)], last_relu=pick(False, True), seed=seed)
    for p in ref.parameters():
        if pick(True, True, True, False):
            continue
        p.requires_grad_(False)
    if not any(p.requires_grad for p in ref.parameters()):
        next(ref.parameters()).requires_grad_(True)
    model = torch_fastmlp.Sequential(*copy.deepcopy(list(ref)))
    if pick(True, False):
        kw = {"lr": pick(1e-2, 1e-3), "momentum": pick(0.0, 0.9), "weight_decay": pick(0.0, 0.01),
              "maximize": pick(False, True)}  # fmt: skip
        kw["nesterov"] = kw["momentum"] > 0 and pick(False, True)
        kw["dampening"] = 0.0 if kw["nesterov"] else pick(0.0, 0.5)
        make = lambda params: torch.optim.SGD(params, **kw)  # noqa: E731
    else:
        cls = pick(torch.optim.Adam, torch.optim.AdamW)
        kw = {"lr": pick(1e-2, 1e-3), "betas": pick((0.9, 0.999), (0.5, 0.9)), "weight_decay": pick(0.0, 0.1),
              "amsgrad": pick(False, True), "maximize": pick(False, True)}  # fmt: skip
        make = lambda params: cls(params, **kw)  # noqa: E731
    trainable = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    ref_opt, opt = make(trainable(ref)), make(trainable(model))
    loss_kw: dict = {"reduction": pick("mean", "sum")}
    classes = sizes[-1]
    loss_name = pick("bce", "mse", "ce")
    if loss_name == "bce":
        if pick(True, False):
            loss_kw["pos_weight"] = torch.rand(classes, generator=rng) * 2
        make_loss, make_target = nn.BCEWithLogitsLoss, lambda rows: torch.rand(rows, classes, generator=rng)
    elif loss_name == "mse":
        make_loss, make_target = nn.MSELoss, lambda rows: torch.randn(rows, classes, generator=rng)
    else:
        loss_kw["label_smoothing"] = pick(0.0, 0.2)
        if pick(True, False):
            loss_kw["weight"] = torch.rand(classes, generator=rng) + 0.5
        probabilities = pick(True, False)
        if not probabilities:  # torch refuses an ignore_index >= 0 with probabilities
            loss_kw["ignore_index"] = pick(-100, 0)

        def make_target(rows: int) -> torch.Tensor:
            if probabilities:
                return torch.softmax(torch.randn(rows, classes, generator=rng), 1)
            return torch.randint(0, classes, (rows,), generator=rng)

        make_loss = nn.CrossEntropyLoss
    clip = pick(None, 0.1)
    step = TrainStep(model, make_loss(**loss_kw), opt, max_grad_norm=clip)
    counter = EagerCounter(step)
    for i in range(4):
        x, _ = data(int(torch.randint(1, 300, (1,), generator=rng)), sizes, seed=100 * seed + i)
        y = make_target(x.shape[0])
        expected = eager_step(ref, make_loss(**loss_kw), ref_opt, x, y, clip=clip)
        torch.testing.assert_close(step(x, y), expected, rtol=1e-4, atol=1e-5, equal_nan=True)
    assert_same_training(ref, ref_opt, step, rtol=1e-4, atol=1e-5)
    assert counter.calls <= 1


@pytest.mark.parametrize("clip", [None, 0.1])
@pytest.mark.parametrize("opt_name", ["sgd-dampening-wd", "adam-amsgrad-maximize", "adamw"])
def test_device_steps_and_epoch_match_eager(device: str, opt_name: str, clip: float | None) -> None:
    """The same comparison on every device (CUDA: the fused chain kernel, the multi-tensor update)."""
    sizes = [784, 30, 1]
    ref = reference_mlp(sizes).to(device)
    model = torch_fastmlp.Sequential(*copy.deepcopy(list(ref)))
    make = OPTIMIZERS[opt_name]
    ref_opt, opt = make(list(ref.parameters())), make(list(model.parameters()))
    step = TrainStep(model, torch_fastmlp.BCEWithLogitsLoss(), opt, max_grad_norm=clip)
    counter = EagerCounter(step)
    loss_fn = nn.BCEWithLogitsLoss()
    for i in range(3):
        x, y = (t.to(device) for t in data(300, sizes, seed=i))
        torch.testing.assert_close(step(x, y), eager_step(ref, loss_fn, ref_opt, x, y, clip=clip), rtol=2e-5, atol=2e-6)
    x, y = (t.to(device) for t in data(500, sizes, seed=9))
    expected = loader_epoch(ref, loss_fn, ref_opt, x, y, 64, shuffle=True, generator=torch.Generator().manual_seed(3),
                            clip=clip)  # fmt: skip
    got = step.epoch(x, y, 64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-6)
    assert_same_training(ref, ref_opt, step)
    assert counter.calls == 1


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])  # adam: a fresh optimizer's first step runs eager
@pytest.mark.parametrize("drop_last", [False, True])
def test_epoch_callback_chunks_the_loop_with_the_same_results(opt_name: str, drop_last: bool) -> None:
    sizes = [10, 8, 1]
    _, _, plain = twins(sizes, OPTIMIZERS[opt_name])
    _, _, chunked = twins(sizes, OPTIMIZERS[opt_name])
    x, y = data(203, sizes)  # 13 batches of 16 (the last one 11 rows), 12 with drop_last
    calls: list[tuple[int, torch.Tensor]] = []
    for _ in range(2):
        expected = plain.epoch(x, y, 16, generator=torch.Generator().manual_seed(3), drop_last=drop_last)
        got = chunked.epoch(
            x, y, 16, generator=torch.Generator().manual_seed(3), drop_last=drop_last,
            callback=lambda done, losses: calls.append((done, losses)), callback_every=5,
        )  # fmt: skip
        assert torch.equal(got, expected)
    for p, q in zip(plain.model.parameters(), chunked.model.parameters(), strict=True):
        assert torch.equal(p, q) and torch.equal(p.grad, q.grad)
    last = 12 if drop_last else 13
    assert [done for done, _ in calls] == [5, 10, last] * 2
    assert [len(losses) for _, losses in calls] == [5, 5, last - 10] * 2
    assert torch.equal(torch.cat([losses for _, losses in calls[3:]]), expected)  # the second epoch's


def test_epoch_callback_on_the_dataloader_path_and_bad_every() -> None:
    sizes = [6, 5, 1]
    ref = reference_mlp(sizes)
    model = nn.Sequential(*copy.deepcopy(list(ref)), nn.Tanh())  # not one chain: the DataLoader loop runs
    step = TrainStep(model, nn.BCEWithLogitsLoss(), torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = data(30, sizes)
    calls: list[tuple[int, int]] = []
    losses = step.epoch(x, y, 4, shuffle=False, callback=lambda d, ls: calls.append((d, len(ls))), callback_every=3)
    assert calls == [(3, 3), (6, 3), (8, 2)] and losses.shape == (8,)
    with pytest.raises(ValueError, match="callback_every should be a positive integer"):
        step.epoch(x, y, 4, callback=print, callback_every=0)


GRAPH_OPTIMIZERS: dict[str, OptFactory] = {
    "sgd": OPTIMIZERS["sgd-dampening-wd"],
    "adam-capturable": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.01, amsgrad=True, capturable=True),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
}


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="needs a GPU and a build with the CUDA kernels")
@pytest.mark.parametrize("opt_name", list(GRAPH_OPTIMIZERS))
@pytest.mark.parametrize("loss_name", ["bce", "mse"])
def test_step_captured_in_a_cuda_graph(loss_name: str, opt_name: str) -> None:
    """With SGD, or Adam keeping its step count on the GPU (capturable=True, fused=True), a
    TrainStep runs its fused op under torch.cuda.graph capture (the kernels advance the count);
    replaying the graph trains as the eager loop does, step after step."""
    sizes = [784, 30, 1]
    ref = reference_mlp(sizes).cuda()
    model = torch_fastmlp.Sequential(*copy.deepcopy(list(ref)))
    make = GRAPH_OPTIMIZERS[opt_name]
    ref_opt, opt = make(list(ref.parameters())), make(list(model.parameters()))
    loss_fn = nn.BCEWithLogitsLoss() if loss_name == "bce" else nn.MSELoss()
    step = TrainStep(model, loss_fn, opt, max_grad_norm=0.5)
    batches = [tuple(t.cuda() for t in data(256, sizes, seed=i)) for i in range(6)]
    static_x, static_y = (t.clone() for t in batches[0])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up before capture, as torch.cuda.graph asks (it makes the state)
        for x, y in batches[:2]:
            torch.testing.assert_close(step(x, y), eager_step(ref, loss_fn, ref_opt, x, y, clip=0.5))
    torch.cuda.current_stream().wait_stream(side)
    counter = EagerCounter(step)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(static_x, static_y)
    assert counter.calls == 0  # the fused op was captured
    for x, y in batches[2:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        expected = eager_step(ref, loss_fn, ref_opt, x, y, clip=0.5)
        torch.testing.assert_close(static_loss, expected, rtol=2e-5, atol=2e-6)
    assert_same_training(ref, ref_opt, step)


def test_capturable_adam_off_the_gpu_raises_as_torch() -> None:
    _, _, step = twins([10, 8, 1], lambda p: torch.optim.Adam(p, capturable=True))
    x, y = data(16, [10, 8, 1])
    with pytest.raises(AssertionError, match="capturable=True"):
        step(x, y)
