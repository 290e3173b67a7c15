"""bench/perf_model.py: the H200 performance model's counts (FLOPs, bytes, launches)
against hand-derived values and README's "What runs where on CUDA" table, the fused
step's block rule, the --compare reader on synthetic bench JSON, and the CLI.
Standard library model: no torch, no GPU needed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ is no installed package: `pytest tests` finds it from the checkout
    sys.path.insert(0, str(REPO))

from bench import perf_model as pm  # noqa: E402

CLASSIC = {"784-30-1": (784, 30, 1), "1000-100-10:mse-sgd": (1000, 100, 10), "1000-100-10:ce-adam": (1000, 100, 10)}
BATCHES = (64, 256, 2048, 12396)
ELEM = {"float32": 4, "bfloat16": 2}


def expected_gemm_flops(dims: tuple[int, ...], batch: int) -> int:
    """2 * batch * fan_in * fan_out per GEMM pass: forward and the weight gradient for every
    layer, the input gradient for every layer but the first."""
    macs = [dims[i] * dims[i + 1] for i in range(len(dims) - 1)]
    return 2 * batch * (2 * sum(macs) + sum(macs[1:]))


def params(dims: tuple[int, ...]) -> int:
    return sum(dims[i] * dims[i + 1] + dims[i + 1] for i in range(len(dims) - 1))


def all_models(phase: str = "step"):
    for name, dims in CLASSIC.items():
        wl = pm.parse_workload(name)
        assert wl.dims == dims
        for dtype in ELEM:
            for batch in BATCHES:
                for path in pm.PATHS:
                    model = pm.model_path(wl, batch, dtype, path, phase)
                    if model is not None:
                        yield name, dims, dtype, batch, path, model


# --------------------------------------------------------------------------
# FLOPs, bytes, launches
# --------------------------------------------------------------------------
def test_flops_are_the_gemm_passes_on_every_path() -> None:
    seen = set()
    for _, dims, _, batch, path, model in all_models():
        assert model.flops == expected_gemm_flops(dims, batch), (dims, batch, path)
        seen.add(path)
    assert seen == set(pm.PATHS)
    # the forward alone: one pass
    wl = pm.parse_workload("784-30-1")
    assert pm.model_path(wl, 64, "float32", "eager", "fwd").flops == 2 * 64 * (784 * 30 + 30)


def test_eager_runs_one_gemm_per_pass() -> None:
    """Forward addmm per layer, backward mm dW per layer and mm dX for all but the first."""
    for _, dims, _, _, path, model in all_models():
        if model.runs != "eager lines":
            continue
        layers = len(dims) - 1
        gemms = [x for x in model.launches if x.flops > 0]
        assert len(gemms) == 3 * layers - 1, (path, [x.name for x in gemms])
        assert all(x.engine == "cublas" for x in gemms)


def test_bytes_at_least_the_input_and_the_parameters() -> None:
    for _, dims, dtype, batch, path, model in all_models():
        e = ELEM[dtype]
        floor = batch * dims[0] * e + params(dims) * e
        assert model.hbm_bytes >= floor, (dims, dtype, batch, path, model.hbm_bytes, floor)
    # an optimizer step reads and writes more than the parameters once: Adam's four tensors, torch's 18 passes
    wl = pm.parse_workload("784-30-1")
    eager = pm.model_path(wl, 64, "float32", "eager")
    update = sum(x.hbm_bytes for x in eager.launches if x.stage == "update")
    assert update == 18 * params((784, 30, 1)) * 4
    ours = pm.model_path(wl, 64, "float32", "trainstep")
    assert sum(x.hbm_bytes for x in ours.launches if x.stage == "update") == 7 * params((784, 30, 1)) * 4


@pytest.mark.parametrize("batch", [1, 64, 2048, 12396, 65536])
def test_fused_bce_trainstep_launches_match_readme(batch: int) -> None:
    """README: a BCE TrainStep on a narrow chain is 3 launches (5 with clipping): fused_step_kernel,
    its finish, one multi-tensor update (clipping: the sum of squares and its one-block finish)."""
    for name in ("784-30-1", "1000-100-10", "784-30-1:bce-sgd"):
        wl = pm.parse_workload(name)
        model = pm.model_path(wl, batch, "float32", "trainstep")
        plan = pm.fused_step_plan(batch, wl.dims[0], wl.widths, 4)
        if not pm.fused_chain_preferred(batch, wl.dims[0], wl.widths[0], plan):  # a big first layer: layer path
            assert model.runs == "layer path"
            assert batch * wl.dims[0] * wl.widths[0] >= 1 << 26 or min(batch, 16) * wl.dims[0] * wl.widths[0] > 1 << 20
            continue
        assert model.runs == "fused chain"
        assert [x.name for x in model.launches][:2] == ["fused_step_kernel", "fused_step_finish_kernel"]
        assert model.n_launches == 3, [x.name for x in model.launches]
        clipped = pm.model_path(pm.parse_workload(name + ":clip"), batch, "float32", "trainstep")
        assert clipped.n_launches == 5, [x.name for x in clipped.launches]
    # the epoch adds two index_selects per batch (README)
    epoch = pm.model_path(pm.parse_workload("784-30-1"), 2048, "float32", "trainstep-epoch")
    assert epoch.n_launches == 5 and [x.name for x in epoch.launches[:2]] == [
        "index_select input",
        "index_select target",
    ]


def test_layer_path_launches_by_hand() -> None:
    """MSE / cross-entropy TrainStep: README's layer path, counted by hand for 1000-100-10.
    Batch 64: L0 forward gemm_kernel split K=1000 in 7 (2), L1 forward (1), the loss (MSE 2, CE 4),
    L1 dX (1), L1 dW+db (1, K=64 too short to split), L0 dW+db (1), the update (1).
    Batch 2048: L0 on cuBLAS (2048*100*1000 >= 2^26): addmm (1) and threshold_backward, mm dW,
    sum db (3); L1 dW+db splits K=2048 (2)."""
    counts = {}
    for name, loss_launches in (("1000-100-10:mse-sgd", 2), ("1000-100-10:ce-adam", 4)):
        for batch, expected in ((64, 2 + 1 + 1 + 1 + 1 + 1), (2048, 1 + 1 + 1 + 2 + 3 + 1)):
            model = pm.model_path(pm.parse_workload(name), batch, "float32", "trainstep")
            assert model.runs == "layer path"
            counts[name, batch] = model.n_launches
            assert model.n_launches == expected + loss_launches, (name, batch, [x.name for x in model.launches])
            assert sum(x.stage == "loss" for x in model.launches) == loss_launches
            assert sum(x.stage == "update" for x in model.launches) == 1
    assert counts[("1000-100-10:mse-sgd", 64)] == 9


def test_eager_launches_by_hand() -> None:
    """784-30-1, BCE + Adam (foreach): forward addmm + relu, the 1-wide layer's bias copy + addmm,
    BCE's 6; backward's seed, BCE's 4, L1 mm dX / mm dW / sum, threshold_backward, L0 mm dW / sum;
    Adam's 7 foreach kernels: 28. MSE(sum) + SGD on 1000-100-10: 3 + 2, 1 + 2, 3, 3, 1 = 15."""
    assert pm.model_path(pm.parse_workload("784-30-1"), 64, "float32", "eager").n_launches == 4 + 6 + 5 + 6 + 7
    assert pm.model_path(pm.parse_workload("1000-100-10:mse-sgd"), 64, "float32", "eager").n_launches == 15
    assert (
        pm.model_path(pm.parse_workload("1000-100-10:ce-adam"), 64, "float32", "eager").n_launches == 3 + 2 + 4 + 6 + 7
    )
    fused_adam = pm.model_path(pm.parse_workload("784-30-1:bce-adam-fused"), 64, "float32", "eager")
    assert fused_adam.n_launches == 28 - 7 + 2
    # clip_grad_norm_ (foreach): _foreach_norm, stack, vector_norm, add, rdiv, clamp, _foreach_mul_
    assert pm.model_path(pm.parse_workload("784-30-1:clip"), 64, "float32", "eager").n_launches == 28 + 7


def test_half_types_run_the_eager_lines_in_trainstep() -> None:
    wl = pm.parse_workload("784-30-1")
    eager = pm.model_path(wl, 2048, "bfloat16", "eager")
    step = pm.model_path(wl, 2048, "bfloat16", "trainstep")
    assert step.runs == "eager lines" and step.n_launches == eager.n_launches
    assert step.host_s == pytest.approx(eager.host_s + pm.ASSUME.trainstep_fallback_s)


def test_cublas_rule_and_splits_mirror_gemm_cuh() -> None:
    assert pm.gemm_on_cublas(2048, 100, 1000, False) and not pm.gemm_on_cublas(256, 100, 1000, False)
    assert pm.gemm_on_cublas(1, 1, 1, True)
    assert pm.gemm_on_cublas(1 << 13, 1 << 13, 1, False) and not pm.gemm_on_cublas((1 << 13) - 1, 1 << 13, 1, False)
    # choose_splits: tiles < 2 * SMs and K >= 256: ceil(2 * 132 / tiles) capped by K / 128 and 64
    assert pm.choose_splits(64, 100, 1000, 132) == 7
    assert pm.choose_splits(10, 100, 2048, 132) == 16
    assert pm.choose_splits(2048, 100, 1000, 132) == 5  # chunk 208
    assert pm.choose_splits(64, 10, 100, 132) == 1  # K < 256
    assert pm.choose_splits(100, 1000, 20000, 132) == 9  # 32 tiles: ceil(264 / 32)
    assert pm.choose_splits(8192, 8192, 8192, 132) == 1  # 16384 tiles: no split


# --------------------------------------------------------------------------
# The fused step's planner
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dims", [(784, 30, 1), (1000, 100, 10)])
@pytest.mark.parametrize("elem_bytes", [4, 2])
@pytest.mark.parametrize("batch", [1, 15, 16, 17, 64, 256, 2048, 2111, 4224, 12396, 65536])
def test_fused_step_blocks_fill_the_h200(dims: tuple[int, ...], elem_bytes: int, batch: int) -> None:
    rows, blocks = pm.fused_step_blocks(batch, dims[0], dims[1:], elem_bytes)
    assert blocks >= min(132, math.ceil(batch / 16)), (rows, blocks)
    assert rows in (64, 32, 16) and blocks <= math.ceil(batch / rows) <= math.ceil(batch / 16)
    assert blocks <= 2 * 132


def test_fused_step_blocks_by_hand() -> None:
    # 784-30-1 float at 12396 rows: 64-row tiles (194 >= 132); gradients (784 * 30 + 30 + 30 + 1 = 23581
    # -> 23584) + buffers 1984 + 64 + 2 * 1984 + 2112 + 992 + 256 = 9376: 32960 floats = 131840 B, in
    # shared memory, 1 block per SM.
    plan = pm.fused_step_plan(12396, 784, [30, 1], 4)
    assert (plan.tile_rows, plan.tiles, plan.blocks) == (64, 194, 132)
    assert plan.smem_bytes == 32960 * 4 and plan.grads_in_smem and plan.blocks_per_sm == 1
    assert pm.fused_step_blocks(12396, 784, [30, 1], 2) == (64, 132)  # bf16 accumulates in float: the same
    # small batches fall to 16-row tiles
    assert pm.fused_step_blocks(64, 784, [30, 1], 4) == (16, 4)
    assert pm.fused_step_blocks(2048, 784, [30, 1], 4) == (16, 128)
    assert pm.fused_step_blocks(4224, 784, [30, 1], 4) == (32, 132)  # 4224 / 64 = 66 < 132, / 32 = 132
    assert pm.fused_step_blocks(8447, 784, [30, 1], 4)[0] == 64  # ceil(8447 / 64) = 132
    assert pm.fused_step_blocks(1, 784, [30, 1], 4) == (64, 1)
    # 1000-100-10: 101110 gradients do not fit; buffers 6464 + 704 + 12928 + 2112 + 3232 + 256 = 25696
    # floats = 102784 B; a 100-wide first layer runs the 128-wide register tiles: 1 block per SM.
    plan = pm.fused_step_plan(12396, 1000, [100, 10], 4)
    assert not plan.grads_in_smem and plan.smem_bytes == 25696 * 4 and plan.blocks_per_sm == 1
    assert (plan.tile_rows, plan.blocks) == (64, 132)
    # double: 784-30-1's gradients no longer fit (32960 * 8 B > 227 KB); 9376 * 8 B buffers, 1 per SM
    plan = pm.fused_step_plan(12396, 784, [30, 1], 8)
    assert not plan.grads_in_smem and plan.smem_bytes == 9376 * 8 and plan.blocks == 132
    # two blocks per SM: float, a first layer <= 32 wide, two blocks' shared memory (+1 KB each) fit
    plan = pm.fused_step_plan(70000, 40, [16, 3], 4, sm_count=4)
    assert plan.blocks_per_sm == 2 and plan.blocks == 8
    # buffers too big for 64 rows (8 layers of 128 in double: 712 KB, 32 rows 373 KB): 16-row tiles
    # (25552 doubles = 204 KB)
    plan = pm.fused_step_plan(12396, 256, [128] * 8, 8)
    assert (plan.tile_rows, plan.blocks, plan.smem_bytes) == (16, 132, 25552 * 8)
    assert pm.fused_step_blocks(12396, 256, [128] * 8, 8, smem_per_block=190 * 1024) == (64, 0)  # none fits
    # the grads-in-shared-memory boundary: exactly smem_per_block fits
    plan = pm.fused_step_plan(12396, 784, [30, 1], 4, smem_per_block=32960 * 4)
    assert plan.grads_in_smem
    plan = pm.fused_step_plan(12396, 784, [30, 1], 4, smem_per_block=32960 * 4 - 1)
    assert not plan.grads_in_smem and plan.smem_bytes == 9376 * 4
    # fewer SMs: fewer tiles wanted
    assert pm.fused_step_blocks(2048, 784, [30, 1], 4, sm_count=16) == (64, 16)
    with pytest.raises(ValueError):
        pm.fused_step_blocks(0, 784, [30, 1], 4)
    with pytest.raises(ValueError):
        pm.fused_step_blocks(64, 784, [], 4)


def test_trainstep_uses_the_planner_and_limits() -> None:
    wl = pm.parse_workload("784-30-1")
    model = pm.model_path(wl, 2048, "float32", "trainstep")
    assert model.launches[0].blocks == pm.fused_step_blocks(2048, 784, [30, 1], 4)[1]
    assert (
        not pm.fused_chain_qualifies([129])
        and not pm.fused_chain_qualifies([8] * 9)
        and pm.fused_chain_qualifies([128] * 8)
    )
    wide = pm.model_path(pm.parse_workload("784-256-1"), 64, "float32", "trainstep")
    assert wide.runs == "layer path"  # BCE, but a layer wider than 128


# --------------------------------------------------------------------------
# --compare
# --------------------------------------------------------------------------
def bench_mlp_row(workload: str, phase: str, dtype: str, batch: int, variant: str, median: float | None, **kw):
    """A result row as bench_mlp writes it (asdict(Result))."""
    row = {
        "workload": workload,
        "phase": phase,
        "dtype": dtype,
        "batch": batch,
        "variant": variant,
        "status": "ok" if median else "skipped",
        "reason": None if median else "TrainStep runs whole steps",
        "median_s": median,
        "p25_s": median,
        "p75_s": median,
        "iqr_s": 0.0,
        "n_samples": 10,
        "speedup_vs_eager": None,
        "bytes_moved": 1,
        "achieved_Bps": 1.0,
        "roofline_frac": 0.1,
        "input_read_floor_s": 1e-7,
        "peak_mem_bytes": 1,
        "peak_mem_delta_bytes": 1,
        "loss_rel_err": 0.0,
        "grad_rel_err": 0.0,
        "check_ok": True,
    }
    row.update(kw)
    return row


def write_bench_mlp(path: Path, device: str, name: str) -> Path:
    results = [
        bench_mlp_row("784-30-1", "step", "float32", 64, "eager", 200e-6),
        bench_mlp_row("784-30-1", "step", "float32", 64, "fastmlp-trainstep", 60e-6),
        bench_mlp_row("784-30-1", "fwdbwd", "bfloat16", 2048, "fastmlp-fused", 90e-6),
        bench_mlp_row("1000-100-10", "fwd", "float32", 12396, "fastmlp", 150e-6),
        bench_mlp_row("784-30-1", "fwdbwd", "float32", 64, "fastmlp-trainstep", None),
        bench_mlp_row("784-30-1", "step", "float32", 64, "compile", 300e-6),
    ]
    meta = {
        "date": "2027-01-01T00:00:00+00:00",
        "device": device,
        "device_name": name,
        "torch": "2.14.1",
        "copy_bandwidth_Bps": 4.0e12,
        "float32_matmul_precision": "highest",
        "config": {},
        "git": {},
    }
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    return path


def test_compare_bench_mlp_cuda(tmp_path: Path) -> None:
    path = write_bench_mlp(tmp_path / "bench-cuda.json", "cuda", "NVIDIA H200")
    report, matches = pm.compare(path)
    matched = [m for m in matches if m.reason is None]
    assert [m.path for m in matched] == ["eager", "trainstep", "fused-classifier", "sequential"]
    eager = pm.model_path(pm.parse_workload("784-30-1"), 64, "float32", "eager", "step")
    assert matched[0].predicted_s == pytest.approx(eager.predicted_s)
    assert matched[0].ratio == pytest.approx(200e-6 / eager.predicted_s)
    fused = pm.model_path(pm.parse_workload("784-30-1"), 2048, "bfloat16", "fused-classifier", "fwdbwd")
    assert matched[2].bound_s == pytest.approx(fused.bound_s)
    reasons = {m.row["variant"]: m.reason for m in matches if m.reason}
    assert "not measured" in reasons["fastmlp-trainstep"] and "not modelled" in reasons["compile"]
    assert "NOT AN H200" not in report and "not an H200" not in report
    assert "| 784-30-1 | step | float32 | 64 | eager | eager |" in report
    last = report.strip().splitlines()[-1]
    assert last.startswith("model vs measured: 4 rows matched") and last.endswith("2 not matched"), last
    for m in matched:
        assert m.verdict in ("in range", "faster than the bound", "slower than predicted")
    # a measurement between the bound and the serial prediction is in range
    between = pm.Match(
        dict(matched[0].row, median_s=(eager.bound_s + eager.predicted_s) / 2),
        "eager",
        eager.predicted_s,
        eager.bound_s,
    )
    assert between.verdict == "in range"


def test_compare_flags_a_cpu_file(tmp_path: Path) -> None:
    path = write_bench_mlp(tmp_path / "bench-cpu.json", "cpu", "AMD EPYC")
    report, _ = pm.compare(path)
    assert "not an H200" in report and "model vs measured: NOT AN H200" in report


def test_compare_bench_train(tmp_path: Path) -> None:
    def row(workload: str, phase: str, batch: int, variant: str, median: float) -> dict:
        return {
            "workload": workload,
            "phase": phase,
            "batch": batch,
            "variant": variant,
            "median_s": median,
            "min_s": median,
            "samples_s": [median],
            "speedup_vs_eager": 1.0,
        }

    results = [
        row("784-30-1", "train", 64, "eager", 250e-6),
        row("784-30-1", "train", 64, "eager-fused-adam", 200e-6),
        row("1000-100-10:mse-sgd", "train", 2048, "trainstep", 100e-6),
        row("1000-100-10:mse-sgd", "train", 2048, "eager-fused-adam", 100e-6),  # SGD: no fused Adam
        row("784-30-1", "epoch", 2048, "trainstep", 0.5e-3),
        row("784-30-1", "epoch", 2048, "eager", 80e-3),
        row("784-30-1", "train", 64, "jax", 100e-6),
        row("not-a-workload", "train", 64, "eager", 100e-6),
    ]
    path = tmp_path / "train-cuda.json"
    meta = {"date": "2027-01-01", "device": "cuda", "cpu": "x", "threads": 2, "torch": "2.14.1", "commit": "abc"}
    path.write_text(json.dumps({"meta": meta, "results": results}))
    _, matches = pm.compare(path)
    by = {(m.row["workload"], m.row["phase"], m.row["variant"]): m for m in matches}
    m = by[("784-30-1", "train", "eager")]
    eager = pm.model_path(pm.parse_workload("784-30-1"), 64, "float32", "eager")
    assert m.predicted_s == pytest.approx(eager.predicted_s + pm.ASSUME.sync_s)  # bench_train syncs every step
    fused = pm.model_path(pm.parse_workload("784-30-1:bce-adam-fused"), 64, "float32", "eager")
    assert by[("784-30-1", "train", "eager-fused-adam")].predicted_s == pytest.approx(
        fused.predicted_s + pm.ASSUME.sync_s
    )
    assert by[("1000-100-10:mse-sgd", "train", "trainstep")].path == "trainstep"
    per_batch = pm.model_path(pm.parse_workload("784-30-1"), 2048, "float32", "trainstep-epoch")
    epoch = by[("784-30-1", "epoch", "trainstep")]
    assert epoch.path == "trainstep-epoch" and epoch.predicted_s > 7 * per_batch.predicted_s  # ceil(12396 / 2048)
    assert "DataLoader" in by[("784-30-1", "epoch", "eager")].reason
    assert by[("784-30-1", "train", "jax")].reason and by[("not-a-workload", "train", "eager")].reason
    assert by[("1000-100-10:mse-sgd", "train", "eager-fused-adam")].reason


def test_load_results_refuses_other_json(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError):
        pm.load_results(bad)
    assert pm.main(["--compare", str(bad)]) == 2
    assert pm.main(["--compare", str(tmp_path / "missing.json")]) == 2


def test_compare_reads_the_checked_in_cpu_results() -> None:
    """The real files in bench/results/ (CPU: the format the CUDA runs will write)."""
    for name in ("cpu-epyc-2026-11-25-classic.json", "train-cpu-xeon-2026-12-01.json"):
        _, matches = pm.compare(REPO / "bench" / "results" / name)
        assert sum(m.reason is None for m in matches) >= 30, name


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------
def test_cli_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rows.json"
    assert pm.main(["--json", str(out)]) == 0
    text = capsys.readouterr().out
    lines = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| ---")]
    # header + 3 workloads x 2 dtypes x 4 batches x 3 paths
    assert len(lines) == 1 + 3 * 2 * 4 * 3
    assert lines[0].startswith("| workload | batch | dtype | path |") and "predicted µs" in lines[0]
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 72 and data["machine"]["sm_count"] == 132
    assert data["machine"]["fp32_simt_flops"] == pytest.approx(66.9e12, rel=1e-3)
    row = next(
        r
        for r in data["rows"]
        if (r["workload"], r["batch"], r["dtype"], r["path"]) == ("784-30-1", 2048, "float32", "trainstep")
    )
    assert row["launches"] == 3 and row["blocks"] == 128 and row["runs"] == "fused chain"
    eager = next(
        r
        for r in data["rows"]
        if (r["workload"], r["batch"], r["dtype"], r["path"]) == ("784-30-1", 2048, "float32", "eager")
    )
    assert row["vs_eager"] == pytest.approx(eager["predicted_us"] / row["predicted_us"])
    assert row["bound_us"] <= row["predicted_us"]
    assert pm.main(["--paths", "nope"]) == 2


def test_cli_runs_as_a_module(tmp_path: Path) -> None:
    bench = write_bench_mlp(tmp_path / "bench-cuda.json", "cuda", "NVIDIA H200")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.perf_model", "--compare", str(bench), "--batch-sizes", "64"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| 784-30-1 | 64 | float32 | trainstep | fused chain |" in proc.stdout  # the table (--batch-sizes given)
    assert proc.stdout.rstrip().splitlines()[-1].startswith("model vs measured: 4 rows matched")


def test_perf_model_md_tables_are_the_cli_output() -> None:
    """bench/PERF_MODEL.md pastes the CLI's tables: regenerate them (the commands in the file) after
    changing the model, its assumptions or the planner."""
    text = (REPO / "bench" / "PERF_MODEL.md").read_text()
    default = pm.markdown_table(pm.table_rows())
    modules = pm.markdown_table(
        pm.table_rows(
            ["1000-100-10"], pm.BATCHES, ["float32"], ["eager", "trainstep", "sequential", "fused-classifier"]
        )
    )
    assert default in text, "PERF_MODEL.md: the table differs from `python -m bench.perf_model`"
    assert modules in text, "PERF_MODEL.md: the --all table differs from the command above it"
