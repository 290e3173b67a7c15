"""FusedLoss(model, loss_fn) and fastmlp::mlp_loss: the loss of a model as one
differentiable op for BCE, MSE and cross-entropy, against ``loss_fn(model(x), y)``
in eager PyTorch: the loss and every gradient, the fallbacks, opcheck, compile."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import reference_mlp
from test_train_step_losses import LOSSES, data
from torch import nn

import torch_fastmlp
from torch_fastmlp import FusedLoss

ops = torch.ops.fastmlp
ALL_LOSSES = {**LOSSES, "bce-pos-weight": (
    lambda: nn.BCEWithLogitsLoss(pos_weight=torch.linspace(0.5, 2.0, 5)),
    lambda: torch_fastmlp.BCEWithLogitsLoss(pos_weight=torch.linspace(0.5, 2.0, 5)),
    "binary",
)}  # fmt: skip


def targets(name: str, rows: int, sizes: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    if ALL_LOSSES[name][2] == "binary":
        g = torch.Generator().manual_seed(seed)
        return torch.randn(rows, sizes[0], generator=g), torch.randint(0, 2, (rows, sizes[-1]), generator=g).float()
    return data(rows, sizes, name, seed=seed)


def twins(name: str, sizes: list[int], device: str = "cpu"):
    make_ref_loss, make_fused_loss, _ = ALL_LOSSES[name]
    ref = reference_mlp(sizes).to(device)
    fused = FusedLoss(torch_fastmlp.Sequential(*copy.deepcopy(list(ref))), make_fused_loss()).to(device)
    return ref, make_ref_loss().to(device), fused


def assert_same_gradients(ref: nn.Module, fused: FusedLoss, rtol=2e-5, atol=2e-6) -> None:
    for (name, p), q in zip(ref.named_parameters(), fused.model.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=rtol, atol=atol, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("batch", [1, 64, 700])
@pytest.mark.parametrize("name", list(ALL_LOSSES))
def test_matches_eager(device: str, name: str, batch: int) -> None:
    sizes = [30, 16, 5]
    ref, ref_loss, fused = twins(name, sizes, device)
    x, y = (t.to(device) for t in targets(name, batch, sizes))
    expected = ref_loss(ref(x), y)
    expected.backward()
    got = fused(x, y)
    assert got.grad_fn is not None and got.grad_fn.name().endswith("::MLPLossFunction>")
    got.backward()
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-6)
    assert_same_gradients(ref, fused)


def test_float64_grad_output_scaling_and_input_gradient() -> None:
    ref, ref_loss, fused = twins("ce-weight-smoothing", [12, 9, 5])
    ref, fused = ref.double(), fused.double()
    ref_loss = ref_loss.double()
    x, y = targets("ce-weight-smoothing", 33, [12, 9, 5])
    x = x.double()
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    (3.0 * ref_loss(ref(xr), y)).backward()
    (3.0 * fused(xf, y)).backward()
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-11, atol=1e-12)
    assert_same_gradients(ref, fused, rtol=1e-11, atol=1e-12)


def test_scaled_backward_is_each_gradient_times_the_seed() -> None:
    """A non-unit seed scales every stored gradient in one multi-tensor multiply
    (one launch on CUDA): bitwise the gradients of a unit seed times the seed."""
    _, _, fused = twins("bce-pos-weight", [20, 12, 5])
    x, y = targets("bce-pos-weight", 40, [20, 12, 5])
    x = x.requires_grad_()
    fused(x, y).backward()
    unit = [p.grad.clone() for p in fused.model.parameters()] + [x.grad.clone()]
    fused.model.zero_grad()
    x.grad = None
    (fused(x, y) * 2.5).backward()
    for got, base in zip([p.grad for p in fused.model.parameters()] + [x.grad], unit, strict=True):
        assert torch.equal(got, base * 2.5)


def test_what_the_op_does_not_take_runs_the_modules() -> None:
    sizes = [8, 6, 5]
    ref, ref_loss, fused = twins("mse-mean", sizes)
    x, y = targets("mse-mean", 20, sizes)
    y = y.clone().requires_grad_()  # the target's gradient: torch's loss
    fused(x, y).backward()
    assert y.grad is not None
    model = nn.Sequential(*copy.deepcopy(list(ref)), nn.Tanh())
    loss = FusedLoss(model, nn.MSELoss())(x, y.detach())
    assert loss.grad_fn.name() == "MseLossBackward0"
    with pytest.raises(RuntimeError, match="ignore_index is not supported for floating point target"):
        FusedLoss(copy.deepcopy(ref), nn.CrossEntropyLoss(ignore_index=1))(x, torch.softmax(y.detach(), 1))
    torch.testing.assert_close(fused.predict(x), ref(x))


def test_state_dict_repr_and_optimizer_loop() -> None:
    ref, ref_loss, fused = twins("ce-weight-smoothing", [8, 6, 5])
    assert list(fused.state_dict()) == ["model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias",
                                        "loss_fn.weight"]  # fmt: skip
    assert "CrossEntropyLoss()" in repr(fused)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    opt = torch.optim.Adam(fused.parameters(), lr=1e-2)
    for i in range(3):
        x, y = targets("ce-weight-smoothing", 40, [8, 6, 5], seed=i)
        ref_opt.zero_grad()
        ref_loss(ref(x), y).backward()
        ref_opt.step()
        opt.zero_grad()
        fused(x, y).backward()
        opt.step()
    for p, q in zip(ref.parameters(), fused.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=2e-5, atol=2e-6)


def test_opcheck_and_compile() -> None:
    w0, b0, w1 = torch.randn(5, 7), torch.randn(5), torch.randn(3, 5)
    x, y = torch.randn(6, 7), torch.randint(0, 3, (6,))
    torch.library.opcheck(ops.mlp_loss.default, (x, y, [w0, w1], [b0, None], False, 2, torch.rand(3), None, 1, 1, 0.1))
    torch.library.opcheck(ops.mlp_loss.default, (x, torch.randn(6, 3), [w0, w1], [b0, None], False, 1, None, None, 2,
                                                 -100, 0.0))  # fmt: skip
    fused = FusedLoss(torch_fastmlp.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3)), nn.CrossEntropyLoss())
    ref = copy.deepcopy(fused)
    torch.compile(fused, fullgraph=True)(x, y).backward()
    ref(x, y).backward()
    for p, q in zip(ref.parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad)
