"""TrainStep with MSELoss and CrossEntropyLoss against the eager training loop:
the same losses, parameters, gradients and optimizer state, step after step and
over whole epochs; torch's own path (and errors) for what the fused op does not
take."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import reference_mlp
from test_train_step import OPTIMIZERS, EagerCounter, assert_same_training, eager_step
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torch_fastmlp
from torch_fastmlp import TrainStep

# name -> (torch loss, torch_fastmlp loss, target kind)
LOSSES = {
    "mse-sum": (lambda: nn.MSELoss(reduction="sum"), lambda: torch_fastmlp.MSELoss(reduction="sum"), "real"),
    "mse-mean": (nn.MSELoss, torch_fastmlp.MSELoss, "real"),
    "ce": (nn.CrossEntropyLoss, torch_fastmlp.CrossEntropyLoss, "index"),
    "ce-sum-ignore": (
        lambda: nn.CrossEntropyLoss(reduction="sum", ignore_index=1),
        lambda: torch_fastmlp.CrossEntropyLoss(reduction="sum", ignore_index=1),
        "index",
    ),
    "ce-weight-smoothing": (
        lambda: nn.CrossEntropyLoss(weight=torch.linspace(0.5, 2.0, 5), label_smoothing=0.1),
        lambda: torch_fastmlp.CrossEntropyLoss(weight=torch.linspace(0.5, 2.0, 5), label_smoothing=0.1),
        "index",
    ),
    "ce-prob": (nn.CrossEntropyLoss, torch_fastmlp.CrossEntropyLoss, "prob"),
}


def twins(sizes, make_opt, loss_name: str, dtype=torch.float32, torch_loss_in_step=False, lr_scale=1.0):
    """An eager model + optimizer + torch loss, and a TrainStep over copies of them."""
    make_ref_loss, make_fused_loss, _ = LOSSES[loss_name]
    ref = reference_mlp(sizes, dtype=dtype)
    model = torch_fastmlp.Sequential(*copy.deepcopy(list(ref)))
    ref_opt, opt = make_opt(list(ref.parameters())), make_opt(list(model.parameters()))
    for group in (*ref_opt.param_groups, *opt.param_groups):
        group["lr"] *= lr_scale
    loss_fn = (make_ref_loss if torch_loss_in_step else make_fused_loss)().to(dtype)
    return ref, ref_opt, make_ref_loss().to(dtype), TrainStep(model, loss_fn, opt)


def data(rows: int, sizes, loss_name: str, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, sizes[0], generator=g, dtype=dtype)
    kind = LOSSES[loss_name][2]
    if kind == "real":
        y = torch.randn(rows, sizes[-1], generator=g, dtype=dtype)
    elif kind == "index":
        y = torch.randint(0, sizes[-1], (rows,), generator=g)
    else:
        y = torch.softmax(torch.randn(rows, sizes[-1], generator=g, dtype=dtype), 1)
    return x, y


def expected_eager_calls(opt: torch.optim.Optimizer) -> int:
    return 1 if opt.state else 0  # only a first step that makes the optimizer's state


@pytest.mark.parametrize("opt_name", ["sgd", "sgd-momentum", "sgd-nesterov-maximize", "adam", "adamw-amsgrad-wd"])
@pytest.mark.parametrize("batch", [1, 64, 700])
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_steps_match_eager(loss_name: str, batch: int, opt_name: str) -> None:
    sizes = [40, 16, 5]
    # a sum's gradients grow with the batch: SGD's lr scaled so that training does not diverge
    lr_scale = 1.0 / batch if "sum" in loss_name and opt_name.startswith("sgd") else 1.0
    ref, ref_opt, ref_loss, step = twins(
        sizes, OPTIMIZERS[opt_name], loss_name, torch_loss_in_step=batch == 64, lr_scale=lr_scale
    )
    counter = EagerCounter(step)
    for i in range(4):
        x, y = data(batch, sizes, loss_name, seed=i)
        expected = eager_step(ref, ref_loss, ref_opt, x, y)
        got = step(x, y)
        assert got.shape == () and not got.requires_grad
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5)
    assert_same_training(ref, ref_opt, step, rtol=5e-5, atol=5e-6)
    assert counter.calls == expected_eager_calls(ref_opt)


@pytest.mark.parametrize("loss_name", ["mse-sum", "ce-weight-smoothing", "ce-prob"])
def test_float64_with_clipping(loss_name: str) -> None:
    sizes = [30, 20, 20, 5]
    ref, ref_opt, ref_loss, step = twins(sizes, OPTIMIZERS["adam"], loss_name, dtype=torch.float64)
    step.max_grad_norm = 0.5
    for i in range(4):
        x, y = data(50, sizes, loss_name, dtype=torch.float64, seed=i)
        expected = eager_step(ref, ref_loss, ref_opt, x, y, clip=0.5)
        torch.testing.assert_close(step(x, y), expected, rtol=1e-12, atol=1e-12)
    assert_same_training(ref, ref_opt, step, rtol=1e-11, atol=1e-12)


def test_two_layer_net_workload() -> None:
    """The study notes' net, 1000 -> 100 -> 10 at 64 rows, sum of squares, SGD."""
    sizes = [1000, 100, 10]
    ref, ref_opt, ref_loss, step = twins(sizes, lambda p: torch.optim.SGD(p, lr=1e-4), "mse-sum")
    counter = EagerCounter(step)
    x, y = data(64, sizes, "mse-sum")
    for _ in range(5):
        torch.testing.assert_close(step(x, y), eager_step(ref, ref_loss, ref_opt, x, y), rtol=1e-5, atol=1e-3)
    assert_same_training(ref, ref_opt, step, rtol=1e-4, atol=1e-5)
    assert counter.calls == 0


@pytest.mark.parametrize("generator", [False, True])
@pytest.mark.parametrize("loss_name", ["mse-sum", "ce-sum-ignore", "ce-prob"])
def test_epoch_matches_dataloader(loss_name: str, generator: bool) -> None:
    sizes = [12, 10, 5]
    ref, ref_opt, ref_loss, step = twins(sizes, OPTIMIZERS["adam"], loss_name)
    x, y = data(203, sizes, loss_name)
    g_ref = torch.Generator().manual_seed(5) if generator else None
    g = torch.Generator().manual_seed(5) if generator else None
    for _ in range(2):
        torch.manual_seed(11)
        expected = [
            eager_step(ref, ref_loss, ref_opt, xb, yb)
            for xb, yb in DataLoader(TensorDataset(x, y), 16, shuffle=True, generator=g_ref)
        ]
        ref_rng = torch.get_rng_state()
        torch.manual_seed(11)
        got = step.epoch(x, y, 16, generator=g)
        assert torch.equal(torch.get_rng_state(), ref_rng)
        torch.testing.assert_close(got, torch.stack(expected), rtol=2e-5, atol=2e-5)
    assert_same_training(ref, ref_opt, step, rtol=5e-5, atol=5e-6)


def test_class_index_out_of_range_raises_like_eager() -> None:
    sizes = [8, 6, 5]
    ref, ref_opt, ref_loss, step = twins(sizes, OPTIMIZERS["sgd-momentum"], "ce")
    x, y = data(20, sizes, "ce")
    for _ in range(2):
        eager_step(ref, ref_loss, ref_opt, x, y)
        step(x, y)
    bad = y.clone()
    bad[7] = 5
    with pytest.raises(IndexError, match="Target 5 is out of bounds"):
        eager_step(ref, ref_loss, ref_opt, x, bad)
    with pytest.raises(IndexError, match="Target 5 is out of bounds"):
        step(x, bad)
    with pytest.raises(IndexError, match="Target 5 is out of bounds"):
        step.epoch(x, bad, 8, shuffle=False)  # the first batch of 8 rows trains, the second fails
    with pytest.raises(IndexError, match="Target 5 is out of bounds"):
        for xb, yb in DataLoader(TensorDataset(x, bad), 8):
            eager_step(ref, ref_loss, ref_opt, xb, yb)
    assert_same_training(ref, ref_opt, step)  # the gradients cleared by zero_grad, as eager leaves them


@pytest.mark.filterwarnings("ignore:Using a target size")  # torch's own broadcasting warning, both loops
def test_what_the_fused_op_does_not_take_runs_eager() -> None:
    sizes = [8, 6, 5]
    cases = [  # (loss, the inputs, whether the fused op takes them)
        ("mse-mean", lambda x, y: (x, y[:, :1]), False),  # a target that broadcasts
        ("mse-mean", lambda x, y: (x.reshape(2, 10, 8), y.reshape(2, 10, 5)), True),  # leading dims
        ("ce", lambda x, y: (x.reshape(2, 10, 8), y.reshape(2, 10)), False),  # classes would be dim 1
        ("ce-prob", lambda x, y: (x, y.double()), False),  # probabilities of another dtype
        ("ce", lambda x, y: (x, y.to(torch.int32)), False),  # int32 class indices
    ]
    for loss_name, make, fused in cases:
        ref, ref_opt, ref_loss, step = twins(sizes, OPTIMIZERS["sgd"], loss_name)
        counter = EagerCounter(step)
        x, y = make(*data(20, sizes, loss_name))
        steps = 0
        for _ in range(2):
            steps += 1
            try:
                expected = eager_step(ref, ref_loss, ref_opt, x, y)
            except (RuntimeError, ValueError) as e:
                with pytest.raises(type(e)):
                    step(x, y)
                break
            torch.testing.assert_close(step(x, y), expected)
        assert_same_training(ref, ref_opt, step)
        assert counter.calls == (0 if fused else steps), loss_name
    # probabilities with an ignore_index >= 0: torch's own error, from the eager lines
    _, _, _, step = twins(sizes, OPTIMIZERS["sgd"], "ce-prob")
    step.loss_fn = torch_fastmlp.CrossEntropyLoss(ignore_index=0)
    with pytest.raises(RuntimeError, match="ignore_index is not supported for floating point target"):
        step(*data(20, sizes, "ce-prob"))
    # reduction none: torch's loss, whose backward then fails as eager's does
    ref, ref_opt, _, step = twins(sizes, OPTIMIZERS["sgd"], "ce")
    step.loss_fn = torch_fastmlp.CrossEntropyLoss(reduction="none")
    with pytest.raises(RuntimeError, match="grad can be implicitly created only for scalar outputs"):
        step(*data(20, sizes, "ce"))


def test_repr_names_the_loss() -> None:
    _, _, _, step = twins([4, 3, 2], OPTIMIZERS["sgd"], "ce-sum-ignore")
    assert "CrossEntropyLoss()" in repr(step)


@pytest.mark.parametrize("loss_name", ["mse-sum", "ce-weight-smoothing", "ce-prob"])
def test_on_device(device: str, loss_name: str) -> None:
    sizes = [24, 16, 5]
    ref, ref_opt, ref_loss, step = twins(sizes, OPTIMIZERS["adam"], loss_name)
    for module in (ref, step.model, ref_loss, step.loss_fn):
        module.to(device)
    for i in range(3):
        x, y = (t.to(device) for t in data(64, sizes, loss_name, seed=i))
        torch.testing.assert_close(step(x, y), eager_step(ref, ref_loss, ref_opt, x, y), rtol=2e-5, atol=2e-5)
    assert_same_training(ref, ref_opt, step, rtol=5e-5, atol=5e-6)
