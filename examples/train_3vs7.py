"""MNIST 3-vs-7: train ``nn.Sequential`` and ``torch_fastmlp.Sequential`` side by side.

Both models start from the same weights and see the same minibatches in the
same order; each epoch prints both models' training loss, validation accuracy
and time, and the end prints the largest parameter difference between them.

    python examples/train_3vs7.py                       # sklearn's 8x8 digits
    python examples/train_3vs7.py --csv mnist_train.csv --epochs 5 --plot loss.png
    python examples/train_3vs7.py --epochs 1 --save ck.pt
    python examples/train_3vs7.py --epochs 2 --resume ck.pt   # == --epochs 2
    python examples/train_3vs7.py --train-step          # fastmlp steps with torch_fastmlp.TrainStep

``--csv`` takes the common MNIST CSV layout ``label,pixel0,...,pixel783``
(header optional, pixels 0-255); rows of digits other than 3 and 7 are skipped.
``--epochs`` is the total: a resumed run trains the epochs the checkpoint lacks.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _data import (
    ExampleError,
    Stopwatch,
    accuracy,
    build_mlp,
    clone_into,
    load_digits_pair,
    load_mnist_csv,
    make_loader,
    max_param_diff,
    progress,
    resolve_device,
    run_main,
    split,
    train_step,
)
from torch import nn

import torch_fastmlp

HIDDEN = 30
NEGATIVE, POSITIVE = 3, 7  # target 0.0 and 1.0


@dataclass
class Trainee:
    """One model with its optimizer, loss function, clock and loss history."""

    name: str
    model: nn.Sequential
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    watch: Stopwatch
    step_losses: list[float] = field(default_factory=list)
    fused_step: torch_fastmlp.TrainStep | None = None  # --train-step: the whole step as one op

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Train on one batch, timing it; returns the batch loss."""
        with self.watch():
            if self.fused_step is not None:
                loss = self.fused_step(x, y).item()
            else:
                loss = train_step(self.model, self.optimizer, self.loss_fn, x, y)
        self.step_losses.append(loss)
        return loss


@dataclass
class EpochStats:
    """Per-model results of one epoch, keyed by trainee name."""

    epoch: int
    loss: dict[str, float]
    val_acc: dict[str, float]
    seconds: dict[str, float]


@dataclass
class Result:
    """What a run returns: per-epoch history, final models and their difference."""

    history: list[EpochStats]
    models: dict[str, nn.Sequential]
    max_param_diff: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--csv", type=Path, help="MNIST-format CSV (default: sklearn digits)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument(
        "--batch-size",
        type=int,
        help="default 1024 with --csv, 32 for the ~290 training rows of the digits",
    )
    p.add_argument("--epochs", type=int, default=10, help="total epochs (default 10)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--save", type=Path, help="write a checkpoint here at the end")
    p.add_argument("--resume", type=Path, help="continue from this checkpoint")
    p.add_argument("--plot", type=Path, help="write both loss curves to this PNG")
    p.add_argument(
        "--train-step",
        action="store_true",
        help="train the fastmlp model with torch_fastmlp.TrainStep (forward, loss, backward, Adam in one op)",
    )
    args = p.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 1024 if args.csv else 32
    if args.batch_size < 1 or args.epochs < 0 or not 0 < args.val_fraction < 1:
        p.error("need --batch-size >= 1, --epochs >= 0 and 0 < --val-fraction < 1")
    return args


def load_data(csv: Path | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Load the 3-vs-7 data from ``csv`` or sklearn's digits; also returns its name."""
    if csv is None:
        x, y = load_digits_pair(NEGATIVE, POSITIVE)
        return x, y, "sklearn digits (8x8)"
    x, y = load_mnist_csv(csv, labels=(NEGATIVE, POSITIVE))
    return x, y, str(csv)


def make_trainees(n_in: int, args: argparse.Namespace) -> list[Trainee]:
    """Build the eager model and its torch_fastmlp twin with the same weights."""
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    eager = build_mlp([n_in, HIDDEN, 1]).to(device)
    fast = clone_into(eager, torch_fastmlp.Sequential)
    trainees = [
        Trainee(
            name,
            model,
            torch.optim.Adam(model.parameters(), lr=args.lr),
            loss_cls(),
            Stopwatch(device),
        )
        for name, model, loss_cls in (
            ("eager", eager, nn.BCEWithLogitsLoss),
            ("fastmlp", fast, torch_fastmlp.BCEWithLogitsLoss),
        )
    ]
    if args.train_step:
        t = trainees[1]
        t.fused_step = torch_fastmlp.TrainStep(t.model, t.loss_fn, t.optimizer)  # the one-line change
    return trainees


# ------------------------------------------------------------------ checkpoints


def save_checkpoint(path: Path, trainees: list[Trainee], epoch: int, gen: torch.Generator, seed: int) -> None:
    """Save the fast model (and, for the comparison, the eager one) after ``epoch``."""
    eager, fast = trainees
    torch.save(
        {
            "epoch": epoch,
            "model_state_dict": fast.model.state_dict(),
            "optimizer_state_dict": fast.optimizer.state_dict(),
            "generator_state": gen.get_state(),
            "seed": seed,
            "eager_model_state_dict": eager.model.state_dict(),
            "eager_optimizer_state_dict": eager.optimizer.state_dict(),
        },
        path,
    )


def load_checkpoint(path: Path, trainees: list[Trainee], gen: torch.Generator, seed: int) -> int:
    """Restore models, optimizers and shuffle state; returns the epochs done."""
    try:
        ckpt: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExampleError(f"{path}: cannot load checkpoint ({reason})") from None
    try:
        if ckpt["seed"] != seed:
            raise ExampleError(f"{path}: made with --seed {ckpt['seed']}, not {seed}")
        eager, fast = trainees
        fast.model.load_state_dict(ckpt["model_state_dict"])
        fast.optimizer.load_state_dict(ckpt["optimizer_state_dict"])
        eager.model.load_state_dict(ckpt["eager_model_state_dict"])
        eager.optimizer.load_state_dict(ckpt["eager_optimizer_state_dict"])
        gen.set_state(ckpt["generator_state"])
        return int(ckpt["epoch"])
    except (KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise ExampleError(f"{path}: checkpoint does not fit this run ({exc})") from None


# --------------------------------------------------------------------- training


def run_epoch(
    epoch: int,
    loader: torch.utils.data.DataLoader,
    trainees: list[Trainee],
    val: tuple[torch.Tensor, torch.Tensor],
) -> EpochStats:
    """Train every trainee on the same batches, then evaluate on ``val``."""
    device = trainees[0].watch.device
    totals = {t.name: 0.0 for t in trainees}
    for t in trainees:
        t.watch.seconds = 0.0
    for xb, yb in progress(loader, desc=f"epoch {epoch}"):
        x, y = xb.to(device), yb.to(device)
        for t in trainees:
            totals[t.name] += t.step(x, y) * len(x)
    n = len(loader.dataset)
    return EpochStats(
        epoch,
        {name: total / n for name, total in totals.items()},
        {t.name: accuracy(t.model, *val) for t in trainees},
        {t.name: t.watch.seconds for t in trainees},
    )


def format_epoch(stats: EpochStats, n_epochs: int) -> str:
    """One printed line per epoch."""
    parts = [
        f"{name}: loss {stats.loss[name]:.4f} val_acc {stats.val_acc[name]:.4f} {stats.seconds[name]:.3f}s"
        for name in stats.loss
    ]
    return f"epoch {stats.epoch}/{n_epochs}  " + " | ".join(parts)


def save_plot(path: Path, trainees: list[Trainee]) -> None:
    """Both per-step loss curves in one PNG (skipped with a warning without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("warning: matplotlib is not installed; --plot skipped", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for t, style in zip(trainees, ("-", "--"), strict=True):
        ax.plot(t.step_losses, style, label=t.name)
    ax.set(xlabel="step", ylabel="BCE loss", title="3 vs 7", yscale="log")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def train(args: argparse.Namespace) -> Result:
    """Run the whole workflow described in the module docstring."""
    x, y, source = load_data(args.csv)
    x_tr, y_tr, x_va, y_va = split(x, y, args.val_fraction, args.seed)
    print(f"data: {source}: {len(x_tr)} train / {len(x_va)} val rows, {x.shape[1]} features")
    trainees = make_trainees(x.shape[1], args)
    device = trainees[0].watch.device
    gen = torch.Generator().manual_seed(args.seed)
    done = load_checkpoint(args.resume, trainees, gen, args.seed) if args.resume else 0
    loader = make_loader(x_tr, y_tr, args.batch_size, gen)
    val = (x_va.to(device), y_va.to(device))
    history = []
    for epoch in range(done + 1, args.epochs + 1):
        history.append(run_epoch(epoch, loader, trainees, val))
        print(format_epoch(history[-1], args.epochs), flush=True)
    if args.save:
        save_checkpoint(args.save, trainees, max(done, args.epochs), gen, args.seed)
    diff = max_param_diff(trainees[0].model, trainees[1].model)
    print(f"max |param diff| eager vs fastmlp: {diff:.3g}")
    if args.plot:
        save_plot(args.plot, trainees)
    return Result(history, {t.name: t.model for t in trainees}, diff)


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 on success, 2 (one ``error:`` line on stderr) on bad input."""
    return run_main(lambda: train(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
