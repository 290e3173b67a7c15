"""The CUDA kernels, run on the CPU by the emulation harness (csrc/emu/cuda_emu.h).

A small test extension (tests/emu/emu_ext.cpp) compiles the project's kernel
headers (csrc/cuda/*.cuh) as plain C++ after cuda_emu.h: every CUDA thread is a
fiber, ``__syncthreads()`` and the warp intrinsics are real rendezvous. It is
built with compile-only ThreadSanitizer instrumentation whose callbacks the
harness implements, so while a kernel runs every load/store it makes is checked:

* global memory: accesses outside every registered tensor (out of bounds, by
  any distance, either side; exact element reported), writes to input tensors,
  reads of output/workspace elements no kernel wrote, and two threads of one
  launch writing the same element without a barrier of their block between;
* shared memory: reads of bytes not written in this block (e.g. a missing
  ``__syncthreads()``), read/write and write/write races between threads not
  separated by a ``__syncthreads()`` (or ``__syncwarp()`` within a warp), and
  accesses past the dynamic shared memory the launch requested;
* execution: a ``__syncthreads()`` not reached by every thread of the block (or
  reached at different call sites), and warp intrinsics whose mask names exited
  or missing lanes, or lanes waiting elsewhere.

Not caught: overruns of one static ``__shared__`` array into another, races
between blocks that only read each other's results (the "last block" pattern is
allowed), anything inside uninstrumented code (libm), inter-block ordering bugs
hidden by the fixed block order, and code paths under ``__CUDA_ARCH__``.

The build is cached in tests/emu/build (ninja rebuilds when a header changes).
"""

from __future__ import annotations

import itertools
import math
import platform
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
EMU_DIR = ROOT / "tests" / "emu"
BUILD_DIR = EMU_DIR / "build"  # ignored by git (`build/` in .gitignore)
# Instrument every memory access of the TU; the harness defines the callbacks,
# so nothing is linked (see csrc/emu/cuda_emu.h).
MEMCHECK_CFLAGS = ["-DFASTMLP_EMU_MEMCHECK=1", "-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0"]
BLOCK = 128  # kBrokenThreads

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64"),
    reason="the CUDA emulation harness needs Linux (ELF TLS, ucontext)",
)


@pytest.fixture(scope="module")
def emu_lib() -> str:
    """Builds (or reuses) the test extension and loads it; returns the library path."""
    from torch.utils.cpp_extension import load

    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    return load(
        name="fastmlp_emu_test",
        sources=[str(EMU_DIR / "emu_ext.cpp")],
        extra_include_paths=[str(ROOT / "csrc")],
        extra_cflags=["-O1", *MEMCHECK_CFLAGS],
        build_directory=str(BUILD_DIR),
        is_python_module=False,
        verbose=False,
    )


@pytest.fixture(scope="module")
def emu(emu_lib: str) -> Any:
    return torch.ops.fastmlp_emu_test


def run_isolated(emu_lib: str, snippet: str) -> subprocess.CompletedProcess[str]:
    """Runs ``snippet`` (with ``ops`` = the test ops) in a fresh interpreter, for
    cases that may kill the process (a signal in host code)."""
    code = f"import torch\ntorch.ops.load_library({emu_lib!r})\nops = torch.ops.fastmlp_emu_test\n{snippet}\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def describe_exit(r: subprocess.CompletedProcess[str]) -> str:
    if r.returncode < 0:
        return f"killed by {signal.Signals(-r.returncode).name}"
    return f"exit code {r.returncode}: {r.stderr[-2000:]}"


DTYPES = [torch.float32, torch.float64]


def tol(dtype: torch.dtype, k: int = 1) -> dict[str, float]:
    """assert_close tolerances for a sum of ``k`` products in ``dtype``."""
    scale = math.sqrt(max(k, 1))
    if dtype == torch.float64:
        return {"rtol": 1e-12, "atol": 1e-12 * scale}
    return {"rtol": 1e-5, "atol": 2e-6 * scale}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- harness self-tests


def test_memcheck_is_compiled_and_sees_accesses(emu: Any) -> None:
    before = emu.stats()
    assert before[0] == 1
    emu.block_sum(torch.ones(1000), 2)
    after = emu.stats()
    assert after[1] > before[1] and after[4] > before[4]  # launches, checked accesses


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "blocks"), [(1, 1), (255, 1), (1000, 3), (5000, 2)])
def test_block_reduction(emu: Any, dtype: torch.dtype, n: int, blocks: int) -> None:
    x = torch.randn(n, dtype=dtype, generator=gen(n))
    partial, positives = emu.block_sum(x, blocks)
    torch.testing.assert_close(partial.sum(), x.sum(), **tol(dtype, n))
    # __syncthreads_count: threads whose first element (i = b * 256 + t) is positive
    firsts = torch.full((blocks * 256,), -1.0, dtype=dtype)
    m = min(n, blocks * 256)
    firsts[:m] = x[:m]
    assert positives.tolist() == (firsts.view(blocks, 256) > 0).sum(1).tolist()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (30, 100), (41, 5)])
def test_warp_shuffle_reduction(emu: Any, dtype: torch.dtype, shape: tuple[int, int]) -> None:
    x = torch.randn(shape, dtype=dtype, generator=gen(1))
    out = emu.warp_row_sum(x)
    ref = x.sum(1)
    torch.testing.assert_close(out[:, 0], ref, **tol(dtype, shape[1]))
    torch.testing.assert_close(out[:, 1], ref, **tol(dtype, shape[1]))


def warp_ops_model(x: list[int]) -> list[list[int]]:
    """What selftest_warp_ops computes, from the CUDA semantics."""
    out = []
    for t, v in enumerate(x):
        lane, base = t % 32, t - t % 32
        warp = x[base : base + 32]
        scan = sum(warp[: lane + 1])
        seg8 = lane - lane % 8
        down = warp[lane + 3] if lane + 3 < seg8 + 8 else v
        seg16 = lane - lane % 16
        xor = warp[lane ^ 5] if (lane ^ 5) < seg16 + 16 else v
        ballot = sum(1 << j for j, w in enumerate(warp) if w > 0)
        ballot = ballot - (1 << 32) if ballot >= 1 << 31 else ballot  # as int32
        match = sum(1 << j for j, w in enumerate(warp) if _cmod(w) == _cmod(v))
        match = match - (1 << 32) if match >= 1 << 31 else match
        partial = warp[lane ^ 1] if lane < 16 else -7
        out.append(
            [
                warp[3],
                scan,
                down,
                xor,
                ballot,
                int(all(w > -100 for w in warp)),
                int(any(w > 100 for w in warp)),
                sum(warp),
                match,
                partial,
            ]
        )
    return out


def _cmod(v: int) -> int:
    """C's v % 3 (truncating)."""
    return int(math.fmod(v, 3))


@pytest.mark.parametrize("threads", [32, 64, 96])
def test_warp_intrinsics(emu: Any, threads: int) -> None:
    x = torch.randint(-50, 50, (threads,), dtype=torch.int32, generator=gen(threads))
    x[7] = 101  # one lane makes __any_sync true in warp 0
    got = emu.warp_ops(x).tolist()
    ref = warp_ops_model(x.tolist())
    for t in range(threads):
        assert got[t] == ref[t], f"thread {t}: got {got[t]}, expected {ref[t]}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "block"), [(1, 64), (100, 64), (1000, 128)])
def test_dynamic_shared_memory(emu: Any, dtype: torch.dtype, n: int, block: int) -> None:
    x = torch.randn(n, dtype=dtype, generator=gen(n))
    y = emu.reverse_chunks(x, block)
    ref = torch.cat([c.flip(0) for c in x.split(block)])
    assert torch.equal(y, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (33, 70), (64, 31)])
def test_2d_grid_transpose(emu: Any, dtype: torch.dtype, shape: tuple[int, int]) -> None:
    x = torch.randn(shape, dtype=dtype, generator=gen(2))
    assert torch.equal(emu.transpose(x), x.t())


def test_dynamic_smem_in_another_namespace_and_opt_in(emu: Any) -> None:
    x = torch.randn(100, generator=gen(3))
    torch.testing.assert_close(emu.scale_by_smem_size(x, 100, False), x * 100)
    big = 20_000  # 80 KB: over the 48 KiB default, needs cudaFuncSetAttribute
    with pytest.raises(RuntimeError, match="cudaFuncAttributeMaxDynamicSharedMemorySize"):
        emu.scale_by_smem_size(x, big, False)
    torch.testing.assert_close(emu.scale_by_smem_size(x, big, True), x * big)


# ---------------------------------------------------------------- deliberately broken kernels


def chunks(x: torch.Tensor) -> list[torch.Tensor]:
    return list(x.split(BLOCK))


def early_return_ref(x: torch.Tensor) -> torch.Tensor:
    out = []
    for c in chunks(x):
        s = torch.zeros(BLOCK, dtype=x.dtype)
        s[: len(c)] = c
        out.append(c + s.roll(-1)[: len(c)])
    return torch.cat(out)


def warp_sums(x: torch.Tensor) -> torch.Tensor:
    pad = torch.zeros((len(x) + 31) // 32 * 32, dtype=x.dtype)
    pad[: len(x)] = x
    return pad.view(-1, 32).sum(1, keepdim=True).expand(-1, 32).reshape(-1)[: len(x)]


def pairs_16(x: torch.Tensor) -> torch.Tensor:
    """x[i ^ 16] within 32-lane warps (0 past the end)."""
    pad = torch.zeros((len(x) + 31) // 32 * 32, dtype=x.dtype)
    pad[: len(x)] = x
    return pad.view(-1, 2, 16).flip(1).reshape(-1)[: len(x)]


# name -> (error the bug must raise, reference (y, partials) check of the fixed kernel)
BROKEN: dict[str, tuple[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]]] = {
    "off_by_one_read": (
        r"out-of-bounds read of 4 bytes at 0 bytes past the end of 'x' .*element index 300\)",
        lambda x, y, p: torch.testing.assert_close(p, torch.stack([c.sum() for c in chunks(x)])),
    ),
    "off_by_one_write": (
        r"out-of-bounds write of 4 bytes at 0 bytes past the end of 'y'",
        lambda x, y, p: torch.testing.assert_close(y, x),
    ),
    "scan_missing_sync": (
        r"shared-memory race: reads .*broken_scan_missing_sync<true>.*::s \+ \d+ bytes written by thread \d+",
        lambda x, y, p: torch.testing.assert_close(y, torch.cat([c.cumsum(0) for c in chunks(x)])),
    ),
    "reverse_missing_sync": (
        r"reads 4 bytes of shared memory never written in this block",
        lambda x, y, p: torch.testing.assert_close(y, torch.cat([c.flip(0) for c in chunks(x)])),
    ),
    "early_return_barrier": (
        r"block \(2,0,0\): divergent barrier \(deadlock\): threads 0-43 wait at __syncthreads\(\) "
        r"\(.*broken_kernels.cuh:\d+\); threads 44-127 have exited",
        lambda x, y, p: torch.testing.assert_close(y, early_return_ref(x)),
    ),
    "two_barrier_sites": (
        r"divergent barrier .*threads 0-126:2 wait at __syncthreads\(\) \(.*:\d+\); threads 1-127:2 wait at "
        r"__syncthreads\(\)",
        lambda x, y, p: torch.testing.assert_close(y, x),
    ),
    "shuffle_exited_lanes": (
        r"calls __shfl_xor_sync\(mask=0xffffffff\) .* but lane \d+ \(thread \d+\) of the mask has exited",
        lambda x, y, p: torch.testing.assert_close(y, warp_sums(x)),
    ),
    "partials_same_slot": (
        r"global write/write race on element 0 of 'partials': also written by thread 0 of block 0",
        lambda x, y, p: torch.testing.assert_close(p, torch.stack([c.sum() for c in chunks(x)])),
    ),
    "dynamic_smem_overrun": (
        r"out-of-bounds read of 4 bytes at dynamic shared memory 'fastmlp::cuda::smem' \+ 512 bytes: the launch "
        r"has 512 bytes",
        lambda x, y, p: torch.testing.assert_close(y, x),
    ),
    "warp_exchange_missing_syncwarp": (
        r"reads 4 bytes of shared memory never written in this block.*broken_warp_exchange_missing_syncwarp<true>",
        lambda x, y, p: torch.testing.assert_close(y, x.view(-1, 2).flip(1).reshape(-1)),  # 300 is even
    ),
    "shuffle_mask_misses_lanes": (
        r"calls __shfl_xor_sync\(mask=0x0000ffff\) .* with a mask that does not include its own lane 16",
        lambda x, y, p: torch.testing.assert_close(y, x + pairs_16(x)),
    ),
    "writes_input": (
        r"writes 4 bytes into read-only buffer 'x'",
        lambda x, y, p: torch.testing.assert_close(y, 2 * x),
    ),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_harness_catches_bug(emu: Any, name: str) -> None:
    x = torch.randn(300, generator=gen(4))  # 3 blocks of 128, the last one partial
    with pytest.raises(RuntimeError, match=BROKEN[name][0]):
        emu.broken(name, True, x)


@pytest.mark.parametrize("name", list(BROKEN))
def test_fixed_kernel_passes(emu: Any, name: str) -> None:
    x = torch.randn(300, generator=gen(4))
    x_before = x.clone()
    y, partials = emu.broken(name, False, x)
    BROKEN[name][1](x, y, partials)
    assert torch.equal(x, x_before)


# ---------------------------------------------------------------- csrc/cuda/gemm.cuh

SM_COUNT = 132  # an H100: decides split-K like the real dispatch would


def gemm_ref(
    a: torch.Tensor,
    b: torch.Tensor,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    relu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(epilogue(masked a @ b), row sums of masked a), computed in float64."""
    a64 = a.double()
    if mask is not None:
        a64 = torch.where(mask.double() <= 0, torch.zeros_like(a64), a64)  # NaN in the mask lets a through
    c = a64 @ b.double()
    if bias is not None:
        c = c + bias.double()
    if relu:
        c = torch.relu(c)
    return c.to(a.dtype), a64.sum(1).to(a.dtype)


def run_gemm(
    emu: Any,
    a: torch.Tensor,
    b: torch.Tensor,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    relu: bool = False,
    want_c: bool = True,
    want_rowsum: bool = False,
    sm_count: int = SM_COUNT,
) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    return emu.gemm(a, b, mask, bias, relu, want_c, want_rowsum, sm_count)


# (batch, in_features, out_features): tile-size edges (64 x 64 x 16), odd sizes, the 784-30-1 net
LINEAR_SHAPES = [(1, 1, 1), (7, 33, 30), (33, 784, 30), (65, 17, 70), (64, 16, 64), (30, 130, 1), (2, 1, 129)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("batch", "k", "n"), LINEAR_SHAPES)
@pytest.mark.parametrize(("bias", "relu"), [(True, True), (False, False)])
def test_gemm_linear_forward(emu: Any, dtype: torch.dtype, batch: int, k: int, n: int, bias: bool, relu: bool) -> None:
    g = gen(batch * 1000 + k + n)
    x = torch.randn(batch, k, dtype=dtype, generator=g)
    w = torch.randn(n, k, dtype=dtype, generator=g) / math.sqrt(k)
    b = torch.randn(n, dtype=dtype, generator=g) if bias else None
    c, _, _ = run_gemm(emu, x, w.t(), bias=b, relu=relu)  # w.t(): a strided [K, N] view
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    ref = (torch.relu(ref) if relu else ref).to(dtype)
    torch.testing.assert_close(c, ref, **tol(dtype, k))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_batch_zero_and_empty_k(emu: Any, dtype: torch.dtype) -> None:
    w = torch.randn(30, 7, dtype=dtype, generator=gen(5))
    c, _, _ = run_gemm(emu, torch.empty(0, 7, dtype=dtype), w.t())
    assert c.shape == (0, 30)
    # K = 0: the result is just the epilogue of the bias
    b = torch.randn(5, dtype=dtype, generator=gen(6))
    c, rowsum, _ = run_gemm(
        emu, torch.empty(3, 0, dtype=dtype), torch.empty(0, 5, dtype=dtype), bias=b, relu=True, want_rowsum=True
    )
    torch.testing.assert_close(c, torch.relu(b).expand(3, 5))
    torch.testing.assert_close(rowsum, torch.zeros(3, dtype=dtype))


def test_gemm_relu_keeps_nan(emu: Any) -> None:
    x = torch.randn(5, 20, generator=gen(7))
    x[2, 3] = float("nan")
    w = torch.randn(4, 20, generator=gen(8))
    c, _, _ = run_gemm(emu, x, w.t(), relu=True)
    ref = torch.relu(x @ w.t())
    assert torch.isnan(c[2]).all()
    torch.testing.assert_close(c, ref, equal_nan=True, rtol=1e-5, atol=1e-5)


def layer_tensors(dtype: torch.dtype, batch: int, k: int, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = gen(seed)
    x = torch.randn(batch, k, dtype=dtype, generator=g)
    w = torch.randn(n, k, dtype=dtype, generator=g) / math.sqrt(k)
    y = torch.relu(x @ w.t() + 0.1)  # the saved ReLU output: about half zeros
    grad = torch.randn(batch, n, dtype=dtype, generator=g)
    return x, w, y, grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("batch", "k", "n"), [(1, 1, 1), (7, 33, 30), (33, 784, 30), (65, 17, 70)])
def test_gemm_grad_input_masked(emu: Any, dtype: torch.dtype, batch: int, k: int, n: int) -> None:
    x, w, y, grad = layer_tensors(dtype, batch, k, n, seed=batch + k)
    gx, _, _ = run_gemm(emu, grad, w, mask=y)  # (g * (y > 0)) @ w
    ref, _ = gemm_ref(grad, w, mask=y)
    torch.testing.assert_close(gx, ref, **tol(dtype, n))
    gx_plain, _, _ = run_gemm(emu, grad, w)
    torch.testing.assert_close(gx_plain, (grad.double() @ w.double()).to(dtype), **tol(dtype, n))


# (batch, in_features, out_features, sm_count): batch >= 256 with few output tiles takes split-K
WEIGHT_GRAD_CASES = [
    (1, 1, 1, SM_COUNT),
    (7, 33, 30, SM_COUNT),
    (300, 784, 30, SM_COUNT),
    (784, 33, 1, SM_COUNT),
    (1000, 70, 65, 4),
    (513, 20, 7, 1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("batch", "k", "n", "sm_count"), WEIGHT_GRAD_CASES)
def test_gemm_weight_and_bias_grad(emu: Any, dtype: torch.dtype, batch: int, k: int, n: int, sm_count: int) -> None:
    x, w, y, grad = layer_tensors(dtype, batch, k, n, seed=batch * 7 + n)
    # grad_w[N, K] = (g * m)^T @ x and grad_b = row sums of (g * m)^T, in one pass
    gw, gb, splits = run_gemm(emu, grad.t(), x, mask=y.t(), want_rowsum=True, sm_count=sm_count)
    ref_w, ref_b = gemm_ref(grad.t(), x, mask=y.t())
    torch.testing.assert_close(gw, ref_w, **tol(dtype, batch))
    torch.testing.assert_close(gb, ref_b, **tol(dtype, batch))
    if batch >= 256 and sm_count > 1:
        assert splits > 1, "this case is meant to exercise split-K"
    if batch < 256:  # larger batches: test_gemm_no_output_tiles_does_not_crash
        # the bias gradient alone (no weight gradient: N = 0)
        _, gb_only, _ = run_gemm(emu, grad.t(), x, mask=y.t(), want_c=False, want_rowsum=True, sm_count=sm_count)
        torch.testing.assert_close(gb_only, ref_b, **tol(dtype, batch))


# GEMMs with no output tile (M == 0 or N == 0) and K >= 256, as layers.cu issues
# them: a forward with batch 0 and >= 256 input features, and the bias gradient
# alone (want_b without want_w: N = 0) over a batch >= 256.
NO_TILE_CASES = {
    "forward_batch0_in784": "a = torch.empty(0, 784); b = torch.randn(30, 784).t()\n"
    "c, _, _ = ops.gemm(a, b, None, None, True, True, False, 132)\nassert c.shape == (0, 30)",
    "bias_grad_only_batch300": "g = torch.randn(300, 30); x = torch.randn(300, 784); y = torch.rand(300, 30)\n"
    "_, gb, _ = ops.gemm(g.t(), x, y.t(), None, False, False, True, 132)\n"
    "torch.testing.assert_close(gb, g.sum(0), rtol=1e-5, atol=1e-4)",
}


@pytest.mark.parametrize("case", list(NO_TILE_CASES))
def test_gemm_no_output_tiles_does_not_crash(emu_lib: str, case: str) -> None:
    r = run_isolated(emu_lib, NO_TILE_CASES[case])
    assert r.returncode == 0, (
        f"{case}: {describe_exit(r)} -- choose_splits() computes ceil_div(2 * sm_count, tiles) with "
        "tiles == 0 when M or N is 0 (integer division by zero in host code)"
    )


def test_gemm_split_k_is_deterministic(emu: Any) -> None:
    x, w, y, grad = layer_tensors(torch.float32, 2000, 40, 30, seed=9)
    first = run_gemm(emu, grad.t(), x, mask=y.t(), want_rowsum=True)
    second = run_gemm(emu, grad.t(), x, mask=y.t(), want_rowsum=True)
    assert first[2] > 1
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_gemm_mask_nan_passes_gradient(emu: Any) -> None:
    grad = torch.randn(4, 3, generator=gen(10))
    w = torch.randn(3, 5, generator=gen(11))
    y = torch.tensor([[1.0, 0.0, float("nan")]] * 4)  # NaN output: threshold_backward lets the gradient through
    gx, _, _ = run_gemm(emu, grad, w, mask=y)
    ref = (grad * torch.tensor([1.0, 0.0, 1.0])) @ w
    torch.testing.assert_close(gx, ref, rtol=1e-5, atol=1e-5)


def test_gemm_output_wider_than_grid_y(emu: Any) -> None:
    """Issue 19: the N-tiles were grid.y (at most 65535), so N > 4,194,240 failed to
    launch (nn.Linear(5_000_000, 10)'s weight gradient). The tiles are now on grid.x."""
    n = 65536 * 64 + 100
    assert emu.gemm_grid_tiles(1, n) == 65538 and emu.gemm_grid_tiles(130, 1) == 3
    a = torch.tensor([[2.0]])
    b = torch.randn(1, n, generator=gen(11))
    c, rowsum, splits = run_gemm(emu, a, b, want_rowsum=True)
    assert splits == 1
    torch.testing.assert_close(c, 2.0 * b)
    torch.testing.assert_close(rowsum, torch.tensor([2.0]))


# ---------------------------------------------------------------- the cuBLAS layer path (common/aten_layers.h)


def test_cublas_planner_decisions(emu: Any) -> None:
    """Which layer GEMMs leave gemm_kernel for cuBLAS: half types always, float / double
    from 2^26 multiply-adds (the classic workloads' first layers at large batches)."""
    big = 1 << 26
    assert emu.gemm_on_cublas(64, 30, 784, True)  # bf16 / half: tensor cores
    assert not emu.gemm_on_cublas(64, 30, 784, False)  # 784-30-1 at batch 64: 1.5M MACs
    assert not emu.gemm_on_cublas(2048, 30, 784, False)  # 48M
    assert emu.gemm_on_cublas(12396, 30, 784, False)  # 292M
    assert not emu.gemm_on_cublas(64, 100, 1000, False)  # 1000-100-10 at batch 64: 6.4M
    assert emu.gemm_on_cublas(2048, 100, 1000, False)  # 205M
    assert emu.gemm_on_cublas(1, big, 1, False) and not emu.gemm_on_cublas(1, big - 1, 1, False)
    assert emu.gemm_on_cublas(1 << 40, 1 << 40, 1 << 40, False)  # no overflow


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("last_relu", [False, True])
@pytest.mark.parametrize(("batch", "sizes"), [(0, [5, 4, 3]), (1, [7, 6, 2]), (37, [20, 16, 16, 3])])
def test_cublas_layer_path_matches_autograd(
    emu: Any, dtype: torch.dtype, last_relu: bool, batch: int, sizes: list[int]
) -> None:
    """LayerOps over the ATen GEMMs and epilogues the CUDA backend runs for wide layers:
    forward and every gradient against autograd, biases on and off, NaN through the ReLU."""
    g = gen(batch + len(sizes))
    x = torch.randn(batch, sizes[0], dtype=dtype, generator=g)
    if batch > 1:
        x[1, 0] = float("nan")  # a NaN row: its ReLU outputs stay NaN, their gradients pass
    ws = [torch.randn(o, i, dtype=dtype, generator=g) / math.sqrt(i) for i, o in itertools.pairwise(sizes)]
    bs = [torch.randn(o, dtype=dtype, generator=g) if l % 2 == 0 else None for l, o in enumerate(sizes[1:])]
    out, hidden = emu.aten_mlp_forward(x, ws, bs, last_relu)
    wr = [w.clone().requires_grad_() for w in ws]
    br = [b.clone().requires_grad_() if b is not None else None for b in bs]
    xr = x.clone().requires_grad_()
    h = xr
    for l, (w, b) in enumerate(zip(wr, br, strict=True)):
        h = F.linear(h, w, b)
        if l + 1 < len(wr) or last_relu:
            h = torch.relu(h)
    t = tol(dtype, max(sizes))
    torch.testing.assert_close(out, h.detach(), equal_nan=True, **t)
    grad = torch.randn(out.shape, dtype=dtype, generator=g)
    h.backward(grad)
    mask = [True] * len(ws)
    bias_mask = [b is not None for b in bs]
    gi, gw, gb = emu.aten_mlp_backward(grad, x, ws, hidden, out if last_relu else None, last_relu, True, mask,
                                       bias_mask)  # fmt: skip
    torch.testing.assert_close(gi, xr.grad, equal_nan=True, **t)
    for l in range(len(ws)):
        torch.testing.assert_close(gw[l], wr[l].grad, equal_nan=True, **t)
        if br[l] is not None:
            torch.testing.assert_close(gb[l], br[l].grad, equal_nan=True, **t)
        else:
            assert gb[l].numel() == 0


# ---------------------------------------------------------------- csrc/cuda/bce.cuh

REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}


def bce_inputs(
    shape: tuple[int, ...], dtype: torch.dtype, weight: str, pos_weight: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    g = gen(seed)
    x = torch.randn(shape, dtype=dtype, generator=g) * 4
    if x.numel() > 2:
        x.view(-1)[:3] = torch.tensor([60.0, -60.0, 0.0], dtype=dtype)  # saturated logits and zero
    y = torch.rand(shape, dtype=dtype, generator=g)  # soft targets exercise every term
    last = shape[-1] if shape else 1

    def make(kind: str) -> torch.Tensor | None:
        if kind == "none":
            return None
        if kind == "scalar":
            return torch.rand(1, dtype=dtype, generator=g) + 0.5
        if kind == "class":
            return torch.rand(last, dtype=dtype, generator=g) + 0.5
        return torch.rand(shape, dtype=dtype, generator=g) + 0.5  # "full"

    return x, y, make(weight), make(pos_weight)


BCE_SHAPES = [(0,), (1,), (7,), (33, 30), (784,), (5, 1000)]
BCE_WEIGHTS = [("none", "none"), ("class", "class"), ("full", "scalar")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BCE_SHAPES)
@pytest.mark.parametrize(("weight", "pos_weight"), BCE_WEIGHTS)
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_bce_forward(
    emu: Any, dtype: torch.dtype, shape: tuple[int, ...], weight: str, pos_weight: str, reduction: int
) -> None:
    x, y, w, pw = bce_inputs(shape, dtype, weight, pos_weight, seed=len(shape) + reduction)
    xr = x.clone().requires_grad_(True)
    ref = F.binary_cross_entropy_with_logits(xr, y, weight=w, pos_weight=pw, reduction=REDUCTIONS[reduction])
    loss, grad = emu.bce_forward(x, y, w, pw, reduction, True)
    torch.testing.assert_close(loss, ref.detach(), equal_nan=True, **tol(dtype, x.numel()))
    if reduction == 0:
        assert grad is None
    else:
        (ref_grad,) = torch.autograd.grad(ref, xr) if x.numel() else (torch.zeros_like(x),)
        torch.testing.assert_close(grad, ref_grad, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bce_forward_many_blocks(emu: Any, dtype: torch.dtype) -> None:
    # > 256 blocks of the first pass: the finishing block loops over the partials
    x, y, w, pw = bce_inputs((300_000,), dtype, "none", "none", seed=12)
    for reduction in (1, 2):
        loss, _ = emu.bce_forward(x, y, None, None, reduction, False)
        ref = F.binary_cross_entropy_with_logits(x.double(), y.double(), reduction=REDUCTIONS[reduction])
        torch.testing.assert_close(loss, ref.to(dtype), rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0,), (1,), (33, 30), (5, 1000)])
@pytest.mark.parametrize(("weight", "pos_weight"), BCE_WEIGHTS)
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_bce_backward(
    emu: Any, dtype: torch.dtype, shape: tuple[int, ...], weight: str, pos_weight: str, reduction: int
) -> None:
    x, y, w, pw = bce_inputs(shape, dtype, weight, pos_weight, seed=3 * len(shape) + reduction)
    xr, yr = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    out = F.binary_cross_entropy_with_logits(xr, yr, weight=w, pos_weight=pw, reduction=REDUCTIONS[reduction])
    grad_out = torch.randn(out.shape, dtype=dtype, generator=gen(13))
    if x.numel():
        ref_x, ref_y = torch.autograd.grad(out, (xr, yr), grad_out)
    else:
        ref_x, ref_y = torch.zeros_like(x), torch.zeros_like(y)
    gx, gy = emu.bce_backward(grad_out.contiguous(), x, y, w, pw, reduction, True, True)
    torch.testing.assert_close(gx, ref_x, **tol(dtype))
    torch.testing.assert_close(gy, ref_y, **tol(dtype))
    only_x, none_y = emu.bce_backward(grad_out.contiguous(), x, y, w, pw, reduction, True, False)
    assert none_y is None
    torch.testing.assert_close(only_x, ref_x, **tol(dtype))


# ---------------------------------------------------------------- csrc/cuda/fused_chain.cuh

H100_SMEM_OPTIN = 227 * 1024


def step_inputs(
    dtype: torch.dtype, batch: int, sizes: list[int], seed: int, bias: bool = True
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor | None]]:
    g = gen(seed)
    x = torch.randn(batch, sizes[0], dtype=dtype, generator=g)
    weights = [
        torch.randn(n, k, dtype=dtype, generator=g) / math.sqrt(k) for k, n in zip(sizes, sizes[1:], strict=False)
    ]
    biases: list[torch.Tensor | None] = [
        torch.randn(n, dtype=dtype, generator=g) * 0.1 if bias else None for n in sizes[1:]
    ]
    y = torch.rand(batch, sizes[-1], dtype=dtype, generator=g)  # soft targets
    return x, y, weights, biases


def step_ref(
    x: torch.Tensor,
    y: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    last_relu: bool,
    w: torch.Tensor | None,
    pw: torch.Tensor | None,
    reduction: int,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor | None]]:
    """(loss, grad_input, grad_weights, grad_biases) by torch autograd in float64."""
    x64 = x.double().requires_grad_(True)
    ws = [t.double().requires_grad_(True) for t in weights]
    bs = [None if b is None else b.double().requires_grad_(True) for b in biases]
    h = x64
    for i, (wt, b) in enumerate(zip(ws, bs, strict=True)):
        h = F.linear(h, wt, b)
        if i + 1 < len(ws) or last_relu:
            h = torch.relu(h)
    loss = F.binary_cross_entropy_with_logits(
        h,
        y.double(),
        weight=None if w is None else w.double(),
        pos_weight=None if pw is None else pw.double(),
        reduction=REDUCTIONS[reduction],
    )
    params = [x64, *ws, *[b for b in bs if b is not None]]
    grads = list(torch.autograd.grad(loss, params))
    gx, gws = grads[0], grads[1 : 1 + len(ws)]
    rest = iter(grads[1 + len(ws) :])
    gbs = [None if b is None else next(rest) for b in bs]
    return loss.detach(), gx, gws, gbs


def run_step(
    emu: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    last_relu: bool = False,
    w: torch.Tensor | None = None,
    pw: torch.Tensor | None = None,
    reduction: int = 1,
    input_grad: bool = True,
    weight_mask: list[bool] | None = None,
    bias_mask: list[bool] | None = None,
    sm_count: int = SM_COUNT,
    smem_optin: int = H100_SMEM_OPTIN,
) -> tuple[Any, ...]:
    layers = len(weights)
    weight_mask = [True] * layers if weight_mask is None else weight_mask
    bias_mask = [b is not None for b in biases] if bias_mask is None else bias_mask
    return emu.fused_step(
        x, y, weights, biases, last_relu, w, pw, reduction, input_grad, weight_mask, bias_mask, sm_count, smem_optin
    )


def assert_step_matches(
    out: tuple[Any, ...],
    ref: tuple[Any, ...],
    dtype: torch.dtype,
    k: int,
    input_grad: bool,
    weight_mask: list[bool],
    bias_mask: list[bool],
) -> None:
    loss, gx, gws, gbs, blocks, _ = out
    rloss, rgx, rgws, rgbs = ref
    assert blocks > 0
    torch.testing.assert_close(loss, rloss.to(dtype), **tol(dtype, k))
    if input_grad:
        torch.testing.assert_close(gx, rgx.to(dtype), **tol(dtype, k))
    else:
        assert gx.numel() == 0
    for gw, rgw, want in zip(gws, rgws, weight_mask, strict=True):
        if want:
            torch.testing.assert_close(gw, rgw.to(dtype), **tol(dtype, k))
        else:
            assert gw.numel() == 0
    for gb, rgb, want in zip(gbs, rgbs, bias_mask, strict=True):
        if want:
            torch.testing.assert_close(gb, rgb.to(dtype), **tol(dtype, k))
        else:
            assert gb.numel() == 0


STEP_CASES = {
    # name: (batch, sizes, sm_count, smem_optin)
    "784-30-1 one tile": (50, [784, 30, 1], SM_COUNT, H100_SMEM_OPTIN),
    "784-30-1 two tiles": (100, [784, 30, 1], SM_COUNT, H100_SMEM_OPTIN),
    "deep, several tiles per block": (300, [40, 16, 8, 3], 2, H100_SMEM_OPTIN),
    "grads in global memory": (150, [700, 33, 5], 3, 100 * 1024),
    "one layer": (65, [9, 4], SM_COUNT, H100_SMEM_OPTIN),
    "odd widths, a one-row last tile": (129, [37, 31, 7, 3], SM_COUNT, H100_SMEM_OPTIN),
    "eight layers": (70, [12, 9, 8, 7, 6, 5, 4, 3, 2], 2, H100_SMEM_OPTIN),
    "32-row tiles": (200, [50, 24, 3], 6, H100_SMEM_OPTIN),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(STEP_CASES))
def test_fused_step_matches_torch(emu: Any, dtype: torch.dtype, case: str) -> None:
    batch, sizes, sm_count, smem_optin = STEP_CASES[case]
    x, y, weights, biases = step_inputs(dtype, batch, sizes, seed=len(case))
    layers = len(weights)
    out = run_step(emu, x, y, weights, biases, sm_count=sm_count, smem_optin=smem_optin)
    ref = step_ref(x, y, weights, biases, False, None, None, 1)
    assert_step_matches(out, ref, dtype, batch * sizes[0], True, [True] * layers, [True] * layers)


def test_fused_step_widest_layers(emu: Any) -> None:
    x, y, weights, biases = step_inputs(torch.float32, 70, [20, 128, 128, 2], seed=3)
    out = run_step(emu, x, y, weights, biases)
    ref = step_ref(x, y, weights, biases, False, None, None, 1)
    assert_step_matches(out, ref, torch.float32, 70 * 128, True, [True] * 3, [True] * 3)
    # float64: 152 KB of accumulators do not fit next to the tile buffers, so they
    # go to each block's workspace slice
    x, y = x.double(), y.double()
    weights, biases = [t.double() for t in weights], [t.double() for t in biases]
    out = run_step(emu, x, y, weights, biases)
    assert out[-1] == 0
    ref = step_ref(x, y, weights, biases, False, None, None, 1)
    assert_step_matches(out, ref, torch.float64, 70 * 128, True, [True] * 3, [True] * 3)


def fused_plan(
    emu: Any,
    batch: int,
    sizes: list[int],
    dtype: torch.dtype = torch.float32,
    forward: bool = False,
    sm_count: int = SM_COUNT,
    smem_optin: int = H100_SMEM_OPTIN,
) -> tuple[int, ...]:
    """(tile_rows, blocks, grads_in_smem, smem_bytes, fused_preferred) of the fused step (or forward)
    kernel's plan: fused_preferred is the heuristic's choice of the fused kernel over the layer path."""
    return tuple(emu.fused_plan(batch, sizes[0], sizes[1:], dtype == torch.float64, forward, sm_count, smem_optin))


CLASSIC_CHAINS = [[784, 30, 1], [1000, 100, 10]]


@pytest.mark.parametrize("forward", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", CLASSIC_CHAINS)
@pytest.mark.parametrize("batch", [1, 64, 256, 2048, 12396, 70000])
def test_fused_plan_fills_an_h200(emu: Any, batch: int, sizes: list[int], dtype: torch.dtype, forward: bool) -> None:
    """Issue 19: on an H200 (132 SMs, 227 KB per block) every classic workload
    launches at least min(132, rows / 16) blocks, each a tile of 16 to 64 rows."""
    tile_rows, blocks, _, smem_bytes, _ = fused_plan(emu, batch, sizes, dtype, forward)
    assert blocks >= min(132, -(-batch // 16)), (tile_rows, blocks)
    assert tile_rows in (16, 32, 64) and blocks <= -(-batch // tile_rows)
    assert 0 < smem_bytes <= H100_SMEM_OPTIN


def test_fused_plan_tiles_and_placement(emu: Any) -> None:
    # 16-row tiles while the batch has fewer than one 64-row tile per SM ...
    assert fused_plan(emu, 64, [784, 30, 1])[:3] == (16, 4, 1)
    assert fused_plan(emu, 2048, [784, 30, 1])[:3] == (16, 128, 1)
    assert fused_plan(emu, 5000, [784, 30, 1])[:2] == (32, 157)  # 79 tiles of 64 < 132 <= 157 of 32
    # ... 64-row ones past that; 94 KB of accumulators + 64-row buffers: one block per SM
    assert fused_plan(emu, 12396, [784, 30, 1])[:3] == (64, 132, 1)
    # two blocks per SM where two fit (float, a first layer <= 32 wide, small buffers) ...
    assert fused_plan(emu, 70000, [784, 30, 1], sm_count=4)[:3] == (64, 4, 1)
    assert fused_plan(emu, 64 * 8, [40, 16, 3], sm_count=4)[:3] == (64, 8, 1)
    # ... one for 128-wide register tiles (1000 -> 100: 400 KB of accumulators in the workspace)
    assert fused_plan(emu, 12396, [1000, 100, 10])[:3] == (64, 132, 0)
    # float64 at 64 rows: the accumulators leave the shared memory rather than shrink the tile
    assert fused_plan(emu, 12396, [784, 30, 1], torch.float64)[:3] == (64, 132, 0)
    # buffers too big for 64 rows (two 128-wide float64 layers): 32-row tiles
    assert fused_plan(emu, 10000, [20, 128, 128, 2], torch.float64)[:3] == (32, 132, 0)
    assert fused_plan(emu, 100, [784, 129, 1])[1] == 0  # a layer wider than kChainMaxWidth: not fused
    # the forward kernel: no accumulators, up to 8 blocks per SM
    assert fused_plan(emu, 70000, [784, 30, 1], forward=True)[:2] == (64, 1056)


def test_fused_or_layered_heuristic(emu: Any) -> None:
    """The fused kernels while the first layer is small enough for them: below 2^26 multiply-adds in
    all (cuBLAS wins above) and at most 2^20 per block (a wide first layer on few blocks loses to the
    layer path's split-K GEMMs)."""
    preferred = {batch: fused_plan(emu, batch, [784, 30, 1])[4] for batch in (1, 64, 256, 2048, 2853, 2854, 12396)}
    assert preferred == {1: 1, 64: 1, 256: 1, 2048: 1, 2853: 1, 2854: 0, 12396: 0}  # 2854 x 784 x 30 >= 2^26
    assert fused_plan(emu, 64, [1000, 100, 10])[4] == 0  # 16 rows x 1000 x 100 = 1.6M a block
    assert fused_plan(emu, 64, [784, 64, 10])[4] == 1  # 16 x 784 x 64 = 0.8M
    assert fused_plan(emu, 64, [784, 30, 1], forward=True)[4] == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", [*CLASSIC_CHAINS, [40, 16, 3], [20, 128, 128, 2], [256, *[128] * 8], [700, 33, 5]])
def test_perf_model_mirrors_the_planner(emu: Any, sizes: list[int], dtype: torch.dtype) -> None:
    """bench/perf_model.py's fused_step_plan is plan_fused_step's rule in Python."""
    from bench import perf_model as pm

    for batch in (1, 15, 64, 100, 2048, 4224, 5000, 12396, 70000):
        for sm_count, smem_optin in ((SM_COUNT, H100_SMEM_OPTIN), (4, H100_SMEM_OPTIN), (108, 163 * 1024)):
            plan = pm.fused_step_plan(batch, sizes[0], sizes[1:], dtype.itemsize, sm_count, smem_optin)
            got = fused_plan(emu, batch, sizes, dtype, sm_count=sm_count, smem_optin=smem_optin)
            if plan.blocks == 0:
                assert got[1] == 0, (batch, sm_count, got)
                continue
            preferred = pm.fused_chain_preferred(batch, sizes[0], sizes[1], plan)
            want = (plan.tile_rows, plan.blocks, int(plan.grads_in_smem), plan.smem_bytes, int(preferred))
            assert got == want, (batch, sm_count, smem_optin)


def test_fused_step_places_the_gradients_as_planned(emu: Any) -> None:
    x, y, weights, biases = step_inputs(torch.float32, 100, [784, 30, 1], seed=1)
    *_, blocks, in_smem = run_step(emu, x, y, weights, biases)
    assert (blocks, in_smem) == (7, 1)  # 7 tiles of 16 rows; 94 KB of accumulators fit next to their buffers
    assert (blocks, in_smem) == fused_plan(emu, 100, [784, 30, 1])[1:3]
    *_, blocks, _ = run_step(emu, x, y, [torch.randn(129, 784), torch.randn(1, 129)], [None, None])
    assert blocks == 0  # a layer wider than kChainMaxWidth: not for this kernel
    x, y, weights, biases = step_inputs(torch.float32, 150, [700, 33, 5], seed=2)
    *_, blocks, in_smem = run_step(emu, x, y, weights, biases, sm_count=3, smem_optin=100 * 1024)
    assert (blocks, in_smem) == (3, 0)  # the accumulators live in each block's workspace slice


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("last_relu", [False, True])
@pytest.mark.parametrize(("weight", "pos_weight", "reduction"), [("class", "class", 2), ("full", "scalar", 1)])
def test_fused_step_loss_options(
    emu: Any, dtype: torch.dtype, last_relu: bool, weight: str, pos_weight: str, reduction: int
) -> None:
    x, y, weights, biases = step_inputs(dtype, 130, [24, 12, 3], seed=5)
    _, _, w, pw = bce_inputs((130, 3), dtype, weight, pos_weight, seed=6)
    out = run_step(emu, x, y, weights, biases, last_relu=last_relu, w=w, pw=pw, reduction=reduction, sm_count=2)
    ref = step_ref(x, y, weights, biases, last_relu, w, pw, reduction)
    assert_step_matches(out, ref, dtype, 130 * 24, True, [True, True], [True, True])


@pytest.mark.parametrize(
    ("input_grad", "weight_mask", "bias_mask"),
    [
        (False, [False, True, True], [False, True, False]),  # frozen first layer: backward stops at layer 1
        (True, [False, False, False], [False, False, False]),  # input gradient only
        (False, [True, False, False], [False, False, True]),
        (False, [False, False, False], [False, False, False]),
    ],  # the loss alone
)
def test_fused_step_gradient_masks(emu: Any, input_grad: bool, weight_mask: list[bool], bias_mask: list[bool]) -> None:
    x, y, weights, biases = step_inputs(torch.float64, 90, [33, 17, 9, 2], seed=7)
    out = run_step(
        emu, x, y, weights, biases, input_grad=input_grad, weight_mask=weight_mask, bias_mask=bias_mask, sm_count=2
    )
    ref = step_ref(x, y, weights, biases, False, None, None, 1)
    assert_step_matches(out, ref, torch.float64, 90 * 33, input_grad, weight_mask, bias_mask)


@pytest.mark.parametrize("sm_count", [2, SM_COUNT])  # tiles of 64 and of 16 rows
def test_fused_step_strided_input_no_bias_and_determinism(emu: Any, sm_count: int) -> None:
    x, y, weights, _ = step_inputs(torch.float32, 140, [50, 20, 1], seed=8)
    xt = x.t().contiguous().t()  # column-major: read through its strides
    biases: list[torch.Tensor | None] = [None, None]
    first = run_step(emu, xt, y, weights, biases, sm_count=sm_count)
    assert_step_matches(
        first,
        step_ref(x, y, weights, biases, False, None, None, 1),
        torch.float32,
        140 * 50,
        True,
        [True, True],
        [False, False],
    )
    second = run_step(emu, xt, y, weights, biases, sm_count=sm_count)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert all(torch.equal(a, b) for a, b in zip(first[2], second[2], strict=True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("batch", "sizes", "last_relu", "sm_count"),
    [(1, [784, 30, 1], False, SM_COUNT), (130, [784, 30, 1], False, SM_COUNT), (200, [45, 20, 7, 3], True, 2)],
)
def test_fused_forward_matches_torch(
    emu: Any, dtype: torch.dtype, batch: int, sizes: list[int], last_relu: bool, sm_count: int
) -> None:
    x, _, weights, biases = step_inputs(dtype, batch, sizes, seed=batch)
    x = x[:, ::1] if batch % 2 else x.t().contiguous().t()  # also through the input's strides
    acts, blocks = emu.fused_forward(x, weights, biases, last_relu, sm_count, H100_SMEM_OPTIN)
    tile_rows = fused_plan(emu, batch, sizes, dtype, forward=True, sm_count=sm_count)[0]
    assert blocks == min(-(-batch // tile_rows), 8 * sm_count)
    h = x.double()
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        h = F.linear(h, w.double(), b.double())
        if i + 1 < len(weights) or last_relu:
            h = torch.relu(h)
        torch.testing.assert_close(acts[i], h.to(dtype), **tol(dtype, sizes[i]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_half_storage_float_accumulation(emu: Any, dtype: torch.dtype) -> None:
    """Half / bfloat16 storage, float accumulation: the float64 result of the
    same (rounded) inputs, within the storage type's rounding."""
    x, y, weights, biases = step_inputs(torch.float32, 100, [784, 30, 1], seed=4)
    x, y = x.to(dtype), y.to(dtype)
    weights = [t.to(dtype) for t in weights]
    biases = [None if b is None else b.to(dtype) for b in biases]
    eps = torch.finfo(dtype).eps
    close = {"rtol": 4 * eps, "atol": 4 * eps}
    loss, gx, gws, gbs, blocks, _ = run_step(emu, x, y, weights, biases)
    rloss, rgx, rgws, rgbs = step_ref(x, y, weights, biases, False, None, None, 1)
    assert blocks > 0
    torch.testing.assert_close(loss.double(), rloss, **close)
    scale = rgx.abs().max()  # gradients: absolute error relative to their size
    torch.testing.assert_close(gx.double() / scale, rgx / scale, **close)
    for got, ref in zip([*gws, *gbs], [*rgws, *rgbs], strict=True):
        torch.testing.assert_close(got.double() / ref.abs().max(), ref / ref.abs().max(), **close)
    acts, _ = emu.fused_forward(x, weights, biases, False, SM_COUNT, H100_SMEM_OPTIN)
    h = torch.relu(F.linear(x.double(), weights[0].double(), biases[0].double()))
    torch.testing.assert_close(acts[0].double() / h.abs().max(), h / h.abs().max(), **close)


@pytest.mark.parametrize("clip", [None, 1.0])
def test_launches_per_training_step(emu: Any, clip: float | None) -> None:
    """The README's launch count of a BCE TrainStep on a narrow chain (784-30-1, batch 64):
    the fused step kernel and its finish, then one update launch (two more with clipping)."""
    x, y, weights, biases = step_inputs(torch.float32, 64, [784, 30, 1], seed=3)
    before = emu.stats()[1]
    _, _, grad_w, grad_b, _, _ = run_step(emu, x, y, weights, biases, input_grad=False)
    assert emu.stats()[1] - before == 2
    params = [t for pair in zip(weights, biases, strict=True) for t in pair]
    grads = [t for pair in zip(grad_w, grad_b, strict=True) for t in pair]
    state = [torch.empty(0) for _ in params]  # SGD without momentum: no state
    hyper = [0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0] * len(params)
    before = emu.stats()[1]
    emu.optimizer_step(params, grads, state, 0, hyper, clip)
    assert emu.stats()[1] - before == (1 if clip is None else 3)


# ---------------------------------------------------------------- csrc/cuda/mse.cuh

MSE_SHAPES = [(0,), (1,), (7,), (33, 30), (5, 1000)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MSE_SHAPES)
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_mse_forward(emu: Any, dtype: torch.dtype, shape: tuple[int, ...], reduction: int) -> None:
    g = gen(len(shape) + 10 * reduction)
    x = torch.randn(shape, dtype=dtype, generator=g) * 3
    y = torch.randn(shape, dtype=dtype, generator=g)
    xr = x.clone().requires_grad_(True)
    ref = F.mse_loss(xr, y, reduction=REDUCTIONS[reduction])
    loss, grad = emu.mse_forward(x, y, reduction, True)
    torch.testing.assert_close(loss, ref.detach(), equal_nan=True, **tol(dtype, x.numel()))
    if reduction == 0:
        assert grad is None
    else:
        (ref_grad,) = torch.autograd.grad(ref, xr) if x.numel() else (torch.zeros_like(x),)
        torch.testing.assert_close(grad, ref_grad, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_mse_forward_many_blocks(emu: Any, dtype: torch.dtype) -> None:
    # > 256 blocks of the first pass: the finishing block loops over the partials
    g = gen(21)
    x, y = torch.randn(300_000, dtype=dtype, generator=g), torch.randn(300_000, dtype=dtype, generator=g)
    for reduction in (1, 2):
        loss, _ = emu.mse_forward(x, y, reduction, False)
        ref = F.mse_loss(x.double(), y.double(), reduction=REDUCTIONS[reduction])
        torch.testing.assert_close(loss, ref.to(dtype), rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0,), (1,), (33, 30), (5, 1000)])
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_mse_backward(emu: Any, dtype: torch.dtype, shape: tuple[int, ...], reduction: int) -> None:
    g = gen(3 * len(shape) + reduction)
    x, y = torch.randn(shape, dtype=dtype, generator=g), torch.randn(shape, dtype=dtype, generator=g)
    xr, yr = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    out = F.mse_loss(xr, yr, reduction=REDUCTIONS[reduction])
    grad_out = torch.randn(out.shape, dtype=dtype, generator=gen(13))
    ref_x, ref_y = torch.autograd.grad(out, (xr, yr), grad_out) if x.numel() else (x * 0, y * 0)
    gx, gy = emu.mse_backward(grad_out.contiguous(), x, y, reduction, True, True)
    torch.testing.assert_close(gx, ref_x, **tol(dtype))
    torch.testing.assert_close(gy, ref_y, **tol(dtype))
    none_x, only_y = emu.mse_backward(grad_out.contiguous(), x, y, reduction, False, True)
    assert none_x is None
    torch.testing.assert_close(only_y, ref_y, **tol(dtype))


# ---------------------------------------------------------------- csrc/cuda/cross_entropy.cuh


def ce_inputs(
    rows: int, classes: int, dtype: torch.dtype, target: str, weighted: bool, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = gen(seed)
    x = torch.randn(rows, classes, dtype=dtype, generator=g) * 4
    if rows > 2 and classes > 1:
        x[0, 0], x[1, 1] = 60.0, -60.0
    if target == "prob":
        t = torch.rand(rows, classes, dtype=dtype, generator=g)
        t = t / t.sum(1, keepdim=True)
    else:
        t = torch.randint(0, classes, (rows,), generator=g)
        if target == "ignored":
            t[::3] = -100
    w = torch.rand(classes, dtype=dtype, generator=g) + 0.5 if weighted else None
    return x, t, w


# 10 classes: a thread per row; 17 and 100: a warp per row (lanes stride, shuffles)
CE_SHAPES = [(0, 10), (1, 1), (7, 10), (300, 10), (33, 17), (40, 100)]
CE_OPTIONS = [
    ("index", False, 0.0),
    ("ignored", True, 0.0),
    ("ignored", True, 0.2),
    ("prob", False, 0.0),
    ("prob", True, 0.3),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "classes"), CE_SHAPES, ids=str)
@pytest.mark.parametrize(("target", "weighted", "smoothing"), CE_OPTIONS, ids=str)
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_cross_entropy_forward(
    emu: Any, dtype: torch.dtype, rows: int, classes: int, target: str, weighted: bool, smoothing: float, reduction: int
) -> None:
    x, t, w = ce_inputs(rows, classes, dtype, target, weighted, seed=rows + classes + reduction)
    xr = x.clone().requires_grad_(True)
    ref = F.cross_entropy(xr, t, w, reduction=REDUCTIONS[reduction], label_smoothing=smoothing)
    loss, grad = emu.cross_entropy(None, x, t, w, reduction, -100, smoothing, True)
    torch.testing.assert_close(loss, ref.detach(), equal_nan=True, **tol(dtype, x.numel()))
    if reduction == 0:
        assert grad is None
    else:
        (ref_grad,) = torch.autograd.grad(ref, xr) if x.numel() else (torch.zeros_like(x),)
        torch.testing.assert_close(grad, ref_grad, **tol(dtype, classes))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "classes"), CE_SHAPES, ids=str)
@pytest.mark.parametrize(("target", "weighted", "smoothing"), CE_OPTIONS, ids=str)
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_cross_entropy_backward(
    emu: Any, dtype: torch.dtype, rows: int, classes: int, target: str, weighted: bool, smoothing: float, reduction: int
) -> None:
    x, t, w = ce_inputs(rows, classes, dtype, target, weighted, seed=2 * rows + classes + reduction)
    xr = x.clone().requires_grad_(True)
    out = F.cross_entropy(xr, t, w, reduction=REDUCTIONS[reduction], label_smoothing=smoothing)
    grad_out = torch.randn(out.shape, dtype=dtype, generator=gen(5)).contiguous()
    (ref_grad,) = torch.autograd.grad(out, xr, grad_out) if x.numel() else (torch.zeros_like(x),)
    none, grad = emu.cross_entropy(grad_out, x, t, w, reduction, -100, smoothing, True)
    assert none is None
    torch.testing.assert_close(grad, ref_grad, **tol(dtype, classes))


def test_cross_entropy_all_ignored_and_many_blocks(emu: Any) -> None:
    x, t, w = ce_inputs(6, 4, torch.float32, "index", True, seed=1)
    t[:] = -100
    loss, grad = emu.cross_entropy(None, x, t, w, 1, -100, 0.1, True)
    assert torch.isnan(loss) and torch.equal(grad, torch.zeros_like(x))
    # > 256 blocks of 256 rows: both finishing blocks loop over their partials
    x, t, w = ce_inputs(70_000, 2, torch.float64, "ignored", True, seed=2)
    for reduction in (1, 2):
        loss, _ = emu.cross_entropy(None, x, t, w, reduction, -100, 0.0, False)
        ref = F.cross_entropy(x, t, w, reduction=REDUCTIONS[reduction])
        torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)


def test_cross_entropy_target_out_of_bounds_traps(emu: Any) -> None:
    x, t, _ = ce_inputs(5, 3, torch.float32, "index", False, seed=3)
    for bad in (3, -1):
        t[2] = bad
        with pytest.raises(RuntimeError, match="__trap"):
            emu.cross_entropy(None, x, t, None, 1, -100, 0.0, True)


def test_cross_entropy_deterministic(emu: Any) -> None:
    x, t, w = ce_inputs(600, 40, torch.float32, "ignored", True, seed=4)
    first = emu.cross_entropy(None, x, t, w, 1, -100, 0.1, True)
    second = emu.cross_entropy(None, x, t, w, 1, -100, 0.1, True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
