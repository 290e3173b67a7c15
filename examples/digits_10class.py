"""Ten-class digits: ``nn.Sequential`` + ``nn.CrossEntropyLoss`` against
``torch_fastmlp.Sequential`` + ``torch_fastmlp.CrossEntropyLoss``, in the manual
loop and through ``torch_fastmlp.TrainStep``.

scikit-learn's 8x8 digits (all ten classes, 1797 images, no download), an MLP
``64 -> hidden -> hidden -> 10`` with a softmax cross-entropy head, trained with
Adam on shuffled minibatches. Three models start from the same weights and take
the same minibatches in the same order (one step of each per batch): ``eager``
and ``fastmlp`` in the manual loop (forward, ``zero_grad``, ``backward``,
``step``), ``trainstep`` as one ``TrainStep`` call per batch (forward, loss,
backward and the Adam update in one op). Every epoch prints the models'
training loss, validation accuracy and time, and the end prints the largest
parameter difference from eager.

    python examples/digits_10class.py [--epochs 20] [--batch-size 64] [--label-smoothing 0.1]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch
from _data import (
    ExampleError,
    Stopwatch,
    build_mlp,
    clone_into,
    make_loader,
    max_param_diff,
    resolve_device,
    run_main,
    split,
    train_step,
)
from torch import nn

import torch_fastmlp

CLASSES = 10


@dataclass
class Result:
    """Per-epoch training loss, validation accuracy and seconds, per model; the
    largest parameter difference of the fused models from eager."""

    loss: dict[str, list[float]]
    val_acc: dict[str, list[float]]
    seconds: dict[str, list[float]]
    max_param_diff: float
    models: dict[str, nn.Module]


def load_digits_all() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits: ``x`` (N, 64) in [0, 1], ``y`` (N,) class indices 0-9."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ExampleError("scikit-learn is needed for the digits data (pip install scikit-learn)") from None
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.int64)
    return x, y


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.hidden < 1:
        p.error("--epochs, --batch-size and --hidden must be >= 1")
    if not 0.0 <= args.label_smoothing <= 1.0:
        p.error("--label-smoothing must be in [0, 1]")
    return args


@torch.no_grad()
def class_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows whose largest logit is the label."""
    if len(x) == 0:
        return float("nan")
    return (model(x).argmax(1) == y).float().mean().item()


def run(args: argparse.Namespace) -> Result:
    """Train both models side by side and print the comparison."""
    device = resolve_device(args.device)
    x, y = load_digits_all()
    x_train, y_train, x_val, y_val = split(x, y, args.val_fraction, args.seed)
    x_train, y_train, x_val, y_val = (t.to(device) for t in (x_train, y_train, x_val, y_val))
    torch.manual_seed(args.seed)
    eager = build_mlp([x.shape[1], args.hidden, args.hidden, CLASSES]).to(device)
    models = {
        "eager": eager,
        "fastmlp": clone_into(eager, torch_fastmlp.Sequential),
        "trainstep": clone_into(eager, torch_fastmlp.Sequential),
    }
    loss_fns = {
        "eager": nn.CrossEntropyLoss(label_smoothing=args.label_smoothing),
        "fastmlp": torch_fastmlp.CrossEntropyLoss(label_smoothing=args.label_smoothing),
        "trainstep": torch_fastmlp.CrossEntropyLoss(label_smoothing=args.label_smoothing),
    }
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=args.lr) for name, m in models.items()}
    fused_step = torch_fastmlp.TrainStep(models["trainstep"], loss_fns["trainstep"], optimizers["trainstep"])
    loader = make_loader(x_train, y_train, args.batch_size, torch.Generator().manual_seed(args.seed))
    result = Result({n: [] for n in models}, {n: [] for n in models}, {n: [] for n in models}, 0.0, models)
    print(
        f"{'epoch':>5}  {'eager loss':>10}  {'fused loss':>10}  {'eager acc':>9}  {'fused acc':>9}  "
        f"{'eager ms':>8}  {'fused ms':>8}  {'step ms':>8}"
    )
    for epoch in range(1, args.epochs + 1):
        watches = {name: Stopwatch(device) for name in models}
        totals = {name: torch.zeros((), device=device) for name in models}
        batches = 0
        for xb, yb in loader:  # the same batch for every model
            for name, model in models.items():
                with watches[name]():
                    if name == "trainstep":
                        totals[name] += fused_step(xb, yb)  # one op; no host sync per batch
                    else:
                        totals[name] += train_step(model, optimizers[name], loss_fns[name], xb, yb)
            batches += 1
        totals = {name: float(total) for name, total in totals.items()}
        for name, model in models.items():
            result.loss[name].append(totals[name] / max(batches, 1))
            result.val_acc[name].append(class_accuracy(model, x_val, y_val))
            result.seconds[name].append(watches[name].seconds)
        print(
            f"{epoch:>5}  {result.loss['eager'][-1]:>10.4f}  {result.loss['fastmlp'][-1]:>10.4f}  "
            f"{result.val_acc['eager'][-1]:>9.3f}  {result.val_acc['fastmlp'][-1]:>9.3f}  "
            f"{1e3 * result.seconds['eager'][-1]:>8.1f}  {1e3 * result.seconds['fastmlp'][-1]:>8.1f}  "
            f"{1e3 * result.seconds['trainstep'][-1]:>8.1f}"
        )
    eager_s, fused_s, step_s = (sum(result.seconds[name]) for name in models)
    print(
        f"time/epoch: eager {1e3 * eager_s / args.epochs:.1f} ms, fastmlp {1e3 * fused_s / args.epochs:.1f} ms "
        f"(speedup {eager_s / fused_s:.2f}x), trainstep {1e3 * step_s / args.epochs:.1f} ms "
        f"(speedup {eager_s / step_s:.2f}x)"
    )
    diffs = {name: max_param_diff(eager, models[name]) for name in ("fastmlp", "trainstep")}
    for name, diff in diffs.items():
        print(f"max |param diff| eager vs {name}: {diff:.3g}")
    result.max_param_diff = max(diffs.values())
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 on success, 2 (one ``error:`` line on stderr) on bad input."""
    return run_main(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
