"""``torch_fastmlp.Sequential``, ``MLP`` and ``fuse``: drop-in parity with
``torch.nn.Sequential`` in results, training, container behaviour and
serialization."""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from collections import OrderedDict
from collections.abc import Callable

import pytest
import torch
from conftest import DEVICES, assert_close, reference_mlp
from torch import nn

import torch_fastmlp
from torch_fastmlp import MLP, FusedLinearReLU, Sequential, fuse


def fused_copy(ref: nn.Sequential) -> Sequential:
    """A torch_fastmlp.Sequential holding deep copies of ``ref``'s modules."""
    return Sequential(OrderedDict((k, copy.deepcopy(m)) for k, m in ref.named_children()))


def assert_same_params(a: nn.Module, b: nn.Module, reduction: int = 1, **kw: float) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert list(pa) == list(pb)
    for name in pa:
        if kw:
            torch.testing.assert_close(pa[name], pb[name], **kw, msg=lambda m, n=name: f"{n}: {m}")
        else:
            assert_close(pa[name], pb[name], reduction, msg=name)


def assert_same_grads(a: nn.Module, b: nn.Module, reduction: int = 1) -> None:
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert_close(pa.grad, pb.grad, reduction, msg=f"grad {na}")


def forward_backward(model: nn.Module, x: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
    out = model(x)
    out.backward(torch.ones_like(out) if g is None else g)
    return out.detach()


# --- training parity --------------------------------------------------------------------


def make_task(sizes: list[int], n: int = 256) -> tuple[torch.Tensor, torch.Tensor, Callable, Callable]:
    """Random data and (fused loss, eager loss) for a 784-30-1 binary or 1000-100-10 multiclass task."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, sizes[0], generator=gen)
    if sizes[-1] == 1:
        y = torch.randint(0, 2, (n, 1), generator=gen).float()
        return x, y, torch_fastmlp.BCEWithLogitsLoss(), nn.BCEWithLogitsLoss()
    y = torch.randint(0, sizes[-1], (n,), generator=gen)
    return x, y, nn.CrossEntropyLoss(), nn.CrossEntropyLoss()


def train(
    model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, opt_name: str, epochs: int = 3
) -> list[float]:
    opt: torch.optim.Optimizer
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


@pytest.mark.parametrize("sizes", [[784, 30, 1], [1000, 100, 10]], ids=str)
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_training_parity(sizes: list[int], opt_name: str) -> None:
    ref = reference_mlp(sizes, seed=0)
    torch.manual_seed(0)
    fused = MLP(sizes)
    assert_same_params(fused, ref, rtol=0, atol=0)  # same seed, same init
    x, y, fused_loss, ref_loss = make_task(sizes)
    got = train(fused, fused_loss, x, y, opt_name)
    expected = train(ref, ref_loss, x, y, opt_name)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-4, atol=1e-5)
    assert_same_params(fused, ref, rtol=2e-4, atol=2e-5)
    assert got[-1] < got[0]  # it did learn something


# --- container behaviour -------------------------------------------------------------


def test_ordered_dict_constructor_and_state_dict_keys() -> None:
    torch.manual_seed(0)
    layers = OrderedDict([("fc1", nn.Linear(6, 5)), ("act", nn.ReLU()), ("fc2", nn.Linear(5, 2))])
    ref = nn.Sequential(copy.deepcopy(layers))
    fused = Sequential(layers)
    assert list(fused.state_dict()) == list(ref.state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert fused.fc1 is layers["fc1"]
    x = torch.randn(4, 6)
    assert_close(fused(x), ref(x))


def test_repr_equals_nn_sequential() -> None:
    ref = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Dropout(0.1), nn.Linear(3, 2))
    assert repr(fused_copy(ref)) == repr(ref)
    od = OrderedDict([("a", nn.Linear(2, 2)), ("b", nn.ReLU())])
    assert repr(Sequential(od)) == repr(nn.Sequential(od))


def test_indexing_slicing_len_iter() -> None:
    ref = reference_mlp([6, 5, 4, 3], seed=0)
    fused = fused_copy(ref)
    x = torch.randn(7, 6)
    assert len(fused) == len(ref) == 5
    assert [type(m) for m in fused] == [type(m) for m in ref]
    assert isinstance(fused[0], nn.Linear) and isinstance(fused[-1], nn.Linear)
    head = fused[:3]
    assert isinstance(head, Sequential) and len(head) == 3
    assert head[0] is fused[0]
    assert_close(head(x), ref[:3](x))
    tail = fused[2:]
    assert isinstance(tail, Sequential)
    h = torch.randn(7, 5)
    assert_close(tail(h), ref[2:](h))
    assert_close(fused[::2][0](x), ref[0](x))


def _mutations() -> list[tuple[str, Callable[[nn.Sequential], None]]]:
    def append(s: nn.Sequential) -> None:
        torch.manual_seed(5)
        s.append(nn.ReLU()).append(nn.Linear(3, 2))

    def insert(s: nn.Sequential) -> None:
        torch.manual_seed(6)
        s.insert(2, nn.Linear(5, 5))
        s.insert(3, nn.ReLU())

    def delete(s: nn.Sequential) -> None:
        del s[3:]

    def delete_one(s: nn.Sequential) -> None:
        del s[1]  # Linear -> Linear with no activation between

    def setitem(s: nn.Sequential) -> None:
        s[1] = nn.Tanh()

    def extend(s: nn.Sequential) -> None:
        torch.manual_seed(7)
        s.extend([nn.ReLU(), nn.Linear(3, 4)])

    def pop(s: nn.Sequential) -> None:
        s.pop(-1)

    return [
        ("append", append),
        ("insert", insert),
        ("del_slice", delete),
        ("del_one", delete_one),
        ("setitem", setitem),
        ("extend", extend),
        ("pop", pop),
    ]


@pytest.mark.parametrize("mutation", _mutations(), ids=lambda m: m[0])
def test_mutation_after_forward(mutation: tuple[str, Callable[[nn.Sequential], None]]) -> None:
    """Mutating the container after a forward pass (the plan is cached) still
    computes what nn.Sequential computes after the same mutation."""
    _, mutate = mutation
    ref = reference_mlp([6, 5, 4, 3], seed=0)
    fused = fused_copy(ref)
    x = torch.randn(7, 6)
    assert_close(fused(x), ref(x))
    mutate(ref)
    mutate(fused)
    fused.load_state_dict(ref.state_dict())
    assert repr(fused) == repr(ref)
    assert_close(fused(x), ref(x))


def test_module_swap_in_place_after_forward() -> None:
    """Replacing a Linear's weight Parameter after a forward is picked up."""
    ref = reference_mlp([6, 5, 3], seed=0)
    fused = fused_copy(ref)
    x = torch.randn(4, 6)
    fused(x)
    new_w = nn.Parameter(torch.randn(5, 6))
    fused[0].weight = new_w
    ref[0].weight = nn.Parameter(new_w.detach().clone())
    assert_close(fused(x), ref(x))


# --- state dict ---------------------------------------------------------------------


def test_state_dict_round_trip_both_ways() -> None:
    ref = reference_mlp([8, 6, 4, 2], seed=0)
    fused = Sequential(*reference_mlp([8, 6, 4, 2], seed=1))
    fused.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(5, 8)
    assert_close(fused(x), ref(x))
    other = reference_mlp([8, 6, 4, 2], seed=2)
    other.load_state_dict(fused.state_dict(), strict=True)
    assert_close(other(x), ref(x))
    for k, v in fused.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k])


# --- mixed modules / hooks ----------------------------------------------------------------


class Scale(nn.Module):
    """A custom module with a parameter."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def mixed_model(device: str) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 10),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(10, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Linear(8, 8),
        nn.Sigmoid(),
        Scale(8),
        nn.Linear(8, 6),
        nn.ReLU(),
        nn.Linear(6, 6),
        nn.ReLU(),
        nn.Linear(6, 3),
    ).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_mixed_modules(device: str, mode: str) -> None:
    ref = mixed_model(device)
    fused = fused_copy(ref)
    ref.train(mode == "train")
    fused.train(mode == "train")
    x = torch.randn(16, 12, device=device)
    g = torch.randn(16, 3, device=device)
    torch.manual_seed(42)  # the same dropout mask for both
    out = forward_backward(fused, x, g)
    torch.manual_seed(42)
    expected = forward_backward(ref, x, g)
    assert_close(out, expected, reduction=12)
    assert_same_grads(fused, ref, reduction=16)
    for (name, a), (_, b) in zip(fused.named_buffers(), ref.named_buffers(), strict=True):
        assert_close(a.float(), b.float(), msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_linear_relu_inside(device: str) -> None:
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 2)).to(device)
    fused = Sequential(FusedLinearReLU(9, 7), nn.Linear(7, 5), nn.ReLU(), FusedLinearReLU(5, 2)).to(device)
    # FusedLinearReLU as the last layer means last ReLU: compare against ref + ReLU.
    ref.append(nn.ReLU())
    index = {"0": "0", "2": "1", "4": "3"}  # ref layer -> fused layer
    fused.load_state_dict({f"{index[k[0]]}{k[1:]}": v for k, v in ref.state_dict().items()}, strict=True)
    x = torch.randn(6, 9, device=device)
    assert_close(forward_backward(fused, x), forward_backward(ref, x))
    for a, b in zip(fused.parameters(), ref.parameters(), strict=True):
        assert_close(a.grad, b.grad)


def _with_global_linear_hook(
    register: Callable, fused: nn.Module, ref: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Forward + backward of both models under a global module hook (forward or
    backward, per ``register``); returns both outputs and how often the hook saw
    an ``nn.Linear`` in each."""
    calls: list[nn.Module] = []

    def hook(m: nn.Module, *args: object) -> None:
        if type(m) is nn.Linear:
            calls.append(m)

    handle = register(hook)
    try:
        out_f = forward_backward(fused, x)
        n_fused = len(calls)
        out_r = forward_backward(ref, x)
    finally:
        handle.remove()
    return out_f, out_r, n_fused, len(calls) - n_fused


def _run_both_one_capture(
    fused: nn.Module, ref: nn.Module, x: torch.Tensor, seen: dict[str, list[torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward + backward through both models; each hook captured once, the same value."""
    out_f = forward_backward(fused, x)
    out_r = forward_backward(ref, x)
    assert len(seen["fused"]) == len(seen["ref"]) == 1
    assert_close(seen["fused"][0], seen["ref"][0])
    return out_f, out_r


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hook_kind", ["backward", "backward_pre", "global_backward"])
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # torch's, for both models
def test_backward_hooks_fire_and_results_match(device: str, hook_kind: str) -> None:
    """A backward hook on a layer of a fused chain fires with the same gradients as
    on nn.Sequential (the chain runs its modules one by one while one is set)."""
    ref = reference_mlp([6, 5, 4, 3], seed=0, device=device)
    fused = fused_copy(ref)
    seen: dict[str, list[torch.Tensor]] = {"ref": [], "fused": []}
    handles = []
    for key, model in (("ref", ref), ("fused", fused)):

        def hook(m: nn.Module, grad_in: tuple, grad_out: tuple | None = None, key: str = key) -> None:
            grads = grad_out if grad_out is not None else grad_in
            seen[key].append(grads[0].detach().clone())

        if hook_kind == "backward":
            handles.append(model[2].register_full_backward_hook(hook))
        elif hook_kind == "backward_pre":
            handles.append(model[2].register_full_backward_pre_hook(hook))
    x = torch.randn(7, 6, device=device)
    if hook_kind == "global_backward":
        out_f, out_r, n_fused, n_ref = _with_global_linear_hook(
            nn.modules.module.register_module_full_backward_hook, fused, ref, x
        )
        assert n_fused == n_ref > 0
    else:
        out_f, out_r = _run_both_one_capture(fused, ref, x, seen)
    assert_close(out_f, out_r)
    assert_same_grads(fused, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hook_kind", ["forward", "forward_pre", "global_forward"])
def test_hooks_fire_and_results_match(device: str, hook_kind: str) -> None:
    ref = reference_mlp([6, 5, 4, 3], seed=0, device=device)
    fused = fused_copy(ref)
    seen: dict[str, list[torch.Tensor]] = {"ref": [], "fused": []}

    def hook_for(key: str) -> Callable:
        def fwd_hook(m: nn.Module, inp: tuple, out: torch.Tensor) -> torch.Tensor:
            seen[key].append(out.detach().clone())
            return out * 2  # a hook that modifies the output must take effect

        def pre_hook(m: nn.Module, inp: tuple) -> tuple:
            seen[key].append(inp[0].detach().clone())
            return (inp[0] * 0.5,)

        return pre_hook if hook_kind == "forward_pre" else fwd_hook

    x = torch.randn(7, 6, device=device)
    if hook_kind == "global_forward":
        out_f, out_r, n_fused, n_ref = _with_global_linear_hook(
            nn.modules.module.register_module_forward_hook, fused, ref, x
        )
        assert n_fused == n_ref == 3
    else:
        register = "register_forward_pre_hook" if hook_kind == "forward_pre" else "register_forward_hook"
        getattr(ref[2], register)(hook_for("ref"))
        getattr(fused[2], register)(hook_for("fused"))
        out_f, out_r = _run_both_one_capture(fused, ref, x, seen)
    assert_close(out_f, out_r)
    assert_same_grads(fused, ref)


# --- frozen layers / modes / dtypes ------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_first_layer_adam(device: str) -> None:
    ref = reference_mlp([20, 12, 6, 1], seed=0, device=device)
    fused = fused_copy(ref)
    for m in (ref, fused):
        m[0].requires_grad_(False)
    frozen_w = fused[0].weight.detach().clone()
    frozen_b = fused[0].bias.detach().clone()
    x = torch.randn(32, 20, device=device)
    y = torch.randn(32, 1, device=device)
    for model in (fused, ref):
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(5):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    assert fused[0].weight.grad is None and fused[0].bias.grad is None
    assert torch.equal(fused[0].weight, frozen_w) and torch.equal(fused[0].bias, frozen_b)
    assert_same_params(fused, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad(device: str) -> None:
    ref = reference_mlp([10, 8, 3], seed=0, device=device)
    fused = fused_copy(ref)
    x = torch.randn(5, 10, device=device)
    with torch.no_grad():
        out = fused(x)
    assert not out.requires_grad
    assert_close(out, ref(x).detach())
    with torch.inference_mode():
        assert_close(fused(x), ref(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("convert", ["double", "to_dtype"])
def test_double_and_to_dtype(device: str, convert: str) -> None:
    ref = reference_mlp([10, 8, 6, 3], seed=0, device=device)
    fused = fused_copy(ref)
    if convert == "double":
        ref, fused = ref.double(), fused.double()
    else:
        ref, fused = ref.to(torch.float64), fused.to(dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in fused.parameters())
    x = torch.randn(5, 10, dtype=torch.float64, device=device)
    assert_close(forward_backward(fused, x), forward_backward(ref, x))
    assert_same_grads(fused, ref)


def test_bfloat16_module() -> None:
    ref = reference_mlp([16, 12, 4], seed=0, dtype=torch.bfloat16)
    fused = fused_copy(ref)
    x = torch.randn(8, 16, dtype=torch.bfloat16)
    assert_close(fused(x), ref(x), reduction=16)


# --- copying / serialization ---------------------------------------------------------------


def test_deepcopy() -> None:
    ref = reference_mlp([10, 8, 3], seed=0)
    fused = fused_copy(ref)
    x = torch.randn(4, 10)
    fused(x)  # build the cached plan first
    clone = copy.deepcopy(fused)
    assert type(clone) is Sequential
    with torch.no_grad():
        clone[0].weight.add_(1.0)  # must not affect the original (no plan shared)
    assert_close(fused(x), ref(x))
    expected = ref[1:](nn.functional.linear(x, clone[0].weight, clone[0].bias))
    assert_close(clone(x), expected)


@pytest.mark.parametrize("how", ["pickle", "torch_save_module", "torch_save_state_dict"])
def test_serialization(how: str) -> None:
    ref = reference_mlp([10, 8, 3], seed=0)
    fused = fused_copy(ref)
    x = torch.randn(4, 10)
    fused(x)
    if how == "pickle":
        loaded = pickle.loads(pickle.dumps(fused))
    else:
        buf = io.BytesIO()
        torch.save(fused if how == "torch_save_module" else fused.state_dict(), buf)
        buf.seek(0)
        obj = torch.load(buf, weights_only=False)
        if how == "torch_save_state_dict":
            loaded = Sequential(*reference_mlp([10, 8, 3], seed=9))
            loaded.load_state_dict(obj)
            other = reference_mlp([10, 8, 3], seed=9)
            other.load_state_dict(obj)  # and into nn.Sequential
            assert_close(other(x), ref(x))
        else:
            loaded = obj
    assert type(loaded) is Sequential
    assert_close(forward_backward(loaded, x), forward_backward(ref, x))
    assert_same_grads(loaded, ref)


def test_pickle_mlp() -> None:
    torch.manual_seed(0)
    m = MLP([5, 4, 2])
    loaded = pickle.loads(pickle.dumps(m))
    x = torch.randn(3, 5)
    assert type(loaded) is MLP
    assert_close(loaded(x), m(x))


# --- compile / DataParallel -----------------------------------------------------------


def test_torch_compile() -> None:
    ref = reference_mlp([12, 10, 6, 2], seed=0)
    fused = fused_copy(ref)
    torch._dynamo.reset()
    compiled = torch.compile(fused)
    for batch in (8, 8, 5):
        x = torch.randn(batch, 12)
        fused.zero_grad()
        ref.zero_grad()
        out = compiled(x)
        out.square().sum().backward()
        expected = ref(x)
        expected.square().sum().backward()
        assert_close(out.detach(), expected.detach(), reduction=12)
        assert_same_grads(fused, ref, reduction=12)


def test_data_parallel_cpu() -> None:
    ref = reference_mlp([10, 8, 3], seed=0)
    fused = fused_copy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp = nn.DataParallel(fused)
    x = torch.randn(6, 10)
    assert_close(forward_backward(dp, x), forward_backward(ref, x))
    assert_same_grads(fused, ref)
    assert list(dp.state_dict()) == ["module." + k for k in ref.state_dict()]


# --- fuse ---------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Sequential(nn.Linear(10, 8), nn.ReLU()), nn.Linear(8, 6), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
        self.other = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.other(self.head(self.body(x)))


def test_fuse_nested() -> None:
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    params_before = [id(p) for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    assert fuse(model) is model
    assert [id(p) for p in model.parameters()] == params_before
    seqs = [m for m in model.modules() if isinstance(m, nn.Sequential)]
    assert len(seqs) == 3 and all(type(m) is Sequential for m in seqs)
    assert type(model.other) is nn.Linear
    x = torch.randn(5, 10)
    for _ in range(3):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    assert_same_params(model, ref)
    before = [p.detach().clone() for p in model.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(before, Net().parameters(), strict=True))


def test_fuse_plain_sequential_keeps_state() -> None:
    ref = reference_mlp([6, 4, 2], seed=0)
    model = copy.deepcopy(ref)
    fuse(model)
    assert type(model) is Sequential
    x = torch.randn(3, 6)
    assert_close(model(x), ref(x))
    assert repr(model) == repr(ref)


# --- MLP ----------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", ["relu", None])
@pytest.mark.parametrize("last_activation", ["relu", None])
def test_mlp_structure(bias: bool, activation: str | None, last_activation: str | None) -> None:
    torch.manual_seed(0)
    m = MLP([7, 6, 5, 3], bias=bias, activation=activation, last_activation=last_activation)
    torch.manual_seed(0)
    expected: list[nn.Module] = []
    for i, (a, b) in enumerate([(7, 6), (6, 5), (5, 3)]):
        expected.append(nn.Linear(a, b, bias=bias))
        if (activation if i < 2 else last_activation) == "relu":
            expected.append(nn.ReLU())
    ref = nn.Sequential(*expected)
    assert isinstance(m, Sequential)
    assert [type(x) for x in m] == [type(x) for x in ref]
    assert list(m.state_dict()) == list(ref.state_dict())
    assert repr(m) == repr(ref).replace("Sequential", "MLP", 1)
    assert_same_params(m, ref, rtol=0, atol=0)
    x = torch.randn(4, 7)
    assert_close(forward_backward(m, x), forward_backward(ref, x))
    assert_same_grads(m, ref)


def test_mlp_dtype_device_args() -> None:
    m = MLP([4, 3, 2], dtype=torch.float64, device="cpu")
    assert all(p.dtype == torch.float64 for p in m.parameters())


def test_mlp_errors() -> None:
    with pytest.raises(ValueError, match="at least"):
        MLP([5])
    with pytest.raises(ValueError, match="activation"):
        MLP([5, 3], activation="tanh")
    with pytest.raises(ValueError, match="last_activation"):
        MLP([5, 3], last_activation="sigmoid")


def test_mlp_slicing_like_sequential() -> None:
    """nn.Sequential slicing rebuilds ``self.__class__`` from an OrderedDict."""
    torch.manual_seed(0)
    m = MLP([6, 5, 4])
    head = m[:2]
    assert isinstance(head, nn.Sequential) and len(head) == 2
    x = torch.randn(3, 6)
    assert_close(head(x), torch.relu(m[0](x)))


# --- bad inputs / shapes ---------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        lambda: torch.randn(4, 11),
        lambda: torch.randn(4, 10, dtype=torch.float64),
        lambda: torch.ones(4, 10, dtype=torch.long),
        lambda: torch.tensor(1.0),
    ],
    ids=["features", "dtype", "integer", "0d"],
)
def test_bad_input_same_exception_type(bad: Callable[[], torch.Tensor]) -> None:
    ref = reference_mlp([10, 8, 3], seed=0)
    fused = fused_copy(ref)
    x = bad()
    with pytest.raises(Exception) as expected:
        ref(x)
    with warnings.catch_warnings(), pytest.raises(expected.type):
        warnings.simplefilter("ignore")
        fused(x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 10), (3, 4, 10), (2, 0, 10), (10,)], ids=str)
def test_batch_shapes(device: str, shape: tuple[int, ...]) -> None:
    ref = reference_mlp([10, 8, 6, 3], seed=0, device=device)
    fused = fused_copy(ref)
    x = torch.randn(shape, device=device)
    out = forward_backward(fused, x)
    expected = forward_backward(ref, x)
    assert out.shape == expected.shape == (*shape[:-1], 3)
    assert_close(out, expected)
    assert_same_grads(fused, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_input_requires_grad(device: str) -> None:
    ref = reference_mlp([10, 8, 3], seed=0, device=device)
    fused = fused_copy(ref)
    x = torch.randn(4, 10, device=device, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    fused(x).sum().backward()
    ref(xr).sum().backward()
    assert_close(x.grad, xr.grad)


# --- determinism -----------------------------------------------------------------------


def _grads_run(model: nn.Module, x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_()
    out = model(xi)
    out.backward(g)
    return [out.detach(), xi.grad] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("sizes", [[784, 30, 1], [1000, 100, 10]], ids=str)
@pytest.mark.parametrize("batch", [64, 1000])
def test_bitwise_deterministic(sizes: list[int], batch: int) -> None:
    fused = Sequential(*reference_mlp(sizes, seed=0))
    x = torch.randn(batch, sizes[0])
    g = torch.randn(batch, sizes[-1])
    torch.set_num_threads(2)
    first = _grads_run(fused, x, g)
    second = _grads_run(fused, x, g)
    torch.set_num_threads(1)
    single = _grads_run(fused, x, g)
    for i, (a, b, c) in enumerate(zip(first, second, single, strict=True)):
        assert torch.equal(a, b), f"tensor {i} differs between two identical runs"
        assert torch.equal(a, c), f"tensor {i} differs between 2 threads and 1 thread"


# --- torch.func ----------------------------------------------------------------------


def test_torch_func_grad() -> None:
    """``torch.func.grad`` over ``functional_call``, as with nn.Sequential."""
    ref = reference_mlp([6, 5, 2], seed=0)
    fused = fused_copy(ref)
    params = {k: v.detach() for k, v in ref.named_parameters()}
    x = torch.randn(4, 6)

    def loss(model: nn.Module) -> Callable:
        return lambda p, x: torch.func.functional_call(model, p, (x,)).square().sum()

    expected = torch.func.grad(loss(ref))(params, x)
    got = torch.func.grad(loss(fused))(params, x)
    for k in expected:
        assert_close(got[k], expected[k], msg=k)


def test_torch_func_vmap_per_sample_grads() -> None:
    """Per-sample gradients with ``vmap(grad(...))``, as with nn.Sequential."""
    ref = reference_mlp([6, 5, 2], seed=0)
    fused = fused_copy(ref)
    params = {k: v.detach() for k, v in ref.named_parameters()}
    x = torch.randn(4, 6)

    def loss(model: nn.Module) -> Callable:
        return lambda p, xi: torch.func.functional_call(model, p, (xi.unsqueeze(0),)).square().sum()

    expected = torch.func.vmap(torch.func.grad(loss(ref)), in_dims=(None, 0))(params, x)
    got = torch.func.vmap(torch.func.grad(loss(fused)), in_dims=(None, 0))(params, x)
    for k in expected:
        assert_close(got[k], expected[k], msg=k)


def test_double_backward_not_silently_wrong() -> None:
    """A gradient penalty through the fused chain: either eager's result or a
    clear error, never a penalty that silently contributes no gradient."""
    ref = reference_mlp([6, 5, 2], seed=0, dtype=torch.float64)
    fused = fused_copy(ref)
    x = torch.randn(4, 6, dtype=torch.float64)
    for model in (fused, ref):
        xi = x.clone().requires_grad_()
        loss = model(xi).sum()
        try:
            (gx,) = torch.autograd.grad(loss, xi, create_graph=True)
            (loss + gx.pow(2).sum()).backward()
        except RuntimeError as e:
            assert model is fused
            assert any(s in str(e) for s in ("twice", "once_differentiable", "double backward")), str(e)
            return
    assert_same_grads(fused, ref)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated in favour of compile/export
def test_jit_script_trace_and_export_like_nn() -> None:
    """What nn.Sequential users can do with TorchScript and torch.export still works,
    with the same parameters and results (scripting compiles torch.nn's modules)."""
    torch.manual_seed(0)
    model = torch_fastmlp.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 1))
    layer = torch_fastmlp.FusedLinearReLU(6, 5)
    loss = torch_fastmlp.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0]))
    x, y = torch.randn(4, 6), torch.rand(4, 1)
    scripted = torch.jit.script(model)
    assert_close(scripted(x), model(x))
    assert {k: v.data_ptr() for k, v in scripted.state_dict().items()} == {
        k: v.data_ptr() for k, v in model.state_dict().items()
    }
    assert_close(torch.jit.trace(model, x)(x + 1), model(x + 1))
    assert_close(torch.jit.script(layer)(x), layer(x))
    # a scripted FusedLinearReLU keeps its class name and state_dict keys (checkpoints load both ways)
    fused_model = torch_fastmlp.Sequential(torch_fastmlp.FusedLinearReLU(6, 5), nn.Linear(5, 1))
    scripted_fused = torch.jit.script(fused_model)
    assert list(scripted_fused.state_dict()) == list(fused_model.state_dict())
    scripted_fused.load_state_dict(fused_model.state_dict())
    assert torch.jit.script(layer).original_name == "FusedLinearReLU"
    assert_close(scripted_fused(x), fused_model(x))
    assert_close(torch.jit.trace(layer, x)(x + 1), layer(x + 1))
    assert_close(torch.jit.script(loss)(model(x), y), loss(model(x), y))
    mlp = torch_fastmlp.MLP([6, 3, 1])
    assert_close(torch.jit.script(mlp)(x), mlp(x))
    exported = torch.export.export(model, (x,))
    assert_close(exported.module()(x + 1), model(x + 1))


def test_meta_device_modules() -> None:
    """Modules built on the meta device (shape-only dry runs) run like torch.nn's."""
    with torch.device("meta"):
        model = torch_fastmlp.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
        x, y = torch.randn(4, 6), torch.rand(4, 2)
        out = model(x)
        loss = torch_fastmlp.BCEWithLogitsLoss()(out, y)
        fused = torch_fastmlp.FusedBCEClassifier(model)(x, y)
    assert out.device.type == "meta" and out.shape == (4, 2)
    assert loss.shape == () and fused.shape == ()
