"""bench/gpu_check.sh without a GPU: the dry run end to end (steps, budgets, the
summary, what lands in $OUT), a step that runs out of time, the sanitizer test
list, and the report helper."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ is no installed package: `pytest tests` finds it from the checkout
    sys.path.insert(0, str(REPO))

from bench import gpu_check_report as report  # noqa: E402

SCRIPT = REPO / "bench" / "gpu_check.sh"
STEPS = ["env", "build", "info", "pytest-cuda", "bench", "model", "memcheck", "racecheck", "bench-compile", "ncu"]
DRY_RUN_LIMIT_S = 240  # the bound for the rehearsal
DryRun = tuple[subprocess.CompletedProcess[str], float, Path]


def run_script(out: Path, timeout: float, **env: str) -> tuple[subprocess.CompletedProcess[str], float]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    full_env = {
        **inherited,
        "FASTMLP_GPU_CHECK_DRY_RUN": "1",
        "OUT": str(out),
        "PYTHON": sys.executable,
        "MAX_JOBS": "2",
        **env,
    }
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", str(SCRIPT)], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    return proc, time.monotonic() - start


def table_rows(stdout: str) -> dict[str, list[str]]:
    """``step -> [status, seconds, budget, key figures]`` from the table printed last."""
    lines = stdout.rstrip("\n").splitlines()
    head = max(i for i, line in enumerate(lines) if line.startswith("step ") and "key figures" in line)
    rows = {}
    for line in lines[head + 2 :]:
        parts = line.split(None, 4)
        if parts and parts[0] in STEPS:
            rows[parts[0]] = parts[1:]
    return rows


def summary_keys(out: Path) -> dict[str, str]:
    """``step -> key figures`` from summary.md (the printed table cuts long ones)."""
    rows = {}
    for line in (out / "summary.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in STEPS:
            rows[cells[0]] = cells[4]
    return rows


def sanitizer_tests() -> list[str]:
    text = SCRIPT.read_text()
    block = re.search(r"^SANITIZER_TESTS=\((.*?)^\)", text, flags=re.MULTILINE | re.DOTALL)
    assert block, "SANITIZER_TESTS=( ... ) not found in gpu_check.sh"
    return re.findall(r'"([^"]+)"', block.group(1))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> DryRun:
    out = tmp_path_factory.mktemp("gpu_check") / "out"  # the script creates it
    proc, elapsed = run_script(out, timeout=DRY_RUN_LIMIT_S + 60)
    return proc, elapsed, out


def test_dry_run_passes_in_time(dry_run: DryRun) -> None:
    proc, elapsed, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert elapsed < DRY_RUN_LIMIT_S, f"dry run took {elapsed:.0f}s"


def test_dry_run_ends_with_the_summary_table(dry_run: DryRun) -> None:
    proc, _, out = dry_run
    rows = table_rows(proc.stdout)
    assert list(rows) == STEPS, proc.stdout[-3000:]
    status = {step: row[0] for step, row in rows.items()}
    # GPU-only parts are skipped, everything that can run on the CPU ran and passed.
    assert status == {
        "env": "ok",
        "build": "ok",
        "info": "ok",
        "pytest-cuda": "ok",
        "bench": "ok",
        "model": "ok",
        "memcheck": "skipped",
        "racecheck": "skipped",
        "bench-compile": "skipped",
        "ncu": "skipped",
    }, proc.stdout[-3000:]
    keys = summary_keys(out)
    assert list(keys) == STEPS
    assert "existing build reused" in keys["build"]
    assert "CUDA kernels:" in keys["info"]
    assert re.search(r"\d+ (skipped|deselected)", keys["pytest-cuda"]), keys["pytest-cuda"]
    assert "fastmlp-fused" in keys["bench"] and "0 mismatches" in keys["bench"], keys["bench"]
    # the model step compared the CPU rehearsal's bench JSON with the H200 model, and says what that is worth
    assert re.search(r"NOT AN H200, ratios meaningless; [1-9]\d* rows matched", keys["model"]), keys["model"]
    n_ids = len(sanitizer_tests())
    assert f"the {n_ids} test ids were run without it" in keys["memcheck"]
    assert f"{n_ids} skipped" in keys["memcheck"]  # pytest ran them: each a CUDA case, skipped here
    assert "ran with eager alone" in keys["bench-compile"] and "0 mismatches" in keys["bench-compile"]
    # the table is the last thing printed
    assert proc.stdout.rstrip().splitlines()[-1].startswith("ncu ")


def test_dry_run_out_folder_fits_the_lent_machine(
    dry_run: tuple[subprocess.CompletedProcess[str], float, Path],
) -> None:
    _, _, out = dry_run
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert report.out_problems(out) == []
    assert 0 < len(files) <= report.MAX_FILES, files
    assert {"summary.md", "logs.tar.gz", "bench-cpu.json"} <= {str(f) for f in files}
    summary = (out / "summary.md").read_text()
    for step in STEPS:
        assert re.search(rf"^\| {re.escape(step)} \| ", summary, flags=re.MULTILINE), step
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {f"logs/{step}.log" for step in STEPS} <= names, names
    results = json.loads((out / "bench-cpu.json").read_text())["results"]
    ran = {(r["variant"], r["dtype"]) for r in results if r["status"] == "ok"}
    assert ("fastmlp-fused", "float32") in ran and ("eager", "bfloat16") in ran, ran


def test_step_out_of_time_does_not_stop_the_next(tmp_path: Path) -> None:
    """A 2 s budget interrupts pytest (it needs longer to collect); the step after it still runs."""
    out = tmp_path / "out"
    proc, elapsed = run_script(out, timeout=180, GPU_CHECK_STEPS="pytest-cuda,ncu", GPU_CHECK_BUDGETS="pytest-cuda=2")
    assert proc.returncode == 1, proc.stdout[-3000:]
    rows = table_rows(proc.stdout)
    assert list(rows) == ["pytest-cuda", "ncu"], proc.stdout[-3000:]
    assert rows["pytest-cuda"][0] == "TIMEOUT" and rows["pytest-cuda"][2] == "2", rows
    # ncu's dry run ran bench/ncu_case.py on the CPU and passed (a failure would read FAIL)
    assert rows["ncu"][0] == "skipped" and "ncu_case.py was run on the CPU" in rows["ncu"][3], rows
    assert "| pytest-cuda | TIMEOUT |" in (out / "summary.md").read_text()
    assert elapsed < 120


def test_total_budget_cuts_and_skips(tmp_path: Path) -> None:
    """A step's budget leaves the later steps their reserve (racecheck's: 3 s in a dry run);
    a step that would get less than its minimum (info's: 5 s) is skipped."""
    proc, _ = run_script(tmp_path / "a", timeout=120, GPU_CHECK_STEPS="info,racecheck", GPU_CHECK_TOTAL_S="30")
    rows = table_rows(proc.stdout)
    assert rows["info"][0] == "ok" and 25 <= int(rows["info"][2]) <= 27, rows
    assert proc.returncode == 0, proc.stdout[-3000:]
    proc, _ = run_script(tmp_path / "b", timeout=120, GPU_CHECK_STEPS="info,racecheck", GPU_CHECK_TOTAL_S="6")
    rows = table_rows(proc.stdout)
    assert rows["info"][0] == "skipped" and "no time left" in rows["info"][3], rows
    assert rows["racecheck"][0] == "skipped" and "needs a GPU" in rows["racecheck"][3], rows


def test_sanitizer_tests_exist_and_are_cuda_cases() -> None:
    ids = sanitizer_tests()
    assert 15 <= len(ids) <= 25, len(ids)
    assert len(set(ids)) == len(ids)
    # -m cuda: an id that is not a CUDA case would be deselected, and missing below
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cuda", "-p", "no:cacheprovider", *ids],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    collected = [line for line in proc.stdout.splitlines() if "::" in line]
    assert sorted(collected) == sorted(ids)


def test_report_pytest_and_sanitizer_lines() -> None:
    text = (
        "========= Invalid __global__ read of size 4 bytes\n"
        "=========     at fastmlp::cuda::gemm_kernel<float>(GemmParams<float>, float *)+0x1c0\n"
        "========= Program hit cudaErrorInvalidValue (error 1) due to invalid argument on CUDA API call\n"
        "========= Invalid __shared__ write of size 4 bytes\n"
        "....\n========= ERROR SUMMARY: 3 errors\n==== 12 passed, 2 skipped, 1 warning in 4.31s ====\n"
    )
    assert report.pytest_line(text) == "12 passed, 2 skipped, 1 warning in 4.31s"
    assert report.sanitizer_line(text) == "3 errors (2 in kernels, 1 API calls)"
    assert report.sanitizer_line("========= ERROR SUMMARY: 0 errors\n") == "0 errors (0 in kernels, 0 API calls)"
    assert (
        report.pytest_line("!!! KeyboardInterrupt !!!\n1 failed, 40 passed in 9.0s\n") == "1 failed, 40 passed in 9.0s"
    )
    assert report.pytest_line("nothing here") is None


def test_report_ncu_keys_from_csv() -> None:
    csv_text = "\n".join(
        [
            "==PROF== Connected to process 1",
            '"ID","Kernel Name","Section Name","Metric Name","Metric Unit","Metric Value"',
            '"0","void fastmlp::cuda::fused_step_kernel<float, 32>(P)","GPU Speed Of Light","Duration","us","41.3"',
            '"0","void fastmlp::cuda::fused_step_kernel<float, 32>(P)","GPU Speed Of Light","DRAM Throughput","%","71"',
            '"1","gemm_kernel","GPU Speed Of Light","Registers Per Thread","","128"',
            '"1","gemm_kernel","GPU Speed Of Light","Duration","us","9.5"',
        ]
    )
    keys = report.ncu_keys(csv_text)
    assert "fastmlp::cuda::fused_step_kernel: duration 41.3 us, dram 71 %" in keys, keys
    assert "gemm_kernel: duration 9.5 us" in keys and "Registers" not in keys


def test_report_model_keys() -> None:
    log = "$ model_step\n# Performance model ...\n| a | b |\nmodel vs measured: 12 rows matched, geomean 1.10x\n"
    assert report.model_keys(log) == "12 rows matched, geomean 1.10x"
    assert (
        report.model_keys("error: --compare x.json: no 'results' list\n")
        == "no comparison: --compare x.json: no 'results' list"
    )
    assert report.model_keys("") == "no comparison in the log"


def test_report_out_problems(tmp_path: Path) -> None:
    for i in range(report.MAX_FILES):
        (tmp_path / f"f{i}.txt").write_text("x")
    assert report.out_problems(tmp_path) == []
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "log.txt").write_text("x")
    (tmp_path / "bad name.txt").write_text("x")
    problems = report.out_problems(tmp_path)
    assert any("files >" in p for p in problems), problems
    assert any("deeper than" in p for p in problems), problems
    assert any("bad name.txt" in p and "name" in p for p in problems), problems


def test_report_phases_leaves_out_unknown_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert report.main(["phases", "fwdbwd,train,step,epoch"]) == 0
    captured = capsys.readouterr()
    from bench import bench_mlp

    kept = captured.out.strip().split(",")
    assert kept == [p for p in ("fwdbwd", "train", "step", "epoch") if p in bench_mlp.PHASES]
    if "train" not in bench_mlp.PHASES:
        assert "train" in captured.err
    assert report.main(["variants", "nope"]) == 1
