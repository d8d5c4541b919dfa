"""Adversarial distillation: methods that own a discriminator, and the trainer that alternates
the student (generator) step with the discriminator step.

A :class:`AdversarialMethod` is a :class:`~kdkernels.distill.Method` whose forward (run by the
:class:`~kdkernels.distill.Distiller`) returns the student-side losses, the adversarial one
included, and keeps the inputs the discriminator step needs: the student's output detached
(``fake``), the teacher's output or the ground truth (``real``) and an optional condition (the
image). The discriminator is a submodule of the method, so ``distiller.state_dict()`` holds it.
In the student's step the discriminator runs with its parameters detached
(:func:`call_with_frozen_parameters`): its parameters never receive a generator-step gradient,
without toggling ``requires_grad``.

:class:`AdversarialTrainer` owns the loop step::

    distiller = Distiller(student, teacher, [StructuredKD(...)])
    optimizer = torch.optim.SGD(generator_parameters(distiller), lr=1e-2, momentum=0.9)
    trainer = AdversarialTrainer(distiller, optimizer)      # discriminator optimisers from the methods
    step = trainer.step(images, labels)                     # both sides' losses, by name
    log({k: v.item() for k, v in step.losses.items()})

Each method declares ``order`` (``"generator_first"``: the student step, then
``discriminator_steps`` discriminator steps on the detached student output of the same forward;
``"discriminator_first"``: the discriminator steps, then the student's adversarial term computed
with the updated discriminator) and ``discriminator_steps`` (the ratio). The gradient penalty of
WGAN-GP is :func:`gradient_penalty` (``torch.autograd.grad`` with ``create_graph=True``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from kdkernels.distill.capture import SpecLike, unwrap
from kdkernels.distill.method import Method

ORDERS = ("generator_first", "discriminator_first")


def at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 (autocast outputs) → fp32 for the loss means; fp32 and fp64 unchanged."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def call_with_frozen_parameters(module: nn.Module, *args: Any) -> Any:
    """``module(*args)`` with every parameter detached: gradients reach ``args`` but not the
    parameters (the discriminator in the student's step). Buffers are the module's own, so
    BatchNorm statistics and spectral-norm power iterations update as in a normal call."""
    params = {name: p.detach() for name, p in module.named_parameters()}
    return torch.func.functional_call(module, params, args, strict=False)


def gradient_penalty(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor, epsilon: torch.Tensor | None = None) -> torch.Tensor:
    r"""WGAN-GP (Gulrajani et al., NeurIPS 2017): :math:`\mathbb E\,(\|\nabla_{\hat x} D(\hat x)\|_2 - 1)^2`
    with :math:`\hat x = \epsilon\,\mathrm{real} + (1-\epsilon)\,\mathrm{fake}`, one
    :math:`\epsilon \sim U(0, 1)` per sample (structured KD's ``CriterionAdditionalGP``: real is
    the teacher's score map). The gradient of :math:`\sum D(\hat x)` is taken per sample over all
    of its elements; ``create_graph=True`` so the penalty trains the discriminator.

    Args:
        discriminator: called on (B, …) tensors; its output may have any shape.
        real, fake: (B, …) discriminator inputs of one shape; both are detached here.
        epsilon: optional (B,) mixing weights (tests); default uniform in [0, 1).
    """
    if real.shape != fake.shape:
        raise ValueError(f"gradient_penalty: real shape {tuple(real.shape)} does not match fake shape {tuple(fake.shape)}")
    batch = real.shape[0]
    if epsilon is None:
        epsilon = torch.rand(batch, device=real.device, dtype=real.dtype)
    elif epsilon.shape != (batch,):
        raise ValueError(f"gradient_penalty: epsilon: expected shape ({batch},), got {tuple(epsilon.shape)}")
    epsilon = epsilon.reshape((batch,) + (1,) * (real.dim() - 1)).to(real.dtype)
    mixed = (epsilon * real.detach() + (1 - epsilon) * fake.detach()).requires_grad_(True)
    with torch.enable_grad():
        score = discriminator(mixed)
        (grad,) = torch.autograd.grad(score.sum(), mixed, create_graph=True)
    norm = torch.linalg.vector_norm(at_least_fp32(grad.reshape(batch, -1)), dim=1)
    return (norm - 1).pow(2).mean()


class AdversarialInputs(NamedTuple):
    """What the discriminator step reads, kept by the method's last forward: ``fake`` is the
    student's output (still attached to the student's graph: a deferred adversarial term uses it),
    ``real`` the teacher's output or the ground truth (detached), ``condition`` the input image
    or None (detached)."""

    fake: torch.Tensor
    real: torch.Tensor
    condition: torch.Tensor | None


class AdversarialMethod(Method):
    """Base of the methods that own a discriminator (structured KD's holistic term, GAN
    Compression). Subclasses build ``self.discriminator`` (an ``nn.Module``, or None when the
    adversarial term is off) and implement:

    - ``discriminator_input(x, condition)``: what the discriminator sees (x, or x with the condition);
    - ``generator_adversarial_loss(fake, condition)``: the student's adversarial term, weighted by
      the method's own part weight (the distiller applies ``weight`` on top, as for every part);
    - ``discriminator_loss(fake, real, condition)``: the discriminator's losses by name, each weighted;
    - ``make_discriminator_optimizer()``: the official optimiser for the discriminator.

    In ``forward`` a subclass calls :meth:`adversarial_term` with the student's output, the real
    sample and the condition, and returns its result under the key ``adversarial_part`` of its
    dict of parts (the trainer replaces it when it computes the term after the discriminator step).
    """

    adversarial_part = "adversarial"

    def __init__(
        self,
        student_features: Sequence[SpecLike],
        teacher_features: Sequence[SpecLike],
        weight: float,
        name: str | None = None,
        teacher_mode: str = "eval",
        *,
        order: str = "generator_first",
        discriminator_steps: int = 1,
    ) -> None:
        super().__init__(student_features, teacher_features, weight, name, teacher_mode)
        if order not in ORDERS:
            raise ValueError(f"{self.name}: order: expected one of {ORDERS}, got {order!r}")
        if isinstance(discriminator_steps, bool) or not isinstance(discriminator_steps, int) or discriminator_steps < 1:
            raise ValueError(f"{self.name}: discriminator_steps: expected an int >= 1 (discriminator steps per student step), got {discriminator_steps!r}")
        self.order = order
        self.discriminator_steps = discriminator_steps
        self.discriminator: nn.Module | None = None
        self._pending: AdversarialInputs | None = None
        self._defer = False

    # --- to implement -------------------------------------------------------------------------

    def discriminator_input(self, x: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        return x if condition is None else torch.cat([condition, x], dim=1)

    def generator_adversarial_loss(self, fake: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def discriminator_loss(self, fake: torch.Tensor, real: torch.Tensor, condition: torch.Tensor | None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def make_discriminator_optimizer(self) -> torch.optim.Optimizer:
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------

    def frozen_discriminator(self, x: torch.Tensor) -> torch.Tensor:
        """The discriminator on ``x`` with its parameters detached (the student's step)."""
        return call_with_frozen_parameters(self.discriminator, x)

    def adversarial_term(self, fake: torch.Tensor, real: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor | None:
        """Keeps the discriminator step's inputs and returns the student's adversarial term
        (None when the discriminator is off). While the trainer defers the term until after the
        discriminator step (``order="discriminator_first"``) it returns a 0 placeholder, which
        the trainer replaces."""
        if self.discriminator is None:
            return None
        condition = None if condition is None else condition.detach()
        self._pending = AdversarialInputs(fake if self._defer else fake.detach(), real.detach(), condition)
        if self._defer:
            return fake.new_zeros(())
        return self.generator_adversarial_loss(fake, condition)

    def pending_inputs(self) -> AdversarialInputs:
        if self._pending is None:
            raise RuntimeError(f"{self.name}: no discriminator inputs: run the distiller's forward first")
        return self._pending

    def clear_pending(self) -> None:
        self._pending = None


def adversarial_methods(distiller: nn.Module) -> list[AdversarialMethod]:
    """The methods of a (possibly DDP-wrapped) distiller that own a discriminator."""
    methods = getattr(unwrap(distiller), "methods", None)
    if methods is None:
        raise TypeError(f"distiller: expected a kdkernels.distill.Distiller (possibly DDP-wrapped), got {type(distiller).__name__}")
    return [m for m in methods if isinstance(m, AdversarialMethod) and m.discriminator is not None]


def discriminator_parameters(distiller: nn.Module) -> list[nn.Parameter]:
    return [p for m in adversarial_methods(distiller) for p in m.discriminator.parameters()]


def generator_parameters(distiller: nn.Module) -> list[nn.Parameter]:
    """The student's and the connectors' parameters: ``distiller.parameters()`` without the
    discriminators (build the student's optimiser on these)."""
    excluded = {id(p) for p in discriminator_parameters(distiller)}
    return [p for p in unwrap(distiller).parameters() if id(p) not in excluded]


class DiscriminatorStep(nn.Module):
    """The discriminator loss of one method as a module, so that DDP can wrap it (one forward,
    one backward per step: DDP synchronises the discriminator's gradients)."""

    def __init__(self, method: AdversarialMethod) -> None:
        super().__init__()
        self.discriminator = method.discriminator  # registered here too: DDP sees its parameters
        object.__setattr__(self, "method", method)  # not registered: no second copy in state_dict

    def forward(self, fake: torch.Tensor, real: torch.Tensor, condition: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return self.method.discriminator_loss(fake, real, condition)


class AdversarialStep(NamedTuple):
    """What :meth:`AdversarialTrainer.step` returns: the student's output, every loss by name
    (the distiller's, then ``<method>/<discriminator part>`` of the last discriminator step),
    all detached, and each side's total."""

    student_output: Any
    losses: dict[str, torch.Tensor]
    generator_total: torch.Tensor
    discriminator_total: torch.Tensor | None


def _sum(values: Iterable[torch.Tensor]) -> torch.Tensor:
    values = list(values)
    total = values[0]
    for value in values[1:]:
        total = total + value
    return total


class AdversarialTrainer:
    """Alternates the student's step and the discriminator steps of the adversarial methods.

    Args:
        distiller: a :class:`~kdkernels.distill.Distiller` (not yet DDP-wrapped; see ``ddp``).
        optimizer: the student's optimiser, over :func:`generator_parameters` (student and
            connectors); one that holds a discriminator parameter is an error.
        discriminator_optimizers: one per adversarial method, by method name (default: each
            method's ``make_discriminator_optimizer()``, its official settings).
        autocast_dtype: run the forwards (student, teacher, discriminators) under
            ``torch.autocast`` with this dtype (bf16; fp16 needs a gradient scaler, which this
            trainer does not run); backward passes run outside it. None: no autocast.
        ddp: None (one process), or the keyword arguments of ``DistributedDataParallel`` (``{}``
            for its defaults; needs an initialised process group). The distiller is wrapped with
            its discriminators ignored, and each discriminator loss is wrapped on its own, so
            the student's and the discriminators' gradients are averaged over ranks in their own
            backward passes.
    """

    def __init__(
        self,
        distiller: nn.Module,
        optimizer: torch.optim.Optimizer,
        discriminator_optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
        *,
        autocast_dtype: torch.dtype | None = None,
        ddp: Mapping[str, Any] | None = None,
    ) -> None:
        if isinstance(distiller, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            raise ValueError("distiller: pass the unwrapped Distiller and ddp={...}: the trainer wraps it with the discriminators kept out")
        self.methods = adversarial_methods(distiller)
        if not self.methods:
            raise ValueError("distiller: no method owns a discriminator; use the Distiller and your own loop")
        self.distiller = distiller
        d_params = {id(p) for p in discriminator_parameters(distiller)}
        for group in optimizer.param_groups:
            if any(id(p) in d_params for p in group["params"]):
                raise ValueError("optimizer: it holds discriminator parameters; build it on kdkernels.distill.generator_parameters(distiller)")
        self.optimizer = optimizer
        given = dict(discriminator_optimizers or {})
        unknown = set(given) - {m.name for m in self.methods}
        if unknown:
            raise ValueError(f"discriminator_optimizers: no adversarial method named {sorted(unknown)}; methods: {[m.name for m in self.methods]}")
        self.discriminator_optimizers = {m.name: given.get(m.name) or m.make_discriminator_optimizer() for m in self.methods}
        for method in self.methods:
            own = {id(p) for p in method.discriminator.parameters()}
            held = {id(p) for g in self.discriminator_optimizers[method.name].param_groups for p in g["params"]}
            if not held <= own:
                raise ValueError(f"discriminator_optimizers[{method.name!r}]: holds parameters that are not its discriminator's")
        if autocast_dtype is not None and not isinstance(autocast_dtype, torch.dtype):
            raise TypeError(f"autocast_dtype: expected a torch.dtype or None, got {autocast_dtype!r}")
        self.autocast_dtype = autocast_dtype
        self.generator: nn.Module = distiller
        self._discriminator_losses: dict[str, nn.Module] = {m.name: DiscriminatorStep(m) for m in self.methods}
        if ddp is not None:
            self._wrap_ddp(dict(ddp))

    def _wrap_ddp(self, kwargs: dict[str, Any]) -> None:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ddp: no default process group; call torch.distributed.init_process_group first (torchrun)")
        d_ids = {id(t) for m in self.methods for t in list(m.discriminator.parameters()) + list(m.discriminator.buffers())}
        ignored = [n for n, p in self.distiller.named_parameters(remove_duplicate=False) if id(p) in d_ids]
        ignored += [n for n, b in self.distiller.named_buffers(remove_duplicate=False) if id(b) in d_ids]
        # Discriminator parameters are trained by their own DDP wrappers below, in their own backward.
        DDP._set_params_and_buffers_to_ignore_for_model(self.distiller, ignored)
        self.generator = DDP(self.distiller, **kwargs)
        self._discriminator_losses = {name: DDP(step, **kwargs) for name, step in self._discriminator_losses.items()}

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device = next(unwrap(self.distiller).parameters()).device.type
        return torch.autocast(device, dtype=self.autocast_dtype)

    def _discriminator_updates(self, method: AdversarialMethod) -> dict[str, torch.Tensor]:
        inputs = method.pending_inputs()
        optimizer = self.discriminator_optimizers[method.name]
        losses: dict[str, torch.Tensor] = {}
        for _ in range(method.discriminator_steps):
            optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                losses = self._discriminator_losses[method.name](inputs.fake.detach(), inputs.real, inputs.condition)
            _sum(losses.values()).backward()
            optimizer.step()
        return {f"{method.name}/{part}": value.detach() for part, value in losses.items()}

    def step(self, x: Any, target: torch.Tensor | None = None, **kwargs: Any) -> AdversarialStep:
        """One student step and the declared discriminator steps, on one batch."""
        deferred = [m for m in self.methods if m.order == "discriminator_first"]
        for method in deferred:
            method._defer = True
        try:
            self.optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                out = self.generator(x, target, **kwargs)
            losses = dict(out.losses)
            d_losses: dict[str, torch.Tensor] = {}
            for method in deferred:
                d_losses.update(self._discriminator_updates(method))
                inputs = method.pending_inputs()
                with self._autocast():
                    losses[f"{method.name}/{method.adversarial_part}"] = method.weight * method.generator_adversarial_loss(inputs.fake, inputs.condition)
            generator_total = _sum(losses.values())
            generator_total.backward()
            self.optimizer.step()
            for method in self.methods:
                if method.order == "generator_first":
                    d_losses.update(self._discriminator_updates(method))
        finally:
            for method in self.methods:
                method._defer = False
                method.clear_pending()
        all_losses = {k: v.detach() for k, v in losses.items()}
        all_losses.update(d_losses)
        d_total = _sum(d_losses.values()) if d_losses else None
        return AdversarialStep(out.student_output, all_losses, generator_total.detach(), d_total)

    def state_dict(self) -> dict[str, Any]:
        """The optimisers' states (the models' are in ``distiller.state_dict()``)."""
        return {"optimizer": self.optimizer.state_dict(), "discriminator_optimizers": {k: o.state_dict() for k, o in self.discriminator_optimizers.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        for name, opt_state in state["discriminator_optimizers"].items():
            self.discriminator_optimizers[name].load_state_dict(opt_state)


__all__ = [
    "AdversarialInputs",
    "AdversarialMethod",
    "AdversarialStep",
    "AdversarialTrainer",
    "DiscriminatorStep",
    "adversarial_methods",
    "at_least_fp32",
    "call_with_frozen_parameters",
    "discriminator_parameters",
    "generator_parameters",
    "gradient_penalty",
]
