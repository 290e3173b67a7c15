"""Heuristic against first-use autotuning, side by side in one process.

For each workload and batch size, a ``torch_fastmlp.Sequential`` forward +
backward (sum of the outputs) is timed in alternating rounds with autotuning
off (the planning heuristic) and on (the decisions its first calls timed,
``csrc/common/autotune.h``); the median per-call time of each and their ratio
are printed with the decisions made.

    python -m bench.bench_autotune --workloads 784-30-1,1000-100-10 --batch-sizes 64,2048,12396
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

import torch_fastmlp


def time_calls(fn: object, min_time: float) -> float:
    """Seconds per call of ``fn()``, run for at least ``min_time``."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()  # type: ignore[operator]
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / calls


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_autotune")
    p.add_argument("--workloads", default="784-30-1,1000-100-10")
    p.add_argument("--batch-sizes", default="64,2048,12396")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--min-run-time", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    print("| workload | batch | heuristic us | autotuned us | heuristic / autotuned |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in args.workloads.split(","):
        widths = [int(w) for w in name.split("-")]
        model = torch_fastmlp.MLP(widths)
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            x = torch.randn(batch, widths[0])

            def step(model: torch.nn.Module = model, x: torch.Tensor = x) -> None:
                model.zero_grad(set_to_none=True)
                model(x).sum().backward()

            torch_fastmlp.autotune(True)
            step()  # the first call times the candidates
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.rounds):
                for on in (False, True):
                    torch_fastmlp.autotune(on)
                    step()
                    times[on].append(time_calls(step, args.min_run_time))
            off, on = statistics.median(times[False]), statistics.median(times[True])
            rows.append({"workload": name, "batch": batch, "heuristic_s": off, "autotuned_s": on})
            print(f"| {name} | {batch} | {off * 1e6:.0f} | {on * 1e6:.0f} | {off / on:.2f}x |", flush=True)
    torch_fastmlp.autotune(None)
    decisions = torch_fastmlp.autotune_decisions()
    print("\ndecisions (candidate 0: our kernels, 1: BLAS / layer by layer):")
    for line in decisions:
        print("  " + line)
    if args.out is not None:
        meta = {"torch": torch.__version__, "threads": args.threads, "cpu_isa": torch_fastmlp.CPU_ISA}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows, "decisions": decisions}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
