"""Build torch_fastmlp._C from csrc/.

CUDA kernels are compiled when torch is a CUDA build and nvcc is found
(``FASTMLP_CUDA=auto``, the default); ``FASTMLP_CUDA=1`` requires them and
``FASTMLP_CUDA=0`` builds the CPU kernels only. Any torch from 2.11 to 2.14.1
(the range in pyproject.toml) will do: the extension compiles against the one
installed, so build with ``--no-build-isolation``.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys
import sysconfig

from setuptools import setup

#: The torch releases this code builds against (pyproject.toml's range; CI tests the last).
TORCH_OLDEST, TORCH_NEWEST = (2, 11), (2, 14, 1)

try:
    import torch
except ImportError:  # pragma: no cover - only hit without --no-build-isolation
    sys.exit(
        "torch_fastmlp: building needs PyTorch (2.11 to 2.14.1) importable in the build environment.\n"
        "Install torch first, then build without isolation:\n"
        "    pip install torch==2.14.1\n"
        "    pip install --no-build-isolation .\n"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _tty():
    """The terminal, when pip captures this process's output (pip shows it only with -v)."""
    if sys.stdout.isatty():
        return None
    try:
        return open("/dev/tty", "w")  # noqa: SIM115 -- kept open for the whole build
    except OSError:  # no controlling terminal (CI): the lines stay in pip's log
        return None


_TTY = _tty()


def _log(msg: str) -> None:
    """A progress line: on stdout, and on the terminal too when pip hides stdout."""
    line = f"torch_fastmlp: {msg}"
    print(line, flush=True)
    if _TTY is not None:
        try:
            _TTY.write(f"\n{line}")
            _TTY.flush()
        except OSError:
            pass


#: What the build will do, said when it starts (pip runs this file for its metadata too).
_PLAN: list[str] = []


def _plan(msg: str) -> None:
    _PLAN.append(msg)


def torch_release(version: str) -> tuple[int, ...]:
    """``"2.11.0+cu130"`` -> ``(2, 11, 0)``."""
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:3])


def check_torch_version() -> None:
    release = torch_release(torch.__version__)
    if not TORCH_OLDEST <= release <= TORCH_NEWEST:
        _log(
            f"warning: torch {torch.__version__} is outside the supported range "
            f"{'.'.join(map(str, TORCH_OLDEST))} to {'.'.join(map(str, TORCH_NEWEST))}; building anyway"
        )


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
    jobs = os.environ.get("MAX_JOBS") or f"{os.cpu_count()} + 2 (ninja's default; set MAX_JOBS)"
    _plan(f"torch {torch.__version__}, Python {sys.version.split()[0]}")
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # The visible GPUs' capabilities (what torch would pick), or a default list without a GPU.
            os.environ["TORCH_CUDA_ARCH_LIST"] = visible_gpu_archs() or DEFAULT_ARCH_LIST
        cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        sources += cuda_sources
        include_dirs += wheel_cuda_include_dirs()
        arches = os.environ["TORCH_CUDA_ARCH_LIST"]
        _plan(f"building CPU + CUDA kernels ({why}; TORCH_CUDA_ARCH_LIST={arches})")
        _plan(
            f"compiling {len(sources) - len(cuda_sources)} C++ and {len(cuda_sources)} CUDA files, "
            f"MAX_JOBS={jobs}: "
            "this takes several minutes (on 2 cores ~9 minutes for 2 archs; each arch adds to every CUDA file), "
            "and an unchanged rebuild seconds"
        )
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
    _plan(f"building CPU kernels only ({why})")
    _plan(f"compiling {len(sources)} C++ files, MAX_JOBS={jobs}: a few minutes, an unchanged rebuild seconds")
    return cpp_extension.CppExtension(
        "torch_fastmlp._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    ), cpp_extension


def visible_gpu_archs() -> str | None:
    """``"9.0"`` for an H200: the capabilities of the visible GPUs, ``None`` without one."""
    try:
        if not torch.cuda.is_available():
            return None
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    except Exception:  # noqa: BLE001 -- a broken driver: fall back to the default list
        return None
    return ";".join(f"{major}.{minor}" for major, minor in caps) or None


#: Where the compiled objects stay between builds: the folder ``setup.py build_ext``
#: uses, also for ``pip install -e`` (whose own is a temporary folder, so every
#: editable install recompiled everything); ninja then rebuilds only what changed.
BUILD_TEMP = os.path.join(ROOT, "build", f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}")


def build_ext_class(cpp_extension):
    """torch's BuildExtension, keeping the object files of editable builds in BUILD_TEMP."""

    class BuildExt(cpp_extension.BuildExtension):
        def finalize_options(self) -> None:
            super().finalize_options()
            if getattr(self, "editable_mode", False):
                self.build_temp = BUILD_TEMP

        def run(self) -> None:
            for msg in _PLAN:
                _log(msg)
            _log(f"compiling into {self.build_temp} (ninja recompiles only what changed)")
            super().run()
            _log("build done")

    return BuildExt


check_torch_version()
extension, cpp_extension = build_extension()

setup(
    ext_modules=[extension],
    cmdclass={"build_ext": build_ext_class(cpp_extension)},
)
