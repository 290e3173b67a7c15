"""Transfer learning: an eager checkpoint, reused by ``torch_fastmlp.Sequential``.

1. Pretrain ``nn.Sequential(Linear(64, 30), ReLU, Linear(30, 1))`` on
   scikit-learn's 8x8 digits, 3 vs 7, and ``torch.save`` its state_dict.
2. Load that state_dict into a ``torch_fastmlp.Sequential`` of the same shape.
3. Freeze the first layer (``requires_grad_(False)``), replace the head with a
   new ``nn.Linear(30, 1)`` and fine-tune it on a new task: digits 1 vs 8.
4. Check that the frozen weights are bitwise unchanged, that no gradient was
   computed for them (``.grad is None``) and that the new head beats chance.

    python examples/transfer_learning.py [--checkpoint pretrained.pt] [--epochs 20]

Exit code 0 when all three checks hold, 1 when one fails.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from _data import (
    accuracy,
    build_mlp,
    load_digits_pair,
    make_loader,
    resolve_device,
    run_main,
    split,
    train_step,
)
from torch import nn

import torch_fastmlp

SIZES = [64, 30, 1]
PRETRAIN_TASK = (3, 7)  # (negative, positive) digits
FINETUNE_TASK = (1, 8)


@dataclass
class Result:
    """Accuracies and the three checks of one run."""

    pretrain_acc: float
    head_acc_before: float
    head_acc_after: float
    frozen_unchanged: bool
    frozen_grad_none: bool

    @property
    def passed(self) -> bool:
        """Whether every check holds ("above chance": > 0.6 on a balanced task)."""
        return self.frozen_unchanged and self.frozen_grad_none and self.head_acc_after > 0.6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="where to save the pretrained state_dict")
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def task_data(
    digits: tuple[int, int], args: argparse.Namespace, device: torch.device
) -> tuple[torch.utils.data.DataLoader, tuple[torch.Tensor, torch.Tensor]]:
    """A seeded training loader and the validation tensors for one digit pair."""
    x_tr, y_tr, x_va, y_va = split(*load_digits_pair(*digits), 0.25, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    return make_loader(x_tr, y_tr, args.batch_size, gen), (
        x_va.to(device),
        y_va.to(device),
    )


def fit(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: torch.utils.data.DataLoader,
    epochs: int,
) -> None:
    """Train ``model`` for ``epochs`` passes over ``loader``."""
    device = next(model.parameters()).device
    for _ in range(epochs):
        for xb, yb in loader:
            train_step(model, optimizer, loss_fn, xb.to(device), yb.to(device))


def pretrain(args: argparse.Namespace, device: torch.device, path: Path) -> float:
    """Train the eager model on the first task, save its state_dict; returns val accuracy."""
    loader, val = task_data(PRETRAIN_TASK, args, device)
    torch.manual_seed(args.seed)
    model = build_mlp(SIZES).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    fit(model, nn.BCEWithLogitsLoss(), optimizer, loader, args.pretrain_epochs)
    torch.save(model.state_dict(), path)
    return accuracy(model, *val)


def finetune(args: argparse.Namespace, device: torch.device, path: Path, pretrain_acc: float) -> Result:
    """Load the checkpoint into torch_fastmlp, freeze layer 0, train a new head."""
    model = build_mlp(SIZES, torch_fastmlp.Sequential).to(device)
    model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    model[0].requires_grad_(False)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    model[2] = nn.Linear(SIZES[1], SIZES[2]).to(device)
    loader, val = task_data(FINETUNE_TASK, args, device)
    before = accuracy(model, *val)
    # All parameters on purpose: Adam skips those whose .grad is None, so a
    # gradient leaking into the frozen layer would show up as changed weights.
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    fit(model, torch_fastmlp.BCEWithLogitsLoss(), optimizer, loader, args.epochs)
    params = list(model[0].parameters())
    return Result(
        pretrain_acc=pretrain_acc,
        head_acc_before=before,
        head_acc_after=accuracy(model, *val),
        frozen_unchanged=all(map(torch.equal, params, frozen)),
        frozen_grad_none=all(p.grad is None for p in params),
    )


def report(result: Result, path: Path) -> None:
    """Print what happened and the checks."""
    neg, pos = FINETUNE_TASK
    print(f"pretrained eager model, digits {PRETRAIN_TASK[0]} vs {PRETRAIN_TASK[1]}:")
    print(f"  val accuracy {result.pretrain_acc:.3f}; state_dict saved to {path}")
    print("loaded into torch_fastmlp.Sequential; layer 0 frozen; new head Linear(30, 1)")
    print(
        f"fine-tuned on digits {neg} vs {pos}: head val accuracy "
        f"{result.head_acc_before:.3f} -> {result.head_acc_after:.3f} (chance 0.5)"
    )
    print(f"frozen layer 0 bitwise unchanged: {result.frozen_unchanged}")
    print(f"frozen layer 0 .grad is None:     {result.frozen_grad_none}")
    print("all checks passed" if result.passed else "CHECK FAILED")


def run(args: argparse.Namespace) -> Result:
    """Pretrain, save, load into torch_fastmlp, fine-tune; prints and returns results."""
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or Path(tmp) / "pretrained.pt"
        result = finetune(args, device, path, pretrain(args, device, path))
        report(result, path)
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 if the checks pass, 1 if not, 2 (``error:`` line) on bad input."""
    return run_main(lambda: run(parse_args(argv)).passed)


if __name__ == "__main__":
    sys.exit(main())
