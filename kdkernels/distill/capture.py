"""Feature capture by dotted module path, with forward hooks: no model edits.

A :class:`FeatureSpec` names a submodule (``"layer3.1.bn2"``, ``""`` for the model itself) and
whether its *output* or its *input* is wanted; the input of an activation module is the
pre-activation feature (``FeatureSpec("layer2.1.relu", on="input")``). :class:`FeatureCapture`
resolves the paths on the model under any ``DistributedDataParallel`` / ``DataParallel`` /
``torch.compile`` wrapper, hooks them, and records them while armed::

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> capture = FeatureCapture(net, ["0", FeatureSpec("1", on="input")])
    >>> with capture:
    ...     logits = net(torch.randn(3, 4))
    >>> capture.get("0").shape, capture.get(FeatureSpec("1", on="input")).shape
    (torch.Size([3, 8]), torch.Size([3, 8]))

A module called more than once in one forward pass (torchvision's ResNet blocks reuse ``relu``)
keeps its last call: for ``layerN.M.relu`` that is the block output after the residual add.
The input of an in-place module (``ReLU(inplace=True)``) is cloned before the module overwrites
it; any other feature changed in place after its capture (``out += identity`` on a captured BN
output) is an error when read, unless its spec asks for ``clone=True``. A hook that fires on an
``nn.DataParallel`` replica while armed raises: one record per feature cannot hold the replicas'
features (use DDP).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable, Union

import torch
from torch import nn

_ON = ("output", "input")
DATA_PARALLEL_MESSAGE = (
    "nn.DataParallel over several devices is not supported: its replicas run in threads that would overwrite one "
    "another's captured features; use DistributedDataParallel (torchrun), wrapping the distiller: "
    "DistributedDataParallel(Distiller(student, teacher, methods))"
)


@dataclass(frozen=True)
class FeatureSpec:
    """One feature of a model: the ``output`` or the (first positional) ``input`` of the
    submodule at dotted ``path``; ``""`` is the model itself (its output: the logits).
    ``clone=True`` records a copy, for a tensor the model later changes in place."""

    path: str
    on: str = "output"
    clone: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.path, str):
            raise TypeError(f"path: expected a dotted module path (str), got {type(self.path).__name__}")
        if self.on not in _ON:
            raise ValueError(f"on: expected 'output' or 'input', got {self.on!r}")

    def __str__(self) -> str:
        name = self.path or "<model>"
        return name if self.on == "output" else f"{name} (input)"


SpecLike = Union[FeatureSpec, str]


def as_spec(spec: SpecLike) -> FeatureSpec:
    """A str is the output of the module at that path."""
    return spec if isinstance(spec, FeatureSpec) else FeatureSpec(spec)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under DistributedDataParallel / DataParallel (``.module``) and
    ``torch.compile`` (``._orig_mod``) wrappers, however nested."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def find_module(model: nn.Module, path: str, role: str = "model") -> nn.Module:
    """The submodule of (unwrapped) ``model`` at dotted ``path``; an unknown path raises a
    ``ValueError`` that lists the closest existing paths."""
    model = unwrap(model)
    names = [name for name, _ in model.named_modules()]
    if path in names:
        return model.get_submodule(path)
    close = difflib.get_close_matches(path, names, n=5, cutoff=0.5)
    hint = f"; close matches: {', '.join(repr(n) for n in close)}" if close else ""
    raise ValueError(f"{role}: no module at path {path!r} in {type(model).__name__}{hint}")


class FeatureCapture:
    """Records features of ``model`` (see :class:`FeatureSpec`) while used as a context manager.

    Hooks stay registered until :meth:`remove`; outside a ``with`` block they record nothing,
    so the model can be used on its own without keeping tensors alive.
    """

    def __init__(self, model: nn.Module, specs: Iterable[SpecLike], role: str = "model") -> None:
        self.role = role
        self.specs = tuple(dict.fromkeys(as_spec(s) for s in specs))
        self._features: dict[FeatureSpec, object] = {}
        self._armed = False
        self._handles = []
        inner = unwrap(model)
        for spec in self.specs:
            self._handles.append(self._hook(spec, find_module(inner, spec.path, role)))

    def _hook(self, spec: FeatureSpec, module: nn.Module):
        if spec.on == "output":

            def hook(module, args, output):
                if self._armed:
                    self._check_not_replica(module)
                    self._record(spec, output, spec.clone)

            return module.register_forward_hook(hook)

        clone = spec.clone or bool(getattr(module, "inplace", False))

        def pre_hook(module, args):  # before the module runs: its input is still unchanged
            if self._armed:
                self._check_not_replica(module)
                self._record(spec, args[0] if args else None, clone)

        return module.register_forward_pre_hook(pre_hook)

    def _check_not_replica(self, module: nn.Module) -> None:
        if getattr(module, "_is_replica", False):
            raise RuntimeError(f"{self.role}: {DATA_PARALLEL_MESSAGE}")

    def _record(self, spec: FeatureSpec, value, clone: bool) -> None:
        if isinstance(value, torch.Tensor):
            value = value.clone() if clone else value
            self._features[spec] = (value, value._version)
        else:
            self._features[spec] = (value, None)

    def __enter__(self) -> "FeatureCapture":
        self._features.clear()
        self._armed = True
        return self

    def __exit__(self, *exc) -> None:
        self._armed = False

    def get(self, spec: SpecLike) -> torch.Tensor:
        """The feature recorded by the last armed forward pass."""
        spec = as_spec(spec)
        if spec not in self.specs:
            raise KeyError(f"{self.role}: {spec} is not captured; captured: {', '.join(map(str, self.specs))}")
        if spec not in self._features:
            raise RuntimeError(f"{self.role}: module {spec.path!r} did not run in the last forward pass")
        value, version = self._features[spec]
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{self.role}: the {spec.on} of {spec.path!r} is a {type(value).__name__}, not a tensor; "
                "capture a submodule whose output (or first input) is a tensor"
            )
        if value._version != version:
            raise RuntimeError(
                f"{self.role}: the {spec.on} of {spec.path!r} was changed in place after it was captured "
                f"(e.g. `out += identity`); capture FeatureSpec({spec.path!r}, on={spec.on!r}, clone=True) or another module"
            )
        return value

    def clear(self) -> None:
        self._features.clear()

    def remove(self) -> None:
        """Unregister the hooks: the model is as it was."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._features.clear()
