"""The classic two-layer ReLU network, eager ``nn.Sequential`` vs ``torch_fastmlp``.

``N=64`` random inputs of ``D_in=1000`` features, ``H=100`` hidden units and
``D_out=10`` random targets, fitted with a sum-reduced MSE loss and plain SGD, as
in the classic PyTorch tutorial. Three runs of it:

* ``eager``: ``nn.Sequential`` + ``nn.MSELoss(reduction="sum")`` in the manual
  loop (forward, ``zero_grad``, ``backward``, ``step``);
* ``fastmlp``: the same loop over ``torch_fastmlp.Sequential`` +
  ``torch_fastmlp.MSELoss(reduction="sum")`` (the loss and its gradient in one pass);
* ``trainstep``: ``step = torch_fastmlp.TrainStep(model, loss_fn, optimizer)``,
  then ``step(x, y)`` per iteration: forward, loss, backward and the SGD
  update in one op.

All start from the same weights and train on the same data, one after the
other; the script prints the losses every ``--log-every`` iterations, the time
per iteration of each, and the largest parameter difference from eager at the end.

    python examples/two_layer_net.py [--iters 500] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch
from _data import (
    Stopwatch,
    build_mlp,
    clone_into,
    max_param_diff,
    resolve_device,
    run_main,
    train_step,
)
from torch import nn

import torch_fastmlp

N, D_IN, H, D_OUT = 64, 1000, 100, 10


@dataclass
class Result:
    """Logged ``(iteration, loss)`` pairs and seconds per iteration, per run;
    the largest parameter difference of the fused runs from eager."""

    losses: dict[str, list[tuple[int, float]]]
    sec_per_iter: dict[str, float]
    max_param_diff: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=500)
    p.add_argument("--lr", type=float, default=1e-4, help="SGD learning rate")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.iters < 1 or args.log_every < 1:
        p.error("--iters and --log-every must be >= 1")
    return args


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    args: argparse.Namespace,
    watch: Stopwatch,
    loss_fn: nn.Module,
    fused_step: bool = False,
) -> list[tuple[int, float]]:
    """Run ``args.iters`` SGD steps of ``loss_fn`` under ``watch`` (through
    ``TrainStep`` when ``fused_step``); returns the logged losses."""
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    step = torch_fastmlp.TrainStep(model, loss_fn, optimizer) if fused_step else None
    logged = []
    with watch():
        for it in range(1, args.iters + 1):
            # TrainStep: the whole step in one op
            loss = step(x, y) if step is not None else train_step(model, optimizer, loss_fn, x, y)
            if it % args.log_every == 0 or it == args.iters:
                logged.append((it, float(loss)))
    return logged


def run(args: argparse.Namespace) -> Result:
    """Train both models and print the comparison."""
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    x = torch.randn(N, D_IN, device=device)
    y = torch.randn(N, D_OUT, device=device)
    eager = build_mlp([D_IN, H, D_OUT]).to(device)
    models = {
        "eager": eager,
        "fastmlp": clone_into(eager, torch_fastmlp.Sequential),
        "trainstep": clone_into(eager, torch_fastmlp.Sequential),
    }
    loss_fns = {
        "eager": nn.MSELoss(reduction="sum"),
        "fastmlp": torch_fastmlp.MSELoss(reduction="sum"),
        "trainstep": torch_fastmlp.MSELoss(reduction="sum"),
    }
    losses, sec_per_iter = {}, {}
    for name, model in models.items():
        watch = Stopwatch(device)
        losses[name] = fit(model, x, y, args, watch, loss_fns[name], fused_step=name == "trainstep")
        sec_per_iter[name] = watch.seconds / args.iters
    print(f"{'iter':>6}  {'eager loss':>12}  {'fastmlp loss':>12}  {'trainstep loss':>14}")
    for (it, a), (_, b), (_, c) in zip(losses["eager"], losses["fastmlp"], losses["trainstep"], strict=True):
        print(f"{it:>6}  {a:>12.6g}  {b:>12.6g}  {c:>14.6g}")
    ms = {name: 1e3 * s for name, s in sec_per_iter.items()}
    print(
        f"time/iter: eager {ms['eager']:.3f} ms, fastmlp {ms['fastmlp']:.3f} ms "
        f"(speedup {ms['eager'] / ms['fastmlp']:.2f}x), trainstep {ms['trainstep']:.3f} ms "
        f"(speedup {ms['eager'] / ms['trainstep']:.2f}x)"
    )
    diffs = {name: max_param_diff(eager, models[name]) for name in ("fastmlp", "trainstep")}
    for name, diff in diffs.items():
        print(f"max |param diff| eager vs {name}: {diff:.3g}")
    return Result(losses, sec_per_iter, max(diffs.values()))


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 on success, 2 (one ``error:`` line on stderr) on bad input."""
    return run_main(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
