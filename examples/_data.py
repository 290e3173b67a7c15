"""Helpers shared by the torch_fastmlp examples.

Data loading (MNIST-format CSV, scikit-learn's 8x8 digits), train/validation
splitting, seeded minibatching, one training step, timing and model comparison.

The examples import this module as ``_data``: running ``python examples/X.py``
puts ``examples/`` on ``sys.path``; the tests insert it themselves.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

T = TypeVar("T")

MNIST_PIXELS = 28 * 28
"""Pixels per image in the MNIST CSV format (``label,pixel0,...,pixel783``)."""


class ExampleError(Exception):
    """A user-facing problem: printed as one ``error: ...`` line, exit code 2."""


class DataError(ExampleError, ValueError):
    """Malformed input data. The message names the file and, where known, the row."""


# --------------------------------------------------------------------------- CSV


def _parse_label(field: str, where: str) -> int:
    """Return the digit in ``field`` or raise DataError if it is not an integer 0-9."""
    text = field.strip()
    if not (text.isascii() and text.isdigit()) or int(text) > 9:
        raise DataError(f"{where}: label {text!r} is not a digit 0-9")
    return int(text)


def _parse_pixels(fields: Sequence[str], where: str) -> np.ndarray:
    """Parse pixel strings (0-255) into a float32 vector, or raise DataError."""
    try:
        pixels = np.array([float(f) for f in fields], dtype=np.float32)
    except ValueError:
        bad = next(i for i, f in enumerate(fields) if not _is_number(f))
        raise DataError(f"{where}: column {bad + 2}: {fields[bad].strip()!r} is not a number") from None
    out_of_range = ~((pixels >= 0) & (pixels <= 255))  # also catches nan
    if out_of_range.any():
        bad = int(np.argmax(out_of_range))
        raise DataError(f"{where}: column {bad + 2}: pixel {fields[bad].strip()} is outside 0-255")
    return pixels


def _is_number(text: str) -> bool:
    """Tell whether ``float(text)`` succeeds."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_lines(path: Path) -> list[str]:
    """Read the file's lines, turning I/O and decoding problems into DataError."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        row = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(f"{path} row {row}: not UTF-8 text") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None


def load_mnist_csv(
    path: str | Path,
    labels: tuple[int, int] = (3, 7),
    n_pixels: int = MNIST_PIXELS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a two-class subset of an MNIST-format CSV.

    Each row is ``label,pixel0,...,pixel{n_pixels-1}``; an optional header row
    is recognised by a non-numeric first field. Rows whose label is another
    digit 0-9 are skipped (their pixels are not parsed). Row numbers in errors
    are 1-based line numbers of the file; blank lines are ignored.

    Returns ``(x, y)``: ``x`` is float32 ``(N, n_pixels)`` scaled to [0, 1];
    ``y`` is float32 ``(N, 1)``, 1.0 for ``labels[1]`` and 0.0 for ``labels[0]``.

    Raises:
        DataError: wrong column count, a non-numeric or out-of-range value, a
            label that is not a digit 0-9, an empty file, or no rows of
            ``labels``.
    """
    path = Path(path)
    rows: list[np.ndarray] = []
    targets: list[float] = []
    n_data = 0
    for row, fields in _csv_rows(path, n_pixels + 1):
        n_data += 1
        where = f"{path} row {row}"
        label = _parse_label(fields[0], where)
        if label in labels:
            rows.append(_parse_pixels(fields[1:], where))
            targets.append(float(label == labels[1]))
    if n_data == 0:
        raise DataError(f"{path}: no data rows (the file is empty or only a header)")
    if not rows:
        raise DataError(f"{path}: none of its {n_data} rows has label {labels[0]} or {labels[1]}")
    x = torch.from_numpy(np.stack(rows)) / 255.0
    return x, torch.tensor(targets, dtype=torch.float32).unsqueeze(1)


def _csv_rows(path: Path, n_cols: int) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(row number, fields)`` of each data row, checking the column count.

    Blank lines are skipped; so is the first non-blank row when its first field
    is not a number (a header).
    """
    header_allowed = True
    for row, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        fields = line.split(",")
        if len(fields) != n_cols:
            raise DataError(f"{path} row {row}: expected {n_cols} columns, got {len(fields)}")
        is_header = header_allowed and not _is_number(fields[0])
        header_allowed = False
        if not is_header:
            yield row, fields


# ------------------------------------------------------------------ other data


def load_digits_pair(negative: int, positive: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits of two classes: ``x`` (N, 64) in [0, 1], ``y`` (N, 1).

    ``y`` is 1.0 for ``positive`` and 0.0 for ``negative``. Needs scikit-learn.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ExampleError(
            "scikit-learn is needed for the built-in digits data (pip install scikit-learn), or pass --csv"
        ) from None
    digits = load_digits()
    keep = np.isin(digits.target, (negative, positive))
    x = torch.tensor(digits.data[keep] / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target[keep] == positive, dtype=torch.float32).unsqueeze(1)
    return x, y


def split(
    x: torch.Tensor, y: torch.Tensor, val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded random split into ``(x_train, y_train, x_val, y_val)``."""
    n_val = max(1, round(len(x) * val_fraction)) if len(x) > 1 else 0
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    val, train = perm[:n_val], perm[n_val:]
    return x[train], y[train], x[val], y[val]


def make_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator) -> DataLoader:
    """Shuffled minibatches whose order depends only on ``generator``'s state.

    Saving ``generator.get_state()`` after an epoch and restoring it later
    reproduces the following epochs' batch order exactly.
    """
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=generator)


# -------------------------------------------------------------- models, steps


def build_mlp(sizes: Sequence[int], container: type[nn.Sequential] = nn.Sequential) -> nn.Sequential:
    """``Linear -> ReLU -> ... -> Linear`` with the given layer widths, in ``container``."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(n_in, n_out))
    return container(*layers)


def clone_into(model: nn.Sequential, container: type[nn.Sequential]) -> nn.Sequential:
    """Copy ``model`` into a new ``container`` of the same shape via its state_dict."""
    twin = build_mlp(mlp_sizes(model), container).to(next(model.parameters()).device)
    twin.load_state_dict(model.state_dict())
    return twin


def mlp_sizes(model: nn.Sequential) -> list[int]:
    """Layer widths of a ``build_mlp`` model: ``[in, hidden..., out]``."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    return [linears[0].in_features] + [m.out_features for m in linears]


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
) -> float:
    """One manual step: forward, loss, ``zero_grad``, ``backward``, ``step``. Returns the loss."""
    loss = loss_fn(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows whose logit sign (``> 0`` means class 1) matches ``y``."""
    if len(x) == 0:
        return float("nan")
    return ((model(x) > 0).float() == y).float().mean().item()


def max_param_diff(a: nn.Module, b: nn.Module) -> float:
    """Largest absolute difference between same-named entries of two state_dicts."""
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        raise ValueError(f"state_dict keys differ: {sorted(sa)} vs {sorted(sb)}")
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


# ------------------------------------------------------------- misc utilities


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``, or ExampleError when CUDA is asked for but absent."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ExampleError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


class Stopwatch:
    """Accumulates wall time of ``with watch():`` blocks, synchronising CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self) -> Iterator[None]:
        """Time the enclosed block and add it to ``seconds``."""
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds += time.perf_counter() - start


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm bar when tqdm is installed (and stderr is a TTY)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, disable=None, file=sys.stderr)


def run_main(body: Callable[[], object]) -> int:
    """Run ``body`` and turn its outcome into an exit code.

    Returns 0, or 1 when ``body`` returns ``False`` (a failed self-check), or 2
    after printing an ExampleError as one ``error: ...`` line on stderr.
    """
    try:
        outcome = body()
    except ExampleError as exc:
        print("error:", " ".join(str(exc).split("\n")), file=sys.stderr)
        return 2
    return 1 if outcome is False else 0
