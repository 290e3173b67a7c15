"""FusedBCEClassifier and fastmlp::mlp_bce_step: the loss and every gradient of
an MLP classifier in one op, against nn.Sequential + nn.BCEWithLogitsLoss."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import assert_close, reference_mlp
from torch import nn

import torch_fastmlp
from torch_fastmlp import FusedBCEClassifier


def _eager_and_fused(
    sizes: list[int], device: str, dtype: torch.dtype = torch.float32, **loss_kw: object
) -> tuple[nn.Sequential, nn.Module, FusedBCEClassifier]:
    ref = reference_mlp(sizes, dtype=dtype, device=device)
    loss = nn.BCEWithLogitsLoss(**loss_kw)  # type: ignore[arg-type]
    clf = FusedBCEClassifier(torch_fastmlp.Sequential(*copy.deepcopy(list(ref))), **loss_kw)  # type: ignore[arg-type]
    return ref, loss, clf


def _check_step(
    ref: nn.Sequential, loss_fn: nn.Module, clf: FusedBCEClassifier, x: torch.Tensor, y: torch.Tensor
) -> None:
    expected = loss_fn(ref(x), y)
    expected.backward()
    got = clf(x, y)
    got.backward()
    reduction = x.shape[0] * max(x.shape[-1], 1)
    assert_close(got, expected.detach(), reduction)
    for (name, p), q in zip(ref.named_parameters(), clf.model.parameters(), strict=True):
        assert_close(q.grad, p.grad, reduction, msg=name)


@pytest.mark.parametrize("batch", [1, 7, 64, 300, 1025, 2500])
# On CUDA the first three run the fused chain kernel, the last (a 200-wide layer) the per-layer GEMMs.
@pytest.mark.parametrize("sizes", [[784, 30, 1], [50, 100, 10], [33, 17, 9, 3], [20, 200, 2], [30, 20, 300]])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_eager(device: str, batch: int, sizes: list[int], reduction: str) -> None:
    ref, loss_fn, clf = _eager_and_fused(sizes, device, reduction=reduction)
    x = torch.randn(batch, sizes[0], device=device)
    y = torch.randint(0, 2, (batch, sizes[-1]), device=device).float()
    _check_step(ref, loss_fn, clf, x, y)


@pytest.mark.parametrize("batch", [64, 2500])
def test_weight_and_pos_weight(device: str, batch: int) -> None:
    pos_weight = torch.rand(4, device=device) * 3
    weight = torch.rand(4, device=device)
    ref, loss_fn, clf = _eager_and_fused([20, 16, 4], device, pos_weight=pos_weight, weight=weight)
    x = torch.randn(batch, 20, device=device)
    y = torch.rand(batch, 4, device=device)  # soft targets
    _check_step(ref, loss_fn, clf, x, y)


def test_full_weight_takes_generic_path(device: str) -> None:
    """A [B, C] weight does not repeat per row: the untiled composition serves it."""
    weight = torch.rand(2500, 2, device=device)
    ref, loss_fn, clf = _eager_and_fused([12, 8, 2], device, weight=weight)
    x = torch.randn(2500, 12, device=device)
    y = torch.randint(0, 2, (2500, 2), device=device).float()
    _check_step(ref, loss_fn, clf, x, y)


def test_float64_and_grad_output_scaling(device: str) -> None:
    ref, loss_fn, clf = _eager_and_fused([9, 5, 1], device, dtype=torch.float64)
    x = torch.randn(300, 9, device=device, dtype=torch.float64)
    y = torch.randint(0, 2, (300, 1), device=device).double()
    (loss_fn(ref(x), y) * 3.5).backward()
    (clf(x, y) * 3.5).backward()
    for p, q in zip(ref.parameters(), clf.model.parameters(), strict=True):
        assert_close(q.grad, p.grad)


def test_input_gradient_and_frozen_layer(device: str) -> None:
    ref, loss_fn, clf = _eager_and_fused([10, 6, 1], device)
    ref[0].weight.requires_grad_(False)
    clf.model[0].weight.requires_grad_(False)
    x = torch.randn(40, 10, device=device)
    y = torch.randint(0, 2, (40, 1), device=device).float()
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss_fn(ref(xr), y).backward()
    clf(xf, y).backward()
    assert clf.model[0].weight.grad is None
    assert_close(xf.grad, xr.grad)
    assert_close(clf.model[0].bias.grad, ref[0].bias.grad)


def test_leading_dims_and_retain_graph(device: str) -> None:
    ref, loss_fn, clf = _eager_and_fused([6, 5, 2], device)
    x = torch.randn(3, 4, 6, device=device)
    y = torch.randint(0, 2, (3, 4, 2), device=device).float()
    expected = loss_fn(ref(x), y)
    got = clf(x, y)
    for _ in range(2):  # the stored gradients survive a retained graph
        expected.backward(retain_graph=True)
        got.backward(retain_graph=True)
    for p, q in zip(ref.parameters(), clf.model.parameters(), strict=True):
        assert_close(q.grad, p.grad)


def test_fallback_for_other_modules_and_predict(device: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 1)).to(device)
    clf = FusedBCEClassifier(copy.deepcopy(model))
    x = torch.randn(16, 8, device=device)
    y = torch.randint(0, 2, (16, 1), device=device).float()
    assert_close(clf(x, y), nn.functional.binary_cross_entropy_with_logits(model(x), y))
    assert_close(clf.predict(x), model(x))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="reduction"):
        FusedBCEClassifier(nn.Sequential(nn.Linear(2, 1)), reduction="none")
    clf = FusedBCEClassifier(torch_fastmlp.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1)))
    with pytest.raises(ValueError, match="Target size"):
        clf(torch.randn(5, 4), torch.rand(5, 2))


def test_state_dict_pickle_and_repr() -> None:
    clf = FusedBCEClassifier(
        torch_fastmlp.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1)), pos_weight=torch.tensor([2.0])
    )
    assert list(clf.state_dict()) == ["pos_weight", "model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias"]
    clone = pickle.loads(pickle.dumps(clf))
    x, y = torch.randn(5, 4), torch.rand(5, 1)
    assert torch.equal(clone(x, y), clf(x, y))
    assert "reduction='mean'" in repr(clf)


@pytest.mark.parametrize("layout", ["contiguous", "row_strided", "transposed"])
@pytest.mark.parametrize("batch", [33, 100, 255])  # small-batch step (CPU): 1, 4 and 8 row partials
def test_small_batch_partials(device: str, batch: int, layout: str) -> None:
    """Batches under 256 rows of a chain with enough work for several partials
    (CPU: one parallel region), with loss weights, on strided inputs."""
    pos_weight = torch.tensor([2.0, 0.5, 1.0], device=device)
    ref, loss_fn, clf = _eager_and_fused([256, 20, 8, 3], device, pos_weight=pos_weight)
    base = torch.randn(batch, 300, device=device)
    x = {
        "contiguous": base[:, :256].contiguous(),
        "row_strided": base[:, 10:266],  # rows 300 apart
        "transposed": base[:, :256].t().contiguous().t(),
    }[layout]
    y = torch.randint(0, 2, (batch, 3), device=device).float()
    _check_step(ref, loss_fn, clf, x, y)


@pytest.mark.parametrize("frozen", ["first_layer", "first_two_layers", "input_grad"])
def test_small_batch_partial_gradients(device: str, frozen: str) -> None:
    """Only the gradients autograd asks for, over several partials: frozen lower
    layers are not visited, an input gradient reaches every row."""
    ref, loss_fn, clf = _eager_and_fused([256, 20, 8, 1], device, dtype=torch.float64)
    layers = {"first_layer": 1, "first_two_layers": 2, "input_grad": 0}[frozen]
    for model in (ref, clf.model):
        for p in list(model.parameters())[: 2 * layers]:
            p.requires_grad_(False)
    x = torch.randn(100, 256, device=device, dtype=torch.float64)
    y = torch.randint(0, 2, (100, 1), device=device).double()
    xr, xf = x.clone().requires_grad_(frozen == "input_grad"), x.clone().requires_grad_(frozen == "input_grad")
    loss_fn(ref(xr), y).backward()
    clf(xf, y).backward()
    for p, q in zip(ref.parameters(), clf.model.parameters(), strict=True):
        assert (q.grad is None) == (p.grad is None)
        if p.grad is not None:
            assert_close(q.grad, p.grad)
    if frozen == "input_grad":
        assert_close(xf.grad, xr.grad)


@pytest.mark.parametrize("batch", [100, 300, 3000])  # 4 small-batch partials; two half-batch tiles; 1024-row tiles
def test_deterministic_over_threads(batch: int) -> None:
    torch.manual_seed(0)
    clf = FusedBCEClassifier(torch_fastmlp.MLP([256, 30, 1]))
    x, y = torch.randn(batch, 256), torch.randint(0, 2, (batch, 1)).float()
    results = []
    for threads in (1, 2, 3, 2):
        torch.set_num_threads(threads)
        clf.zero_grad(set_to_none=True)
        loss = clf(x, y)
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in clf.parameters()])
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


def test_opcheck_and_compile() -> None:
    w0, b0, w1 = torch.randn(5, 7), torch.randn(5), torch.randn(2, 5)
    x, y = torch.randn(6, 7), torch.rand(6, 2)
    torch.library.opcheck(
        torch.ops.fastmlp.mlp_bce_step.default,
        (x, y, [w0, w1], [b0, None], False, None, torch.rand(2), 1, True, [True, True], [True, False]),
    )
    clf = FusedBCEClassifier(torch_fastmlp.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 2)))
    ref = copy.deepcopy(clf)
    compiled = torch.compile(clf, fullgraph=True)
    compiled(x, y).backward()
    ref(x, y).backward()
    for p, q in zip(ref.parameters(), clf.parameters(), strict=True):
        assert_close(q.grad, p.grad)


@pytest.mark.parametrize("where", ["model_forward", "model_backward", "layer_backward"])
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # torch's own, for both paths
def test_hooks_on_the_model_fire(where: str) -> None:
    """Hooks on the classifier's model or its layers fire as with the model run on its own."""
    torch.manual_seed(0)
    model = torch_fastmlp.Sequential(nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 1))
    ref = copy.deepcopy(model)
    calls = {"fused": 0, "ref": 0}

    def make(key: str):  # noqa: ANN202
        def hook(*args: object) -> None:
            calls[key] += 1

        return hook

    for key, m in (("fused", model), ("ref", ref)):
        target = m if where.startswith("model") else m[2]
        if where == "model_forward":
            target.register_forward_hook(make(key))
        else:
            target.register_full_backward_hook(make(key))
    x, y = torch.randn(6, 8), torch.rand(6, 1)
    FusedBCEClassifier(model)(x, y).backward()
    nn.functional.binary_cross_entropy_with_logits(ref(x), y).backward()
    assert calls["fused"] == calls["ref"] == 1
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert_close(a.grad, b.grad)
