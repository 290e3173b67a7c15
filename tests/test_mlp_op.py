"""``fastmlp::mlp_forward`` / ``mlp_backward`` and ``MLPFunction``: a whole
Linear(+ReLU) chain as one op, checked against the eager chain."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest
import torch
from conftest import DEVICES, assert_close, leaf, make_linear_params, reference_chain, reference_mlp
from torch import nn

import torch_fastmlp
from torch_fastmlp import MLPFunction

ops = torch.ops.fastmlp

SIZES = [13, 17, 9, 11, 5]


def make_chain(
    depth: int,
    bias: Sequence[bool] | bool = True,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    sizes: Sequence[int] = SIZES,
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    biases_on = [bias] * depth if isinstance(bias, bool) else list(bias)
    weights: list[torch.Tensor] = []
    biases: list[torch.Tensor | None] = []
    for l in range(depth):
        w, b = make_linear_params(sizes[l], sizes[l + 1], biases_on[l], dtype, device)
        weights.append(w)
        biases.append(b)
    return weights, biases


def interleave(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    out: list[torch.Tensor | None] = []
    for w, b in zip(weights, biases, strict=True):
        out += [w, b]
    return out


def bias_pattern(depth: int, kind: str) -> list[bool]:
    if kind == "all":
        return [True] * depth
    if kind == "none":
        return [False] * depth
    return [l % 2 == 1 for l in range(depth)]  # "some": every other layer has a bias


def mlp_apply(x: torch.Tensor, last_relu: bool, *params: torch.Tensor | None) -> torch.Tensor:
    """``MLPFunction.apply``'s output (older versions also returned the hidden buffer)."""
    result = MLPFunction.apply(x, last_relu, *params)
    return result[0] if isinstance(result, tuple) else result


def hidden_size(batch: int, weights: Sequence[torch.Tensor]) -> int:
    return sum(batch * w.shape[0] for w in weights[:-1])


# --- MLPFunction vs eager -------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("last_relu", [False, True])
@pytest.mark.parametrize("bias_kind", ["all", "none", "some"])
@pytest.mark.parametrize("batch", [0, 1, 8, 33])
def test_mlp_function_vs_eager(
    device: str, dtype: torch.dtype, depth: int, last_relu: bool, bias_kind: str, batch: int
) -> None:
    weights, biases = make_chain(depth, bias_pattern(depth, bias_kind), dtype, device)
    x = torch.randn(batch, SIZES[0], dtype=dtype, device=device, requires_grad=True)
    out = mlp_apply(x, last_relu, *interleave(weights, biases))
    assert out.shape == (batch, SIZES[depth])

    xr = leaf(x)
    wr = [leaf(w) for w in weights]
    br = [None if b is None else leaf(b) for b in biases]
    ref = reference_chain(xr, wr, br, last_relu)
    k = max(SIZES) + batch
    assert_close(out, ref, reduction=k)

    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    assert_close(x.grad, xr.grad, reduction=k, msg="grad input")
    for l in range(depth):
        assert_close(weights[l].grad, wr[l].grad, reduction=k, msg=f"grad weight {l}")
        if biases[l] is not None:
            assert_close(biases[l].grad, br[l].grad, reduction=k, msg=f"grad bias {l}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead", [(3, 4), (2, 0), (2, 3, 2)], ids=str)
def test_mlp_function_leading_dims(device: str, lead: tuple[int, ...]) -> None:
    weights, biases = make_chain(3, True, torch.float64, device)
    x = torch.randn(*lead, SIZES[0], dtype=torch.float64, device=device, requires_grad=True)
    out = mlp_apply(x, False, *interleave(weights, biases))
    xr = leaf(x)
    wr = [leaf(w) for w in weights]
    br = [leaf(b) for b in biases]
    ref = reference_chain(xr, wr, br, False)
    assert out.shape == ref.shape
    assert_close(out, ref)
    out.sum().backward()
    ref.sum().backward()
    assert_close(x.grad, xr.grad)
    for a, e in zip(weights + biases, wr + br, strict=True):
        assert_close(a.grad, e.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_mlp_function_noncontiguous_input(device: str) -> None:
    weights, biases = make_chain(2, True, torch.float64, device)
    base = torch.randn(SIZES[0], 10, dtype=torch.float64, device=device, requires_grad=True)
    out = mlp_apply(base.t(), True, *interleave(weights, biases))
    rb = leaf(base)
    ref = reference_chain(rb.t(), [leaf(w) for w in weights], [leaf(b) for b in biases], True)
    assert_close(out, ref)
    out.sum().backward()
    ref.sum().backward()
    assert_close(base.grad, rb.grad)


# frozen subsets: which of x, w0, b0, w1, b1, w2, b2 require grad
FROZEN = {
    "first_layer_frozen": [True, False, False, True, True, True, True],
    "input_only": [True, False, False, False, False, False, False],
    "last_weight_only": [False, False, False, False, False, True, False],
    "biases_only": [False, False, True, False, True, False, True],
    "middle_frozen_no_input": [False, True, True, False, False, True, True],
    "first_bias_only": [False, False, True, False, False, False, False],
    "weights_only": [False, True, False, True, False, True, False],
}


def check_frozen_subset(
    flags: Sequence[bool], sizes: Sequence[int], batch: int, last_relu: bool, device: str, strided_grad: bool
) -> None:
    """A 3-layer chain where ``flags`` say which of x, w0, b0, w1, b1, w2, b2
    require grad: the gradients asked for match eager, the others stay None."""
    weights, biases = make_chain(3, True, torch.float64, device, sizes)
    x = torch.randn(batch, sizes[0], dtype=torch.float64, device=device)
    tensors = [x, *interleave(weights, biases)]
    for t, f in zip(tensors, flags, strict=True):
        t.requires_grad_(f)
    ref_tensors = [leaf(t, t.requires_grad) for t in tensors]
    out = mlp_apply(tensors[0], last_relu, *tensors[1:])
    ref = reference_chain(ref_tensors[0], ref_tensors[1::2], ref_tensors[2::2], last_relu)
    g = torch.randn(sizes[3], batch, dtype=torch.float64, device=device).t() if strided_grad else torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    for i, (t, r, f) in enumerate(zip(tensors, ref_tensors, flags, strict=True)):
        if f:
            assert_close(t.grad, r.grad, reduction=batch, msg=f"tensor {i}")
        else:
            assert t.grad is None, f"tensor {i} is frozen but got a gradient"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(FROZEN))
@pytest.mark.parametrize("last_relu", [False, True])
def test_mlp_function_frozen_subsets(device: str, case: str, last_relu: bool) -> None:
    check_frozen_subset(FROZEN[case], SIZES, 6, last_relu, device, strided_grad=False)


ROW_PARTIAL_SIZES = [300, 40, 20, 3]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["all", "first_layer_frozen", "input_only", "middle_frozen_no_input"])
@pytest.mark.parametrize("last_relu", [False, True])
@pytest.mark.parametrize("batch", [100, 255, 700])  # 4, 8, 8 partials (700: every layer <= 64 wide)
def test_mlp_function_row_partials(device: str, case: str, last_relu: bool, batch: int) -> None:
    """Batches with work enough for several row partials (CPU: the backward in
    one parallel region), with a non-contiguous incoming gradient."""
    flags = [True] * 7 if case == "all" else FROZEN[case]
    check_frozen_subset(flags, ROW_PARTIAL_SIZES, batch, last_relu, device, strided_grad=True)


@pytest.mark.parametrize("batch", [100, 700])
def test_mlp_backward_row_partials_deterministic_over_threads(batch: int) -> None:
    weights, biases = make_chain(3, True, torch.float32, "cpu", ROW_PARTIAL_SIZES)
    x = torch.randn(batch, ROW_PARTIAL_SIZES[0])
    g = torch.randn(batch, ROW_PARTIAL_SIZES[-1])
    out, hidden = ops.mlp_forward(x, weights, biases, False)
    results = []
    for threads in (1, 2, 3, 2):
        torch.set_num_threads(threads)
        gi, gw, gb = ops.mlp_backward(g, x, weights, hidden, None, False, True, [True] * 3, [True] * 3)
        results.append([gi, *gw, *gb])
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


# --- the raw ops -------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("last_relu", [False, True])
def test_mlp_ops_raw(device: str, depth: int, last_relu: bool) -> None:
    """mlp_forward's hidden blocks are the ReLU activations; mlp_backward returns
    exactly the gradients asked for (others empty) and they equal eager's."""
    batch = 7
    weights, biases = make_chain(depth, bias_pattern(depth, "some"), torch.float64, device)
    weights = [w.detach() for w in weights]
    biases = [None if b is None else b.detach() for b in biases]
    x = torch.randn(batch, SIZES[0], dtype=torch.float64, device=device)
    out, hidden = ops.mlp_forward(x, weights, biases, last_relu)
    assert hidden.shape == (hidden_size(batch, weights),)

    # hidden: layer l is a contiguous [B, N_l] block.
    h = x
    offset = 0
    for l in range(depth - 1):
        h = torch.relu(nn.functional.linear(h, weights[l], biases[l]))
        n = batch * weights[l].shape[0]
        assert_close(hidden[offset : offset + n].view(batch, -1), h, msg=f"hidden block {l}")
        offset += n
    ref_leaves = [leaf(x)] + [leaf(w) for w in weights] + [None if b is None else leaf(b) for b in biases]
    ref = reference_chain(ref_leaves[0], ref_leaves[1 : depth + 1], ref_leaves[depth + 1 :], last_relu)
    assert_close(out, ref)
    g = torch.randn_like(ref)
    ref.backward(g)
    ref_gx = ref_leaves[0].grad
    ref_gw = [t.grad for t in ref_leaves[1 : depth + 1]]
    ref_gb = [None if t is None else t.grad for t in ref_leaves[depth + 1 :]]

    has_bias = [b is not None for b in biases]
    masks = list(itertools.product([False, True], repeat=1 + 2 * depth))
    if len(masks) > 64:
        masks = masks[::3] + [masks[-1]]
    for m in masks:
        input_grad, wmask = m[0], list(m[1 : depth + 1])
        bmask = [a and hb for a, hb in zip(m[depth + 1 :], has_bias, strict=True)]
        gx, gws, gbs = ops.mlp_backward(
            g, x, weights, hidden, out if last_relu else None, last_relu, input_grad, wmask, bmask
        )
        assert len(gws) == depth and len(gbs) == depth
        if input_grad:
            assert_close(gx, ref_gx)
        else:
            assert gx.numel() == 0
        for l in range(depth):
            if wmask[l]:
                assert_close(gws[l], ref_gw[l], msg=f"weight {l} mask {m}")
            else:
                assert gws[l].numel() == 0
            if bmask[l]:
                assert_close(gbs[l], ref_gb[l], msg=f"bias {l} mask {m}")
            else:
                assert gbs[l].numel() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("last_relu", [False, True])
def test_opcheck_mlp_forward(device: str, depth: int, last_relu: bool) -> None:
    weights, biases = make_chain(depth, bias_pattern(depth, "some"), torch.float32, device)
    weights = [w.detach() for w in weights]
    biases = [None if b is None else b.detach() for b in biases]
    for batch in (5, 0):
        x = torch.randn(batch, SIZES[0], device=device)
        torch.library.opcheck(ops.mlp_forward.default, (x, weights, biases, last_relu))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("last_relu", [False, True])
@pytest.mark.parametrize("mask", ["all", "input_only", "last_only", "biases_only"])
def test_opcheck_mlp_backward(device: str, depth: int, last_relu: bool, mask: str) -> None:
    weights, biases = make_chain(depth, True, torch.float32, device)
    weights = [w.detach() for w in weights]
    biases = [b.detach() for b in biases]
    x = torch.randn(5, SIZES[0], device=device)
    out, hidden = ops.mlp_forward(x, weights, biases, last_relu)
    g = torch.randn_like(out)
    input_grad = mask in ("all", "input_only")
    wmask = [mask == "all" or (mask == "last_only" and l == depth - 1) for l in range(depth)]
    bmask = [mask in ("all", "biases_only") for _ in range(depth)]
    torch.library.opcheck(
        ops.mlp_backward.default,
        (g, x, weights, hidden, out if last_relu else None, last_relu, input_grad, wmask, bmask),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("last_relu", [False, True])
def test_gradcheck_mlp_function(device: str, depth: int, last_relu: bool) -> None:
    weights, biases = make_chain(depth, bias_pattern(depth, "some"), torch.float64, device, sizes=[4, 5, 3, 4])
    x = torch.randn(3, 4, dtype=torch.float64, device=device, requires_grad=True)
    params = [p for p in interleave(weights, biases) if p is not None]
    layout = interleave(weights, biases)

    def fn(x: torch.Tensor, *flat: torch.Tensor) -> torch.Tensor:
        it = iter(flat)
        full = [None if p is None else next(it) for p in layout]
        return mlp_apply(x, last_relu, *full)

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-7)


def test_mlp_errors() -> None:
    weights, biases = make_chain(2, True)
    with pytest.raises(RuntimeError, match="input features|in_features|expects"):
        ops.mlp_forward(torch.randn(3, SIZES[0] + 1), [w.detach() for w in weights], list(biases), False)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.mlp_forward(
            torch.randn(3, SIZES[0], dtype=torch.float64), [w.detach() for w in weights], list(biases), False
        )
    with pytest.raises(RuntimeError, match="biases"):
        ops.mlp_forward(torch.randn(3, SIZES[0]), [w.detach() for w in weights], [biases[0]], False)
    with pytest.raises(RuntimeError, match="at least one layer"):
        ops.mlp_forward(torch.randn(3, SIZES[0]), [], [], False)


# --- saved-tensor memory --------------------------------------------------------------


@contextmanager
def saved_bytes(params: Sequence[torch.Tensor]) -> Iterator[dict[str, int]]:
    """Sums the bytes of the distinct storages autograd saves that are not parameters."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}
    result = {"bytes": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    result["bytes"] = sum(seen.values())


@pytest.mark.parametrize("sizes", [[784, 30, 1], [1000, 100, 10]], ids=str)
@pytest.mark.parametrize("input_grad", [False, True])
def test_saved_tensor_bytes_not_above_eager(sizes: list[int], input_grad: bool) -> None:
    ref = reference_mlp(sizes, seed=0)
    fused = torch_fastmlp.Sequential(*reference_mlp(sizes, seed=0))
    x = torch.randn(64, sizes[0], requires_grad=input_grad)

    with saved_bytes(list(ref.parameters())) as eager_saved:
        ref_out = ref(x)
    with saved_bytes(list(fused.parameters())) as fused_saved:
        out = fused(x)
    assert eager_saved["bytes"] > 0
    assert fused_saved["bytes"] <= eager_saved["bytes"], (
        f"fused saves {fused_saved['bytes']} bytes, eager {eager_saved['bytes']}"
    )
    assert_close(out, ref_out, reduction=sizes[0])
