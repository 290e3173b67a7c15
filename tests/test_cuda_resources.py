"""The CUDA kernels as built (issue 19), read from the extension's own cubins
with ``cuobjdump -res-usage``: every kernel family is there for every arch,
registers, stack (local memory: spills and per-thread arrays) and static shared
memory stay within what the launchers assume. No GPU needed: it runs wherever
the extension was built with nvcc (CI builds it on every run) and a cuobjdump is
found (the CUDA toolkit's, or the one in the triton wheel)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import torch_fastmlp
from torch_fastmlp import _C

pytestmark = pytest.mark.skipif(not torch_fastmlp.WITH_CUDA, reason="the extension was built without CUDA")

# The kernel families of csrc/cuda/ (a name's last component, before its template arguments).
FAMILIES = {
    "gemm_kernel", "gemm_reduce_splits_kernel", "fused_forward_kernel", "fused_step_kernel",
    "fused_step_finish_kernel", "sgd_kernel", "adam_kernel", "grad_sum_squares_kernel", "clip_coef_kernel",
    "bce_forward_kernel", "bce_backward_kernel", "bce_finish_kernel", "mse_forward_kernel", "mse_backward_kernel",
    "loss_finish_kernel", "ce_rows_kernel", "ce_prepare_kernel", "ce_prepare_finish_kernel",
}  # fmt: skip
# Nothing may use local memory but double kernels, up to 8 B of stack (ce_rows_kernel<double, 32>,
# fused_step_kernel<double, 128>: a few spilled registers). The fused chain's layout comes in
# with the parameters (issue 19), so its kernels have none.
STACK_ALLOWED_DOUBLE = 8
# 256-thread blocks compiled for two resident per SM (65536 registers): at most 128 registers.
# Compiled for one (__launch_bounds__(256, 1)): the fused chain kernels whose first layer is
# 128 wide (their register tiles), every double kernel; up to the 255 a thread can address.
MAX_REGISTERS = 128
MAX_REGISTERS_ONE_BLOCK = 255
MAX_STATIC_SHARED = 48 * 1024  # beyond it a kernel needs dynamic shared memory and an opt-in


def find_cuobjdump() -> str | None:
    candidates = [shutil.which("cuobjdump")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(str(Path(os.environ[var]) / "bin" / "cuobjdump"))
    try:
        import triton

        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        pytest.skip("no c++filt (binutils) to read the kernel names")
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def family(name: str) -> str:
    """``void fastmlp::cuda::gemm_kernel<float>(...)`` -> ``gemm_kernel``."""
    head = re.sub(r"[<(].*", "", name.removeprefix("void "))
    return head.rsplit("::", 1)[-1]


@pytest.fixture(scope="module")
def kernels() -> list[dict[str, object]]:
    tool = find_cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton wheel)")
    out = subprocess.run([tool, "-res-usage", _C.__file__], capture_output=True, text=True, check=True).stdout
    rows: list[dict[str, object]] = []
    arch, name = None, None
    for line in out.splitlines():
        if m := re.match(r"\s*arch = (sm_\d+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            name = m.group(1)
        elif (m := re.match(r"\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)) and name:
            reg, stack, shared, local = map(int, m.groups())
            rows.append({"arch": arch, "mangled": name, "reg": reg, "stack": stack, "shared": shared, "local": local})
            name = None
    for row, pretty in zip(rows, demangle([str(r["mangled"]) for r in rows]), strict=True):
        row["name"] = pretty
        row["family"] = family(pretty)
    assert rows, f"cuobjdump found no kernels in {_C.__file__}"
    return rows


def test_every_kernel_family_for_every_arch(kernels: list[dict[str, object]]) -> None:
    by_arch: dict[object, set[object]] = {}
    for k in kernels:
        by_arch.setdefault(k["arch"], set()).add(k["family"])
    archs = re.findall(r"(\d+)\.(\d+)", torch_fastmlp.CUDA_ARCHS)
    for major, minor in archs:
        assert f"sm_{major}{minor}" in by_arch, f"no cubin for sm_{major}{minor} (have {sorted(by_arch)})"
    for arch, families in by_arch.items():
        assert families >= FAMILIES, f"{arch} lacks {sorted(FAMILIES - families)}"


def test_half_layers_have_no_simt_gemm(kernels: list[dict[str, object]]) -> None:
    """Half / bf16 layers run on cuBLAS (gemm_on_cublas): gemm_kernel is float / double only."""
    gemms = {str(k["name"]) for k in kernels if k["family"] == "gemm_kernel"}
    assert gemms and all(("Half" not in n and "BFloat16" not in n) for n in gemms), sorted(gemms)


def one_block_per_sm(name: str) -> bool:
    """Whether the kernel is compiled for one resident block per SM (chain_blocks_per_sm in
    csrc/cuda/fused_chain.cuh), so the planner launches no more than one per SM."""
    if "<double" in name:
        return True
    m = re.search(r"fused_(?:step|forward)_kernel<[^,]+, (\d+)>", name)
    return m is not None and int(m.group(1)) > 32


def test_registers_stack_and_shared_memory(kernels: list[dict[str, object]]) -> None:
    for k in kernels:
        name = str(k["name"])
        where = f"{k['arch']} {name}"
        bound = MAX_REGISTERS_ONE_BLOCK if one_block_per_sm(name) else MAX_REGISTERS
        assert int(k["reg"]) <= bound, f"{where}: {k['reg']} registers"
        assert int(k["local"]) == 0, f"{where}: {k['local']} B of local memory"
        assert int(k["shared"]) <= MAX_STATIC_SHARED, f"{where}: {k['shared']} B of static shared memory"
        allowed = STACK_ALLOWED_DOUBLE if "<double" in name else 0
        assert int(k["stack"]) <= allowed, f"{where}: {k['stack']} B of stack (spills or local arrays)"


def test_one_block_per_sm_reads_the_names() -> None:
    chain = "void fastmlp::cuda::fused_step_kernel<float, {}>(fastmlp::cuda::FusedChainParams<float>)"
    assert one_block_per_sm(chain.format(128)) and not one_block_per_sm(chain.format(32))
    assert one_block_per_sm("void fastmlp::cuda::gemm_kernel<double>(fastmlp::cuda::GemmParams<double>)")
    assert not one_block_per_sm("void fastmlp::cuda::gemm_kernel<float>(fastmlp::cuda::GemmParams<float>)")
