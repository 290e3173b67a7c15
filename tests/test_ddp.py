"""A 2-process DistributedDataParallel run on CPU (gloo): the fused model's
all-reduced gradients equal the single-process full-batch gradients."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import torch_fastmlp

WORLD = 2
BATCH = 32
SIZES = [24, 16, 8, 1]
TIMEOUT_S = 60.0
EPOCH_BATCH = 4  # TrainStep.epoch's batches on each rank's shard

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(SIZES) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, SIZES[0], generator=gen)
    y = torch.randint(0, 2, (BATCH, 1), generator=gen).float()
    return x, y


@contextmanager
def process_group(rank: int, port: int) -> Iterator[None]:
    """This spawned worker's gloo process group (one thread), destroyed on the way out."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=30))
    try:
        yield
    finally:
        dist.destroy_process_group()


def _worker(rank: int, port: int, out_dir: str) -> None:
    with process_group(rank, port):
        model = torch_fastmlp.fuse(build_model())
        ddp = nn.parallel.DistributedDataParallel(model)
        x, y = make_data()
        shard = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        loss = torch_fastmlp.BCEWithLogitsLoss()(ddp(x[shard]), y[shard])
        loss.backward()
        grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        params = {k: p.detach().clone() for k, p in model.named_parameters()}
        torch.save({"grads": grads, "params": params, "type": type(model).__name__}, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()


def run_workers(worker: object, tmp_path: Path) -> list[dict]:
    """Runs ``worker(rank, port, out_dir)`` in WORLD spawned processes; returns what each saved."""
    ctx = mp.start_processes(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP workers did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_ddp_gradients_equal_full_batch(tmp_path: Path) -> None:
    results = run_workers(_worker, tmp_path)
    assert all(r["type"] == "Sequential" for r in results)

    # Single process, full batch, pure torch.nn.
    ref = build_model()
    x, y = make_data()
    nn.BCEWithLogitsLoss()(ref(x), y).backward()
    expected = {k: p.grad for k, p in ref.named_parameters()}
    torch.optim.SGD(ref.parameters(), lr=0.1).step()

    for r in results:
        assert list(r["grads"]) == list(expected)
        for k, g in expected.items():
            torch.testing.assert_close(r["grads"][k], g, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"grad {k}: {m}")
        for k, p in ref.named_parameters():
            torch.testing.assert_close(r["params"][k], p.detach(), rtol=1e-5, atol=1e-6)
    # Both ranks hold bitwise identical gradients after the all-reduce.
    for k in expected:
        assert torch.equal(results[0]["grads"][k], results[1]["grads"][k])


def _train_step_worker(rank: int, port: int, out_dir: str) -> None:
    """TrainStep on a DDP model: three Adam steps on this rank's shard."""
    with process_group(rank, port):
        model = torch_fastmlp.fuse(build_model())
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        step = torch_fastmlp.TrainStep(ddp, torch_fastmlp.BCEWithLogitsLoss(), opt, max_grad_norm=0.5)
        x, y = make_data()
        shard = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        losses = [float(step(x[shard], y[shard])) for _ in range(3)]
        plan = step._plan(x[shard], y[shard])
        assert plan is not None and not plan.fresh  # steps 2 and 3 ran the fused path
        step.epoch(x[shard], y[shard], EPOCH_BATCH, shuffle=False)  # every batch all-reduced too
        grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
        params = {k: p.detach().clone() for k, p in model.named_parameters()}
        torch.save({"grads": grads, "params": params, "losses": losses}, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()


def test_train_step_under_ddp_equals_ddp(tmp_path: Path) -> None:
    """TrainStep(DDP(model)) averages the gradients over the process group as DDP
    does: both ranks end with the parameters of full-batch training."""
    results = run_workers(_train_step_worker, tmp_path)
    ref = build_model()
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    x, y = make_data()
    shard = BATCH // WORLD
    batches = [torch.arange(BATCH)] * 3  # three full-batch steps, then the epoch's batches:
    for b in range(0, shard, EPOCH_BATCH):  # rows b.. of every rank's shard, averaged over ranks
        batches.append(torch.cat([torch.arange(r * shard + b, r * shard + b + EPOCH_BATCH) for r in range(WORLD)]))
    for rows in batches:  # the mean loss over the ranks' rows has the average of their gradients
        opt.zero_grad()
        nn.BCEWithLogitsLoss()(ref(x[rows]), y[rows]).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt.step()
    for r in results:
        for k, p in ref.named_parameters():
            torch.testing.assert_close(r["params"][k], p.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(r["grads"][k], p.grad, rtol=1e-5, atol=1e-6)
    for k in results[0]["params"]:
        assert torch.equal(results[0]["params"][k], results[1]["params"][k])
