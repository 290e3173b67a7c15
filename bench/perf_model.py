"""A written performance model of one training step on an NVIDIA H200: FLOPs, HBM
bytes and kernel launches of every path (eager PyTorch, torch_fastmlp's
TrainStep and the modules), and the time they predict.

    python -m bench.perf_model                         # the markdown table (bench/PERF_MODEL.md)
    python -m bench.perf_model --all --json rows.json  # every workload and path, also as JSON
    python -m bench.perf_model --compare bench-cuda.json   # against a bench_mlp / bench_train result

Nothing here has run on a GPU: every device and host figure is a datasheet
number or an assumption, labelled as such below (``H200``, ``Assumptions``);
``bench/gpu_check.sh`` prints this model next to what the lent H200 measures
(its ``model`` step runs ``--compare`` on the bench step's JSON).

Per kernel launch the model counts the GEMM FLOPs (2 per multiply-add;
elementwise, loss and optimizer arithmetic is not counted: it is bandwidth
bound), the bytes it moves to and from HBM, the bytes it re-reads from L2, and
its grid size. Its device time is

    max(flops * imbalance / (fill * achievable FLOP/s), hbm_bytes / achievable HBM bandwidth,
        l2_bytes / L2 bandwidth)

with fill = min(1, blocks / SMs) and imbalance the busiest SM's tiles over the average SM's
(the fused step kernel's tiles on fewer blocks; 1 elsewhere). A path's predicted time per step is

    sum of the launches' device times + launches * launch cost + the host's other work (Python, autograd)

which is the serial sum (an upper bound: the host waits for nothing); ``bound_us``
is max(host time, device time with a floor per kernel), what a stream of
asynchronous steps would take if the host and the device overlapped fully (a
lower bound). A measured step should lie between the two.

Standard library only: runs (and is tested) without torch.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Machine:
    """Facts about the device, each with its source. FLOP rates are dense (no sparsity)."""

    name: str
    #: NVIDIA H200 SXM: 132 SMs (the GH100 of the H100 SXM5, NVIDIA H100/H200 datasheets).
    sm_count: int
    #: Boost clock 1.98 GHz (the H100 SXM5 figure; assumed the same for the H200, the same GH100 die).
    clock_hz: float
    #: FP32 lanes per SM: 128 (Hopper SM, H100 whitepaper).
    fp32_lanes_per_sm: int
    #: 141 GB HBM3e (H200 datasheet).
    hbm_capacity_bytes: float
    #: 4.8 TB/s HBM3e (H200 datasheet).
    hbm_bandwidth: float
    #: 50 MB L2: the H100 SXM5 figure (H100 whitepaper); the H200 datasheet does not give one, same die.
    l2_bytes: float
    #: 228 KB shared memory per SM, 227 KB per block (opt-in), 1 KB of it reserved per block
    #: (CUDA C++ programming guide, compute capability 9.0; Hopper tuning guide).
    smem_per_sm: int
    smem_per_block: int
    smem_reserved_per_block: int
    #: Dense tensor-core peaks (the H200 datasheet's with-sparsity figures, halved): BF16/FP16 ~989 TFLOP/s,
    #: TF32 ~495; FP64 tensor ~67 and FP64 SIMT ~34 (datasheet).
    bf16_tensor_flops: float
    tf32_tensor_flops: float
    fp64_tensor_flops: float
    fp64_simt_flops: float

    @property
    def fp32_simt_flops(self) -> float:
        """FP32 SIMT peak: SMs * lanes * 2 (an FMA) * clock = 66.9 TFLOP/s (datasheet: 67)."""
        return self.sm_count * self.fp32_lanes_per_sm * 2 * self.clock_hz


H200 = Machine(
    name="NVIDIA H200 SXM (datasheet figures)",
    sm_count=132,
    clock_hz=1.98e9,
    fp32_lanes_per_sm=128,
    hbm_capacity_bytes=141e9,
    hbm_bandwidth=4.8e12,
    l2_bytes=50e6,
    smem_per_sm=228 * 1024,
    smem_per_block=227 * 1024,
    smem_reserved_per_block=1024,
    bf16_tensor_flops=989e12,
    tf32_tensor_flops=495e12,
    fp64_tensor_flops=67e12,
    fp64_simt_flops=34e12,
)


@dataclass(frozen=True)
class Assumptions:
    """Modelling assumptions: none of these has been measured on a GPU. Change them
    here when gpu_check.sh's measurements say otherwise."""

    # --- device ---
    #: ASSUMPTION (issue 19's estimate): our SIMT kernels (gemm_kernel, the fused chain) reach ~24 TFLOP/s
    #: in fp32 (no double buffering, scalar shared-memory loads): 36% of the FP32 peak. bf16 / half storage
    #: computes in float, at the same rate.
    ours_flops: float = 24e12
    #: ASSUMPTION: the same tiles in double, at the same share of the FP64 SIMT peak (34 * 0.36).
    ours_fp64_flops: float = 12e12
    #: ASSUMPTION (issue 19): cuBLAS SGEMM ~50 TFLOP/s (FP32 SIMT: torch's default keeps TF32 off).
    cublas_fp32_flops: float = 50e12
    #: ASSUMPTION: cuBLAS reaches half the dense tensor-core peak (bf16 / half / fp64) on these shapes.
    cublas_tensor_fraction: float = 0.5
    #: ASSUMPTION: a streaming kernel reaches 90% of the HBM peak (bench_mlp measures a large copy:
    #: its JSON's copy_bandwidth_Bps, which --compare prints beside this).
    hbm_efficiency: float = 0.9
    #: ASSUMPTION (rough): L2 bandwidth ~6 TB/s (published microbenchmarks put H100-class L2 at a few
    #: TB/s; not checked). Used for data a kernel reads again (weights per tile) and for the fused
    #: step's accumulators when they live in global memory.
    l2_bandwidth: float = 6e12
    #: ASSUMPTION: a working set up to half the L2 stays in it while one kernel re-reads it.
    l2_resident_fraction: float = 0.5
    #: ASSUMPTION: a kernel's shortest time on the device (launch latency, ramp-up, tail), used by the
    #: overlapped bound: about one CUDA graph node.
    kernel_floor_s: float = 1.0e-6
    # --- host ---
    #: ASSUMPTION (issue 19): one launch of an ATen op through PyTorch's dispatcher, ~4-5 us.
    eager_launch_s: float = 4.5e-6
    #: ASSUMPTION (issue 19): one raw <<<>>> launch of our kernels from our C++, ~2.5 us.
    ours_launch_s: float = 2.5e-6
    #: ASSUMPTION (issue 19): one kernel node inside a replayed CUDA graph, ~1 us (not measured;
    #: PERF_MODEL.md uses it for what a captured TrainStep would cost).
    graph_node_s: float = 1.0e-6
    #: ASSUMPTION: Python and autograd recording per eager call (a module's __call__, a functional,
    #: a torch._foreach_* call), beyond the launches it makes.
    python_op_s: float = 2.0e-6
    #: ASSUMPTION: the autograd engine's own work per backward node, beyond its launches.
    autograd_node_s: float = 1.0e-6
    #: ASSUMPTION: loss.backward() itself (the call into the engine, the hand-off to the device thread).
    backward_call_s: float = 10e-6
    #: ASSUMPTION: torch.optim.Adam.step()'s Python around its kernels (_init_group, grouping by device
    #: and dtype, the bias-correction lists, the step wrappers); SGD's.
    adam_python_s: float = 20e-6
    sgd_python_s: float = 10e-6
    #: MEASURED on the development Xeon: a TrainStep call around its op, served by the C++ StepRunner
    #: (csrc/step_runner.cpp; a 4-3-1 step at batch 2 took 14.1 us, its op 9.4 us of them by the
    #: profiler; 45 us while the plan was read in Python); ASSUMED the same on the GPU's host.
    trainstep_python_s: float = 5e-6
    #: ASSUMPTION: TrainStep's checks before it hands a step it does not fuse (bf16, half) to the eager lines.
    trainstep_fallback_s: float = 10e-6
    #: ASSUMPTION: one of our ops called from C++ (dispatcher, argument checks, a few caching-allocator
    #: allocations), beyond its launches.
    op_host_s: float = 5e-6
    #: ASSUMPTION: torch.cuda.synchronize()'s round trip (bench_train synchronises after every CUDA step).
    sync_s: float = 10e-6


ASSUME = Assumptions()

# Constants of the kernels (csrc/cuda/), mirrored here.
GEMM_TILE = 64  # gemm.cuh: kTileM = kTileN
GEMM_TILE_K = 16  # kTileK
CUBLAS_MIN_MACS = 1 << 26  # gemm.cuh: kCublasMinMacs
CHAIN_MAX_LAYERS = 8  # fused_chain.cuh: kChainMaxLayers
CHAIN_MAX_WIDTH = 128  # kChainMaxWidth
CHAIN_CHUNK = 32  # kChainChunk (input features staged at a time)
CHAIN_THREADS = 256  # kChainThreads
CHAIN_MIN_ROWS = 16  # kChainMinRows (tiles of 64, 32 or 16 rows)
NARROW_FIRST = 32  # kNarrowFirst: the first-layer width of the two-blocks-per-SM kernels
MAX_PARTIAL_BYTES = 256 << 20  # kMaxPartialBytes
OPTIM_CHUNK = 4096  # optim.cuh: kOptimChunk
LOSS_THREADS = 256  # loss_reduce.cuh / bce.cuh: kLossThreads, kBceThreads
LOSS_MAX_BLOCKS = 1024  # kLossMaxBlocks, kBceMaxBlocks
FOREACH_CHUNK = 65536  # ATen's multi_tensor_apply: elements per block
ATEN_ELEMENTWISE_BLOCK = 512  # ATen's elementwise kernels: 128 threads x 4 elements

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative ints."""
    return -(-a // b)


def acc_bytes(elem_bytes: int) -> int:
    """Bytes of the kernels' accumulator type: double for double, float otherwise."""
    return 8 if elem_bytes == 8 else 4


# --------------------------------------------------------------------------
# The fused step's planner (csrc/cuda/fused_chain.cuh, plan_fused_step: the rule
# being written now; tests compare this with the C++ planner through the CPU harness)
# --------------------------------------------------------------------------
def pitch_of(width: int) -> int:
    """Shared-memory row pitch of ``width`` values: odd (fused_chain.cuh's pitch_of)."""
    return width | 1


def round_up4(n: int) -> int:
    """``n`` rounded up to a multiple of 4 (fused_chain.cuh's round_up4)."""
    return (n + 3) // 4 * 4


def chain_tile_rows(batch: int, sm_count: int) -> int:
    """Tile rows of the fused chain kernels: the first of 64, 32, 16 that still gives
    min(SMs, ceil(batch / 16)) tiles (fused_chain.cuh's chain_tile_rows)."""
    wanted = min(sm_count, ceil_div(batch, 16))
    return next(r for r in (64, 32, 16) if ceil_div(batch, r) >= wanted)


@dataclass(frozen=True)
class FusedStepPlan:
    """How the fused step kernel is launched for one chain and batch."""

    tile_rows: int
    tiles: int
    blocks: int  # 0: not even 16-row tile buffers fit in a block's shared memory (the planner declines)
    smem_bytes: int
    grads_in_smem: bool
    blocks_per_sm: int


def _chain_smem_elems(rows: int, widths: Sequence[int], grads: int, grads_in_smem: bool) -> int:
    """fused_chain.cuh's chain_smem_layout(...).total for the step kernel, in accumulator elements."""
    total = round_up4(grads) if grads_in_smem else 0
    total += sum(round_up4(rows * pitch_of(w)) for w in widths)  # each layer's activations
    total += 2 * round_up4(rows * max(pitch_of(w) for w in widths))  # ping-pong gradients
    total += round_up4(rows * (CHAIN_CHUNK + 1))  # an input chunk
    total += round_up4(CHAIN_CHUNK * pitch_of(widths[0]))  # a first-layer weight chunk
    return total + CHAIN_THREADS  # block_sum's scratch


def _lay_out(rows: int, widths: Sequence[int], grads: int, in_smem: bool, acc: int, smem_per_block: int) -> int:
    """lay_out_chain: the planned tile, halved down to 16 rows until its buffers fit; 0 if none does."""
    while rows >= CHAIN_MIN_ROWS:
        if _chain_smem_elems(rows, widths, grads, in_smem) * acc <= smem_per_block:
            return rows
        rows //= 2
    return 0


def fused_step_plan(
    batch: int,
    in_features: int,
    widths: Sequence[int],
    elem_bytes: int,
    sm_count: int = 132,
    smem_per_block: int = 227 * 1024,
) -> FusedStepPlan:
    """The whole plan behind :func:`fused_step_blocks` (shared memory, where the
    gradient accumulators live), every gradient asked for. Does not check the
    chain limits (at most 8 layers, each at most 128 wide): see
    :func:`fused_chain_qualifies`. Mirrors plan_fused_step in
    csrc/cuda/fused_chain.cuh; tests/test_perf_model.py compares the two through
    the CPU harness when it is built."""
    widths = [int(w) for w in widths]
    if batch < 1 or in_features < 1 or not widths or min(widths) < 1 or sm_count < 1:
        raise ValueError(f"fused_step_plan: bad shape batch={batch} in_features={in_features} widths={widths}")
    planned = chain_tile_rows(batch, sm_count)
    acc = acc_bytes(elem_bytes)
    fan_in = [in_features, *widths[:-1]]
    grads = sum(w * f + w for w, f in zip(widths, fan_in, strict=True))  # weights and biases, every layer
    # The accumulators stay in shared memory only if the planned tile still fits beside them.
    rows = _lay_out(planned, widths, grads, True, acc, smem_per_block)
    grads_in_smem = rows == planned
    if not grads_in_smem:
        rows = _lay_out(planned, widths, grads, False, acc, smem_per_block)
    if rows == 0:
        return FusedStepPlan(planned, ceil_div(batch, planned), 0, 0, False, 0)
    tiles = ceil_div(batch, rows)
    smem = _chain_smem_elems(rows, widths, grads, grads_in_smem) * acc
    # chain_blocks_per_sm: two for float accumulation with a first layer <= 32 wide, else one;
    # an SM has 1 KB more than a block may opt in to, and reserves 1 KB per block.
    by_registers = 2 if widths[0] <= NARROW_FIRST and acc == 4 else 1
    per_sm = max(1, min(by_registers, (smem_per_block + 1024) // (smem + 1024)))
    blocks = min(tiles, per_sm * sm_count, max(1, MAX_PARTIAL_BYTES // (grads * acc)))
    return FusedStepPlan(rows, tiles, blocks, smem, grads_in_smem, per_sm)


def fused_step_blocks(
    batch: int,
    in_features: int,
    widths: Sequence[int],
    elem_bytes: int,
    sm_count: int = 132,
    smem_per_block: int = 227 * 1024,
) -> tuple[int, int]:
    """``(tile_rows, blocks)`` of the fused step kernel for a chain of layers of
    ``widths`` over ``in_features`` inputs, ``elem_bytes`` the storage element's
    size (2 half / bf16, 4 float, 8 double; the accumulators are float, double for
    double), as plan_fused_step plans it.

    Tile rows R: the first of 64, 32, 16 with ceil(batch / R) >= min(sm_count,
    ceil(batch / 16)), halved while the tile's buffers do not fit. A block's
    shared memory, in accumulator elements: the gradients (every weight and bias)
    rounded up to a multiple of 4 when the planned tile still fits beside them
    (else they live in global memory), then round_up4(R * pitch(w)) per layer,
    2 * round_up4(R * max pitch), round_up4(R * 33), round_up4(32 * pitch(width_0))
    and 256, with pitch(w) = w | 1. Blocks per SM: as many as the shared memory
    holds (1 KB reserved per block), at most 2 for float accumulation with a first
    layer at most 32 wide, else 1; blocks = min(tiles, blocks per SM * sm_count,
    256 MiB of partial gradients).

    ``blocks`` is 0 when not even 16-row buffers fit (the planner declines the
    chain). Raises ValueError for an empty batch or chain."""
    plan = fused_step_plan(batch, in_features, widths, elem_bytes, sm_count, smem_per_block)
    return plan.tile_rows, plan.blocks


def fused_chain_preferred(batch: int, in_features: int, first_width: int, plan: FusedStepPlan) -> bool:
    """fused_chain.cuh's fused_chain_preferred: the fused chain while the first layer's GEMM has
    fewer than 2^26 multiply-adds and no block of ``plan``'s grid does more than 2^20 of them; the
    layer path (cuBLAS or gemm_kernel) otherwise."""
    if plan.blocks <= 0:
        return False
    per_block = min(ceil_div(ceil_div(batch, plan.tile_rows), plan.blocks) * plan.tile_rows, batch)
    return batch * in_features * first_width < CUBLAS_MIN_MACS and per_block * in_features * first_width <= (1 << 20)


def fused_chain_qualifies(widths: Sequence[int]) -> bool:
    """The chains the fused kernels take: 1 to 8 layers, each 1 to 128 wide (fused_chain.cuh)."""
    return 1 <= len(widths) <= CHAIN_MAX_LAYERS and all(1 <= w <= CHAIN_MAX_WIDTH for w in widths)


# --------------------------------------------------------------------------
# Kernel helpers: gemm.cuh's split-K and cuBLAS rules
# --------------------------------------------------------------------------
def gemm_on_cublas(m: int, n: int, k: int, half_type: bool) -> bool:
    """gemm.cuh's gemm_on_cublas: every half / bf16 GEMM, and any of at least 2^26 multiply-adds."""
    return half_type or m * n * k >= CUBLAS_MIN_MACS


def choose_splits(m: int, n: int, k: int, sm_count: int) -> int:
    """gemm.cuh's choose_splits: the split-K factor of gemm_kernel for this shape."""
    tiles = ceil_div(m, GEMM_TILE) * ceil_div(max(n, 1), GEMM_TILE)
    s = 1
    min_k = 8 * GEMM_TILE_K
    if 0 < tiles < 2 * sm_count and k >= 2 * min_k:
        s = max(1, min(ceil_div(2 * sm_count, tiles), k // min_k, 64))
    chunk = ceil_div(ceil_div(k, s), GEMM_TILE_K) * GEMM_TILE_K or GEMM_TILE_K
    return 1 if k == 0 else ceil_div(k, chunk)


def cublas_blocks(m: int, n: int, k: int, sm_count: int) -> int:
    """ASSUMPTION: cuBLAS's grid for an [m, k] x [k, n] GEMM: 64 x 64 tiles, split-K (at most one
    split per 128 of k) until the SMs are full. Only the fill of its FLOP rate depends on it."""
    tiles = ceil_div(m, GEMM_TILE) * ceil_div(n, GEMM_TILE)
    return tiles * min(max(1, ceil_div(sm_count, tiles)), max(1, k // 128))


def loss_blocks(work: int, per_thread: int) -> int:
    """loss_reduce.cuh / bce.cuh: blocks of the loss kernels."""
    return max(1, min(LOSS_MAX_BLOCKS, ceil_div(work, LOSS_THREADS * per_thread)))


# --------------------------------------------------------------------------
# Launches and paths
# --------------------------------------------------------------------------
@dataclass
class Launch:
    """One kernel launch: what it computes and moves, and who launches it.

    ``engine``: ``ours`` (our SIMT kernels), ``cublas`` (a GEMM in cuBLAS) or
    ``memory`` (no FLOPs counted). ``host``: ``eager`` (an ATen op through the
    dispatcher) or ``ours`` (a raw launch from our C++)."""

    name: str
    stage: str  # forward, loss, backward, update, data
    flops: float = 0.0
    hbm_bytes: float = 0.0
    l2_bytes: float = 0.0
    blocks: int = 1
    engine: str = "memory"
    host: str = "eager"
    #: The busiest SM's share of the work over the average one's (>= 1): tiles that do not divide
    #: evenly over the blocks and SMs. Multiplies the FLOP time.
    imbalance: float = 1.0


@dataclass(frozen=True)
class Workload:
    """A model and its training: widths, loss (``bce`` mean, ``mse`` sum, ``ce`` mean over
    class indices), optimizer (``adam``: torch's default foreach on CUDA; ``adam-fused``;
    ``sgd`` without momentum), optional gradient clipping."""

    dims: tuple[int, ...]
    loss: str = "bce"
    optimizer: str = "adam"
    clip: bool = False

    @property
    def name(self) -> str:
        """``784-30-1`` for BCE + Adam (bench_mlp's and bench_train's default), else ``W:loss-opt``."""
        base = "-".join(map(str, self.dims))
        suffix = "" if (self.loss, self.optimizer) == ("bce", "adam") else f":{self.loss}-{self.optimizer}"
        return base + suffix + (":clip" if self.clip else "")

    @property
    def widths(self) -> tuple[int, ...]:
        """Output features of each layer."""
        return self.dims[1:]

    @property
    def params(self) -> int:
        """Weights and biases of every layer."""
        return sum(k * n + n for k, n in zip(self.dims[:-1], self.dims[1:], strict=True))

    def param_sizes(self) -> list[int]:
        """Element counts in optimizer order: each layer's weight, then its bias."""
        sizes: list[int] = []
        for k, n in zip(self.dims[:-1], self.dims[1:], strict=True):
            sizes += [k * n, n]
        return sizes


def parse_workload(name: str) -> Workload:
    """``784-30-1``, ``1000-100-10:mse-sgd``, ``784-30-1:bce-adam:clip`` (bench_train's names)."""
    parts = name.strip().split(":")
    try:
        dims = tuple(int(d) for d in parts[0].split("-"))
    except ValueError:
        raise ValueError(f"workload {name!r}: widths like 784-30-1 expected") from None
    if len(dims) < 2 or min(dims) < 1:
        raise ValueError(f"workload {name!r}: at least two positive widths expected")
    loss, opt = "bce", "adam"
    clip = "clip" in parts[1:]
    heads = [p for p in parts[1:] if p and p != "clip"]
    if len(heads) > 1:
        raise ValueError(f"workload {name!r}: one loss-optimizer expected")
    if heads:
        loss, _, opt = heads[0].partition("-")
        opt = opt or "adam"
    if loss not in ("bce", "mse", "ce") or opt not in ("adam", "adam-fused", "sgd"):
        raise ValueError(f"workload {name!r}: expected widths[:{{bce,mse,ce}}-{{adam,adam-fused,sgd}}][:clip]")
    return Workload(dims, loss, opt, clip)


@dataclass
class PathModel:
    """The launches and host work of one path for one workload, batch, dtype and phase."""

    workload: Workload
    batch: int
    dtype: str
    path: str
    phase: str
    runs: str  # what actually runs: "fused chain", "layer path", "eager lines", ...
    launches: list[Launch]
    host_other_s: float  # host work beyond the launches: Python, autograd, op calls
    machine: Machine = H200
    assume: Assumptions = ASSUME
    notes: list[str] = field(default_factory=list)

    def rate(self, engine: str) -> float:
        """Achievable FLOP/s of an engine in this dtype."""
        if engine == "ours":
            return self.assume.ours_fp64_flops if self.dtype == "float64" else self.assume.ours_flops
        if engine == "cublas":
            if self.dtype == "float32":
                return self.assume.cublas_fp32_flops
            peak = self.machine.fp64_tensor_flops if self.dtype == "float64" else self.machine.bf16_tensor_flops
            return self.assume.cublas_tensor_fraction * peak
        return math.inf

    def device_s(self, launch: Launch) -> float:
        """A launch's roofline time: max(FLOPs at its fill, HBM bytes, L2 bytes)."""
        fill = min(1.0, max(launch.blocks, 1) / self.machine.sm_count)
        t_flops = launch.flops * launch.imbalance / (fill * self.rate(launch.engine)) if launch.flops else 0.0
        t_hbm = launch.hbm_bytes / (self.machine.hbm_bandwidth * self.assume.hbm_efficiency)
        t_l2 = launch.l2_bytes / self.assume.l2_bandwidth
        return max(t_flops, t_hbm, t_l2)

    def launch_host_s(self, launch: Launch) -> float:
        """The host's cost of issuing one launch."""
        return self.assume.ours_launch_s if launch.host == "ours" else self.assume.eager_launch_s

    @property
    def flops(self) -> float:
        """GEMM FLOPs of the step."""
        return sum(x.flops for x in self.launches)

    @property
    def hbm_bytes(self) -> float:
        """Bytes to and from HBM."""
        return sum(x.hbm_bytes for x in self.launches)

    @property
    def l2_bytes(self) -> float:
        """Bytes re-read from L2."""
        return sum(x.l2_bytes for x in self.launches)

    @property
    def n_launches(self) -> int:
        """Kernel launches of the step."""
        return len(self.launches)

    @property
    def main_launch(self) -> Launch | None:
        """The launch with the most FLOPs (bytes when none has FLOPs)."""
        return max(self.launches, key=lambda x: (x.flops, x.hbm_bytes), default=None)

    @property
    def blocks(self) -> int:
        """The grid of the main launch."""
        main = self.main_launch
        return main.blocks if main is not None else 0

    @property
    def kernel_s(self) -> float:
        """Sum of the launches' roofline times."""
        return sum(self.device_s(x) for x in self.launches)

    @property
    def host_s(self) -> float:
        """The host's time: every launch's issue cost plus the other host work."""
        return sum(self.launch_host_s(x) for x in self.launches) + self.host_other_s

    @property
    def predicted_s(self) -> float:
        """Serial sum: kernel times + launch costs + the other host work (the upper estimate)."""
        return self.kernel_s + self.host_s

    @property
    def bound_s(self) -> float:
        """Host and device fully overlapped (each kernel at least the floor): the lower estimate."""
        device = sum(max(self.assume.kernel_floor_s, self.device_s(x)) for x in self.launches)
        return max(self.host_s, device)

    def launch_rows(self) -> list[dict[str, Any]]:
        """Every launch with its roofline time, for the JSON output."""
        return [{**asdict(x), "device_us": self.device_s(x) * 1e6} for x in self.launches]


# --------------------------------------------------------------------------
# Launch builders
# --------------------------------------------------------------------------
def _ew_blocks(numel: int) -> int:
    return max(1, ceil_div(numel, ATEN_ELEMENTWISE_BLOCK))


def _foreach_blocks(sizes: Iterable[int]) -> int:
    return max(1, sum(ceil_div(n, FOREACH_CHUNK) for n in sizes))


def _optim_blocks(sizes: Iterable[int]) -> int:
    return max(1, sum(ceil_div(n, OPTIM_CHUNK) for n in sizes))


def gemm_kernel_launches(
    name: str, stage: str, m: int, n: int, k: int, e: int, sm: int, *, masked: bool = False, rowsum: bool = False
) -> list[Launch]:
    """gemm_kernel (and gemm_reduce_splits_kernel under split-K) for C[m, n] = A[m, k] . B[k, n]:
    A (and its ReLU mask, the layer's output, when ``masked``) and B read once from HBM,
    re-read from L2 by the other tiles; C (and A's row sums, the bias gradient) written,
    or per-split partials that the second kernel sums."""
    acc = acc_bytes(e)
    splits = choose_splits(m, n, k, sm)
    m_tiles, n_tiles = ceil_div(m, GEMM_TILE), ceil_div(max(n, 1), GEMM_TILE)
    a = m * k * e * (2 if masked else 1)
    b = k * n * e
    rows = m if rowsum else 0
    out = (m * n + rows) * e
    l2 = a * (n_tiles - 1) + b * (m_tiles - 1)
    flops = 2.0 * m * n * k
    blocks = m_tiles * n_tiles * splits
    if splits == 1:
        return [Launch(name, stage, flops, a + b + out, l2, blocks, "ours", "ours")]
    partial = splits * (m * n + rows) * acc
    return [
        Launch(name, stage, flops, a + b + partial, l2, blocks, "ours", "ours"),
        Launch(
            f"{name} split-K sum",
            stage,
            0.0,
            partial + out,
            0.0,
            min(ceil_div(m * n + rows, 256), 4096),
            "memory",
            "ours",
        ),
    ]


def aten_addmm_launches(name: str, stage: str, b: int, k: int, n: int, e: int, sm: int, relu: bool) -> list[Launch]:
    """Eager's (and our cuBLAS layers') forward of one layer. addmm is one cuBLASLt launch with the
    bias epilogue, and two when the layer has one output: ATen's addmm refuses cuBLASLt for a
    one-column mat2 (aten/src/ATen/native/cuda/Blas.cpp, as we read it), copies the bias into the
    output and runs the GEMM with beta 1. ``relu``: eager's separate relu (clamp_min) launch."""
    gemm_bytes = (b * k + n * k + n + b * n) * e
    launches = []
    if n == 1:
        launches.append(Launch(f"{name} bias copy", stage, 0.0, (n + b * n) * e, 0.0, _ew_blocks(b * n)))
        gemm_bytes += b * n * e  # the GEMM reads the output back (beta = 1)
    launches.append(Launch(name, stage, 2.0 * b * k * n, gemm_bytes, 0.0, cublas_blocks(b, n, k, sm), "cublas"))
    if relu:
        launches.append(Launch(f"{name} relu", stage, 0.0, 2 * b * n * e, 0.0, _ew_blocks(b * n)))
    return launches


def aten_layer_backward_launches(
    l: int, b: int, k: int, n: int, e: int, sm: int, relu: bool, want_x: bool
) -> list[Launch]:
    """A layer's backward as eager's autograd (and our cuBLAS layers, aten_layers.h) runs it:
    threshold_backward for the ReLU after the layer, mm for the input gradient (not for the
    first layer), mm for the weight gradient, a column sum for the bias gradient."""
    out = []
    if relu:
        out.append(Launch(f"L{l} threshold_backward", "backward", 0.0, 3 * b * n * e, 0.0, _ew_blocks(b * n)))
    if want_x:
        out.append(
            Launch(
                f"L{l} mm dX",
                "backward",
                2.0 * b * k * n,
                (b * n + n * k + b * k) * e,
                0.0,
                cublas_blocks(b, k, n, sm),
                "cublas",
            )
        )
    out.append(
        Launch(
            f"L{l} mm dW",
            "backward",
            2.0 * b * k * n,
            (b * n + b * k + n * k) * e,
            0.0,
            cublas_blocks(n, k, b, sm),
            "cublas",
        )
    )
    out.append(Launch(f"L{l} sum db", "backward", 0.0, (b * n + n) * e, 0.0, max(1, ceil_div(b * n, 4096))))
    return out


def eager_loss_launches(wl: Workload, b: int, e: int, backward: bool) -> list[Launch]:
    """The loss in eager ATen (launch counts from a torch 2.14 profile of the same ops on CPU,
    with CUDA's mean as one reduction):

    - BCEWithLogits, mean: log_sigmoid, fill (1 - target: a filled tensor minus target), sub_,
      mul_(input), sub_(log_sigmoid), mean: 6; backward sigmoid, sub, mul (grad), div_ (numel): 4.
    - MSE, sum: the elementwise square, sum: 2; backward zeros_like + mse_loss_backward: 2.
    - Cross-entropy, class indices, mean: log_softmax, nll_loss_forward: 2; backward
      nll_loss_backward (zero_ + its kernel) and log_softmax_backward: 3.
    Plus the seed of backward(): ones_like, 1."""
    c = wl.dims[-1]
    n = b * c
    ew = _ew_blocks(n)
    if wl.loss == "bce":
        fwd = [
            ("log_sigmoid", 2),
            ("fill (1 - target)", 1),
            ("sub_ target", 3),
            ("mul_ input", 3),
            ("sub_ log_sigmoid", 3),
            ("mean", 1),
        ]
        bwd = [("sigmoid", 2), ("sub target", 3), ("mul grad", 2), ("div_ numel", 2)]
        launches = [Launch(f"bce {name}", "loss", 0.0, k * n * e, 0.0, ew) for name, k in fwd]
    elif wl.loss == "mse":
        launches = [Launch("mse square", "loss", 0.0, 3 * n * e, 0.0, ew), Launch("mse sum", "loss", 0.0, n * e)]
        bwd = [("zeros_like", 1), ("mse_loss_backward", 3)]
    else:
        launches = [
            Launch("log_softmax", "loss", 0.0, 2 * n * e, 0.0, b),
            Launch("nll_loss_forward", "loss", 0.0, b * (e + 8), 0.0, 1),
        ]
        bwd = [("nll_loss_backward zero_", 1), ("nll_loss_backward", 0), ("log_softmax_backward", 3)]
    if not backward:
        return launches
    launches.append(Launch("backward seed ones_like", "loss", 0.0, e))
    for name, k in bwd:
        nbytes = k * n * e if k else b * (e + 8)
        launches.append(Launch(f"{wl.loss} {name}", "loss", 0.0, nbytes, 0.0, ew))
    return launches


def torch_optimizer_launches(wl: Workload, e: int) -> list[Launch]:
    """torch.optim's update on CUDA (torch/optim/adam.py, sgd.py of torch 2.14). Adam, foreach
    (the default): the step counts are CPU tensors (no launch), then _foreach_lerp_,
    _foreach_mul_, _foreach_addcmul_, _foreach_sqrt, _foreach_div_, _foreach_add_,
    _foreach_addcdiv_: 7 launches, 18 passes over the parameters. Adam(fused=True):
    _foreach_add_ of the device step counts and _fused_adam_: 2. SGD without momentum, foreach:
    _foreach_add_(params, grads, alpha=-lr): 1. Clipping first (clip_grad_norm_, foreach,
    torch/nn/utils/clip_grad.py): _foreach_norm, stack, vector_norm, + 1e-6, max_norm / it, clamp,
    _foreach_mul_: 7."""
    sizes = wl.param_sizes()
    p = wl.params
    fb = _foreach_blocks(sizes)
    out: list[Launch] = []
    if wl.clip:
        out.append(Launch("_foreach_norm", "update", 0.0, p * e, 0.0, fb))
        out += [Launch(f"clip {name}", "update", 0.0, 8 * len(sizes)) for name in ("stack", "vector_norm", "add")]
        out += [Launch(f"clip {name}", "update", 0.0, 8) for name in ("rdiv", "clamp")]
        out.append(Launch("_foreach_mul_ (clip)", "update", 0.0, 2 * p * e, 0.0, fb))
    if wl.optimizer == "sgd":
        return [*out, Launch("_foreach_add_ (SGD)", "update", 0.0, 3 * p * e, 0.0, fb)]
    if wl.optimizer == "adam-fused":
        return [
            *out,
            Launch("_foreach_add_ steps", "update", 0.0, 2 * len(sizes) * 4, 0.0, 1),
            Launch("_fused_adam_", "update", 0.0, 7 * p * e, 0.0, fb),
        ]
    passes = [("lerp_", 3), ("mul_", 2), ("addcmul_", 3), ("sqrt", 2), ("div_", 2), ("add_ eps", 2), ("addcdiv_", 4)]
    return out + [Launch(f"_foreach_{name}", "update", 0.0, k * p * e, 0.0, fb) for name, k in passes]


def eager_host_s(wl: Workload, phase: str, a: Assumptions) -> float:
    """Eager's host work beyond the launches: a Python call per module (Sequential, each Linear
    and ReLU, the loss), zero_grad, backward() and its nodes, the optimizer's Python and its
    torch._foreach_* calls."""
    layers = len(wl.dims) - 1
    s = (2 * layers + 1) * a.python_op_s  # Sequential + Linears + ReLUs + loss
    if phase == "fwd":
        return s
    loss_nodes = 2 if wl.loss == "ce" else 1
    nodes = loss_nodes + 4 * layers + (layers - 1)  # Addmm, T, 2 AccumulateGrad per layer; ReLU
    s += a.python_op_s + a.backward_call_s + nodes * a.autograd_node_s  # zero_grad, backward()
    if phase == "step":
        s += torch_optimizer_host_s(wl, a)
    return s


def torch_optimizer_host_s(wl: Workload, a: Assumptions) -> float:
    """torch.optim's Python: its fixed part and one call per torch._foreach_* (the CPU step add too);
    clip_grad_norm_'s seven calls and one for the function itself when clipping."""
    clip = 8 * a.python_op_s if wl.clip else 0.0
    if wl.optimizer == "sgd":
        return clip + a.sgd_python_s + a.python_op_s
    calls = 2 if wl.optimizer == "adam-fused" else 8
    return clip + a.adam_python_s + calls * a.python_op_s


def ours_update_launches(wl: Workload, e: int) -> list[Launch]:
    """optimizer_step on CUDA (optim.cuh): clipping's chunked sum of squares and its one-block
    finish when clipping, then one multi-tensor SGD / Adam launch over every parameter
    (Adam reads param, grad, exp_avg, exp_avg_sq and writes three of them; SGD without momentum
    reads param and grad and writes param; clipping also writes the clipped gradients)."""
    sizes = wl.param_sizes()
    p = wl.params
    blocks = _optim_blocks(sizes)
    out = []
    if wl.clip:
        out.append(Launch("grad_sum_squares_kernel", "update", 0.0, p * e + blocks * 4, 0.0, blocks, "memory", "ours"))
        out.append(Launch("clip_coef_kernel", "update", 0.0, blocks * 4, 0.0, 1, "memory", "ours"))
    passes = (3 if wl.optimizer == "sgd" else 7) + (1 if wl.clip else 0)
    kernel = "sgd_kernel" if wl.optimizer == "sgd" else "adam_kernel"
    out.append(Launch(kernel, "update", 0.0, passes * p * e, 0.0, blocks, "memory", "ours"))
    return out


def gemm_flops(wl: Workload, b: int, backward: bool = True) -> float:
    """2 * batch * fan_in * fan_out per GEMM pass: forward, and backward's weight gradient and
    input gradient (none for the first layer: the input needs no gradient)."""
    macs = [k * n for k, n in zip(wl.dims[:-1], wl.dims[1:], strict=True)]
    total = 2.0 * b * sum(macs)
    if backward:
        total += 2.0 * b * sum(macs) + 2.0 * b * sum(macs[1:])
    return total


def fused_step_launches(
    wl: Workload, b: int, e: int, plan: FusedStepPlan, m: Machine, a: Assumptions, grads: bool = True
) -> list[Launch]:
    """fused_step_kernel + fused_step_finish_kernel (fused_chain.cuh). HBM: the input and targets
    once, the weights once, every block's partial gradients written and read back by the finish,
    the gradients written. L2: the input again (the first layer's weight gradient right after
    its forward), the weights once per tile, and the accumulators' read-modify-write per tile when
    they live in global memory (HBM instead when the blocks' slices exceed the L2 share)."""
    acc = acc_bytes(e)
    slots = wl.params if grads else 0
    c = wl.dims[-1]
    inp = b * wl.dims[0] * e
    hbm = inp + b * c * e + wl.params * e + plan.blocks * (slots + 1) * acc
    l2 = (inp if grads else 0) + plan.tiles * wl.params * e
    if grads and not plan.grads_in_smem:
        rmw = plan.blocks * slots * acc + plan.tiles * 2 * slots * acc  # zeroed, then += per tile
        if plan.blocks * slots * acc <= a.l2_resident_fraction * m.l2_bytes:
            l2 += rmw
        else:
            hbm += rmw
    finish_blocks = min(max(ceil_div(slots, CHAIN_THREADS), 1), 1024)
    # The busiest SM's tiles over the average SM's: its blocks (2 per SM share one) times their tiles.
    sms = min(plan.blocks, m.sm_count)
    imbalance = ceil_div(plan.blocks, m.sm_count) * ceil_div(plan.tiles, plan.blocks) * sms / plan.tiles
    return [
        Launch(
            "fused_step_kernel", "forward", gemm_flops(wl, b, grads), hbm, l2, plan.blocks, "ours", "ours", imbalance
        ),
        Launch(
            "fused_step_finish_kernel",
            "backward",
            0.0,
            plan.blocks * (slots + 1) * acc + slots * e,
            0.0,
            finish_blocks,
            "memory",
            "ours",
        ),
    ]


def ours_loss_launches(wl: Workload, b: int, e: int) -> list[Launch]:
    """The loss's one-pass kernels on the layer path (the loss and its logits' gradient in the
    forward): BCE bce_forward + bce_finish; MSE mse_forward + loss_finish; cross-entropy
    ce_prepare + its finish (the mean's denominator), ce_rows, loss_finish."""
    c = wl.dims[-1]
    n = b * c
    if wl.loss == "bce":
        blocks = loss_blocks(n, 4)
        return [
            Launch("bce_forward_kernel", "loss", 0.0, 3 * n * e + blocks * 4, 0.0, blocks, "memory", "ours"),
            Launch("bce_finish_kernel", "loss", 0.0, blocks * 4, 0.0, 1, "memory", "ours"),
        ]
    if wl.loss == "mse":
        blocks = loss_blocks(n, 4)
        return [
            Launch("mse_forward_kernel", "loss", 0.0, 3 * n * e + blocks * 4, 0.0, blocks, "memory", "ours"),
            Launch("loss_finish_kernel", "loss", 0.0, blocks * 4, 0.0, 1, "memory", "ours"),
        ]
    prep = loss_blocks(b, 4)
    rows = max(1, min(LOSS_MAX_BLOCKS, ceil_div(b, LOSS_THREADS // (1 if c <= 16 else 32))))
    return [
        Launch("ce_prepare_kernel", "loss", 0.0, 8 * b + prep * 4, 0.0, prep, "memory", "ours"),
        Launch("ce_prepare_finish_kernel", "loss", 0.0, prep * 4, 0.0, 1, "memory", "ours"),
        Launch("ce_rows_kernel", "loss", 0.0, 2 * n * e + 8 * b, 0.0, rows, "memory", "ours"),
        Launch("loss_finish_kernel", "loss", 0.0, rows * 4, 0.0, 1, "memory", "ours"),
    ]


def layer_forward_launches(wl: Workload, b: int, e: int, half: bool, sm: int) -> list[Launch]:
    """The chain's forward layer by layer (LayerOps::mlp_forward): cuBLAS (``_addmm_activation``,
    bias + ReLU in cuBLASLt's epilogue) where gemm_on_cublas says so, else gemm_kernel with the
    fused bias + ReLU epilogue."""
    out: list[Launch] = []
    for l, (k, n) in enumerate(zip(wl.dims[:-1], wl.dims[1:], strict=True)):
        if gemm_on_cublas(b, n, k, half):  # the ReLU is in the epilogue: relu=False
            out += aten_addmm_launches(f"L{l} addmm (cuBLAS)", "forward", b, k, n, e, sm, relu=False)
        else:
            out += gemm_kernel_launches(f"L{l} gemm_kernel fwd", "forward", b, n, k, e, sm)
    return out


def layer_backward_launches(wl: Workload, b: int, e: int, half: bool, sm: int) -> list[Launch]:
    """LayerOps::mlp_backward: per layer from the last, cuBLAS (threshold_backward, mm, mm, sum) or
    gemm_kernel's two GEMMs with the ReLU mask and the bias gradient fused (the input gradient's
    not for the first layer)."""
    out: list[Launch] = []
    layers = len(wl.dims) - 1
    for l in reversed(range(layers)):
        k, n = wl.dims[l], wl.dims[l + 1]
        relu = l < layers - 1
        if gemm_on_cublas(b, n, k, half):
            out += aten_layer_backward_launches(l, b, k, n, e, sm, relu, want_x=l > 0)
            continue
        if l > 0:
            out += gemm_kernel_launches(f"L{l} gemm_kernel dX", "backward", b, k, n, e, sm, masked=relu)
        out += gemm_kernel_launches(f"L{l} gemm_kernel dW+db", "backward", n, k, b, e, sm, masked=relu, rowsum=True)
    return out


def fused_forward_launch(wl: Workload, b: int, e: int, m: Machine) -> Launch:
    """fused_forward_kernel (Sequential's forward of a narrow chain): the input and weights read,
    every layer's activations written; the step's tile rows (chain_tile_rows), at most 8 blocks
    per SM (plan_fused_forward as the working tree has it)."""
    tiles = ceil_div(b, chain_tile_rows(b, m.sm_count))
    blocks = min(tiles, 8 * m.sm_count)
    hbm = (b * wl.dims[0] + wl.params + b * sum(wl.widths)) * e
    return Launch(
        "fused_forward_kernel", "forward", gemm_flops(wl, b, False), hbm, tiles * wl.params * e, blocks, "ours", "ours"
    )


# --------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------
PATHS = ("eager", "trainstep", "trainstep-epoch", "sequential", "fused-classifier")
DEFAULT_PATHS = ("eager", "trainstep", "trainstep-epoch")
PHASES = ("step", "fwdbwd", "fwd")


def model_path(
    wl: Workload,
    batch: int,
    dtype: str,
    path: str,
    phase: str = "step",
    machine: Machine = H200,
    assume: Assumptions = ASSUME,
) -> PathModel | None:
    """The model of one path, or None where the path does not apply (TrainStep: phase step only;
    Sequential / FusedBCEClassifier: BCE only)."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r}: one of {', '.join(DTYPE_BYTES)}")
    if batch < 1:
        raise ValueError(f"batch {batch}: at least 1")
    if phase not in PHASES:
        raise ValueError(f"phase {phase!r}: one of {', '.join(PHASES)}")
    if path == "eager":
        return _eager(wl, batch, dtype, phase, machine, assume)
    if path in ("trainstep", "trainstep-epoch"):
        return _trainstep(wl, batch, dtype, path, phase, machine, assume)
    if path == "sequential":
        return _sequential(wl, batch, dtype, phase, machine, assume)
    if path == "fused-classifier":
        return _fused_classifier(wl, batch, dtype, phase, machine, assume)
    raise ValueError(f"path {path!r}: one of {', '.join(PATHS)}")


def _eager(wl: Workload, b: int, dtype: str, phase: str, m: Machine, a: Assumptions) -> PathModel:
    """(a) The eager loop: zero_grad(set_to_none=True) (no launch), the Sequential's forward (addmm
    per layer, relu between), the loss, backward() (the loss's backward, then per layer
    threshold_backward, mm dX except the first layer, mm dW, sum db; AccumulateGrad takes the
    gradients over: no copy), torch.optim's update."""
    e = DTYPE_BYTES[dtype]
    layers = len(wl.dims) - 1
    launches: list[Launch] = []
    for l, (k, n) in enumerate(zip(wl.dims[:-1], wl.dims[1:], strict=True)):
        launches += aten_addmm_launches(f"L{l} addmm", "forward", b, k, n, e, m.sm_count, relu=l < layers - 1)
    launches += eager_loss_launches(wl, b, e, backward=phase != "fwd")
    if phase != "fwd":
        for l in reversed(range(layers)):
            k, n = wl.dims[l], wl.dims[l + 1]
            launches += aten_layer_backward_launches(l, b, k, n, e, m.sm_count, l < layers - 1, want_x=l > 0)
    if phase == "step":
        launches += torch_optimizer_launches(wl, e)
    return PathModel(wl, b, dtype, "eager", phase, "eager lines", launches, eager_host_s(wl, phase, a), m, a)


def _trainstep(wl: Workload, b: int, dtype: str, path: str, phase: str, m: Machine, a: Assumptions) -> PathModel | None:
    """(b) / (c) TrainStep: one op per step (``trainstep``), or per batch of ``step.epoch`` (the loop in
    C++: two index_select gathers of the batch's rows, no Python). float32 / float64 only: other
    dtypes run the eager lines (plus TrainStep's checks)."""
    if phase != "step":
        return None
    e = DTYPE_BYTES[dtype]
    epoch = path == "trainstep-epoch"
    gather: list[Launch] = []
    if epoch:
        target_row = 8 if wl.loss == "ce" else wl.dims[-1] * e
        gather = [
            Launch("index_select input", "data", 0.0, 2 * b * wl.dims[0] * e + 8 * b, 0.0, _ew_blocks(b * wl.dims[0])),
            Launch("index_select target", "data", 0.0, 2 * b * target_row + 8 * b, 0.0, _ew_blocks(b)),
        ]
    if dtype not in ("float32", "float64"):
        eager = _eager(wl, b, dtype, "step", m, a)
        model = PathModel(
            wl,
            b,
            dtype,
            path,
            phase,
            "eager lines",
            gather + eager.launches,
            eager.host_other_s + a.trainstep_fallback_s,
            m,
            a,
        )
        model.notes.append(f"TrainStep runs {dtype} through the eager lines (float32 / float64 only)")
        return model
    host = a.op_host_s if epoch else a.trainstep_python_s + a.op_host_s
    plan = fused_step_plan(b, wl.dims[0], wl.widths, e, m.sm_count, m.smem_per_block)
    preferred = fused_chain_preferred(b, wl.dims[0], wl.widths[0], plan)
    if wl.loss == "bce" and fused_chain_qualifies(wl.widths) and plan.blocks > 0 and preferred:
        launches = gather + fused_step_launches(wl, b, e, plan, m, a) + ours_update_launches(wl, e)
        model = PathModel(wl, b, dtype, path, phase, "fused chain", launches, host, m, a)
        model.notes.append(
            f"fused step: {plan.tile_rows}-row tiles, {plan.tiles} tiles, {plan.blocks} blocks "
            f"({plan.blocks_per_sm}/SM, {plan.smem_bytes} B shared, gradients in "
            f"{'shared' if plan.grads_in_smem else 'global'} memory)"
        )
        return model
    launches = gather + layer_forward_launches(wl, b, e, False, m.sm_count) + ours_loss_launches(wl, b, e)
    launches += layer_backward_launches(wl, b, e, False, m.sm_count) + ours_update_launches(wl, e)
    return PathModel(wl, b, dtype, path, phase, "layer path", launches, host, m, a)


def _sequential(wl: Workload, b: int, dtype: str, phase: str, m: Machine, a: Assumptions) -> PathModel | None:
    """torch_fastmlp.Sequential + BCEWithLogitsLoss + torch.optim (bench_mlp's ``fastmlp``): the
    fused forward (one op, a C++ autograd node), the BCE op (loss and gradient in one pass; its
    backward scales the gradient: a CUDA seed is no CPU 1.0, one mul), mlp_backward on the layer
    path, torch.optim's update."""
    if wl.loss != "bce":
        return None
    e = DTYPE_BYTES[dtype]
    half = dtype in ("bfloat16", "float16")
    rows = chain_tile_rows(b, m.sm_count)
    forward_plan = FusedStepPlan(rows, ceil_div(b, rows), min(ceil_div(b, rows), 8 * m.sm_count), 0, False, 8)
    if fused_chain_qualifies(wl.widths) and fused_chain_preferred(b, wl.dims[0], wl.widths[0], forward_plan):
        launches = [fused_forward_launch(wl, b, e, m)]
        runs = "fused forward + layer backward"
    else:
        launches = layer_forward_launches(wl, b, e, half, m.sm_count)
        runs = "layer path"
    launches += ours_loss_launches(wl, b, e)
    host = 3 * a.python_op_s + 2 * a.op_host_s  # Sequential, the loss module; the mlp and bce ops
    if phase != "fwd":
        n = b * wl.dims[-1]
        launches.append(Launch("backward seed ones_like", "loss", 0.0, e))
        launches.append(Launch("bce grad * seed", "loss", 0.0, 2 * n * e, 0.0, _ew_blocks(n)))
        launches += layer_backward_launches(wl, b, e, half, m.sm_count)
        layers = len(wl.dims) - 1
        host += a.python_op_s + a.backward_call_s + (2 + 2 * layers) * a.autograd_node_s + a.op_host_s
    if phase == "step":
        launches += torch_optimizer_launches(wl, e)
        host += torch_optimizer_host_s(wl, a)
    return PathModel(wl, b, dtype, "sequential", phase, runs, launches, host, m, a)


def _fused_classifier(wl: Workload, b: int, dtype: str, phase: str, m: Machine, a: Assumptions) -> PathModel | None:
    """FusedBCEClassifier + torch.optim (bench_mlp's ``fastmlp-fused``): forward is the fused step
    (every gradient; without grad mode the loss alone), backward() scales each saved gradient by
    the seed (one mul per parameter: on CUDA the seed is no CPU 1.0), torch.optim's update."""
    if wl.loss != "bce":
        return None
    e = DTYPE_BYTES[dtype]
    grads = phase != "fwd"
    plan = fused_step_plan(b, wl.dims[0], wl.widths, e, m.sm_count, m.smem_per_block)
    if not (fused_chain_qualifies(wl.widths) and plan.blocks > 0):
        return None
    if fused_chain_preferred(b, wl.dims[0], wl.widths[0], plan):
        launches = fused_step_launches(wl, b, e, plan, m, a, grads=grads)
        runs = "fused chain"
    else:  # the BCE step op's layer path (cuBLAS)
        half = dtype in ("bfloat16", "float16")
        launches = layer_forward_launches(wl, b, e, half, m.sm_count) + ours_loss_launches(wl, b, e)
        if grads:
            launches += layer_backward_launches(wl, b, e, half, m.sm_count)
        runs = "layer path"
    host = 2 * a.python_op_s + a.op_host_s
    if grads:
        launches.append(Launch("backward seed ones_like", "backward", 0.0, e))
        for i, size in enumerate(wl.param_sizes()):
            launches.append(Launch(f"grad[{i}] * seed", "backward", 0.0, 2 * size * e, 0.0, _ew_blocks(size)))
        layers = len(wl.dims) - 1
        host += a.python_op_s + a.backward_call_s + (1 + 2 * layers) * a.autograd_node_s
    if phase == "step":
        launches += torch_optimizer_launches(wl, e)
        host += torch_optimizer_host_s(wl, a)
    return PathModel(wl, b, dtype, "fused-classifier", phase, runs, launches, host, m, a)


# --------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------
CLASSIC = ("784-30-1", "1000-100-10:mse-sgd", "1000-100-10:ce-adam")
EXTRA = ("1000-100-10",)  # bench_mlp's BCE head on 1000-100-10 (gpu_check.sh measures it)
BATCHES = (64, 256, 2048, 12396)
DTYPES = ("float32", "bfloat16")


def row_of(model: PathModel, eager: PathModel | None) -> dict[str, Any]:
    """One table / JSON row."""
    return {
        "workload": model.workload.name,
        "batch": model.batch,
        "dtype": model.dtype,
        "path": model.path,
        "phase": model.phase,
        "runs": model.runs,
        "flops": model.flops,
        "hbm_bytes": model.hbm_bytes,
        "l2_bytes": model.l2_bytes,
        "launches": model.n_launches,
        "blocks": model.blocks,
        "kernel_us": model.kernel_s * 1e6,
        "host_us": model.host_s * 1e6,
        "predicted_us": model.predicted_s * 1e6,
        "bound_us": model.bound_s * 1e6,
        "vs_eager": (eager.predicted_s / model.predicted_s) if eager is not None else None,
        "notes": model.notes,
        "launch_list": model.launch_rows(),
    }


def table_rows(
    workloads: Sequence[str] = CLASSIC,
    batches: Sequence[int] = BATCHES,
    dtypes: Sequence[str] = DTYPES,
    paths: Sequence[str] = DEFAULT_PATHS,
    machine: Machine = H200,
    assume: Assumptions = ASSUME,
) -> list[dict[str, Any]]:
    """Rows for every workload x batch x dtype x path (phase step), eager first in each group."""
    rows = []
    for name in workloads:
        wl = parse_workload(name)
        for dtype in dtypes:
            for batch in batches:
                eager = model_path(wl, batch, dtype, "eager", "step", machine, assume)
                for path in paths:
                    model = eager if path == "eager" else model_path(wl, batch, dtype, path, "step", machine, assume)
                    if model is not None:
                        rows.append(row_of(model, eager))
    return rows


def fmt_us(us: float) -> str:
    """Microseconds (or megabytes), three significant figures, whole numbers from 1000."""
    return f"{us:.3g}" if us < 1000 else f"{us:,.0f}"


def fmt_count(x: float) -> str:
    """Large counts with a unit (k, M, G)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.0f}"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The markdown table of :func:`table_rows`."""
    head = (
        "| workload | batch | dtype | path | runs | FLOPs | HBM MB | launches | blocks | kernel µs | host µs "
        "| predicted µs | bound µs | vs eager |"
    )
    lines = [head, "| --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ratio = "—" if r["path"] == "eager" or r["vs_eager"] is None else f"{r['vs_eager']:.2f}x"
        lines.append(
            f"| {r['workload']} | {r['batch']} | {r['dtype']} | {r['path']} | {r['runs']} | {fmt_count(r['flops'])} "
            f"| {fmt_us(r['hbm_bytes'] / 1e6)} | {r['launches']} | {r['blocks']} | {fmt_us(r['kernel_us'])} "
            f"| {fmt_us(r['host_us'])} | {fmt_us(r['predicted_us'])} | {fmt_us(r['bound_us'])} | {ratio} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------
# --compare: a bench_mlp / bench_train result against the model
# --------------------------------------------------------------------------
#: bench_mlp's variants (phases fwd / fwdbwd / step; BCE + Adam foreach) -> the model's paths.
BENCH_MLP_PATHS = {
    "eager": "eager",
    "fastmlp": "sequential",
    "fastmlp-fused": "fused-classifier",
    "fastmlp-trainstep": "trainstep",
}
#: bench_train's variants (phases train / epoch) -> (path, optimizer override).
BENCH_TRAIN_PATHS = {
    "eager": ("eager", None),
    "eager-fused-adam": ("eager", "adam-fused"),
    "fused-classifier": ("fused-classifier", "adam-fused"),  # bench_train gives it Adam(fused=True)
    "trainstep": ("trainstep", None),
}
EPOCH_ROWS = 12396  # bench_train's epoch: the MNIST 3-vs-7 training set


@dataclass
class Match:
    """One measured row and what the model says about it (``reason`` set: not matched)."""

    row: dict[str, Any]
    path: str | None = None
    predicted_s: float | None = None
    bound_s: float | None = None
    reason: str | None = None

    @property
    def ratio(self) -> float | None:
        """Measured over predicted."""
        measured = self.row.get("median_s")
        if self.predicted_s and isinstance(measured, (int, float)) and measured > 0:
            return measured / self.predicted_s
        return None

    @property
    def verdict(self) -> str:
        """Where the measurement falls against the model's range."""
        measured = self.row.get("median_s")
        if self.predicted_s is None or self.bound_s is None or not isinstance(measured, (int, float)):
            return "-"
        if measured < self.bound_s:
            return "faster than the bound"
        if measured <= self.predicted_s:
            return "in range"
        return "slower than predicted"


def load_results(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(meta, results)`` of a bench_mlp or bench_train JSON (``{"meta", "results"}``; a bare list
    of results is taken too). Raises ValueError when neither is there."""
    data = json.loads(path.read_text())
    if isinstance(data, list):
        return {}, [r for r in data if isinstance(r, dict)]
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ValueError(f"{path}: no 'results' list (expected a bench_mlp or bench_train JSON)")
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
    return meta, [r for r in data["results"] if isinstance(r, dict)]


def match_row(row: dict[str, Any], machine: Machine = H200, assume: Assumptions = ASSUME) -> Match:
    """The model's prediction for one measured row, or the reason there is none."""
    try:
        wl = parse_workload(str(row.get("workload", "")))
        batch = int(row["batch"])
    except (KeyError, TypeError, ValueError) as exc:
        return Match(row, reason=f"unreadable row ({exc})")
    status = row.get("status", "ok")
    median = row.get("median_s")
    if status != "ok" or not isinstance(median, (int, float)) or median <= 0:
        return Match(row, reason=f"not measured ({row.get('reason') or status})")
    phase = str(row.get("phase", ""))
    dtype = str(row.get("dtype") or "float32")
    variant = str(row.get("variant", ""))
    if dtype not in DTYPE_BYTES:
        return Match(row, reason=f"dtype {dtype} not modelled")
    if batch < 1:
        return Match(row, reason="empty batch")
    if phase in PHASES:  # bench_mlp: BCE + Adam(foreach) whatever the workload string says
        path = BENCH_MLP_PATHS.get(variant)
        if path is None:
            return Match(row, reason=f"variant {variant} not modelled")
        wl = Workload(wl.dims, "bce", "adam", wl.clip)
        model = model_path(wl, batch, dtype, path, phase, machine, assume)
        if model is None:
            return Match(row, reason=f"{path} has no phase {phase}")
        return Match(row, path, model.predicted_s, model.bound_s)
    if phase not in ("train", "epoch"):
        return Match(row, reason=f"phase {phase} not modelled")
    found = BENCH_TRAIN_PATHS.get(variant)
    if found is None:
        return Match(row, reason=f"variant {variant} not modelled")
    path, optimizer = found
    label = path
    if optimizer is not None:
        if wl.optimizer != "adam":
            return Match(row, reason=f"{variant} with {wl.optimizer}")
        wl = Workload(wl.dims, wl.loss, optimizer, wl.clip)
        label = f"{path} ({optimizer})"
    if phase == "epoch":
        if path != "trainstep":
            return Match(row, reason="epoch through a DataLoader: its per-row Python is not modelled")
        model = model_path(wl, batch, dtype, "trainstep-epoch", "step", machine, assume)
        if model is None:
            return Match(row, reason="no model")
        batches = ceil_div(EPOCH_ROWS, batch)
        fixed = assume.trainstep_python_s + 2 * assume.eager_launch_s + assume.sync_s  # randperm copy, stack, sync
        return Match(row, "trainstep-epoch", batches * model.predicted_s + fixed, batches * model.bound_s + fixed)
    model = model_path(wl, batch, dtype, path, "step", machine, assume)
    if model is None:
        return Match(row, reason=f"{path} does not run {wl.loss}")
    # bench_train synchronises after every CUDA step: no overlap across steps.
    return Match(row, label, model.predicted_s + assume.sync_s, model.bound_s + assume.sync_s)


def compare(path: Path, machine: Machine = H200, assume: Assumptions = ASSUME) -> tuple[str, list[Match]]:
    """The comparison report (markdown) and the matches, for a bench JSON."""
    meta, results = load_results(path)
    matches = [match_row(r, machine, assume) for r in results]
    matched = [m for m in matches if m.reason is None]
    device = str(meta.get("device", "?"))
    name = str(meta.get("device_name") or meta.get("cpu") or "?")
    out = [f"# Performance model ({machine.name}) vs measured: {path.name}", ""]
    out.append(f"- measured on: {device} ({name}), torch {meta.get('torch', '?')}, {meta.get('date', '?')}")
    bw = meta.get("copy_bandwidth_Bps")
    if isinstance(bw, (int, float)):
        out.append(
            f"- measured copy bandwidth {bw / 1e9:.0f} GB/s; the model's streaming HBM bandwidth "
            f"{machine.hbm_bandwidth * assume.hbm_efficiency / 1e9:.0f} GB/s"
        )
    if meta.get("float32_matmul_precision") not in (None, "highest"):
        out.append(f"- note: float32_matmul_precision {meta['float32_matmul_precision']}: TF32 GEMMs, not modelled")
    off_device = device != "cuda" or "H200" not in name.upper()
    if off_device:
        out.append(f"- note: not an H200 ({device}, {name}): the model's figures are for an H200, ratios mean nothing")
    out += [
        "",
        "| workload | phase | dtype | batch | variant | model path | measured µs | predicted µs | bound µs "
        "| measured / predicted | verdict |",
        "| --- | --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for m in matched:
        r = m.row
        out.append(
            f"| {r.get('workload')} | {r.get('phase')} | {r.get('dtype') or 'float32'} | {r.get('batch')} "
            f"| {r.get('variant')} | {m.path} | {fmt_us(r['median_s'] * 1e6)} | {fmt_us((m.predicted_s or 0) * 1e6)} "
            f"| {fmt_us((m.bound_s or 0) * 1e6)} | {m.ratio:.2f}x | {m.verdict} |"
        )
    unmatched = [m for m in matches if m.reason is not None]
    if unmatched:
        out += ["", f"Not matched ({len(unmatched)} rows):", ""]
        for m in unmatched:
            r = m.row
            out.append(
                f"- {r.get('workload')} {r.get('phase')} {r.get('dtype') or 'float32'} B={r.get('batch')} "
                f"{r.get('variant')}: {m.reason}"
            )
    out += ["", summary_line(matches, off_device)]
    return "\n".join(out) + "\n", matches


def summary_line(matches: Sequence[Match], off_device: bool = False) -> str:
    """``model vs measured: ...``: the line gpu_check_report.py keys shows for the model step."""
    ratios = [r for r in (m.ratio for m in matches) if r]
    unmatched = sum(m.reason is not None for m in matches)
    head = "model vs measured: " + ("NOT AN H200, ratios meaningless; " if off_device else "")
    if not ratios:
        return f"{head}0 rows matched, {unmatched} not matched"
    geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
    verdicts = [m.verdict for m in matches if m.ratio]
    worst = max((m for m in matches if m.ratio), key=lambda m: abs(math.log(m.ratio or 1.0)))
    w = worst.row
    return (
        f"{head}{len(ratios)} rows matched, measured/predicted geomean {geo:.2f}x "
        f"({min(ratios):.2f}x-{max(ratios):.2f}x), {verdicts.count('in range')} in range, "
        f"{verdicts.count('faster than the bound')} faster than the bound, "
        f"{verdicts.count('slower than predicted')} slower than predicted; furthest: {w.get('variant')} "
        f"{w.get('workload')} {w.get('phase')} {w.get('dtype') or 'float32'} B={w.get('batch')} {worst.ratio:.2f}x; "
        f"{unmatched} not matched"
    )


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.perf_model [--all] [--json FILE] [--compare BENCH_JSON]``."""
    p = argparse.ArgumentParser(
        prog="python -m bench.perf_model", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workloads", help=f"comma-separated (default {','.join(CLASSIC)})")
    p.add_argument("--batch-sizes", help=f"default {','.join(map(str, BATCHES))}")
    p.add_argument("--dtypes", help=f"default {','.join(DTYPES)}")
    p.add_argument("--paths", help=f"subset of {','.join(PATHS)} (default {','.join(DEFAULT_PATHS)})")
    p.add_argument("--all", action="store_true", help="also 1000-100-10 with BCE; Sequential, FusedBCEClassifier")
    p.add_argument("--json", type=Path, help="write the rows (and the comparison) as JSON")
    p.add_argument("--compare", type=Path, help="a bench_mlp / bench_train JSON: measured vs predicted")
    args = p.parse_args(argv)
    try:
        workloads = _csv(args.workloads) or [*CLASSIC, *(EXTRA if args.all else ())]
        batches = [int(b) for b in _csv(args.batch_sizes)] or list(BATCHES)
        dtypes = _csv(args.dtypes) or list(DTYPES)
        paths = _csv(args.paths) or list(PATHS if args.all else DEFAULT_PATHS)
        for path in paths:
            if path not in PATHS:
                raise ValueError(f"path {path!r}: one of {', '.join(PATHS)}")
        # --compare alone prints the comparison only; any table option adds the table
        table = not args.compare or any((args.workloads, args.batch_sizes, args.dtypes, args.paths, args.all))
        rows = table_rows(workloads, batches, dtypes, paths) if table else []
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    payload: dict[str, Any] = {
        "machine": {**asdict(H200), "fp32_simt_flops": H200.fp32_simt_flops},
        "assumptions": asdict(ASSUME),
        "rows": rows,
    }
    if rows:
        print(markdown_table(rows))
    if args.compare:
        try:
            report, matches = compare(args.compare)
        except (OSError, ValueError) as exc:
            print(f"error: --compare {args.compare}: {exc}", file=sys.stderr)
            return 2
        print(("\n" if rows else "") + report, end="")
        payload["compare"] = [
            {
                **{k: m.row.get(k) for k in ("workload", "phase", "dtype", "batch", "variant", "median_s")},
                "path": m.path,
                "predicted_s": m.predicted_s,
                "bound_s": m.bound_s,
                "ratio": m.ratio,
                "verdict": m.verdict,
                "reason": m.reason,
            }
            for m in matches
        ]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _csv(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


if __name__ == "__main__":
    sys.exit(main())
