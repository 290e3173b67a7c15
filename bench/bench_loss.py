"""The loss alone: ``torch_fastmlp.BCEWithLogitsLoss`` against
``torch.nn.BCEWithLogitsLoss``, forward + backward, side by side on the same
logits and targets, over batch sizes 64 to 65536 (one and ten outputs).

    python -m bench.bench_loss [--device cpu|cuda] [--out bench/results/loss-<device>.json]

Writes JSON and a markdown table next to it; the timing helpers are
bench.bench_mlp's (interleaved rounds, median and quartiles).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import torch
from torch import nn

import torch_fastmlp
from bench.bench_mlp import RESULTS_DIR, device_name, device_slug, git_info, summarize, synchronize, time_fn

BATCHES = (64, 256, 1024, 2048, 12396, 65536)
OUTPUTS = (1, 10)


def run(device: torch.device, budget: float, rounds: int) -> list[dict]:
    """Median times of both losses for every (batch, outputs) case."""
    timer = time_fn(device)
    results = []
    for outputs in OUTPUTS:
        for batch in BATCHES:
            x = torch.randn(batch, outputs, device=device, requires_grad=True)
            y = torch.randint(0, 2, (batch, outputs), device=device).float()
            losses = {"torch": nn.BCEWithLogitsLoss(), "fastmlp": torch_fastmlp.BCEWithLogitsLoss()}
            torch.testing.assert_close(losses["fastmlp"](x, y), losses["torch"](x, y))

            samples: dict[str, list[float]] = {name: [] for name in losses}
            for _ in range(rounds):  # interleaved, so drift hits both alike
                for name, fn in losses.items():
                    synchronize(device)
                    samples[name] += timer(lambda fn=fn, x=x, y=y: fn(x, y).backward(), budget / rounds)
            stats = {name: summarize(s) for name, s in samples.items()}
            speedup = stats["torch"]["median_s"] / stats["fastmlp"]["median_s"]
            print(
                f"[{batch},{outputs}] torch {stats['torch']['median_s'] * 1e6:.1f} µs  "
                f"fastmlp {stats['fastmlp']['median_s'] * 1e6:.1f} µs  ({speedup:.2f}x)",
                flush=True,
            )
            results.append(
                {
                    "batch": batch,
                    "outputs": outputs,
                    "speedup_vs_torch": speedup,
                    **{f"{name}_{k}": v for name, st in stats.items() for k, v in st.items()},
                }
            )
    return results


def markdown(meta: dict, results: list[dict]) -> str:
    lines = [
        "# BCEWithLogitsLoss alone: forward + backward",
        "",
        f"- device: {meta['device']} ({meta['device_name']}), threads: {meta['threads']}",
        f"- torch {meta['torch']}, commit {meta['commit']}, {meta['date']}",
        "- speedup = torch time / torch_fastmlp time (median of interleaved rounds)",
        "",
        "| shape | torch | torch_fastmlp | speedup |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| [{r['batch']}, {r['outputs']}] | {r['torch_median_s'] * 1e6:.1f} µs | "
            f"{r['fastmlp_median_s'] * 1e6:.1f} µs | {r['speedup_vs_torch']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds per variant per case")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    meta = {
        "device": device.type,
        "device_name": device_name(device.type),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **git_info(),
    }
    results = run(device, args.budget, args.rounds)
    out = args.out or RESULTS_DIR / f"loss-{device_slug(device.type)}-{dt.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    out.with_suffix(".md").write_text(markdown(meta, results))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
