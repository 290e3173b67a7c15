"""Build torch_fastmlp._C from csrc/.

CUDA kernels are compiled when torch is a CUDA build and nvcc is found
(``FASTMLP_CUDA=auto``, the default); ``FASTMLP_CUDA=1`` requires them and
``FASTMLP_CUDA=0`` builds the CPU kernels only.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

try:
    import torch
except ImportError:  # pragma: no cover - only hit without --no-build-isolation
    sys.exit(
        "torch_fastmlp: building needs PyTorch importable in the build environment.\n"
        "Install torch first, then build without isolation:\n"
        "    pip install torch==2.14.1\n"
        "    pip install --no-build-isolation .\n"
    )

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _log(msg: str) -> None:
    print(f"torch_fastmlp: {msg}", flush=True)


def _is_toolkit_root(path: str) -> bool:
    """A real CUDA toolkit root has nvcc, the runtime header and libcudart together."""
    return all(os.path.exists(os.path.join(path, p)) for p in ("bin/nvcc", "include/cuda_runtime.h")) and any(
        os.path.exists(os.path.join(path, lib, "libcudart.so")) for lib in ("lib64", "lib")
    )


def find_cuda_home() -> str | None:
    """Locate the toolkit root. ``nvcc`` on PATH may be a wrapper script in a
    generic bin folder, so torch's own guess (the folder above nvcc) can be wrong."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        path = os.environ.get(var)
        if path and _is_toolkit_root(path):
            return path
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        # A wrapper script: look for the toolkit path it execs.
        try:
            with open(nvcc, errors="ignore") as f:
                for token in f.read().split():
                    if token.endswith("/bin/nvcc"):
                        candidates.append(os.path.dirname(os.path.dirname(token)))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for path in candidates:
        if _is_toolkit_root(path):
            return path
    return None


def wheel_cuda_include_dirs() -> list[str]:
    """Headers (cuBLAS, cuSPARSE, ...) that ATen's CUDA headers need, shipped by
    the ``nvidia-*`` wheels torch depends on. Found via the ``nvidia`` namespace."""
    try:
        import nvidia  # type: ignore[import-not-found]
    except ImportError:
        return []
    dirs = []
    for base in nvidia.__path__:
        for inc in sorted(glob.glob(os.path.join(base, "*", "include"))):
            if os.path.exists(os.path.join(inc, "cublas_v2.h")) or os.path.exists(os.path.join(inc, "cusparse.h")):
                dirs.append(inc)
    return dirs


def want_cuda() -> tuple[bool, str]:
    mode = os.environ.get("FASTMLP_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"torch_fastmlp: FASTMLP_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False, "FASTMLP_CUDA=0"
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is not a CUDA build"
    else:
        cuda_home = find_cuda_home()
        if cuda_home is not None:
            os.environ["CUDA_HOME"] = cuda_home
            return True, f"nvcc found in {cuda_home}"
        reason = "nvcc / the CUDA toolkit was not found (set CUDA_HOME)"
    if mode == "1":
        sys.exit(f"torch_fastmlp: FASTMLP_CUDA=1 but {reason}")
    return False, reason


def build_extension():
    with_cuda, why = want_cuda()
    # Import only after CUDA_HOME is fixed: cpp_extension reads it at import.
    from torch.utils import cpp_extension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "autograd", "*.cpp")))
    # torch adds the C++ standard it needs (C++20). -fno-math-errno: nothing reads errno, and with it
    # sqrt would be a branch to libm that keeps loops like the Adam update from vectorising.
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    define_macros: list[tuple[str, str | None]] = []
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        include_dirs += wheel_cuda_include_dirs()
        arches = os.environ.get("TORCH_CUDA_ARCH_LIST", "this GPU")
        _log(f"building CPU + CUDA kernels ({why}; archs {arches})")
        define_macros.append(("FASTMLP_WITH_CUDA", "1"))
        define_macros.append(("FASTMLP_CUDA_ARCHS", f'"{arches}"'))
        return cpp_extension.CUDAExtension(
            "torch_fastmlp._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
            },
            extra_link_args=["-fopenmp"],
        ), cpp_extension
    _log(f"building CPU kernels only ({why})")
    return cpp_extension.CppExtension(
        "torch_fastmlp._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    ), cpp_extension


extension, cpp_extension = build_extension()

setup(
    ext_modules=[extension],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
