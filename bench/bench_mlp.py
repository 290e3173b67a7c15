"""Side-by-side benchmark of torch_fastmlp against eager and compiled PyTorch.

Run from the repository root::

    python -m bench.bench_mlp --quick                 # short CPU/GPU run (README)
    python -m bench.bench_mlp --device cuda --dtypes float32,bfloat16,float16

For every case (workload x dtype x phase x batch size) all variants run on the
same inputs with the same initial weights, interleaved round by round, after a
correctness check against eager.  Results go to ``bench/results/`` as JSON,
a markdown table and (if matplotlib is importable) a speedup plot.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import benchmark as tbench

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"

DEFAULT_WORKLOADS = ("784-30-1", "1000-100-10", "784-256-256-1", "1024-1024-1024-1")
DEFAULT_BATCHES = (1, 8, 64, 256, 1024, 2048, 4096, 12396, 16384, 65536)
PHASES = ("fwd", "fwdbwd", "step")
CPU_MAX_BATCH = 16384
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# (loss relative tolerance, gradient tolerance relative to max |grad|) per dtype.
TOLERANCES = {"float32": (1e-4, 1e-3), "bfloat16": (3e-2, 5e-2), "float16": (1e-2, 2e-2)}
# Per-parameter compulsory memory traffic, in multiples of the weight bytes:
# fwd reads W; fwdbwd also writes dW; step reads W/m/v and writes W/m/v.
WEIGHT_TRAFFIC = {"fwd": 1, "fwdbwd": 2, "step": 6}
QUICK = {
    "workloads": ("784-30-1", "1000-100-10"),
    "batch_sizes": (64, 2048, 12396),
    "phases": ("fwdbwd",),
    "min_run_time": 0.1,
    "rounds": 2,
    "warmup": 2,
}
EAGER = "eager"


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------
@dataclass
class Config:
    """Resolved command-line configuration."""

    device: str
    workloads: list[str]
    batch_sizes: list[int]
    phases: list[str]
    dtypes: list[str]
    variants: list[str]
    min_run_time: float
    rounds: int
    warmup: int
    threads: int
    pos_weight: float | None
    seed: int
    quick: bool
    out: Path
    plot: bool


class SkipVariant(Exception):
    """Raised by a variant factory when the variant cannot run here."""


@dataclass
class Env:
    """Process-wide facts that the variant factories need."""

    device: torch.device
    fastmlp: ModuleType | None
    fastmlp_error: str | None
    pos_weight: float | None


def parse_dims(workload: str) -> tuple[int, ...]:
    """Turn ``"784-30-1"`` into ``(784, 30, 1)`` (at least two positive ints)."""
    try:
        dims = tuple(int(p) for p in workload.split("-"))
    except ValueError:
        dims = ()
    if len(dims) < 2 or min(dims) < 1:
        raise SystemExit(f"bad workload {workload!r}, expected widths like 784-30-1")
    return dims


def csv_list(text: str) -> list[str]:
    """Split a comma-separated CLI value, dropping empty items."""
    return [item.strip() for item in text.split(",") if item.strip()]


def default_variants(device: str) -> list[str]:
    """Variants run when ``--variants`` is not given."""
    names = list(VARIANTS)
    if device != "cuda":
        names.remove("compile-autotune")
    return names


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser; list options take comma-separated values."""
    p = argparse.ArgumentParser(
        prog="python -m bench.bench_mlp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    p.add_argument("--quick", action="store_true", help="short run: 784-30-1,1000-100-10 x batch 64,2048,12396, fwdbwd")
    p.add_argument("--workloads", help=f"layer widths, default {','.join(DEFAULT_WORKLOADS)}")
    p.add_argument("--batch-sizes", help="default " + ",".join(map(str, DEFAULT_BATCHES)))
    p.add_argument("--max-batch", type=int, help=f"drop larger batches (default {CPU_MAX_BATCH} on CPU, none on CUDA)")
    p.add_argument("--phases", help=f"subset of {','.join(PHASES)} (default all)")
    p.add_argument("--dtypes", default="float32", help=f"subset of {','.join(DTYPES)}")
    p.add_argument("--variants", help=f"subset of {','.join(VARIANTS)}")
    p.add_argument(
        "--min-run-time", type=float, help="seconds of timing per variant per case (default 0.5 CPU, 0.2 CUDA)"
    )
    p.add_argument("--rounds", type=int, help="interleaved timing rounds per case (default 3)")
    p.add_argument("--warmup", type=int, help="warm-up iterations per variant (default 5)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads before running")
    p.add_argument("--pos-weight", type=float, help="BCE pos_weight for every output")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/<device>-<date>.json)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    return p


def resolve_config(args: argparse.Namespace) -> Config:
    """Apply ``--quick`` and device-dependent defaults to the parsed args."""
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    quick = QUICK if args.quick else {}

    def pick(name: str, fallback: Any) -> Any:
        value = getattr(args, name)
        return value if value is not None else quick.get(name, fallback)

    workloads = csv_list(args.workloads) if args.workloads else list(pick("workloads", DEFAULT_WORKLOADS))
    for w in workloads:
        parse_dims(w)
    try:
        batches = [int(b) for b in csv_list(args.batch_sizes)] if args.batch_sizes else None
    except ValueError as exc:
        raise SystemExit(f"bad --batch-sizes {args.batch_sizes!r}: {exc}") from None
    batches = batches or list(pick("batch_sizes", DEFAULT_BATCHES))
    max_batch = args.max_batch if args.max_batch is not None else (CPU_MAX_BATCH if device == "cpu" else None)
    if max_batch:
        dropped = [b for b in batches if b > max_batch]
        if dropped:
            print(f"note: skipping batch sizes {dropped} > --max-batch {max_batch}", flush=True)
        batches = [b for b in batches if b <= max_batch]
    phases = csv_list(args.phases) if args.phases else list(pick("phases", PHASES))
    dtypes = csv_list(args.dtypes)
    variants = csv_list(args.variants) if args.variants else default_variants(device)
    _validate_choices("phase", phases, PHASES)
    _validate_choices("dtype", dtypes, DTYPES)
    _validate_choices("variant", variants, VARIANTS)
    variants = [EAGER, *(v for v in dict.fromkeys(variants) if v != EAGER)]  # reference goes first
    threads = args.threads or torch.get_num_threads()
    out = args.out or RESULTS_DIR / f"{device_slug(device)}-{dt.datetime.now():%Y-%m-%d_%H%M%S}.json"
    return Config(
        device=device,
        workloads=workloads,
        batch_sizes=batches,
        phases=phases,
        dtypes=dtypes,
        variants=variants,
        min_run_time=pick("min_run_time", 0.5 if device == "cpu" else 0.2),
        rounds=max(1, pick("rounds", 3)),
        warmup=max(1, pick("warmup", 5)),
        threads=threads,
        pos_weight=args.pos_weight,
        seed=args.seed,
        quick=args.quick,
        out=out,
        plot=not args.no_plot,
    )


def _validate_choices(kind: str, given: Iterable[str], allowed: Iterable[str]) -> None:
    """Exit with a helpful message if ``given`` has names outside ``allowed``."""
    bad = sorted(set(given) - set(allowed))
    if bad:
        raise SystemExit(f"unknown {kind}(s) {bad}; choose from {sorted(allowed)}")


# --------------------------------------------------------------------------
# Environment / metadata
# --------------------------------------------------------------------------
def import_fastmlp() -> tuple[ModuleType | None, str | None]:
    """Import torch_fastmlp, returning ``(module, None)`` or ``(None, reason)``."""
    try:
        import torch_fastmlp
    except Exception as exc:  # noqa: BLE001 -- ImportError, OSError from the .so, RuntimeError...
        return None, f"import torch_fastmlp failed: {type(exc).__name__}: {exc}"
    return torch_fastmlp, None


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo, falling back to ``platform``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    """Human-readable name of the benchmarked device."""
    return torch.cuda.get_device_name() if device == "cuda" else cpu_model()


def device_slug(device: str) -> str:
    """File-name-safe short device name, e.g. ``cuda-nvidia-h100-80gb-hbm3``."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")[:40].strip("-")
    return f"{device}-{slug or 'unknown'}"


def git_info() -> dict[str, Any]:
    """Short commit hash and dirty flag; ``None`` values if git is unusable."""

    def git(*cmd: str) -> str | None:
        try:
            res = subprocess.run(["git", *cmd], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip()

    status = git("status", "--porcelain")
    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": None if status is None else bool(status)}


def collect_metadata(cfg: Config, env: Env, copy_bw: float) -> dict[str, Any]:
    """Everything needed to interpret the numbers later."""
    meta: dict[str, Any] = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": cfg.device,
        "device_name": device_name(cfg.device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_fastmlp": getattr(env.fastmlp, "__version__", "unknown") if env.fastmlp else None,
        "torch_fastmlp_error": env.fastmlp_error,
        "git": git_info(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "copy_bandwidth_Bps": copy_bw,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "command": " ".join(sys.argv),
    }
    if cfg.device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        meta.update(
            cuda=torch.version.cuda,
            capability=f"{props.major}.{props.minor}",
            gpu_memory_bytes=props.total_memory,
            float32_matmul_precision=torch.get_float32_matmul_precision(),
        )
    return meta


def raise_recompile_limits(limit: int = 64) -> None:
    """Let dynamo keep one graph per (batch shape, grad mode) without falling back."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        try:
            setattr(cfg, name, max(limit, getattr(cfg, name)))
        except (AttributeError, TypeError):
            continue


# --------------------------------------------------------------------------
# Variants: name -> factory(base model, env) -> Built
# --------------------------------------------------------------------------
@dataclass
class Built:
    """A ready variant: ``loss_fn(x, target) -> loss`` and the model owning the weights.

    ``model`` has ``nn.Sequential`` state_dict keys, so weights can be reset from
    the reference model before every case.
    """

    loss_fn: Callable[[Tensor, Tensor], Tensor]
    model: nn.Module
    #: Phase ``step`` runs torch_fastmlp.TrainStep(model, loss_fn.loss, Adam) (the other phases skip).
    train_step: bool = False


class LossModule(nn.Module):
    """``loss(model(x), target)`` as one module (what torch.compile sees)."""

    def __init__(self, model: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        return self.loss(self.model(x), target)


def pos_weight_tensor(base: nn.Sequential, env: Env) -> Tensor | None:
    """``pos_weight`` broadcast over the output width, or ``None``."""
    if env.pos_weight is None:
        return None
    last = [m for m in base if isinstance(m, nn.Linear)][-1]
    w = last.weight
    return torch.full((last.out_features,), env.pos_weight, device=w.device, dtype=w.dtype)


def require_fastmlp_module() -> ModuleType:
    """torch_fastmlp, already imported by the variant factory that needs it."""
    return sys.modules["torch_fastmlp"]


def require_fastmlp(env: Env) -> ModuleType:
    """The torch_fastmlp module, or :class:`SkipVariant` with the import error."""
    if env.fastmlp is None:
        raise SkipVariant(env.fastmlp_error or "torch_fastmlp not importable")
    return env.fastmlp


def build_eager(base: nn.Sequential, env: Env) -> Built:
    """Reference: plain ``nn.Sequential`` + ``nn.BCEWithLogitsLoss``."""
    model = copy.deepcopy(base)
    return Built(LossModule(model, nn.BCEWithLogitsLoss(pos_weight=pos_weight_tensor(base, env))), model)


def compiled(mode: str | None) -> Callable[[nn.Sequential, Env], Built]:
    """Factory for the eager reference under ``torch.compile(mode=mode)``."""

    def build(base: nn.Sequential, env: Env) -> Built:
        eager = build_eager(base, env)
        return Built(torch.compile(eager.loss_fn, mode=mode), eager.model)

    return build


def build_fastmlp(base: nn.Sequential, env: Env) -> Built:
    """``torch_fastmlp.Sequential`` + ``torch_fastmlp.BCEWithLogitsLoss``."""
    fm = require_fastmlp(env)
    model = fm.Sequential(*copy.deepcopy(list(base)))
    loss = fm.BCEWithLogitsLoss(pos_weight=pos_weight_tensor(base, env))
    return Built(LossModule(model, loss), model)


def build_fused_classifier(base: nn.Sequential, env: Env) -> Built:
    """``torch_fastmlp.FusedBCEClassifier``: model + loss in a single pass."""
    fm = require_fastmlp(env)
    cls = getattr(fm, "FusedBCEClassifier", None)
    if cls is None:
        raise SkipVariant("torch_fastmlp.FusedBCEClassifier not available")
    model = fm.Sequential(*copy.deepcopy(list(base)))
    return Built(cls(model, pos_weight=pos_weight_tensor(base, env), reduction="mean"), model)


def build_train_step(base: nn.Sequential, env: Env) -> Built:
    """``torch_fastmlp.TrainStep``: forward, loss, backward and the Adam update in one op (phase ``step``)."""
    fm = require_fastmlp(env)
    if getattr(fm, "TrainStep", None) is None:
        raise SkipVariant("torch_fastmlp.TrainStep not available")
    built = build_fastmlp(base, env)
    built.train_step = True
    return built


VARIANTS: dict[str, Callable[[nn.Sequential, Env], Built]] = {
    EAGER: build_eager,
    "compile": compiled(None),
    "compile-autotune": compiled("max-autotune-no-cudagraphs"),
    "fastmlp": build_fastmlp,
    "fastmlp-fused": build_fused_classifier,
    "fastmlp-trainstep": build_train_step,
}


def make_base(dims: Sequence[int], device: torch.device, dtype: torch.dtype, seed: int) -> nn.Sequential:
    """``Linear -> ReLU -> ... -> Linear`` with the given widths (no final ReLU)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).to(device=device, dtype=dtype)


def build_variants(names: Sequence[str], base: nn.Sequential, env: Env) -> dict[str, Built | str]:
    """Instantiate each variant; a string value is the reason it is skipped."""
    built: dict[str, Built | str] = {}
    for name in names:
        try:
            built[name] = VARIANTS[name](base, env)
        except Exception as exc:  # noqa: BLE001 -- SkipVariant or an API mismatch in the package
            built[name] = short_error(exc)
    return built


def short_error(exc: BaseException) -> str:
    """One-line description of an exception (skip reasons, warnings)."""
    if isinstance(exc, SkipVariant):
        return str(exc)
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


# --------------------------------------------------------------------------
# Phases, correctness check, timing
# --------------------------------------------------------------------------
def make_runner(built: Built, phase: str, x: Tensor, target: Tensor) -> Callable[[], None]:
    """One timed iteration of ``phase`` (fwd / fwdbwd / step) for a variant."""
    if phase == "fwd":

        def run_fwd() -> None:
            with torch.no_grad():
                built.loss_fn(x, target)

        return run_fwd
    opt = torch.optim.Adam(built.model.parameters(), lr=1e-4) if phase == "step" else None
    if built.train_step:
        if opt is None:
            raise SkipVariant("TrainStep runs whole training steps (phase step only)")
        step = require_fastmlp_module().TrainStep(built.model, built.loss_fn.loss, opt)  # type: ignore[union-attr]

        def run_train_step() -> None:
            step(x, target)

        return run_train_step

    def run_train() -> None:
        built.model.zero_grad(set_to_none=True)
        built.loss_fn(x, target).backward()
        if opt is not None:
            opt.step()

    return run_train


@dataclass
class Outputs:
    """Loss and named gradients of one variant, for the correctness check."""

    loss: float
    grads: dict[str, Tensor] | None


def compute_outputs(built: Built, phase: str, x: Tensor, target: Tensor) -> Outputs:
    """Loss (and grads unless ``phase == "fwd"``) from the current weights."""
    built.model.zero_grad(set_to_none=True)
    if phase == "fwd":
        with torch.no_grad():
            return Outputs(float(built.loss_fn(x, target).detach()), None)
    loss = built.loss_fn(x, target)
    loss.backward()
    grads = {n: p.grad.detach().double().clone() for n, p in built.model.named_parameters() if p.grad is not None}
    return Outputs(float(loss.detach()), grads)


@dataclass
class Check:
    """Deviation of a variant from eager on the same weights and inputs."""

    loss_rel_err: float
    grad_rel_err: float | None
    ok: bool


def compare(ref: Outputs, got: Outputs, dtype: str) -> Check:
    """Relative loss error and max grad error (relative to max |eager grad|)."""
    loss_tol, grad_tol = TOLERANCES[dtype]
    loss_err = abs(got.loss - ref.loss) / max(abs(ref.loss), 1e-12)
    grad_err = None
    if ref.grads is not None:
        if got.grads is None or set(got.grads) != set(ref.grads):
            grad_err = float("inf")
        else:
            scale = max(float(g.abs().max()) for g in ref.grads.values()) or 1e-12
            grad_err = max(float((got.grads[n] - g).abs().max()) for n, g in ref.grads.items()) / scale
    ok = loss_err <= loss_tol and (grad_err is None or grad_err <= grad_tol)
    return Check(loss_err, grad_err, ok)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cpu(run: Callable[[], None], budget: float, blocks: int = 10) -> list[float]:
    """Per-iteration seconds, one value per block, from ``benchmark.Timer.timeit``.

    Unlike ``blocked_autorange`` (blocks of >= ~10 ms), blocks are sized to give
    about ``blocks`` samples per ``budget`` so short budgets still yield quartiles.
    """
    timer = tbench.Timer(stmt="run()", globals={"run": run}, num_threads=torch.get_num_threads())
    one = timer.timeit(1).mean
    number = max(1, int(budget / blocks / max(one, 1e-9)))
    times: list[float] = []
    while not times or sum(times) * number < budget:
        times.append(timer.timeit(number).mean)
    return times


def time_cuda(run: Callable[[], None], budget: float) -> list[float]:
    """Per-iteration seconds from CUDA events, reps sized to fill ``budget``."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    run()
    torch.cuda.synchronize()
    reps = int(min(5000, max(10, budget / max(time.perf_counter() - t0, 1e-6))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) * 1e-3 for start, end in events]


def time_fn(device: torch.device) -> Callable[[Callable[[], None], float], list[float]]:
    """The timing routine for ``device``."""
    return time_cuda if device.type == "cuda" else time_cpu


def peak_memory(run: Callable[[], None]) -> tuple[int, int]:
    """``(max_memory_allocated, peak minus memory held before)`` for one CUDA iteration."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak, peak - before


def measure_copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Copy bandwidth in bytes/s, counting read + write, from a large ``copy_``."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    samples = time_fn(device)(lambda: dst.copy_(src), 0.3)
    return 2 * nbytes / statistics.median(samples)


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------
@dataclass
class Result:
    """One variant in one case; ``status`` is ``ok`` or ``skipped``."""

    workload: str
    phase: str
    dtype: str
    batch: int
    variant: str
    status: str
    reason: str | None = None
    median_s: float | None = None
    p25_s: float | None = None
    p75_s: float | None = None
    iqr_s: float | None = None
    n_samples: int = 0
    speedup_vs_eager: float | None = None
    bytes_moved: int | None = None
    achieved_Bps: float | None = None
    roofline_frac: float | None = None
    input_read_floor_s: float | None = None
    peak_mem_bytes: int | None = None
    peak_mem_delta_bytes: int | None = None
    loss_rel_err: float | None = None
    grad_rel_err: float | None = None
    check_ok: bool | None = None


@dataclass
class Case:
    """One (workload, dtype, phase, batch) point."""

    workload: str
    dims: tuple[int, ...]
    dtype: str
    phase: str
    batch: int

    @property
    def label(self) -> str:
        """Short description used in progress lines and warnings."""
        return f"{self.workload} {self.phase} {self.dtype} B={self.batch}"


def compulsory_bytes(case: Case) -> tuple[int, int]:
    """``(minimum bytes moved per iteration, input bytes)`` for a case.

    Input and target are read once; weights move ``WEIGHT_TRAFFIC[phase]`` times.
    """
    elt = torch.empty((), dtype=DTYPES[case.dtype]).element_size()
    n_params = sum(i * o + o for i, o in itertools.pairwise(case.dims))
    input_bytes = case.batch * case.dims[0] * elt
    total = input_bytes + case.batch * case.dims[-1] * elt + WEIGHT_TRAFFIC[case.phase] * n_params * elt
    return total, input_bytes


def summarize(samples: list[float]) -> dict[str, float]:
    """Median and quartiles of per-iteration times."""
    s = sorted(samples)
    q1, q3 = statistics.quantiles(s, n=4, method="inclusive")[::2] if len(s) > 1 else (s[0], s[0])
    return {"median_s": statistics.median(s), "p25_s": q1, "p75_s": q3, "iqr_s": q3 - q1}


def make_inputs(case: Case, device: torch.device, seed: int) -> tuple[Tensor, Tensor]:
    """Random input and 0/1 float targets of the output's shape."""
    torch.manual_seed(seed + case.batch)
    dtype = DTYPES[case.dtype]
    x = torch.randn(case.batch, case.dims[0], device=device, dtype=dtype)
    target = torch.randint(0, 2, (case.batch, case.dims[-1]), device=device).to(dtype)
    return x, target


# --------------------------------------------------------------------------
# Running a case
# --------------------------------------------------------------------------
def prepare(
    built: Built, ref_state: dict[str, Tensor], case: Case, x: Tensor, target: Tensor, warmup: int
) -> tuple[Callable[[], None], Outputs]:
    """Reset weights, compute outputs for the check, warm up; return the runner."""
    built.model.load_state_dict(ref_state)
    outputs = compute_outputs(built, case.phase, x, target)
    run = make_runner(built, case.phase, x, target)
    for _ in range(warmup):
        run()
    synchronize(x.device)
    return run, outputs


def run_case(
    case: Case, variants: dict[str, Built | str], ref_state: dict[str, Tensor], cfg: Config, copy_bw: float
) -> list[Result]:
    """Check, warm up and time (interleaved) every variant on one case."""
    device = torch.device(cfg.device)
    x, target = make_inputs(case, device, cfg.seed)
    results = {n: Result(case.workload, case.phase, case.dtype, case.batch, n, "skipped") for n in variants}
    runners: dict[str, Callable[[], None]] = {}
    ref: Outputs | None = None
    for name, built in variants.items():
        if isinstance(built, str):
            results[name].reason = built
            continue
        try:
            runners[name], outputs = prepare(built, ref_state, case, x, target, cfg.warmup)
        except Exception as exc:  # noqa: BLE001 -- compile failures, OOM, missing kernels...
            results[name].reason = short_error(exc)
            release_memory(device)
            continue
        if name == EAGER:
            ref = outputs
        elif ref is not None:
            record_check(results[name], compare(ref, outputs, case.dtype), case)
    samples = time_interleaved(runners, cfg, device, results)
    finish_results(case, results, samples, copy_bw)
    if device.type == "cuda":
        record_peak_memory(runners, variants, results)
    return list(results.values())


def record_peak_memory(
    runners: dict[str, Callable[[], None]], variants: dict[str, Built | str], results: dict[str, Result]
) -> None:
    """Peak CUDA memory of one iteration per variant, other variants' gradients freed first.

    ``peak_mem_bytes`` still includes the shared inputs, all models' weights and (phase
    ``step``) optimizer states; ``peak_mem_delta_bytes`` is the variant's own transient.
    """
    models = [b.model for b in variants.values() if isinstance(b, Built)]
    for name, run in runners.items():
        for model in models:
            model.zero_grad(set_to_none=True)
        results[name].peak_mem_bytes, results[name].peak_mem_delta_bytes = peak_memory(run)


def record_check(result: Result, check: Check, case: Case) -> None:
    """Store the correctness check and warn (without aborting) on a mismatch."""
    result.loss_rel_err, result.grad_rel_err, result.check_ok = (check.loss_rel_err, check.grad_rel_err, check.ok)
    if not check.ok:
        tol = TOLERANCES[case.dtype]
        grad = "n/a" if check.grad_rel_err is None else f"{check.grad_rel_err:.2e}"
        print(
            f"WARNING: {result.variant} differs from eager on {case.label}: loss rel err "
            f"{check.loss_rel_err:.2e} (tol {tol[0]:g}), grad rel err {grad} (tol {tol[1]:g})",
            flush=True,
        )


def time_interleaved(
    runners: dict[str, Callable[[], None]], cfg: Config, device: torch.device, results: dict[str, Result]
) -> dict[str, list[float]]:
    """Time all runners in ``cfg.rounds`` rounds, rotating the order each round."""
    timer = time_fn(device)
    names = list(runners)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(cfg.rounds):
        k = r % max(len(names), 1)
        for name in names[k:] + names[:k]:
            if name not in runners:
                continue
            try:
                samples[name] += timer(runners[name], cfg.min_run_time / cfg.rounds)
            except Exception as exc:  # noqa: BLE001 -- e.g. OOM at the largest batch
                results[name].reason = short_error(exc)
                samples.pop(name)
                runners.pop(name)
                release_memory(device)
    return samples


def release_memory(device: torch.device) -> None:
    """Return cached CUDA memory after a failure (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def finish_results(case: Case, results: dict[str, Result], samples: dict[str, list[float]], copy_bw: float) -> None:
    """Fill statistics, speedups and bandwidth figures."""
    bytes_moved, input_bytes = compulsory_bytes(case)
    for name, times in samples.items():
        res = results[name]
        stats = summarize(times)
        res.status, res.reason, res.n_samples = "ok", None, len(times)
        res.median_s, res.p25_s, res.p75_s, res.iqr_s = (
            stats["median_s"],
            stats["p25_s"],
            stats["p75_s"],
            stats["iqr_s"],
        )
        res.bytes_moved = bytes_moved
        res.achieved_Bps = bytes_moved / res.median_s
        res.roofline_frac = res.achieved_Bps / copy_bw
        res.input_read_floor_s = input_bytes / copy_bw
    eager = results.get(EAGER)
    if eager is not None and eager.median_s:
        for res in results.values():
            if res.median_s:
                res.speedup_vs_eager = eager.median_s / res.median_s


def progress_line(index: int, total: int, case: Case, results: list[Result]) -> str:
    """``[i/n] case: variant time (speedup) | ...``."""
    cells = []
    for r in results:
        if r.status != "ok":
            cells.append(f"{r.variant} skipped")
            continue
        spread = f" ±{100 * r.iqr_s / r.median_s / 2:.0f}%" if r.iqr_s and r.median_s else ""
        speed = f" ({r.speedup_vs_eager:.2f}x)" if r.variant != EAGER and r.speedup_vs_eager else ""
        cells.append(f"{r.variant} {fmt_time(r.median_s)}{spread}{speed}")
    return f"[{index}/{total}] {case.label}: " + " | ".join(cells)


def fmt_time(seconds: float | None) -> str:
    """Seconds with a readable unit (ns, µs, ms, s)."""
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def run_suite(cfg: Config, env: Env, copy_bw: float) -> list[Result]:
    """All cases: workload -> dtype -> phase -> batch, printing a line per case."""
    cases_per_model = len(cfg.phases) * len(cfg.batch_sizes)
    total = len(cfg.workloads) * len(cfg.dtypes) * cases_per_model
    results: list[Result] = []
    index = 0
    for workload in cfg.workloads:
        dims = parse_dims(workload)
        for dtype in cfg.dtypes:
            base = make_base(dims, env.device, DTYPES[dtype], cfg.seed)
            ref_state = {k: v.clone() for k, v in base.state_dict().items()}
            variants = build_variants(cfg.variants, base, env)
            for phase in cfg.phases:
                for batch in cfg.batch_sizes:
                    index += 1
                    case = Case(workload, dims, dtype, phase, batch)
                    case_results = run_case(case, variants, ref_state, cfg, copy_bw)
                    print(progress_line(index, total, case, case_results), flush=True)
                    results += case_results
            del variants
            release_memory(env.device)
    return results


# --------------------------------------------------------------------------
# Reports: markdown, JSON, plot
# --------------------------------------------------------------------------
def group_key(r: Result) -> tuple[str, str, str]:
    """Results are tabulated per (workload, phase, dtype)."""
    return r.workload, r.phase, r.dtype


def markdown_tables(results: list[Result], variants: Sequence[str]) -> str:
    """One markdown table per workload/phase/dtype; rows = batch sizes."""
    groups: dict[tuple[str, str, str], list[Result]] = {}
    for r in results:
        groups.setdefault(group_key(r), []).append(r)
    parts = []
    for (workload, phase, dtype), rows in groups.items():
        parts.append(markdown_table(f"{workload} · {phase} · {dtype}", rows, variants))
    return "\n".join(parts)


def markdown_table(title: str, rows: list[Result], variants: Sequence[str]) -> str:
    """A single table: time (speedup vs eager) per variant, plus bandwidth columns."""
    by_batch: dict[int, dict[str, Result]] = {}
    for r in rows:
        by_batch.setdefault(r.batch, {})[r.variant] = r
    head = ["batch", *variants, "input-read floor", "best roofline"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "|".join(["---:"] * len(head)) + "|"]
    skips: dict[str, str] = {}
    for batch, cells in sorted(by_batch.items()):
        row = [str(batch)]
        for v in variants:
            r = cells.get(v)
            row.append(table_cell(r))
            if r is not None and r.status != "ok" and r.reason:
                skips.setdefault(v, r.reason)
        ok = [r for r in cells.values() if r.status == "ok"]
        floor = ok[0].input_read_floor_s if ok else None
        best = max((r.roofline_frac or 0.0 for r in ok), default=None)
        row += [fmt_time(floor), "-" if best is None else f"{100 * best:.1f}%"]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines += [f"- `{v}` skipped: {reason}" for v, reason in skips.items()]
    return "\n".join(lines) + ("\n" if skips else "")


def table_cell(r: Result | None) -> str:
    """``1.23 ms (3.10x)``, ``skipped`` or a warning-flagged time."""
    if r is None or r.status != "ok":
        return "skipped"
    text = fmt_time(r.median_s)
    if r.variant != EAGER and r.speedup_vs_eager:
        text += f" ({r.speedup_vs_eager:.2f}x)"
    if r.check_ok is False:
        text += " ⚠"
    return text


def markdown_report(meta: dict[str, Any], results: list[Result], variants: Sequence[str]) -> str:
    """Header with the environment, then all tables."""
    git = meta["git"]
    header = [
        "# torch_fastmlp benchmark",
        "",
        f"- device: {meta['device']} ({meta['device_name']}), threads: {meta['threads']}",
        (
            f"- torch {meta['torch']}, torch_fastmlp {meta['torch_fastmlp'] or 'not importable'}, "
            f"commit {git['commit'] or 'n/a'}{' (dirty)' if git['dirty'] else ''}, {meta['date']}"
        ),
        f"- copy bandwidth (read+write): {meta['copy_bandwidth_Bps'] / 1e9:.1f} GB/s",
        "- cells: median time per iteration (speedup = eager / variant); ⚠ = differs from eager",
        (
            "- input-read floor: input bytes / copy bandwidth; best roofline: compulsory bytes "
            "(input, targets, weights) / time / copy bandwidth of the fastest variant"
        ),
        "",
        "",
    ]
    return "\n".join(header) + markdown_tables(results, variants)


def write_json(path: Path, meta: dict[str, Any], results: list[Result]) -> None:
    """Metadata plus every per-variant figure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "results": [asdict(r) for r in results]}
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")


def write_plot(path: Path, results: list[Result]) -> str:
    """Speedup vs batch size (log2 x), one line per variant per workload.

    One panel per (phase, dtype); colour = variant, marker/line style = workload.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not importable; plot skipped"
    panels = sorted({(r.phase, r.dtype) for r in results})
    workloads = list(dict.fromkeys(r.workload for r in results))
    variants = [v for v in dict.fromkeys(r.variant for r in results) if v != EAGER]
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4.2 * nrows), squeeze=False)
    styles = ("-", "--", ":", "-.")
    markers = ("o", "s", "^", "D", "v")
    for ax, (phase, dtype) in zip(axes.flat, panels, strict=False):
        for wi, workload in enumerate(workloads):
            for vi, variant in enumerate(variants):
                pts = sorted(
                    (r.batch, r.speedup_vs_eager)
                    for r in results
                    if (r.phase, r.dtype, r.workload, r.variant) == (phase, dtype, workload, variant)
                    and r.speedup_vs_eager
                )
                if pts:
                    ax.plot(
                        *zip(*pts, strict=True),
                        color=f"C{vi}",
                        linestyle=styles[wi % len(styles)],
                        marker=markers[wi % len(markers)],
                        label=f"{variant} {workload}",
                    )
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set(title=f"{phase} · {dtype}", xlabel="batch size", ylabel="speedup vs eager (x)")
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines[:-1]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------
def warn_if_oversubscribed(cfg: Config, meta: dict[str, Any]) -> None:
    """CPU timings with more busy threads than cores are dominated by preemption."""
    load, cores = meta["load_avg_1m"], meta["cpu_count"]
    if cfg.device == "cpu" and load is not None and cores and load + meta["threads"] > cores + 0.5:
        print(
            f"note: load average {load} + {meta['threads']} threads > {cores} cores: "
            "CPU timings will be noisy (use an idle machine or fewer --threads)",
            flush=True,
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Parse args, run every case, print tables and write the result files."""
    cfg = resolve_config(build_parser().parse_args(argv))
    torch.set_num_threads(cfg.threads)
    raise_recompile_limits()
    fastmlp, error = import_fastmlp()
    if error:
        print(f"note: torch_fastmlp variants skipped: {error}", flush=True)
    env = Env(torch.device(cfg.device), fastmlp, error, cfg.pos_weight)
    copy_bw = measure_copy_bandwidth(env.device, (1 << 30) if cfg.device == "cuda" else (128 << 20))
    meta = collect_metadata(cfg, env, copy_bw)
    print(
        f"device {meta['device_name']} | torch {meta['torch']} | threads {meta['threads']} | "
        f"load {meta['load_avg_1m']} | copy bw {copy_bw / 1e9:.1f} GB/s | "
        f"variants {','.join(cfg.variants)}",
        flush=True,
    )
    warn_if_oversubscribed(cfg, meta)
    started = time.perf_counter()
    results = run_suite(cfg, env, copy_bw)
    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    if fastmlp is not None and fastmlp.autotune_enabled():
        # FASTMLP_AUTOTUNE=1: what the first-use timings chose, with both candidates' times
        meta["autotune_decisions"] = fastmlp.autotune_decisions()
        print("autotune decisions (candidate 0: our kernel, 1: BLAS / cuBLAS / layer by layer):")
        for line in meta["autotune_decisions"]:
            print("  " + line)
    report = markdown_report(meta, results, cfg.variants)
    print("\n" + report)
    write_json(cfg.out, meta, results)
    cfg.out.with_suffix(".md").write_text(report)
    print(f"wrote {cfg.out} and {cfg.out.with_suffix('.md')}")
    if cfg.plot:
        print(write_plot(cfg.out.with_suffix(".png"), results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
