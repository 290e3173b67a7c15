"""Drop-in ``nn.Module``s: the same constructors, parameters, ``state_dict``
keys and ``repr`` as their ``torch.nn`` counterparts, computed by the fused ops."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.nn.modules import module as _nn_module

from . import functional as F
from ._ops import ops
from .autograd import _flatten, _unflatten
from .functional import _fast_path_ok

__all__ = ["BCEWithLogitsLoss", "FusedBCEClassifier", "FusedLinearReLU", "MLP", "Sequential", "fuse"]


class FusedLinearReLU(nn.Linear):
    """``nn.Linear`` followed by ReLU, fused: ``relu(input @ weight.T + bias)``.

    Same constructor, parameters and initialisation as :class:`torch.nn.Linear`
    (the same seed gives the same weights)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles torch's own ops (same parameters, same keys)
            return torch.relu(torch.nn.functional.linear(input, self.weight, self.bias))
        return self._fused_forward(input)

    @torch.jit.unused
    def _fused_forward(self, input: torch.Tensor) -> torch.Tensor:
        # torch.relu(nn.Linear.forward(input)) where the kernels do not serve the call.
        return F.linear_relu(input, self.weight, self.bias)


class BCEWithLogitsLoss(nn.BCEWithLogitsLoss):
    """:class:`torch.nn.BCEWithLogitsLoss` computed by the fused kernels: the same
    constructor, buffers (``weight``, ``pos_weight``), ``state_dict`` and results."""

    def __prepare_scriptable__(self) -> nn.BCEWithLogitsLoss:
        """``torch.jit.script`` compiles torch's own loss with these buffers."""
        return nn.BCEWithLogitsLoss(self.weight, reduction=self.reduction, pos_weight=self.pos_weight)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if _fast_path_ok(input):
            return F.binary_cross_entropy_with_logits(
                input, target, self.weight, pos_weight=self.pos_weight, reduction=self.reduction
            )
        return super().forward(input, target)


# --- Sequential -----------------------------------------------------------------


class _Chain:
    """A run of Linear(+ReLU) layers executed as one fused op."""

    __slots__ = ("linears", "last_relu", "modules")

    def __init__(self, linears: list[nn.Linear], last_relu: bool, modules: list[nn.Module]) -> None:
        self.linears = linears
        self.last_relu = last_relu
        self.modules = modules  # every module the chain replaces, ReLUs included

    def params(self) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """The layers' current weights and biases (read on every call: a
        parameter may have been replaced since the chain was planned)."""
        weights, biases = [], []
        for lin in self.linears:
            # Straight from _parameters: Module.__getattr__ costs ~0.5 µs a lookup
            # (and .get(name, lin.weight) would pay it as the default).
            params = lin._parameters
            weights.append(params["weight"] if "weight" in params else lin.weight)  # noqa: SIM401
            biases.append(params["bias"] if "bias" in params else lin.bias)  # noqa: SIM401
        return weights, biases


def _is_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear or type(m) is FusedLinearReLU


def _is_relu(m: nn.Module) -> bool:
    return type(m) is nn.ReLU


def _plan(modules: Sequence[nn.Module]) -> list[_Chain | nn.Module]:
    """Split a Sequential's modules into fused chains and modules run as they are.

    A chain is (Linear ReLU)* Linear [ReLU]: ReLU between every pair of layers,
    optional after the last. Any other module ends the chain."""
    plan: list[_Chain | nn.Module] = []
    i, n = 0, len(modules)
    while i < n:
        if not _is_linear(modules[i]):
            plan.append(modules[i])
            i += 1
            continue
        linears: list[nn.Linear] = []
        covered: list[nn.Module] = []
        relu = False
        while i < n and _is_linear(modules[i]):
            lin = modules[i]
            linears.append(lin)
            covered.append(lin)
            i += 1
            relu = type(lin) is FusedLinearReLU
            if i < n and _is_relu(modules[i]) and not relu:
                covered.append(modules[i])
                relu = True
                i += 1
            if not relu:
                break  # no activation: this layer closes the chain
        plan.append(_Chain(linears, relu, covered))
    return plan


def _same_dtype_device(t: torch.Tensor, ref: torch.Tensor) -> bool:
    """``t`` has ``ref``'s dtype and device. dtypes are singletons; devices are
    compared in full only off the CPU (building a torch.device costs more than
    the rest of the check)."""
    if t.dtype is not ref.dtype or t.is_cpu != ref.is_cpu:
        return False
    return ref.is_cpu or t.device == ref.device


def _has_hooks(modules: Iterable[nn.Module]) -> bool:
    """Hooks (global or on any of ``modules``) must see the modules run: forward
    hooks fire in the module call, and full backward hooks are attached there too."""
    g = _nn_module
    if g._global_forward_hooks or g._global_forward_pre_hooks:
        return True
    if g._global_backward_hooks or g._global_backward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks for m in modules)


def _chain_fusable(chain: _Chain, input: object) -> tuple[list[torch.Tensor], list[torch.Tensor | None]] | None:
    """The chain's weights and biases when the fused op can run it on ``input``
    exactly as the modules would, else None (the modules then run one by one,
    with torch's own results and errors). Kept cheap: it runs on every forward."""
    # Before reading the parameters: a parametrized weight computed here and
    # again by the modules would run its parametrization twice.
    if not _fast_path_ok(input) or input.dim() == 0 or _has_hooks(chain.modules):  # type: ignore[union-attr]
        return None
    weights, biases = chain.params()
    dtype, on_cpu = input.dtype, input.is_cpu  # type: ignore[union-attr]
    width = input.shape[-1]  # type: ignore[union-attr]
    for w, b in zip(weights, biases, strict=True):
        # Shapes as the layers' matmuls would take them (a replaced weight may not match in_features).
        if w.dim() != 2 or w.shape[1] != width:
            return None
        width = w.shape[0]
        if b is not None and (b.dim() != 1 or b.shape[0] != width):
            return None
        for p in (w, b):
            # _same_dtype_device inlined: this loop runs for every parameter on every forward.
            if p is not None and (
                p.dtype is not dtype or p.is_cpu != on_cpu or (not on_cpu and p.device != input.device)  # type: ignore[union-attr]
            ):
                return None
    return weights, biases


def _whole_chain(model: object) -> _Chain | None:
    """The chain when ``model`` is an ``nn.Sequential`` (or subclass) without hooks
    that is one Linear(+ReLU) chain: what the single-pass step and TrainStep serve."""
    if not isinstance(model, nn.Sequential) or _has_hooks((model,)):
        return None
    plan = _cached_plan(model)
    if len(plan) != 1 or not isinstance(plan[0], _Chain):
        return None
    return plan[0]


def _cached_plan(seq: nn.Sequential) -> list[_Chain | nn.Module]:
    """The plan of ``seq``, rebuilt only when its list of modules changed."""
    modules = tuple(seq._modules.values())
    cached = seq.__dict__.get("_fastmlp_plan")
    # The same module objects in the same order (modules compare by identity).
    if cached is None or cached[0] != modules:
        cached = (modules, _plan(list(modules)))
        seq.__dict__["_fastmlp_plan"] = cached
    return cached[1]


class Sequential(nn.Sequential):
    """Drop-in :class:`torch.nn.Sequential` that runs every Linear(+ReLU) chain
    as one fused op (one op forward, one backward, for the whole chain).

    Same constructor (modules or an ``OrderedDict``), indexing, slicing,
    ``append``, ``repr`` and ``state_dict`` keys as ``nn.Sequential``. Other
    modules run as they are between fused chains. A chain falls back to running
    its modules one by one when that is what the user would observe differently:
    forward or backward hooks registered on them, autocast, mixed dtypes or
    devices, or an input the kernels do not take (torch.nn then raises its own
    errors)."""

    def _get_plan(self) -> list[_Chain | nn.Module]:
        return _cached_plan(self)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_fastmlp_plan", None)  # derived; rebuilt on first forward
        return state

    def __prepare_scriptable__(self) -> nn.Sequential:
        """``torch.jit.script`` compiles the same modules as an ``nn.Sequential``
        (the fused ops are for eager and ``torch.compile``)."""
        return nn.Sequential(OrderedDict(self._modules))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        for step in self._get_plan():
            input = self._run_chain(step, input) if isinstance(step, _Chain) else step(input)
        return input

    @staticmethod
    def _run_chain(chain: _Chain, input: torch.Tensor) -> torch.Tensor:
        params = _chain_fusable(chain, input)
        if params is not None:
            # fastmlp::mlp has its autograd in C++ (the math of MLPFunction).
            return _unflatten(ops.mlp(_flatten(input), *params, chain.last_relu), input.shape)
        for m in chain.modules:
            input = m(input)
        return input


class MLP(Sequential):
    """A Linear(+ReLU) stack from a list of sizes, e.g. ``MLP([784, 30, 1])`` is
    ``Linear(784, 30) -> ReLU -> Linear(30, 1)`` (compare ``apex.mlp.MLP``).

    Args:
        sizes: layer widths, input first; at least two.
        bias: whether the Linear layers have a bias.
        activation: ``"relu"`` or ``None``, between layers.
        last_activation: ``"relu"`` or ``None``, after the last layer.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        bias: bool = True,
        activation: str | None = "relu",
        last_activation: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if len(sizes) < 2:
            raise ValueError(f"MLP needs at least an input and an output size, got sizes={list(sizes)}")
        for name, act in (("activation", activation), ("last_activation", last_activation)):
            if act not in ("relu", None):
                raise ValueError(f"MLP: {name} must be 'relu' or None, got {act!r}")
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(fan_in, fan_out, bias=bias, device=device, dtype=dtype))
            last = i == len(sizes) - 2
            if (activation if not last else last_activation) == "relu":
                layers.append(nn.ReLU())
        super().__init__(*layers)

    def __getitem__(self, idx: slice | int) -> nn.Module:
        # nn.Sequential rebuilds a slice as self.__class__(OrderedDict), which is
        # not MLP's constructor: a slice of an MLP is a fused Sequential.
        if isinstance(idx, slice):
            return Sequential(OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)


class FusedBCEClassifier(nn.Module):
    """An MLP classifier and its ``BCEWithLogits`` loss as one fused training step.

    ``forward(input, target)`` returns the loss of ``model(input)``; the same op
    that computes it also computes every gradient (the chain forward, the loss
    and its logits gradient, the backward through every layer), so
    ``loss.backward()`` only scales the stored gradients by the incoming
    gradient and hands them to autograd: optimizers, gradient clipping, DDP and
    ``torch.compile`` keep working. ``predict(input)`` returns the logits.

    The fused path serves a ``model`` that is one Linear(+ReLU) chain (an
    ``nn.Sequential`` or :class:`Sequential` of ``Linear``/``ReLU``); anything
    else (other modules, hooks, a target that requires grad) runs
    ``model`` and :class:`BCEWithLogitsLoss` separately, with the same result.

    Args:
        model: the classifier, mapping ``[*, in_features]`` to logits.
        pos_weight: as in :class:`torch.nn.BCEWithLogitsLoss`.
        reduction: ``"mean"`` or ``"sum"`` (``"none"`` has no single-pass form).
        weight: as in :class:`torch.nn.BCEWithLogitsLoss`.
    """

    def __init__(
        self,
        model: nn.Module,
        pos_weight: torch.Tensor | None = None,
        reduction: str = "mean",
        *,
        weight: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"FusedBCEClassifier: reduction must be 'mean' or 'sum', got {reduction!r}")
        self.model = model
        self.reduction = reduction
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"

    def predict(self, input: torch.Tensor) -> torch.Tensor:
        """The logits ``model(input)``."""
        return self.model(input)

    def _fused_chain(
        self, input: object, target: object
    ) -> tuple[_Chain, list[torch.Tensor], list[torch.Tensor | None]] | None:
        chain = _whole_chain(self.model)
        if chain is None:
            return None
        params = _chain_fusable(chain, input)
        if params is None or not isinstance(target, torch.Tensor):
            return None
        weights, biases = params
        out_features = chain.linears[-1].out_features
        if target.requires_grad or not _same_dtype_device(target, input):
            return None  # torch's promotion / target gradient: the unfused path
        if input.numel() == 0 or target.numel() == 0:
            return None
        buffers = self._buffers
        for buf in (buffers["weight"], buffers["pos_weight"]):
            if buf is not None and not (_same_dtype_device(buf, input) and F._broadcasts_to(buf, target.shape)):
                return None  # torch's promotion, or its broadcasting error
        if tuple(target.shape) != (*input.shape[:-1], out_features):
            return None
        return chain, weights, biases

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        fused = self._fused_chain(input, target)
        if fused is None:
            return F.binary_cross_entropy_with_logits(
                self.model(input), target, self.weight, pos_weight=self.pos_weight, reduction=self.reduction
            )
        chain, weights, biases = fused
        input_2d = _flatten(input)
        buffers = self._buffers
        # fastmlp::mlp_bce_loss has its autograd in C++ (the math of MLPBCEFunction).
        return ops.mlp_bce_loss(
            input_2d,
            target if target.dim() == 2 else target.reshape(input_2d.shape[0], -1),
            weights,
            biases,
            chain.last_relu,
            F._pattern(buffers["weight"], target.shape),
            F._pattern(buffers["pos_weight"], target.shape),
            1 if self.reduction == "mean" else 2,
        )


def fuse(module: nn.Module) -> nn.Module:
    """Convert, in place, every ``nn.Sequential`` in ``module`` (itself and nested
    ones) into a :class:`torch_fastmlp.Sequential`. Parameters stay the same
    objects, so optimizers that already hold them keep working. Returns ``module``."""
    for m in module.modules():
        if type(m) is nn.Sequential:
            m.__class__ = Sequential
    return module


# --- MSE and softmax cross-entropy (issue 20) ---------------------------------------

__all__ += ["CrossEntropyLoss", "MSELoss"]


class MSELoss(nn.MSELoss):
    """:class:`torch.nn.MSELoss` computed by the fused kernels (the loss and its
    gradients in one pass): the same constructor, ``state_dict``, ``repr`` and results."""

    def __prepare_scriptable__(self) -> nn.MSELoss:
        """``torch.jit.script`` compiles torch's own loss."""
        return nn.MSELoss(reduction=self.reduction)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # F.mse_loss runs torch's own function for any call the kernels do not serve
        return F.mse_loss(input, target, reduction=self.reduction)


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """:class:`torch.nn.CrossEntropyLoss` computed by the fused kernels
    (log-softmax, NLL and the logits' gradient in one pass): the same constructor,
    ``weight`` buffer, ``state_dict``, ``repr`` and results."""

    def __prepare_scriptable__(self) -> nn.CrossEntropyLoss:
        """``torch.jit.script`` compiles torch's own loss with the same buffer and options."""
        return nn.CrossEntropyLoss(
            self.weight, ignore_index=self.ignore_index, reduction=self.reduction, label_smoothing=self.label_smoothing
        )

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # F.cross_entropy runs torch's own function for any call the kernels do not serve
        return F.cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )
