"""First-use autotuning of the kernel paths: :func:`autotune`.

Where a backend has two ways to run an op (on CPU: its own narrow kernels or
BLAS, for a layer's forward and weight gradient), a planning heuristic picks
one. With autotuning on, the first call of each shape instead times both and
keeps the faster for the rest of the process, per op, shapes, dtype, device
and thread count (``csrc/common/autotune.h``). The candidates agree within
floating-point rounding but not bitwise, so a timed choice may differ between
runs: autotuning is off by default, like ``torch.backends.cudnn.benchmark``,
and never applies under ``torch.use_deterministic_algorithms(True)``.
"""

from __future__ import annotations

from . import _C


def autotune(enabled: bool | None) -> bool:
    """Turns first-use autotuning on (``True``) or off (``False``); ``None``
    gives the choice back to the ``FASTMLP_AUTOTUNE`` environment variable
    (``1``: on), as at import. Returns :func:`autotune_enabled`. Decisions
    already made are kept: :func:`clear_autotune` forgets them."""
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"autotune(): enabled must be a bool or None, got {type(enabled).__name__}")
    _C.set_autotune(-1 if enabled is None else int(enabled))
    return autotune_enabled()


def autotune_enabled() -> bool:
    """Whether first-use timing decides now: turned on, and not under
    ``torch.use_deterministic_algorithms(True)``."""
    return bool(_C.autotune_enabled())


def autotune_decisions() -> list[str]:
    """The decisions made so far, one line each:
    ``"op:shapes:dtype:device:threads: chose i (heuristic h), seconds t0 t1"``
    (candidate 0 is the backend's own kernel, 1 the BLAS / cuBLAS path)."""
    return list(_C.autotune_decisions())


def clear_autotune() -> None:
    """Forgets every decision: the next call of each shape is timed again."""
    _C.clear_autotune()
