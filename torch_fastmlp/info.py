"""``python -m torch_fastmlp.info``: how this build was made and what it can use now."""

from __future__ import annotations

import torch

import torch_fastmlp


def main() -> None:
    """Print torch's version, whether CUDA kernels were compiled (and for which
    architectures), and whether a GPU is usable now."""
    print(f"torch_fastmlp {torch_fastmlp.__version__}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    if torch_fastmlp.WITH_CUDA:
        print(f"CUDA kernels: compiled for {torch_fastmlp.CUDA_ARCHS or 'the GPU present at build time'}")
    else:
        print("CUDA kernels: not compiled (CPU-only build)")
    for op in ("linear_act", "mlp_forward", "bce_with_logits"):
        keys = [k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmlp::{op}", k)]
        print(f"  fastmlp::{op}: {', '.join(keys)}")
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        cap = ".".join(map(str, torch.cuda.get_device_capability()))
        usable = "yes" if torch_fastmlp.WITH_CUDA else "no (kernels not compiled)"
        print(f"GPU: {name} (sm {cap}); usable by torch_fastmlp: {usable}")
    else:
        print("GPU: none visible")
    print(f"CPU kernels: {torch_fastmlp.CPU_ISA} vectors, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
