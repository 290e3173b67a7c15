"""The CPU kernels on every vector ISA path and at the batch sizes where they
change form (the forward's dot and outer-product forms and its row tiles
through a whole chain, the weight gradient's row groups and column tails).

Each ISA runs in a child process (``FASTMLP_CPU_ISA`` is read once, at import)
that checks float64 results against torch and prints any mismatch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import torch_fastmlp

CHECKS = r"""
import itertools, torch, torch_fastmlp
ops = torch.ops.fastmlp
torch.manual_seed(0)
bad = []
def close(name, got, want):
    if not torch.allclose(got, want, rtol=1e-9, atol=1e-9):
        bad.append(f"{name}: max err {(got - want).abs().max().item():.3g}")
# out_features around the vector widths (4/8/16 doubles or floats) and the outer
# form's panels of 4 vectors (65, 100, 128, 200), batches either side of the outer
# form's threshold and of its row blocks; features fewer than a vector (5) and
# with a tail (131) for the weight gradient.
for n, k, b, relu, bias in itertools.product(
        [1, 3, 7, 8, 9, 16, 17, 30, 33, 64, 65, 100, 128, 200], [5, 16, 30, 131], [3, 255, 256, 301], [True, False],
        [True, False]):
    x = torch.randn(b, k, dtype=torch.float64)
    w = torch.randn(n, k, dtype=torch.float64)
    bb = torch.randn(n, dtype=torch.float64) if bias else None
    ref = torch.nn.functional.linear(x, w, bb)
    ref = ref.relu() if relu else ref
    close(f"forward n={n} k={k} b={b} relu={relu} bias={bias}", ops.linear_act(x, w, bb, relu), ref)
    g = torch.randn(b, n, dtype=torch.float64)
    masked = g * (ref > 0) if relu else g
    gi, gw, gb = ops.linear_act_backward(g, x, w, ref, relu, [True, True, bias])
    close(f"grad_weight n={n} k={k} b={b}", gw, masked.t() @ x)
    close(f"grad_input n={n} k={k} b={b}", gi, masked @ w)
# whole narrow chains (mlp_forward runs them tile by tile through every layer):
# batches around the tile sizes and the outer form's threshold, a strided input
for sizes, b, last_relu in itertools.product(
        [[784, 30, 1], [40, 64, 17, 3], [9, 8], [50, 100, 128, 7], [20, 200, 256, 3]],
        [1, 7, 12, 13, 255, 256, 257, 529, 1000],
        [False, True]):
    x = torch.randn(2 * b, sizes[0], dtype=torch.float64)[::2]  # a row stride of 2 rows
    ws = [torch.randn(n, k, dtype=torch.float64) for k, n in zip(sizes, sizes[1:])]
    bs = [torch.randn(n, dtype=torch.float64) if i % 2 == 0 else None for i, n in enumerate(sizes[1:])]
    out, hidden = ops.mlp_forward(x, ws, bs, last_relu)
    h, at = x, 0
    for i, (w, bb) in enumerate(zip(ws, bs)):
        h = torch.nn.functional.linear(h, w, bb)
        if i + 1 < len(ws) or last_relu:
            h = h.relu()
        if i + 1 < len(ws):
            close(f"chain {sizes} b={b} hidden {i}", hidden[at:at + h.numel()].view(h.shape), h)
            at += h.numel()
    close(f"chain {sizes} b={b} output", out, h)
# a transposed (non-contiguous) weight and a strided input
x = torch.randn(300, 40, dtype=torch.float64)[:, ::2]
w = torch.randn(20, 24, dtype=torch.float64).t()
close("strided forward", ops.linear_act(x, w, None, True), (x @ w.t()).relu())
# float32: the same paths against a float64 reference, and 1 vs 2 threads bitwise
for b in (255, 256, 1500):
    x = torch.randn(b, 784)
    w = torch.randn(30, 784) * 0.05
    bb = torch.randn(30)
    torch.set_num_threads(1)
    one = ops.linear_act(x, w, bb, True)
    torch.set_num_threads(2)
    two = ops.linear_act(x, w, bb, True)
    if not torch.equal(one, two):
        bad.append(f"float32 forward b={b}: 1 and 2 threads differ")
    ref = torch.nn.functional.linear(x.double(), w.double(), bb.double()).relu().float()
    if not torch.allclose(one, ref, rtol=1e-5, atol=1e-5):
        bad.append(f"float32 forward b={b}: max err {(one - ref).abs().max().item():.3g}")
    w2, b2 = torch.randn(1, 30) * 0.2, torch.randn(1)
    torch.set_num_threads(1)
    one = ops.mlp_forward(x, [w, w2], [bb, b2], False)
    torch.set_num_threads(2)
    two = ops.mlp_forward(x, [w, w2], [bb, b2], False)
    if not (torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])):
        bad.append(f"float32 chain forward b={b}: 1 and 2 threads differ")
# the weight gradient's feature ranges over 1, 2 and 3 threads: bitwise the
# same (787 features: a scalar tail; 3 threads: ranges that end mid-block)
for b, k in ((300, 787), (2000, 784), (700, 40)):
    x = torch.randn(b, k)
    g = torch.randn(b, 30)
    w = torch.randn(30, k)
    grads = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        grads.append(ops.linear_act_backward(g, x, w, g, False, [False, True, False])[1])
    torch.set_num_threads(2)
    if not (torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])):
        bad.append(f"float32 weight grad b={b} k={k}: 1, 2 and 3 threads differ")
    ref = (g.double().t() @ x.double()).float()
    if not torch.allclose(grads[0], ref, rtol=1e-4, atol=1e-3):
        bad.append(f"float32 weight grad b={b} k={k}: max err {(grads[0] - ref).abs().max().item():.3g}")
print("ISA", torch_fastmlp.CPU_ISA)
print("\n".join(bad) if bad else "OK")
"""


def _isas() -> list[str]:
    order = ["avx512", "avx2", "baseline"]
    return order[order.index(torch_fastmlp.CPU_ISA) :]


@pytest.mark.parametrize("isa", _isas())
def test_kernels_on_every_isa(isa: str) -> None:
    env = dict(os.environ, FASTMLP_CPU_ISA=isa)
    proc = subprocess.run([sys.executable, "-c", CHECKS], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == f"ISA {isa}", lines
    assert lines[1:] == ["OK"], "\n".join(lines[1:40])


def test_unknown_isa_name_keeps_the_detected_one() -> None:
    env = dict(os.environ, FASTMLP_CPU_ISA="sse9")
    code = "import torch_fastmlp; print(torch_fastmlp.CPU_ISA)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.stdout.strip() == torch_fastmlp.CPU_ISA
