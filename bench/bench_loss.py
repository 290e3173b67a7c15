"""The losses alone: torch_fastmlp's ``BCEWithLogitsLoss``, ``MSELoss`` and
``CrossEntropyLoss`` against torch.nn's, forward + backward, side by side on the
same logits and targets, over batch sizes 64 to 65536.

    python -m bench.bench_loss [--device cpu|cuda] [--losses bce,mse,ce,ce_ls_w]
                               [--out bench/results/loss-<device>.json]

Cases: ``bce`` ([B, 1] and [B, 10] logits, 0/1 targets), ``mse`` (the two-layer
net's head: [B, 10], ``reduction="sum"``), ``ce`` ([B, 10] logits, class
indices, mean), ``ce_ls_w`` (the same with class weights and
``label_smoothing=0.1``). Writes JSON and a markdown table next to it; the
timing helpers are bench.bench_mlp's (interleaved rounds, median and quartiles).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import torch_fastmlp
from bench.bench_mlp import RESULTS_DIR, device_name, device_slug, git_info, summarize, synchronize, time_fn

BATCHES = (64, 256, 1024, 2048, 12396, 65536)
LOSSES = ("bce", "mse", "ce", "ce_ls_w")
TITLES = {
    "bce": "BCEWithLogitsLoss()",
    "mse": 'MSELoss(reduction="sum")',
    "ce": "CrossEntropyLoss()",
    "ce_ls_w": "CrossEntropyLoss(weight, label_smoothing=0.1)",
}

Pair = dict[str, nn.Module]


def make_case(loss: str, batch: int, outputs: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, Pair]:
    """Logits (requiring grad), targets and the two loss modules of one case."""
    x = torch.randn(batch, outputs, device=device, requires_grad=True)
    if loss == "bce":
        y = torch.randint(0, 2, (batch, outputs), device=device).float()
        return x, y, {"torch": nn.BCEWithLogitsLoss(), "fastmlp": torch_fastmlp.BCEWithLogitsLoss()}
    if loss == "mse":
        y = torch.randn(batch, outputs, device=device)
        return x, y, {"torch": nn.MSELoss(reduction="sum"), "fastmlp": torch_fastmlp.MSELoss(reduction="sum")}
    y = torch.randint(0, outputs, (batch,), device=device)
    if loss == "ce":
        return x, y, {"torch": nn.CrossEntropyLoss(), "fastmlp": torch_fastmlp.CrossEntropyLoss()}
    w = torch.rand(outputs, device=device) + 0.5
    return (
        x,
        y,
        {
            "torch": nn.CrossEntropyLoss(w, label_smoothing=0.1),
            "fastmlp": torch_fastmlp.CrossEntropyLoss(w, label_smoothing=0.1),
        },
    )


def time_case(x: torch.Tensor, y: torch.Tensor, losses: Pair, device: torch.device, budget: float, rounds: int) -> dict:
    """Medians and quartiles of forward + backward for both modules, interleaved."""
    timer = time_fn(device)
    ref, got = losses["torch"](x, y), losses["fastmlp"](x, y)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    samples: dict[str, list[float]] = {name: [] for name in losses}
    for _ in range(rounds):  # interleaved, so drift hits both alike
        for name, fn in losses.items():
            synchronize(device)
            run: Callable[[], None] = lambda fn=fn: fn(x, y).backward()  # noqa: E731
            samples[name] += timer(run, budget / rounds)
    stats = {name: summarize(s) for name, s in samples.items()}
    return {
        "speedup_vs_torch": stats["torch"]["median_s"] / stats["fastmlp"]["median_s"],
        **{f"{name}_{k}": v for name, st in stats.items() for k, v in st.items()},
    }


def run(device: torch.device, budget: float, rounds: int, losses: tuple[str, ...] = LOSSES) -> list[dict]:
    """Every (loss, outputs, batch) case."""
    results = []
    for loss in losses:
        for outputs in (1, 10) if loss == "bce" else (10,):
            for batch in BATCHES:
                x, y, pair = make_case(loss, batch, outputs, device)
                r = {"loss": loss, "batch": batch, "outputs": outputs, **time_case(x, y, pair, device, budget, rounds)}
                print(
                    f"{loss:>8} [{batch},{outputs}] torch {r['torch_median_s'] * 1e6:.1f} µs  "
                    f"fastmlp {r['fastmlp_median_s'] * 1e6:.1f} µs  ({r['speedup_vs_torch']:.2f}x)",
                    flush=True,
                )
                results.append(r)
    return results


def markdown(meta: dict, results: list[dict]) -> str:
    lines = [
        "# The losses alone: forward + backward",
        "",
        f"- device: {meta['device']} ({meta['device_name']}), threads: {meta['threads']}",
        f"- torch {meta['torch']}, commit {meta['commit']}, {meta['date']}",
        f"- 1-minute load average {meta['loadavg_before']:.1f} before, {meta['loadavg_after']:.1f} after "
        f"({os.cpu_count()} CPUs): above the thread count, other work shares the cores",
        "- speedup = torch time / torch_fastmlp time (median of interleaved rounds; p25-p75 in brackets)",
        "",
        "| loss | shape | torch | torch_fastmlp | speedup |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in results:
        t, f = (
            f"{r[f'{n}_median_s'] * 1e6:.1f} µs [{r[f'{n}_p25_s'] * 1e6:.0f}-{r[f'{n}_p75_s'] * 1e6:.0f}]"
            for n in ("torch", "fastmlp")
        )
        lines.append(
            f"| {TITLES[r.get('loss', 'bce')]} | [{r['batch']}, {r['outputs']}] | {t} | {f} | "
            f"{r['speedup_vs_torch']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds per variant per case")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--losses", default=",".join(LOSSES), help=f"comma-separated subset of {','.join(LOSSES)}")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    losses = tuple(name.strip() for name in args.losses.split(",") if name.strip())
    unknown = [name for name in losses if name not in LOSSES]
    if unknown:
        parser.error(f"unknown losses {unknown}; choose from {', '.join(LOSSES)}")
    device = torch.device(args.device)
    meta = {
        "device": device.type,
        "device_name": device_name(device.type),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "losses": list(losses),
        "loadavg_before": os.getloadavg()[0],  # other work on the machine: the noise to expect
        **git_info(),
    }
    results = run(device, args.budget, args.rounds, losses)
    meta["loadavg_after"] = os.getloadavg()[0]
    out = args.out or RESULTS_DIR / f"loss-{device_slug(device.type)}-{dt.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    out.with_suffix(".md").write_text(markdown(meta, results))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
