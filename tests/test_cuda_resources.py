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
# The fused chain kernels keep their per-thread layout in 240-272 B of stack (sm_80 and
# sm_90; issue 19: to be computed on the host and passed in); nothing else may use local memory.
STACK_ALLOWED = {"fused_forward_kernel": 288, "fused_step_kernel": 288}
# 256-thread blocks: at least two resident per SM (65536 registers); double kernels may take
# up to their launch bound (sm_80's fused_forward_kernel<double, 128>: 167)
MAX_REGISTERS = 128
MAX_REGISTERS_DOUBLE = 255
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


def test_registers_stack_and_shared_memory(kernels: list[dict[str, object]]) -> None:
    for k in kernels:
        where = f"{k['arch']} {k['name']}"
        double = "<double" in str(k["name"])
        assert int(k["reg"]) <= (MAX_REGISTERS_DOUBLE if double else MAX_REGISTERS), f"{where}: {k['reg']} registers"
        assert int(k["local"]) == 0, f"{where}: {k['local']} B of local memory"
        assert int(k["shared"]) <= MAX_STATIC_SHARED, f"{where}: {k['shared']} B of static shared memory"
        allowed = STACK_ALLOWED.get(str(k["family"]), 8 if double else 0)
        assert int(k["stack"]) <= allowed, f"{where}: {k['stack']} B of stack (spills or local arrays)"
