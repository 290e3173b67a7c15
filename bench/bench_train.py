"""Whole training steps and epochs, side by side: the seed loop in eager PyTorch,
torch.compile, FusedBCEClassifier, torch_fastmlp.TrainStep, and (when jax and
optax are installed) a jitted JAX/optax step.

Run from the repository root::

    python -m bench.bench_train                                # CPU, the default workloads
    python -m bench.bench_train --phases train --batch-sizes 64,2048
    python -m bench.bench_train --workloads 1000-100-10:mse-sgd,1000-100-10:ce-adam

A workload is ``widths[:loss-optimizer]``: loss ``bce`` (BCEWithLogitsLoss, the
default), ``mse`` (MSELoss(reduction="sum"), the study notes' sum of squares)
or ``ce`` (CrossEntropyLoss over class indices); optimizer ``adam`` (the
default, lr 1e-3) or ``sgd`` (lr 1e-6 for a sum, as the notes' two-layer net).

Phases:

* ``train``: one step with the optimizer (``zero_grad``, forward, loss,
  ``backward``, ``optimizer.step()``), each on the next of a fixed list of
  batches (the rows of a 12396-row data set).
* ``epoch``: one epoch over 12396 rows (the MNIST 3-vs-7 training set's size)
  in minibatches: the seed loop with its ``DataLoader(TensorDataset(...),
  shuffle=True)``, ``TrainStep.epoch``, and a JAX loop over a jitted step with
  the rows gathered through a permutation.

The ``first-layer-blas`` variant (train phase) is no training step: only the
first layer's two matrix products that every fp32 step computes, the forward
``x @ W0.T`` and the weight gradient ``g.T @ x``, through torch's BLAS on the
same batches: what a step that runs them with BLAS pays at least. The header
of the results also gives this machine's fp32 GEMM rate (a square SGEMM),
which bounds any step's time from below by its multiply-adds.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import itertools
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torch_fastmlp as fm
from bench.bench_mlp import cpu_model

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
EPOCH_ROWS = 12396
DEFAULT_WORKLOADS = "784-30-1,1000-100-10,1000-100-10:mse-sgd,1000-100-10:ce-adam"
LR = {"adam": 1e-3, "sgd": 1e-6}


def parse_workload(name: str) -> tuple[list[int], str, str]:
    """``"1000-100-10:mse-sgd"`` -> ([1000, 100, 10], "mse", "sgd")."""
    widths, _, rest = name.partition(":")
    loss, _, opt = (rest or "bce-adam").partition("-")
    if loss not in ("bce", "mse", "ce") or opt not in ("adam", "sgd"):
        raise ValueError(f"workload {name!r}: expected widths[:{{bce,mse,ce}}-{{adam,sgd}}]")
    return [int(d) for d in widths.split("-")], loss, opt


def make_model(dims: list[int], seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_data(rows: int, dims: list[int], device: str, loss: str = "bce") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(rows, dims[0], generator=g)
    if loss == "bce":
        y = torch.randint(0, 2, (rows, dims[-1]), generator=g).float()
    elif loss == "mse":
        y = torch.randn(rows, dims[-1], generator=g)
    else:
        y = torch.randint(0, dims[-1], (rows,), generator=g)
    return x.to(device), y.to(device)


def torch_loss(loss: str, fused: bool = False) -> nn.Module:
    lib = fm if fused else nn
    if loss == "bce":
        return lib.BCEWithLogitsLoss()
    if loss == "mse":
        return lib.MSELoss(reduction="sum")
    return lib.CrossEntropyLoss()


def torch_optimizer(opt: str, params, fused: bool = False) -> torch.optim.Optimizer:
    if opt == "adam":
        return torch.optim.Adam(params, lr=LR["adam"], fused=fused or None)
    return torch.optim.SGD(params, lr=LR["sgd"])


# --- variants: name -> (base model, x, y) -> one-iteration callable ---------------


def eager_step_fn(
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], opt: torch.optim.Optimizer
) -> Callable:
    """The seed loop's step: zero_grad, loss_of(x, y).backward(), opt.step()."""

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        opt.zero_grad()
        loss = loss_of(x, y)
        loss.backward()
        opt.step()
        return loss

    return step


def torch_variant(kind: str, base: nn.Sequential, loss: str = "bce", opt: str = "adam") -> Callable | None:
    """A step function (x, y) -> loss for one of the PyTorch variants, or None
    where the variant does not apply (FusedBCEClassifier is BCE only; fused Adam
    is Adam only)."""
    model = copy.deepcopy(base)
    loss_fn = torch_loss(loss)
    if kind == "eager":
        return eager_step_fn(lambda x, y: loss_fn(model(x), y), torch_optimizer(opt, model.parameters()))
    if kind == "eager-fused-adam":
        if opt != "adam":
            return None
        return eager_step_fn(lambda x, y: loss_fn(model(x), y), torch_optimizer(opt, model.parameters(), fused=True))
    if kind == "compile":
        return eager_step_fn(torch.compile(lambda x, y: loss_fn(model(x), y)), torch_optimizer(opt, model.parameters()))
    if kind == "fused-classifier":
        if loss != "bce" or opt != "adam":
            return None
        fused = fm.Sequential(*list(model))
        return eager_step_fn(fm.FusedBCEClassifier(fused), torch_optimizer(opt, fused.parameters(), fused=True))
    if kind == "trainstep":
        fused = fm.Sequential(*list(model))
        return fm.TrainStep(fused, torch_loss(loss, fused=True), torch_optimizer(opt, fused.parameters()))
    raise ValueError(kind)


def first_layer_gemms(base: nn.Sequential, batch: int, device: str) -> Callable[[torch.Tensor, Any], Any]:
    """The first layer's forward and weight-gradient products alone (the
    ``first-layer-blas`` variant), with a fixed output gradient of the batch's shape."""
    w = next(m for m in base if isinstance(m, nn.Linear)).weight.detach().to(device)
    g = torch.randn(batch, w.shape[0], generator=torch.Generator().manual_seed(0)).to(device)

    def run(x: torch.Tensor, _y: Any) -> Any:
        gb = g if x.shape[0] == batch else g[: x.shape[0]]
        return torch.mm(x, w.t()), torch.mm(gb.t(), x)

    return run


def jax_step(base: nn.Sequential, loss: str = "bce", opt: str = "adam") -> tuple[Callable, Callable] | None:
    """A jitted JAX/optax step from the same weights, and an epoch loop; None without jax."""
    try:
        import jax
        import jax.numpy as jnp
        import numpy as np
        import optax
    except ImportError:
        return None
    layers = [m for m in base if isinstance(m, nn.Linear)]
    params = [(jnp.asarray(m.weight.detach().numpy()), jnp.asarray(m.bias.detach().numpy())) for m in layers]

    def loss_fn(params, x, y):
        h = x
        for i, (w, b) in enumerate(params):
            h = h @ w.T + b
            if i < len(params) - 1:
                h = jax.nn.relu(h)
        if loss == "bce":
            return optax.sigmoid_binary_cross_entropy(h, y).mean()
        if loss == "mse":
            return jnp.sum((h - y) ** 2)
        return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()

    tx = optax.adam(LR["adam"]) if opt == "adam" else optax.sgd(LR["sgd"])
    state = {"params": params, "opt": tx.init(params)}

    @jax.jit
    def update(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def step(x, y):
        state["params"], state["opt"], loss = update(state["params"], state["opt"], x, y)
        loss.block_until_ready()
        return loss

    rng = np.random.default_rng(0)

    def epoch(x, y, batch_size):
        order = rng.permutation(x.shape[0])
        loss = None
        for b in range(0, x.shape[0], batch_size):
            idx = order[b : b + batch_size]
            state["params"], state["opt"], loss = update(state["params"], state["opt"], x[idx], y[idx])
        loss.block_until_ready()

    return step, epoch


# --- timing -------------------------------------------------------------------------


def timed(fn: Callable[[], Any], budget_s: float) -> float:
    """Seconds per call of fn, over about budget_s."""
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    n = max(1, int(budget_s / one))
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def run_rounds(fns: dict[str, Callable[[], Any]], rounds: int, budget_s: float) -> dict[str, list[float]]:
    for fn in fns.values():  # warm-up (compile, optimizer state, caches)
        for _ in range(3):
            fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            # Each timing starts with the collector's generations empty: a full
            # collection (100-200 ms with jax loaded), triggered by the DataLoader's
            # per-row objects, then falls on the loop whose objects trigger it
            # rather than on whichever variant runs when the count overflows
            # (the committed session-10 epoch at 2048 had FusedBCEClassifier's
            # loop at 0.25x eager by that alone; its steps were 1.2x faster).
            gc.collect()
            out[k].append(timed(fn, budget_s))
    return out


def cycling(batches: list[Any], step: Callable[[Any, Any], Any]) -> Callable[[], Any]:
    """One step per call on the next batch of ``batches`` (a fixed batch trained on
    for thousands of steps drives the gradients, and Adam's second moments, into
    float denormals, whose arithmetic is ~100x slower on x86: not a training workload)."""
    i = 0

    def run() -> Any:
        nonlocal i
        xb, yb = batches[i % len(batches)]
        i += 1
        return step(xb, yb)

    return run


def bench_train(
    dims: list[int], loss: str, opt: str, batch: int, device: str, rounds: int, budget: float, variants: list[str]
):
    base = make_model(dims).to(device)
    x, y = make_data(max(batch, EPOCH_ROWS), dims, device, loss)
    pool = [
        (x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]) for i in range(max(1, EPOCH_ROWS // batch))
    ]
    fns: dict[str, Callable[[], Any]] = {}
    for v in variants:
        if v == "jax":
            if device != "cpu":
                continue
            js = jax_step(base.cpu(), loss, opt)
            if js is None:
                continue
            import jax.numpy as jnp

            jpool = [(jnp.asarray(a.cpu().numpy()), jnp.asarray(b.cpu().numpy())) for a, b in pool]
            fns[v] = cycling(jpool, js[0])
        elif v == "first-layer-blas":
            fns[v] = cycling(pool, first_layer_gemms(base, batch, device))
        else:
            step = torch_variant(v, base, loss, opt)
            if step is not None:
                fns[v] = cycling(pool, step)
    if device == "cuda":
        fns = {k: _synced(f) for k, f in fns.items()}
    return run_rounds(fns, rounds, budget)


def _synced(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def bench_epoch(dims: list[int], loss: str, opt: str, batch: int, device: str, rounds: int, variants: list[str]):
    base = make_model(dims).to(device)
    x, y = make_data(EPOCH_ROWS, dims, device, loss)
    fns: dict[str, Callable[[], Any]] = {}
    for v in variants:
        if v == "jax":
            js = jax_step(base.cpu(), loss, opt) if device == "cpu" else None
            if js is None:
                continue
            # NumPy rows gathered per batch, as a NumPy data pipeline feeds a jitted step
            # (indexing a jax.Array with a NumPy index array costs more per batch).
            nx, ny = x.cpu().numpy(), y.cpu().numpy()
            fns[v] = lambda js=js, nx=nx, ny=ny: js[1](nx, ny, batch)
        elif v == "trainstep":
            ts = torch_variant("trainstep", base, loss, opt)
            gen = torch.Generator().manual_seed(0)
            fns[v] = lambda ts=ts, gen=gen: ts.epoch(x, y, batch, shuffle=True, generator=gen)
        elif v in ("eager", "fused-classifier", "eager-fused-adam"):
            step = torch_variant(v, base, loss, opt)
            if step is None:
                continue
            loader = DataLoader(TensorDataset(x, y), batch, shuffle=True, generator=torch.Generator().manual_seed(0))

            def run(step=step, loader=loader) -> None:
                for xb, yb in loader:
                    step(xb, yb)

            fns[v] = run
    if device == "cuda":
        fns = {k: _synced(f) for k, f in fns.items()}
    return run_rounds(fns, rounds, budget_s=0.0)


def _jax_version() -> str | None:
    try:
        import jax
    except ImportError:
        return None
    return jax.__version__


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bench_train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--workloads", default=DEFAULT_WORKLOADS)
    p.add_argument("--phases", default="train,epoch")
    p.add_argument("--batch-sizes", default="64,256,2048,12396")
    p.add_argument("--epoch-batch-sizes", default="64,256,2048")
    p.add_argument(
        "--variants", default="eager,eager-fused-adam,compile,fused-classifier,trainstep,jax,first-layer-blas"
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--budget", type=float, default=0.2, help="seconds per variant per round (train)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    rows: list[dict[str, Any]] = []
    for wl, phase in itertools.product(args.workloads.split(","), args.phases.split(",")):
        dims, loss, opt = parse_workload(wl)
        batches = args.batch_sizes if phase == "train" else args.epoch_batch_sizes
        for batch in (int(b) for b in batches.split(",")):
            vs = [v for v in variants if phase == "train" or v not in ("compile", "first-layer-blas")]
            if phase == "train":
                times = bench_train(dims, loss, opt, batch, args.device, args.rounds, args.budget, vs)
            else:
                times = bench_epoch(dims, loss, opt, batch, args.device, args.rounds, vs)
            eager = statistics.median(times["eager"])
            for v, ts in times.items():
                med = statistics.median(ts)
                rows.append({"workload": wl, "phase": phase, "batch": batch, "variant": v, "median_s": med,
                             "min_s": min(ts), "samples_s": ts, "speedup_vs_eager": eager / med})  # fmt: skip
                print(f"{wl:12s} {phase:6s} B={batch:<6d} {v:18s} median {med * 1e6:10.1f} us  "
                      f"min {min(ts) * 1e6:10.1f} us  eager/x {eager / med:5.2f}", flush=True)  # fmt: skip
    meta = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": args.device,
        "cpu": cpu_model(),
        "jax": _jax_version(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "commit": git_commit(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "sgemm_gflops": round(sgemm_gflops(args.device)),
        "command": "python -m bench.bench_train " + " ".join(argv or []),
    }
    out = args.out or RESULTS / f"train-{args.device}-{dt.datetime.now():%Y-%m-%d_%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    out.with_suffix(".md").write_text(markdown(meta, rows))
    print(f"wrote {out} and {out.with_suffix('.md')}")


def sgemm_gflops(device: str, n: int = 2048) -> float:
    """This machine's fp32 GEMM rate: the fastest of 5 square n x n products."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(6):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [f"# Training step / epoch benchmark ({meta['device']}, {meta['threads']} threads)", "",
             f"{meta['cpu']}, torch {meta['torch']}, jax {meta.get('jax')}, commit {meta['commit']}, {meta['date']}, "
             f"load {meta['load_avg_1m']}, fp32 SGEMM {meta.get('sgemm_gflops')} GFLOP/s.",
             "Median over rounds (min in brackets); speedup = eager median / variant median.", "",
             "| workload | phase | batch | variant | median | min | vs eager |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: |"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['workload']} | {r['phase']} | {r['batch']} | {r['variant']} | {_fmt(r['median_s'])} | "
                     f"{_fmt(r['min_s'])} | {r['speedup_vs_eager']:.2f}x |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _fmt(s: float) -> str:
    return f"{s * 1e6:.0f} µs" if s < 1e-3 else f"{s * 1e3:.2f} ms"


if __name__ == "__main__":
    main()
