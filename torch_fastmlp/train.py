"""The training step as one op: :class:`TrainStep`.

``TrainStep(model, loss_fn, optimizer)(input, target)`` does what::

    optimizer.zero_grad()
    loss = loss_fn(model(input), target)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)  # when given
    optimizer.step()

does, as one call of ``fastmlp::mlp_train_step``: forward, loss, every
gradient, clipping and the optimizer's update, with no autograd graph and no
Python between the phases. The optimizer's state stays in ``optimizer.state``
in torch's own tensors, so ``state_dict()``, checkpoints, LR schedulers and
switching to the eager loop at any step keep working. Whatever the fused op
does not serve runs the eager lines above (same results, torch's errors).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable
from operator import attrgetter
from typing import Any

import torch
import torch.optim.optimizer as _optim_module
from torch import nn

from . import _C
from ._ops import WITH_CUDA, ops
from .fused_loss import _BCE, _CROSS_ENTROPY, _is_number, step_loss_args, step_loss_kind
from .modules import _Chain, _chain_fusable, _has_hooks, _nn_module, _whole_chain

__all__ = ["TrainStep"]

_SGD, _ADAM = 0, 1
_requires_grad = attrgetter("requires_grad")
_tensor_hooks = attrgetter("_backward_hooks")
_post_accumulate_hooks = attrgetter("_post_accumulate_grad_hooks")
_values_of = itertools.chain.from_iterable
_MISSING = object()  # "no such key" in a StepRunner's probes
_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = (
    (_nn_module, ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                  "_global_backward_pre_hooks")),
    (_optim_module, ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks")),
)  # fmt: skip
# The group options _sgd_hyper / _adam_hyper and _step_count_ok read, lr aside.
_GROUP_KEYS = {
    _SGD: ("momentum", "dampening", "weight_decay", "nesterov", "maximize", "differentiable", "capturable"),
    _ADAM: ("betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay", "differentiable",
            "capturable"),
}  # fmt: skip
_OWNER_ATTRS = frozenset(("model", "loss_fn", "optimizer", "max_grad_norm"))
_RUNNER_MISSES = 8  # StepRunners dropped right after they were made, before TrainStep stops making them
_CUDA_MAX_PARAMS = 24  # parameters one launch of the CUDA update takes (kOptimMaxSlots in cuda/optim.cuh)
_HYPER_STRIDE = 8  # the op's hyper-parameters per trainable parameter, lr first (kHyperStride in common/optim_math.h)


def _sgd_hyper(group: dict[str, Any]) -> tuple[float, ...] | None:
    """The 8 values per parameter the op takes for SGD, or None when the fused
    update does not implement this group's options."""
    lr, momentum, dampening, wd = group["lr"], group["momentum"], group["dampening"], group["weight_decay"]
    if group.get("differentiable") or not all(_is_number(v) for v in (lr, momentum, dampening, wd)):
        return None
    return (float(lr), float(momentum), float(dampening), float(wd), float(bool(group["nesterov"])),
            float(bool(group["maximize"])), 0.0, 0.0)  # fmt: skip


def _adam_hyper(group: dict[str, Any]) -> tuple[float, ...] | None:
    """The 8 values per parameter the op takes for Adam / AdamW, or None."""
    lr, betas, eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if group.get("differentiable"):
        return None
    if not (_is_number(lr) and _is_number(eps) and _is_number(wd) and len(betas) == 2):
        return None
    if not (_is_number(betas[0]) and _is_number(betas[1])):
        return None
    return (float(lr), float(betas[0]), float(betas[1]), float(eps), float(wd), float(bool(group["amsgrad"])),
            float(bool(group["maximize"])), float(bool(group.get("decoupled_weight_decay", False))))  # fmt: skip


def _immutable(value: object) -> bool:
    """A value that cannot change while it stays the same object (what a
    StepRunner may compare by identity): None, a bool, number or string, or a
    tuple of them."""
    if type(value) is tuple:
        return all(_immutable(v) for v in value)
    return value is None or type(value) in (bool, int, float, str)


def _optimizer_kind(optimizer: torch.optim.Optimizer) -> int | None:
    kind = type(optimizer)
    if kind is torch.optim.SGD:
        return _SGD
    if kind is torch.optim.Adam or kind is torch.optim.AdamW:
        return _ADAM
    return None


def _optimizer_hooked(optimizer: torch.optim.Optimizer) -> bool:
    """Step hooks (the optimizer's or global ones), or a ``step`` replaced on the
    instance by anything but an LR scheduler's call counter, must run as they are."""
    if optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks:
        return True
    if _optim_module._global_optimizer_pre_hooks or _optim_module._global_optimizer_post_hooks:
        return True
    step = optimizer.__dict__.get("step")
    return step is not None and not getattr(step, "_wrapped_by_lr_sched", False)


class _Plan:
    """What one fused step needs, read from the model, loss and optimizer."""

    __slots__ = (
        "chain", "weights", "biases", "weight_mask", "bias_mask", "trainable", "state", "hyper", "kind", "fresh",
        "loss", "dtype", "device", "weight_ids", "bias_ids", "frozen", "groups", "group_keys", "hyper_of_group",
        "group_of_trainable", "opt_state", "state_key_ids", "state_value_ids", "check_capture", "trainable_weights",
        "trainable_biases", "others",
    )  # fmt: skip

    def __init__(self) -> None:
        self.chain: _Chain
        self.weights: list[torch.Tensor] = []
        self.biases: list[torch.Tensor | None] = []
        self.weight_mask: list[bool] = []
        self.bias_mask: list[bool] = []
        self.trainable: list[torch.Tensor] = []
        self.trainable_weights: list[tuple[int, torch.Tensor]] = []  # (layer, weight) where weight_mask is on
        self.trainable_biases: list[tuple[int, torch.Tensor]] = []
        self.others: list[torch.Tensor] = []  # the optimizer's parameters the step gives no gradient
        self.state: list[torch.Tensor] = []
        self.hyper: list[float] = []
        self.kind = _SGD
        self.fresh = False  # some optimizer state is not made yet: the eager step makes it
        self.loss = _BCE
        # What the plan was read from, to tell whether it still holds for the next step
        # (_Plan.holds): the objects by identity (the plan keeps them alive, so their
        # ids are not reused), the values that can change between steps by value.
        self.dtype: torch.dtype
        self.device: torch.device
        self.weight_ids: list[int] = []
        self.bias_ids: list[int] = []  # id(None) for a layer without bias
        self.frozen: list[torch.Tensor] = []  # the chain's parameters with requires_grad=False
        self.groups: list[dict[str, Any]] = []  # optimizer.param_groups, the list itself
        self.group_keys: list[tuple[dict[str, Any], list[int], object]] = []  # group, ids of its params, capturable
        self.hyper_of_group: list[tuple[float, ...] | None] = []
        self.group_of_trainable: list[int] = []
        self.opt_state: dict[torch.Tensor, Any] = {}  # optimizer.state, the dict itself
        self.state_key_ids: list[int] = []  # its keys (parameters), in order
        self.state_value_ids: list[int] = []  # the values of every parameter's state dict, in order
        self.check_capture = False  # a CPU step count on CUDA: refused while a graph is captured

    def holds(
        self,
        chain: _Chain,
        kind: int,
        loss: int,
        weights: list[torch.Tensor],
        biases: list[torch.Tensor | None],
        input: torch.Tensor,
        optimizer: torch.optim.Optimizer,
    ) -> bool:
        """Whether this plan, made for an earlier step, is the one _plan_params
        would make now: the same parameters (identity, requires_grad, contiguous,
        no tensor hooks),
        optimizer groups (the same dicts, members and options) and state (the same
        dicts and tensors). A changed learning rate (an LR scheduler) is taken
        over in place; any other change makes a new plan."""
        if chain is not self.chain or kind != self.kind or loss != self.loss:
            return False
        if input.dtype is not self.dtype or input.device != self.device:
            return False
        if list(map(id, weights)) != self.weight_ids or list(map(id, biases)) != self.bias_ids:
            return False
        # requires_grad as planned: every trainable parameter still, no frozen one (not None) now.
        if not all(map(_requires_grad, self.trainable)) or any(map(_requires_grad, self.frozen)):
            return False
        if not all(map(torch.Tensor.is_contiguous, self.trainable)):
            return False
        if any(map(_tensor_hooks, self.trainable)) or any(map(_post_accumulate_hooks, self.trainable)):
            return False  # tensor hooks fire in the autograd engine: the eager lines
        groups = optimizer.param_groups
        state = optimizer.state
        if groups is not self.groups or len(groups) != len(self.group_keys) or state is not self.opt_state:
            return False
        adam = kind == _ADAM
        for index, (group, (known, ids, capturable)) in enumerate(zip(groups, self.group_keys, strict=True)):
            if group is not known or group.get("capturable") is not capturable or list(map(id, group["params"])) != ids:
                return False
            old = self.hyper_of_group[index]
            if old is None:
                continue  # none of the chain's parameters is in this group
            hyper = _adam_hyper(group) if adam else _sgd_hyper(group)
            if hyper != old:
                if hyper is None or hyper[1:] != old[1:]:
                    return False
                self._set_lr(index, hyper)
        # The state: the same parameters, per-parameter dicts and tensors in them (a
        # load_state_dict replaces optimizer.state itself; a reset replaces or clears
        # a parameter's dict). Over the whole state at C speed, not per parameter.
        if list(map(id, state)) != self.state_key_ids:
            return False
        try:
            if list(map(id, _values_of(map(dict.values, state.values())))) != self.state_value_ids:
                return False
        except TypeError:  # a state entry that is not a dict: whatever it is, not what was planned
            return False
        return not (self.check_capture and torch.cuda.is_current_stream_capturing())

    def lr_slots(self, index: int) -> list[int]:
        """Where group ``index``'s ``lr`` stands in ``hyper`` (once per trainable parameter of it)."""
        return [_HYPER_STRIDE * k for k, group in enumerate(self.group_of_trainable) if group == index]

    def _set_lr(self, index: int, hyper: tuple[float, ...]) -> None:
        """Group ``index``'s new hyper-parameters, which differ in ``lr`` alone."""
        self.hyper_of_group[index] = hyper
        for slot in self.lr_slots(index):
            self.hyper[slot] = hyper[0]


class _Progress:
    """An epoch's ``callback(batches_done, losses)``: called after every ``every``
    batches and after the last one, with the losses since its previous call."""

    __slots__ = ("callback", "every", "done", "pending")

    def __init__(self, callback: Callable[[int, torch.Tensor], object] | None, every: int) -> None:
        self.callback = callback
        self.every = every
        self.done = 0
        self.pending: list[torch.Tensor] = []

    def until_next(self) -> int:
        """Batches to run before the next call (no limit without a callback)."""
        return self.every - self.done % self.every if self.callback is not None else sys.maxsize

    def add(self, losses: torch.Tensor) -> torch.Tensor:
        """Counts consecutive batches' losses (1-D); calls back at a multiple of ``every``."""
        if self.callback is not None and losses.numel() > 0:
            self.pending.append(losses)
            self.done += losses.numel()
            if self.done % self.every == 0:
                self._call()
        return losses

    def finish(self, result: torch.Tensor) -> torch.Tensor:
        """The last call, for the batches since the previous one; returns ``result``."""
        if self.callback is not None and self.pending:
            self._call()
        return result

    def _call(self) -> None:
        pending, self.pending = self.pending, []
        self.callback(self.done, torch.cat(pending) if len(pending) > 1 else pending[0])  # type: ignore[misc]


class TrainStep:
    """One training step (``zero_grad``, forward, loss, backward, optional
    gradient clipping, ``optimizer.step()``) as one fused op.

    Args:
        model: an ``nn.Sequential`` / :class:`torch_fastmlp.Sequential` /
            :class:`torch_fastmlp.MLP` that is one Linear(+ReLU) chain, or a
            ``DistributedDataParallel`` around one (gradients are averaged over
            its process group with one all-reduce, as DDP does).
        loss_fn: ``nn.BCEWithLogitsLoss`` / :class:`torch_fastmlp.BCEWithLogitsLoss`
            (``weight``, ``pos_weight``), ``nn.MSELoss`` / :class:`torch_fastmlp.MSELoss`,
            or ``nn.CrossEntropyLoss`` / :class:`torch_fastmlp.CrossEntropyLoss`
            (``weight``, ``ignore_index``, ``label_smoothing``; class index or
            probability targets), with reduction ``"mean"`` or ``"sum"``.
        optimizer: ``torch.optim.SGD`` (momentum, dampening, nesterov,
            weight_decay, maximize), ``Adam`` or ``AdamW`` (betas, eps,
            weight_decay, amsgrad, maximize), any number of parameter groups.
        max_grad_norm: clip the gradients' total 2-norm to this before the
            update, as ``torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)``.

    Anything else (other modules, losses or optimizers, options the fused
    update does not implement, hooks, ``capturable``/``differentiable``
    optimizers, tensors the kernels do not take) runs the eager lines, with
    the same results and torch's errors. The first step of a fresh optimizer
    also runs them, so its state is created by torch itself.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        max_grad_norm: float | None = None,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self._empties: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        self._last_plan: _Plan | None = None  # the previous step's, reused while it holds
        self._runner: Any = None  # _C.StepRunner of the last plan
        self._runner_misses = 0  # runners dropped before they served two steps

    def __getstate__(self) -> dict[str, Any]:
        """Pickled and copied without the plan of the last step (it is derived, and
        compared by the identity of objects a copy does not share)."""
        state = self.__dict__.copy()
        state["_last_plan"] = None
        state["_empties"] = {}
        state["_runner"] = None
        return state

    def __repr__(self) -> str:
        clip = "" if self.max_grad_norm is None else f", max_grad_norm={self.max_grad_norm}"
        return f"TrainStep(model={type(self.model).__name__}, loss_fn={self.loss_fn!r}, " \
            f"optimizer={type(self.optimizer).__name__}{clip})"  # fmt: skip

    # --- one step -------------------------------------------------------------

    def __call__(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Run one step on ``(input, target)``; returns the loss (detached, 0-dim)."""
        runner = self._runner
        if runner is not None:
            # The last plan, re-checked and run in C++ (csrc/step_runner.cpp); None where it does not hold.
            try:
                loss = runner(input, target, self.__dict__)
            except BaseException:
                self._failed()
                raise
            if loss is not None:
                return loss
            self._drop_runner()
        return self._planned_step(input, target)

    step = __call__

    def _planned_step(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The step as planned in Python (the first of a plan, DDP, whatever a StepRunner does not take)."""
        plan = self._plan(input, target)
        if plan is None or plan.fresh:
            return self.eager_step(input, target)
        x = input if input.dim() == 2 else input.reshape(-1, input.shape[-1])
        y = target if target.dim() == 2 or plan.loss == _CROSS_ENTROPY else target.reshape(x.shape[0], -1)
        loss_args = self._loss_args(plan.loss, target.shape)
        self._clear_other_grads(plan)
        ddp = self._ddp()
        try:
            if ddp is None:
                # Not differentiable: the op runs below autograd whatever the grad mode (no no_grad() needed).
                loss, grad_w, grad_b = ops.mlp_train_step(
                    x, y, plan.weights, plan.biases, plan.chain.last_relu, *loss_args,
                    plan.weight_mask, plan.bias_mask, plan.state, plan.kind, plan.hyper, self.max_grad_norm,
                )  # fmt: skip
                self._set_grads(plan, grad_w, grad_b)
                if self._runner is None and self._runner_misses < _RUNNER_MISSES and x is input and y is target:
                    self._runner = self._make_runner(plan, input, target, loss_args)
            else:
                with torch.no_grad():
                    loss, _, grad_w, grad_b = ops.mlp_loss_step(
                        x, y, plan.weights, plan.biases, plan.chain.last_relu, *loss_args, False,
                        plan.weight_mask, plan.bias_mask,
                    )  # fmt: skip
                self._set_grads(plan, *self._all_reduce(ddp, grad_w, grad_b, plan))
                grads = [p.grad for p in plan.trainable]
                ops.optimizer_step(plan.trainable, grads, plan.state, plan.kind, plan.hyper, self.max_grad_norm)
        except BaseException:
            self._failed()
            raise
        self._mark_stepped()
        return loss

    def eager_step(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The step as the eager lines run it (what the fused op must equal)."""
        self.optimizer.zero_grad()
        loss = self.loss_fn(self.model(input), target)
        loss.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        return loss.detach()

    # --- one epoch ------------------------------------------------------------

    def epoch(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        callback: Callable[[int, torch.Tensor], object] | None = None,
        callback_every: int = 100,
    ) -> torch.Tensor:
        """One epoch: what ``for xb, yb in DataLoader(TensorDataset(inputs, targets),
        batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last):
        self(xb, yb)`` does (the same batches in the same order, the same random
        draws from ``generator`` or the global generator), with the batch loop in
        C++. Returns the per-batch losses as a 1-D tensor.

        ``callback(batches_done, losses)``, when given, is called after every
        ``callback_every`` batches and after the last one, with the number of
        batches done so far and the losses of the batches since its previous call
        (e.g. ``bar.update(len(losses))`` for a tqdm bar): the C++ loop runs in
        chunks of ``callback_every`` batches between the calls, with the same
        results as one call."""
        if callback is not None and not (type(callback_every) is int and callback_every > 0):
            raise ValueError(f"callback_every should be a positive integer, got {callback_every!r}")
        progress = _Progress(callback, callback_every)
        self._runner = None  # the epoch plans in Python; a runner kept would hold what it may replace
        plan = None
        if (
            type(batch_size) is int
            and batch_size > 0
            and isinstance(inputs, torch.Tensor)
            and isinstance(targets, torch.Tensor)
            and inputs.dim() == 2
            and 1 <= targets.dim() <= 2
            and 0 < inputs.shape[0] == targets.shape[0]
        ):
            plan = self._plan(inputs, targets)
        if plan is None:
            return self._dataloader_epoch(inputs, targets, batch_size, shuffle, generator, drop_last, progress)
        order = self._draw_order(inputs.shape[0], shuffle, generator)
        losses = []
        if plan.fresh:
            # A fresh optimizer: its state is torch's own, made by its first step.
            first = order[:batch_size] if order is not None else torch.arange(min(batch_size, inputs.shape[0]))
            if drop_last and first.numel() < batch_size:
                return progress.finish(inputs.new_empty((0,)))
            losses.append(progress.add(self(inputs[first], targets[first]).reshape(1)))
            order = (order if order is not None else torch.arange(inputs.shape[0]))[batch_size:]
            if order.numel() == 0 or (drop_last and order.numel() < batch_size):
                return progress.finish(torch.cat(losses))
            plan = self._plan(inputs, targets)
            if plan is None or plan.fresh:  # the first step did not make every state: step by step
                return self._steps(inputs, targets, order, batch_size, drop_last, losses, progress)
        if self._ddp() is not None:  # every step's gradients are all-reduced: one op call per batch
            order = order if order is not None else torch.arange(inputs.shape[0])
            return self._steps(inputs, targets, order, batch_size, drop_last, losses, progress)
        loss_args = self._loss_args(plan.loss, targets.shape)
        self._clear_other_grads(plan)
        if order is not None and order.device != inputs.device:
            order = order.to(inputs.device)
        rows = order.numel() if order is not None else inputs.shape[0]
        batches = rows // batch_size if drop_last else -(-rows // batch_size)
        done = 0
        grads = None
        while done < batches:
            n = min(batches - done, progress.until_next())
            r0, r1 = done * batch_size, min(rows, (done + n) * batch_size)
            if order is not None:
                x, y, chunk_order = inputs, targets, order[r0:r1]
            else:
                x, y, chunk_order = inputs[r0:r1], targets[r0:r1], None
            try:
                chunk_losses, grad_w, grad_b = ops.mlp_train_epoch(
                    x, y, chunk_order, batch_size, drop_last, plan.weights, plan.biases, plan.chain.last_relu,
                    *loss_args, plan.weight_mask, plan.bias_mask, plan.state, plan.kind, plan.hyper,
                    self.max_grad_norm,
                )  # fmt: skip
            except BaseException:
                self._failed()
                raise
            grads = grad_w, grad_b
            losses.append(progress.add(chunk_losses))
            done += n
        if grads is not None:
            self._set_grads(plan, *grads)
            self._mark_stepped()
        if not losses:
            return progress.finish(inputs.new_empty((0,)))
        return progress.finish(torch.cat(losses) if len(losses) > 1 else losses[0])

    def _steps(self, inputs, targets, order, batch_size, drop_last, losses, progress) -> torch.Tensor:
        """The rest of an epoch as one step call per batch of ``order``, after ``losses``."""
        for b in range(0, order.numel(), batch_size):
            idx = order[b : b + batch_size]
            if drop_last and idx.numel() < batch_size:
                break
            losses.append(progress.add(self(inputs[idx], targets[idx]).reshape(1)))
        return progress.finish(torch.cat(losses) if losses else inputs.new_empty((0,)))

    def _dataloader_epoch(
        self, inputs, targets, batch_size, shuffle, generator, drop_last, progress: _Progress
    ) -> torch.Tensor:
        """The epoch as written with a DataLoader (anything the fused loop does not serve)."""
        from torch.utils.data import DataLoader, TensorDataset

        loader = DataLoader(
            TensorDataset(inputs, targets), batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last
        )
        losses = []
        for xb, yb in loader:
            losses.append(self(xb, yb))
            progress.add(losses[-1].reshape(1))
        if not losses:
            return progress.finish(torch.empty((0,), dtype=inputs.dtype, device=inputs.device))
        return progress.finish(torch.stack(losses))

    @staticmethod
    def _draw_order(rows: int, shuffle: bool, generator: torch.Generator | None) -> torch.Tensor | None:
        """The random draws of one DataLoader epoch, in its order: the iterator's
        base seed, then (shuffle) RandomSampler's permutation, drawn from a
        generator seeded from the global one when none is given, and the second
        permutation it draws and discards when it runs out."""
        torch.empty((), dtype=torch.int64).random_(generator=generator)  # _BaseDataLoaderIter._base_seed
        if not shuffle:
            return None
        sampler_gen = generator
        if sampler_gen is None:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
            sampler_gen = torch.Generator()
            sampler_gen.manual_seed(seed)
        order = torch.randperm(rows, generator=sampler_gen)
        torch.randperm(rows, generator=sampler_gen)  # randperm(n)[: num_samples % n], discarded
        return order

    # --- planning -------------------------------------------------------------

    def _ddp(self) -> nn.parallel.DistributedDataParallel | None:
        model = self.model
        return model if isinstance(model, nn.parallel.DistributedDataParallel) else None

    def _inner_model(self) -> nn.Module | None:
        model = self.model
        if isinstance(model, nn.parallel.DistributedDataParallel):
            if not model.require_backward_grad_sync or _has_hooks((model,)):
                return None  # no_sync(), or hooks on the wrapper: DDP's own path
            model = model.module
        return model

    def _plan(self, input: object, target: object) -> _Plan | None:
        """The fused step's arguments, or None where the eager lines must run.

        The checks here run on every step. What they pass on to _plan_params
        (masks, optimizer groups, state, hyper-parameters) is read once and kept:
        the previous step's plan is reused while _Plan.holds finds everything it
        was read from unchanged, which costs a fraction of reading it again."""
        chain = _whole_chain(self._inner_model())
        if chain is None:
            return None
        params = _chain_fusable(chain, input)
        if params is None:
            return None
        loss_kind = self._loss_kind(input, target, chain)
        if loss_kind is None:
            return None
        if input.numel() == 0 or not (input.dtype is torch.float32 or input.dtype is torch.float64):  # type: ignore[union-attr]
            return None
        # Eager would fill input.grad, or fail in backward without grad mode.
        if input.requires_grad or not torch.is_grad_enabled():  # type: ignore[union-attr]
            return None
        optimizer = self.optimizer
        kind = _optimizer_kind(optimizer)
        if kind is None or _optimizer_hooked(optimizer):
            return None
        if input.is_cuda and not self._cuda_ok():  # type: ignore[union-attr]
            return None
        if self.max_grad_norm is not None and not _is_number(self.max_grad_norm):
            return None
        weights, biases = params
        plan = self._last_plan
        if plan is not None and plan.holds(chain, kind, loss_kind, weights, biases, input, optimizer):
            return plan
        self._last_plan = None
        plan = _Plan()
        plan.chain = chain
        plan.kind = kind
        plan.loss = loss_kind
        plan.weights, plan.biases = weights, biases
        plan.dtype, plan.device = input.dtype, input.device  # type: ignore[union-attr]
        if not self._plan_params(plan):
            return None
        if input.is_cuda and len(plan.trainable) > _CUDA_MAX_PARAMS:  # type: ignore[union-attr]
            return None
        if not plan.fresh:
            self._last_plan = plan
        return plan

    @staticmethod
    def _cuda_ok() -> bool:
        """The CUDA kernels are built. Under CUDA graph capture the hyper-parameters
        are baked in, as torch's own optimizers bake a float lr; Adam's step count
        must then be on the device (capturable=True or fused=True: the kernels
        advance it), which _plan_params checks. (A constant of the build: asking
        the dispatcher on every step cost ~4 us of host time.)"""
        return WITH_CUDA

    def _loss_kind(self, input: Any, target: object, chain: _Chain) -> int | None:
        return step_loss_kind(self.loss_fn, input, target, chain.linears[-1].out_features)

    def _loss_args(self, kind: int, target_shape: torch.Size) -> tuple[Any, ...]:
        return step_loss_args(self.loss_fn, kind, target_shape)

    def _failed(self) -> None:
        """After an op raised (e.g. a class index out of range): the gradients as
        the eager lines leave them, cleared by their ``zero_grad()``. The step op
        raises before it writes a parameter; the epoch op after the batches before."""
        self.optimizer.zero_grad()

    def _plan_params(self, plan: _Plan) -> bool:
        """Masks, optimizer state and hyper-parameters for the trainable parameters
        (weight then bias, layer by layer), and what _Plan.holds compares them with.
        False where the fused update cannot give the eager result: a trainable
        parameter outside the optimizer (eager would accumulate into its .grad), a
        non-contiguous one, options it does not implement, state of another dtype
        or on the device (fused / capturable Adam). State not made yet marks the
        plan ``fresh``. Shapes and contiguity of the state are checked again by the
        op, before it writes."""
        optimizer = self.optimizer
        groups = optimizer.param_groups
        plan.groups = groups
        plan.group_keys = [(g, list(map(id, g["params"])), g.get("capturable")) for g in groups]
        group_index = {pid: i for i, (_, ids, _) in enumerate(plan.group_keys) for pid in ids}
        plan.hyper_of_group = [None] * len(groups)
        adam = plan.kind == _ADAM
        opt_state = plan.opt_state = optimizer.state
        empty = self._empty(plan.weights[0])
        for w, b in zip(plan.weights, plan.biases, strict=True):
            for p, mask in ((w, plan.weight_mask), (b, plan.bias_mask)):
                if p is None or not p.requires_grad:
                    mask.append(False)
                    if p is not None:
                        plan.frozen.append(p)
                    continue
                mask.append(True)
                if any(p is q for q in plan.trainable):
                    return False  # a parameter shared by two layers: eager sums its gradients
                index = group_index.get(id(p))
                if index is None or not p.is_contiguous():
                    return False
                if p._backward_hooks or p._post_accumulate_grad_hooks:
                    return False  # tensor hooks fire in the autograd engine: the eager lines
                group = groups[index]
                hyper = plan.hyper_of_group[index]
                if hyper is None:
                    hyper = plan.hyper_of_group[index] = _adam_hyper(group) if adam else _sgd_hyper(group)
                if hyper is None:
                    return False
                state = opt_state.get(p)
                dtype = p.dtype
                if adam:
                    step = state.get("step") if state else None
                    if step is None:
                        plan.fresh = True
                        continue
                    m, v = state.get("exp_avg"), state.get("exp_avg_sq")
                    vmax = state.get("max_exp_avg_sq") if hyper[5] else empty
                    if not self._step_count_ok(step, p, group) or m is None or v is None or vmax is None:
                        return False
                    if m.dtype is not dtype or v.dtype is not dtype or (vmax is not empty and vmax.dtype is not dtype):
                        return False
                    plan.state += (step, m, v, vmax)
                    plan.check_capture = plan.check_capture or (p.is_cuda and step.is_cpu)
                elif hyper[1] != 0:
                    buf = state.get("momentum_buffer") if state else None
                    if buf is None:
                        plan.fresh = True
                        continue
                    if buf.dtype is not dtype:
                        return False
                    plan.state.append(buf)
                else:
                    plan.state.append(empty)
                plan.trainable.append(p)
                plan.hyper += hyper
                plan.group_of_trainable.append(index)
        trainable = {id(p) for p in plan.trainable}
        plan.others = [p for g in groups for p in g["params"] if id(p) not in trainable]
        plan.trainable_weights = [(i, w) for i, w in enumerate(plan.weights) if plan.weight_mask[i]]
        plan.trainable_biases = [(i, b) for i, b in enumerate(plan.biases) if plan.bias_mask[i]]
        plan.weight_ids = list(map(id, plan.weights))
        plan.bias_ids = list(map(id, plan.biases))
        plan.state_key_ids = list(map(id, opt_state))
        try:
            plan.state_value_ids = list(map(id, _values_of(map(dict.values, opt_state.values()))))
        except TypeError:
            return False  # a state entry that is not a dict: torch's optimizer will say what it makes of it
        return True

    @staticmethod
    def _step_count_ok(step: object, p: torch.Tensor, group: dict[str, Any]) -> bool:
        """Adam's ``state["step"]`` as the op takes it: torch's CPU scalar
        (capturable=False; not while a CUDA graph is captured: a replay would
        reuse its bias corrections), or a 0-dim tensor on the parameter's GPU
        (capturable=True, fused=True), which the CUDA kernels advance. A
        capturable group off the GPU runs the eager lines (torch's error)."""
        if type(step) is not torch.Tensor or step.dim() != 0:
            return False
        if step.is_cpu:
            return not group.get("capturable") and not (p.is_cuda and torch.cuda.is_current_stream_capturing())
        return p.is_cuda and step.device == p.device

    def _empty(self, like: torch.Tensor) -> torch.Tensor:
        """A 0-element tensor of ``like``'s dtype and device: the op's "no state" entry."""
        key = (like.dtype, like.device)
        cached = self._empties.get(key)
        if cached is None:
            cached = self._empties[key] = like.new_empty((0,))
        return cached

    # --- the plan in C++ ------------------------------------------------------

    def __setattr__(self, name: str, value: object) -> None:
        # A new model, loss, optimizer or max_grad_norm: the runner and plan of the
        # old ones would not hold; dropped now, they no longer keep the old ones alive.
        if name in _OWNER_ATTRS and "_runner" in self.__dict__:
            self.__dict__["_runner"] = self.__dict__["_last_plan"] = None
        super().__setattr__(name, value)

    def _drop_runner(self) -> None:
        """Forget a runner whose plan no longer holds; after _RUNNER_MISSES that held
        for less than two steps (something they watch changes on every step), plan
        in Python from then on."""
        if self._runner.steps < 2:
            self._runner_misses += 1
        self._runner = None

    def _make_runner(self, plan: _Plan, input: torch.Tensor, target: torch.Tensor, loss_args: tuple[Any, ...]) -> Any:
        """A _C.StepRunner of ``plan`` (csrc/step_runner.cpp): its arguments, and
        what _plan read them from, as probes it re-checks on every call: the
        objects in the dicts and lists read (by identity), hook dicts that stay
        empty, the parameters' metadata. None where the plan is not one to keep:
        no CUDA graph capture check, no BCE weights (their patterns follow the
        target's shape). The caller makes runners only for an input and target
        the step takes as they are (not reshaped)."""
        kind, weight, pos_weight, reduction, ignore_index, smoothing = loss_args
        if plan.check_capture or pos_weight is not None or (kind == _BCE and weight is not None):
            return None
        if input.device.type not in ("cpu", "cuda"):
            return None  # meta: shapes only, through the Python path
        model, loss_fn, optimizer = self.model, self.loss_fn, self.optimizer
        same: list[tuple[dict[Any, Any], Any, object]] = []
        items: list[tuple[Any, tuple[Any, ...]]] = []
        empty: list[dict[Any, Any]] = []

        def watch(owner: dict[str, Any], name: str, *, stays_empty: bool = False, contents: bool = False) -> None:
            value = owner.get(name, _MISSING)
            same.append((owner, name, value))
            if stays_empty:
                empty.append(value)
            if contents:
                items.append((value, tuple(value.items()) if isinstance(value, dict) else tuple(value)))

        for module, names in _GLOBAL_HOOKS:
            for name in names:
                watch(vars(module), name, stays_empty=True)
        for m in (model, *plan.chain.modules, loss_fn):
            for name in _MODULE_HOOKS:
                watch(m.__dict__, name, stays_empty=True)
        watch(model.__dict__, "_modules", contents=True)
        for linear in plan.chain.linears:
            watch(linear.__dict__, "_parameters", contents=True)
        watch(loss_fn.__dict__, "_buffers", contents=True)
        for name in ("reduction", "ignore_index", "label_smoothing"):
            if not _immutable(loss_fn.__dict__.get(name)):
                return None
            watch(loss_fn.__dict__, name)
        opt = optimizer.__dict__
        for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks"):
            watch(opt, name, stays_empty=True)
        watch(opt, "step")  # an LR scheduler's counter, or a replaced step (eager)
        watch(opt, "param_groups", contents=True)
        watch(opt, "state", contents=True)
        lr = []
        for index, group in enumerate(optimizer.param_groups):
            watch(group, "params", contents=True)
            for name in _GROUP_KEYS[plan.kind]:
                if not _immutable(group.get(name)):
                    return None  # e.g. betas as a list: changed in place, the same object
                watch(group, name)
            slots = plan.lr_slots(index)
            if slots:
                lr.append((group, "lr", slots))
        for p in plan.trainable:
            state = optimizer.state.get(p)
            if state is not None:
                items.append((state, tuple(state.items())))
        tensors = [t for t in (*plan.weights, *plan.biases, weight) if t is not None]
        stepped = optimizer if hasattr(optimizer.step, "_wrapped_by_lr_sched") else None
        return _C.StepRunner(
            (model, loss_fn, optimizer, self.max_grad_norm), same, items, empty, lr, tensors, _MISSING,
            plan.weights[0].shape[1], plan.weights[-1].shape[0], kind == _CROSS_ENTROPY and target.dtype is torch.int64,
            plan.weights, plan.biases, plan.chain.last_relu, kind, weight, reduction, ignore_index, smoothing,
            plan.weight_mask, plan.bias_mask, plan.state, plan.kind, plan.hyper, self.max_grad_norm,
            [layer for layer, _ in plan.trainable_weights], [layer for layer, _ in plan.trainable_biases],
            plan.others, stepped,
        )  # fmt: skip

    # --- after the op ---------------------------------------------------------

    @staticmethod
    def _clear_other_grads(plan: _Plan) -> None:
        """``optimizer.zero_grad()`` for the optimizer's parameters that the step
        gives no gradient (frozen ones, or ones outside the model)."""
        for p in plan.others:
            if p.grad is not None:
                p.grad = None

    @staticmethod
    def _set_grads(plan: _Plan, grad_w: list[torch.Tensor], grad_b: list[torch.Tensor]) -> None:
        """Each trainable parameter's .grad, as after ``loss.backward()``."""
        for layer, w in plan.trainable_weights:
            w.grad = grad_w[layer]
        for layer, b in plan.trainable_biases:
            b.grad = grad_b[layer]

    @staticmethod
    def _all_reduce(
        ddp: nn.parallel.DistributedDataParallel, grad_w: list[torch.Tensor], grad_b: list[torch.Tensor], plan: _Plan
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """DDP's gradient averaging: divide by the world size, then sum over the
        process group, as one flat all-reduce."""
        import torch.distributed as dist

        pg = ddp.process_group
        parts = []
        for gw, gb, mw, mb in zip(grad_w, grad_b, plan.weight_mask, plan.bias_mask, strict=True):
            if mw:
                parts.append(gw)
            if mb:
                parts.append(gb)
        flat = torch.cat([g.reshape(-1) for g in parts])
        flat.div_(dist.get_world_size(pg))
        dist.all_reduce(flat, group=pg)
        out = [t.view_as(g).clone() for t, g in zip(flat.split([g.numel() for g in parts]), parts, strict=True)]
        it = iter(out)  # the same walk as above: each layer's weight, then its bias
        new_w, new_b = [], []
        for gw, gb, mw, mb in zip(grad_w, grad_b, plan.weight_mask, plan.bias_mask, strict=True):
            new_w.append(next(it) if mw else gw)
            new_b.append(next(it) if mb else gb)
        return new_w, new_b

    def _mark_stepped(self) -> None:
        # An LR scheduler counts optimizer.step() calls to warn when it steps first.
        if hasattr(self.optimizer.step, "_wrapped_by_lr_sched"):
            self.optimizer._opt_called = True  # type: ignore[attr-defined]
