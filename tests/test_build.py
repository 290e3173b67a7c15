"""How the extension was built: kernels registered per backend, the info
command, and the clear error for a CUDA tensor on a CPU-only build."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torch_fastmlp
from torch_fastmlp import _ops

CORE_OPS = [
    "linear_act",
    "linear_act_backward",
    "mlp_forward",
    "mlp_backward",
    "bce_with_logits",
    "bce_with_logits_backward",
]
#: Every op of the library, as the dispatcher knows them (new ops are covered automatically).
OPS = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastmlp::"))
REPO = Path(__file__).resolve().parents[1]


def test_all_ops_defined() -> None:
    assert set(CORE_OPS) <= set(OPS)
    for op in OPS:
        assert hasattr(torch.ops.fastmlp, op), op


@pytest.mark.parametrize("op", OPS)
def test_cpu_kernel(op: str) -> None:
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmlp::{op}", "CPU")


@pytest.mark.parametrize("op", OPS)
def test_cuda_kernel_when_built_with_cuda(op: str) -> None:
    if not torch_fastmlp.WITH_CUDA:
        pytest.skip("CPU-only build")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmlp::{op}", "CUDA")


@pytest.mark.parametrize("op", OPS)
def test_fake_impl(op: str) -> None:
    """Every op has a fake (meta) impl, which torch.compile needs."""
    assert torch._library.simple_registry.singleton.find(f"fastmlp::{op}").fake_impl.kernel is not None


def test_with_cuda_consistent_with_archs() -> None:
    assert isinstance(torch_fastmlp.WITH_CUDA, bool)
    assert isinstance(torch_fastmlp.CUDA_ARCHS, str)
    if not torch_fastmlp.WITH_CUDA:
        assert torch_fastmlp.CUDA_ARCHS == ""


def test_ci_cuda_build() -> None:
    """CI sets FASTMLP_CUDA=1 where it builds the CUDA kernels: they must be there."""
    if os.environ.get("FASTMLP_CUDA") != "1":
        pytest.skip("FASTMLP_CUDA=1 not set")
    assert torch_fastmlp.WITH_CUDA is True


def test_info_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "torch_fastmlp.info"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert torch.__version__ in proc.stdout
    assert torch_fastmlp.__version__ in proc.stdout
    assert "CUDA kernels:" in proc.stdout
    assert "fastmlp::linear_act: CPU" in proc.stdout


class _FakeCudaTensor:
    """What check_device reads of a CUDA tensor."""

    device = torch.device("cuda", 0)
    is_cpu = False


def test_cuda_tensor_on_cpu_only_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_ops, "WITH_CUDA", False)
    with pytest.raises(RuntimeError, match="built without its CUDA kernels"):
        _ops.check_device(_FakeCudaTensor())  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="torch_fastmlp.info"):
        _ops.check_device(None, _FakeCudaTensor())  # type: ignore[arg-type]
    assert not _ops.device_supported(torch.device("cuda"))
    assert _ops.device_supported(torch.device("cpu"))
    _ops.check_device(torch.empty(1), None, torch.empty(1, device="meta"))  # no error


def test_check_device_with_cuda_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_ops, "WITH_CUDA", True)
    _ops.check_device(_FakeCudaTensor())  # type: ignore[arg-type]
    assert _ops.device_supported(torch.device("cuda"))


def test_unsupported_device_message() -> None:
    class Fake:
        device = torch.device("xpu")
        is_cpu = False

    with pytest.raises(RuntimeError, match="no kernels for device"):
        _ops.check_device(Fake())  # type: ignore[arg-type]


def test_version() -> None:
    assert isinstance(torch_fastmlp.__version__, str) and torch_fastmlp.__version__
    assert set(torch_fastmlp.__all__) >= {
        "BCEWithLogitsLoss",
        "FusedLinearReLU",
        "MLP",
        "Sequential",
        "fuse",
        "functional",
        "WITH_CUDA",
    }


# --- MSE and cross-entropy (issue 20) -------------------------------------------------

LOSS_OPS = [
    "mse_forward",
    "mse_backward",
    "mse_loss",
    "cross_entropy_forward",
    "cross_entropy_backward",
    "cross_entropy_loss",
]


def test_loss_ops_defined_with_kernels() -> None:
    """The MSE / cross-entropy ops exist with a CPU kernel and a fake impl (and,
    in a CUDA build, a CUDA kernel): OPS above parametrizes over them too."""
    assert set(LOSS_OPS) <= set(OPS)
    for op in LOSS_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmlp::{op}", "CPU"), op
        assert torch._library.simple_registry.singleton.find(f"fastmlp::{op}").fake_impl.kernel is not None, op
        if torch_fastmlp.WITH_CUDA:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmlp::{op}", "CUDA"), op
    assert {"MSELoss", "CrossEntropyLoss"} <= set(torch_fastmlp.__all__)
    assert {"mse_loss", "cross_entropy"} <= set(torch_fastmlp.functional.__all__)
