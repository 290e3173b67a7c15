"""The launches that ``bench/gpu_check.sh`` profiles with ncu: one
``FusedBCEClassifier`` step (``fused_step_kernel``), one ``Sequential`` forward
(``fused_forward_kernel``) and its backward (``gemm_kernel``), on ``784-30-1``.

    python -m bench.ncu_case --device cuda --batch 2048

(2048 rows: the fused kernels' regime; from 2854 rows of 784-30-1 the chain takes
the layer path, cuBLAS, by fused_chain_preferred.)

No warm-up: ncu replays each kernel it profiles, so the first launch is measured
like any other. On ``--device cpu`` it checks the same code path (the dry run).
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from torch import nn

import torch_fastmlp as fm


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ncu_case")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--dims", default="784-30-1")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dims = [int(d) for d in args.dims.split("-")]
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers += [nn.Linear(fan_in, fan_out)] + ([nn.ReLU()] if i < len(dims) - 2 else [])
    model = fm.Sequential(*layers).to(device)
    classifier = fm.FusedBCEClassifier(copy.deepcopy(model))
    x = torch.randn(args.batch, dims[0], device=device)
    y = torch.randint(0, 2, (args.batch, dims[-1]), device=device).float()

    classifier(x, y).backward()  # fused_step_kernel (+ its finish kernel)
    loss = fm.BCEWithLogitsLoss()(model(x), y)  # fused_forward_kernel (+ the BCE kernels)
    loss.backward()  # gemm_kernel x3: layer 2's weight and input gradients, layer 1's weight gradient
    if device.type == "cuda":
        torch.cuda.synchronize()
    grads = [p.grad for p in model.parameters()]
    ok = all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    print(f"ncu case {args.dims} batch {args.batch} on {device}: loss {float(loss):.4f}, grads finite: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
