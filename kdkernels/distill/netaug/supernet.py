"""The NetAug supernet: an existing model whose layers can run wider than it, sharing its weights.

Cai et al., "Network Augmentation for Tiny Deep Learning" (ICLR 2022); code mit-han-lab/tinyml
``netaug/models/netaug/{mbv2,utils}.py``. Every dense convolution gets the output widths
``round(w_base × m)`` for m in ``width_mults``; the expand convolution of every inverted residual
block gets the expand ratios ``e_base × m`` for m in ``expand_mults``, its active width being
``round(e × active block input width)`` (the official ``make_divisible(·, 1)``); the projection of
a residual block keeps ``out = in``. Depthwise convolutions, BatchNorm and Linear inputs follow the
width of their input. The base network is the ``"min"`` configuration (multiplier 1.0 everywhere)
and computes exactly what the original model computes.

Conversion, without tracing: the model's Conv2d / BatchNorm2d / Linear layers are walked in
registration order, which must be the order they run in (true of MobileNetV2 in torchvision, in
``transformers`` and in the official code); the channel counts are checked along the way, so a
model where this does not hold is an error, not a silent mis-wiring. Inverted residual blocks are
found by their residual flag (``use_res_connect``: torchvision and the official code;
``use_residual``: ``transformers``), or given as ``blocks={path: has_residual}``. A block holds at
most one expand (1×1) convolution, one depthwise convolution and one projection, in that order.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from numbers import Real
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from kdkernels.distill.capture import unwrap
from kdkernels.distill.netaug.dynamic_layers import DynamicBatchNorm2d, DynamicConv2d, DynamicLinear

MODES = ("min", "random", "min_w", "min_e")
RESIDUAL_FLAGS = ("use_res_connect", "use_residual")


def make_divisible(value: float, divisor: int = 1) -> int:
    """The MobileNet channel rounding: to the nearest multiple of ``divisor`` (at least one
    divisor), never more than 10 % below ``value``. NetAug uses ``divisor=1``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def check_multipliers(name: str, values: Sequence[float]) -> tuple[float, ...]:
    """Sorted, distinct multipliers ≥ 1 that include 1.0 (the base network)."""
    try:
        values = list(values)
    except TypeError:
        raise TypeError(f"NetAug: {name}: expected a sequence of numbers, got {type(values).__name__}") from None
    if not values or any(isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v) for v in values):
        raise ValueError(f"NetAug: {name}: expected a non-empty sequence of finite numbers, got {values!r}")
    if min(values) != 1.0:
        raise ValueError(f"NetAug: {name}: the smallest multiplier must be 1.0 (the base network), got {values!r}")
    return tuple(sorted(set(float(v) for v in values)))


@dataclass
class _Layer:
    """One Conv2d / BatchNorm2d / Linear of the model, in registration order.

    ``feeder`` is the index (into the dense convolutions) of the convolution whose output this
    layer reads, through depthwise convolutions, BatchNorms and activations; None for the model's
    input or a Linear's output. Dense convolutions have a ``role``: ``"width"`` (width choices),
    ``"expand"`` (ratio × block input), ``"residual"`` (= block input), ``"fixed"`` (base width).
    """

    path: str
    kind: str  # "dense", "depthwise", "norm", "linear"
    module: nn.Module
    base_in: int
    base_out: int
    feeder: int | None
    block: str | None
    role: str = ""
    choices: tuple[int, ...] = ()
    ratios: tuple[float, ...] = ()
    max_out: int = 0
    source: int | None = None  # a residual projection: the dense conv whose output is the block's input
    norms: list[int] = field(default_factory=list)  # indices (into layers) of the BNs/depthwise on this conv's output


def _residual_flag(module: nn.Module) -> bool | None:
    for name in RESIDUAL_FLAGS:
        flag = getattr(module, name, None)
        if isinstance(flag, bool):
            return flag
    return None


def _find_blocks(model: nn.Module, blocks: Mapping[str, bool] | None) -> dict[str, bool]:
    names = dict(model.named_modules())
    if blocks is None:
        found = {}
        for path, module in names.items():
            flag = _residual_flag(module)
            if flag is not None and path:
                found[path] = flag
        return found
    if not isinstance(blocks, Mapping):
        raise TypeError(f"NetAug: blocks: expected a mapping {{path: has_residual}}, got {type(blocks).__name__}")
    for path, flag in blocks.items():
        if path not in names:
            raise ValueError(f"NetAug: blocks: no module at path {path!r} in {type(model).__name__}")
        if not isinstance(flag, bool):
            raise TypeError(f"NetAug: blocks: {path!r}: expected True/False (has a residual), got {flag!r}")
    return dict(blocks)


def _block_of(path: str, blocks: Iterable[str]) -> str | None:
    best = None
    for block in blocks:
        if path.startswith(block + ".") and (best is None or len(block) > len(best)):
            best = block
    return best


class Supernet(nn.Module):
    """``model`` (deep-copied unless ``inplace=True``) with its layers made dynamic.

    Args:
        model: a MobileNetV2-style network (Conv2d, depthwise Conv2d, BatchNorm2d, Linear).
        width_mults: output-width multipliers of every dense convolution, 1.0 first (official
            scripts: ``(1.0, 1.8, 2.6)`` for MobileNetV2-0.35 and TinyMobileNetV2).
        expand_mults: expand-ratio multipliers of every inverted block (official ``(1.0, 1.6, 2.2, 2.8)``).
        blocks: ``{path: has_residual}`` of the inverted residual blocks (default: found by flag).
        keep_width: paths of dense convolutions that keep their width (a convolution whose
            output is the model's output). Linear layers always keep their output width.
        inplace: convert ``model`` itself instead of a copy.

    ``set_active(mode)`` picks the configuration the next forward runs: ``"min"`` (the base
    network), ``"random"`` (every width and expand ratio drawn uniformly and independently),
    ``"min_w"`` (base widths, random expand ratios), ``"min_e"`` (random widths, base ratios).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        width_mults: Sequence[float] = (1.0, 1.8, 2.6),
        expand_mults: Sequence[float] = (1.0, 1.6, 2.2, 2.8),
        blocks: Mapping[str, bool] | None = None,
        keep_width: Sequence[str] = (),
        inplace: bool = False,
    ) -> None:
        super().__init__()
        self.width_mults = check_multipliers("width_mults", width_mults)
        self.expand_mults = check_multipliers("expand_mults", expand_mults)
        model = unwrap(model)
        self.model = model if inplace else copy.deepcopy(model)
        self._blocks = _find_blocks(self.model, blocks)
        names = dict(self.model.named_modules())
        for path in keep_width:
            if not isinstance(names.get(path), nn.Conv2d):
                raise ValueError(f"NetAug: keep_width: {path!r} is not a Conv2d of {type(self.model).__name__}")
        self._convert(set(keep_width))
        self.set_active("min")

    # --- conversion --------------------------------------------------------------------------------

    def _walk(self) -> list[_Layer]:
        """The supported layers in registration order, with the channel chain checked."""
        layers: list[_Layer] = []
        dense: list[int] = []  # indices into layers
        current, feeder, previous = None, None, "the model's input"
        for path, module in self.model.named_modules():
            if not isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
                if any(True for _ in module.parameters(recurse=False)):
                    raise ValueError(
                        f"NetAug: {path!r} is a {type(module).__name__} with parameters; the supernet conversion handles "
                        "Conv2d (dense or depthwise), BatchNorm2d and Linear only"
                    )
                continue
            if isinstance(module, nn.Conv2d):
                takes, gives = module.in_channels, module.out_channels
                if module.groups == 1:
                    kind = "dense"
                elif module.groups == module.in_channels == module.out_channels:
                    kind = "depthwise"
                else:
                    raise ValueError(f"NetAug: Conv2d {path!r} has groups={module.groups}: only dense and depthwise convolutions can change width")
                if layers and layers[-1].kind == "linear":
                    raise ValueError(f"NetAug: Conv2d {path!r} runs after a Linear layer; only a classifier may follow the convolutions")
            elif isinstance(module, nn.BatchNorm2d):
                kind, takes, gives = "norm", module.num_features, module.num_features
            else:
                kind, takes, gives = "linear", module.in_features, module.out_features
            if current is not None and takes != current:
                raise ValueError(
                    f"NetAug: cannot follow the channels: {type(module).__name__} {path!r} takes {takes} channels but "
                    f"{previous} gives {current}; the conversion needs the layers registered in the order they run (as in MobileNetV2)"
                )
            layer = _Layer(path, kind, module, takes, gives, feeder, _block_of(path, self._blocks))
            layers.append(layer)
            if kind == "dense":
                feeder = len(dense)
                dense.append(len(layers) - 1)
            elif kind == "linear":
                feeder = None
            elif feeder is not None:
                layers[dense[feeder]].norms.append(len(layers) - 1)
            current, previous = gives, f"{type(module).__name__} {path!r}"
        if not dense:
            raise ValueError(f"NetAug: {type(self.model).__name__} has no dense Conv2d to augment")
        return layers

    def _assign_roles(self, layers: list[_Layer], keep_width: set[str]) -> None:
        dense = [layer for layer in layers if layer.kind == "dense"]
        for layer in dense:
            layer.role = "fixed" if layer.path in keep_width else "width"
        for block, residual in self._blocks.items():
            inside = [layer for layer in layers if layer.block == block and layer.kind in ("dense", "depthwise")]
            kinds = [layer.kind for layer in inside]
            if kinds not in (["depthwise", "dense"], ["dense", "depthwise", "dense"]):
                raise ValueError(
                    f"NetAug: block {block!r}: expected [expand 1×1 conv,] depthwise conv, projection conv in this order, "
                    f"got {kinds or 'no convolutions'}"
                )
            producer = inside[0].feeder
            if len(inside) == 3:
                inside[0].role = "expand"
            project = inside[-1]
            if residual:
                if producer is None or dense[producer].base_out != project.base_out:
                    takes = dense[producer].base_out if producer is not None else inside[0].base_in
                    raise ValueError(
                        f"NetAug: block {block!r} has a residual, but its input has {takes} channels and its output {project.base_out}"
                    )
                project.role, project.source = "residual", producer
            if project.path in keep_width:
                project.role = "fixed"

        for layer in dense:
            source_max = dense[layer.feeder].max_out if layer.feeder is not None else layer.base_in
            if layer.role == "width":
                layer.choices = tuple(sorted({make_divisible(layer.base_out * m) for m in self.width_mults}))
                layer.max_out = layer.choices[-1]
            elif layer.role == "fixed":
                layer.choices, layer.max_out = (layer.base_out,), layer.base_out
            elif layer.role == "residual":
                layer.max_out = dense[layer.source].max_out
            else:  # expand
                base_ratio = layer.base_out / layer.base_in
                layer.ratios = tuple(base_ratio * m for m in self.expand_mults)
                layer.max_out = max(make_divisible(layer.ratios[-1] * source_max), layer.base_out)

    def _convert(self, keep_width: set[str]) -> None:
        layers = self._walk()
        self._assign_roles(layers, keep_width)
        dense = [layer for layer in layers if layer.kind == "dense"]
        for layer in layers:
            width_in = dense[layer.feeder].max_out if layer.feeder is not None else layer.base_in
            if layer.kind == "dense":
                new = DynamicConv2d.from_conv(layer.module, width_in, layer.max_out)
            elif layer.kind == "depthwise":
                new = DynamicConv2d.from_conv(layer.module, width_in, width_in)
            elif layer.kind == "norm":
                new = DynamicBatchNorm2d.from_batchnorm(layer.module, width_in)
            else:
                new = DynamicLinear.from_linear(layer.module, width_in, layer.base_out)
            self.model.set_submodule(layer.path, new)
            layer.module = new
        self.layers = layers  # not a ModuleList: the modules are registered under self.model
        self.dense = dense

    # --- configurations -----------------------------------------------------------------------------

    def set_active(self, mode: str = "min", generator: torch.Generator | None = None) -> dict[str, int]:
        """Choose the configuration the next forward passes run; returns the dense convolutions'
        output widths by path. Under DDP, give every rank a generator seeded alike so that all
        ranks sample the same subnet (as the official code does)."""
        if mode not in MODES:
            raise ValueError(f"NetAug: mode: expected one of {MODES}, got {mode!r}")
        random_width = mode in ("random", "min_e")
        random_ratio = mode in ("random", "min_w")

        def pick(n: int, at_random: bool) -> int:
            return int(torch.randint(n, (1,), generator=generator)) if at_random and n > 1 else 0

        widths = {}
        for layer in self.dense:
            source = self.dense[layer.feeder].module.active_out if layer.feeder is not None else layer.base_in
            if layer.role in ("width", "fixed"):
                out = layer.choices[pick(len(layer.choices), random_width)]
            elif layer.role == "residual":
                out = self.dense[layer.source].module.active_out
            else:
                k = pick(len(layer.ratios), random_ratio)
                base_in = layer.base_in == source
                out = layer.base_out if k == 0 and base_in else make_divisible(layer.ratios[k] * source)
            layer.module.active_out = out
            widths[layer.path] = out
        return widths

    def active_widths(self) -> dict[str, int]:
        return {layer.path: layer.module.active_out for layer in self.dense}

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # --- the base network ---------------------------------------------------------------------------

    def export(self) -> nn.Module:
        """The base network as a plain module of the original classes (no dynamic layers): a copy
        holding the leading slices of the shared weights, computing exactly what ``"min"`` computes."""
        active = self.active_widths()
        self.set_active("min")
        try:
            exported = copy.deepcopy(self.model)
            for layer in self.layers:
                exported.set_submodule(layer.path, exported.get_submodule(layer.path).export(layer.base_in))
        finally:
            for layer in self.dense:
                layer.module.active_out = active[layer.path]
        return exported

    # --- channel sorting and BN re-estimation ---------------------------------------------------------

    @torch.no_grad()
    def sort_channels(self) -> None:
        """Reorder the inner channels of every inverted block with an expand convolution by L1
        importance (the sum of |projection weight| over its outputs and kernel), most important
        first, so that the base network and narrow subnets use the important ones (official
        ``sort_channels_inner``). The widest network's function is unchanged (a permutation).
        Optimiser state (momentum) is not permuted, as in the official code."""
        for expand in self.dense:
            if expand.role != "expand":
                continue
            project = next(layer for layer in self.dense if layer.block == expand.block and layer is not expand)
            importance = project.module.weight.abs().sum(dim=(0, 2, 3))
            order = torch.sort(importance, descending=True, stable=True).indices
            inner = [expand] + [self.layers[i] for i in expand.norms]
            for layer in inner:
                for tensor in (layer.module.weight, layer.module.bias, getattr(layer.module, "running_mean", None), getattr(layer.module, "running_var", None)):
                    if tensor is not None:
                        tensor.copy_(tensor.index_select(0, order))
            project.module.weight.copy_(project.module.weight.index_select(1, order))

    @torch.no_grad()
    def reset_bn(self, batches: Iterable, forward=None) -> int:
        """Re-estimate every BatchNorm's running statistics for the active configuration: the mean
        over ``batches`` of each batch's mean and (biased) variance, weighted by batch size, as the
        official ``reset_bn`` does. BNs normalise with batch statistics during the pass; the other
        layers run in eval mode. ``forward(model, batch)`` runs one batch (default
        ``model(batch)``, or ``model(batch[0])`` for an (input, target) pair). Returns the number
        of samples seen."""
        norms = [m for m in self.model.modules() if isinstance(m, nn.BatchNorm2d)]
        sums: dict[nn.Module, list] = {m: [0.0, 0.0, 0] for m in norms}

        def hook(module, args):
            x = args[0]
            mean = x.mean(dim=(0, 2, 3))
            var = ((x - mean[None, :, None, None]) ** 2).mean(dim=(0, 2, 3))
            n = x.shape[0]
            acc = sums[module]
            acc[0] = acc[0] + mean * n
            acc[1] = acc[1] + var * n
            acc[2] += n

        training = {m: m.training for m in self.model.modules()}
        saved = {m: (m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in norms}
        handles = [m.register_forward_pre_hook(hook) for m in norms]
        seen = 0
        try:
            self.model.eval()
            for m in norms:
                m.train()
                m.momentum = 0.0  # batch statistics in the forward, running statistics untouched
            for batch in batches:
                if forward is not None:
                    forward(self.model, batch)
                    first = batch
                else:
                    first = batch[0] if isinstance(batch, (tuple, list)) else batch
                    self.model(first)
                seen += first.shape[0] if isinstance(first, torch.Tensor) else 0
        finally:
            for h in handles:
                h.remove()
            for m, mode in training.items():
                m.train(mode)
            for m, (momentum, tracked) in saved.items():
                m.momentum = momentum
                if tracked is not None:
                    m.num_batches_tracked.copy_(tracked)
        for m, (mean_sum, var_sum, n) in sums.items():
            if n and m.track_running_stats:
                c = mean_sum.shape[0]
                m.running_mean[:c].copy_(mean_sum / n)
                m.running_var[:c].copy_(var_sum / n)
        return seen
