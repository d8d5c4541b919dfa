"""Born-again networks: Furlanello et al., "Born-Again Neural Networks" (ICML 2018) (paper; no
code checked).

Generation k has the architecture of generation k−1 and learns from its outputs at T = 1,
optionally plus the label CE:  L_k = KL(f(x; θ_{k−1}) ‖ f(x; θ_k)) + CE(y, f(x; θ_k)).
The paper writes the CE with the teacher's distribution; the KL differs by the teacher's entropy
(same gradient). The final model is the ensemble: the average of the generations' predictions.
The CWTM and DKPP variants are not here.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from kdkernels.distill.distiller import Distiller
from kdkernels.distill.methods.cross_entropy import CrossEntropy
from kdkernels.distill.methods.hinton_kd import HintonKD


def born_again(
    teacher: nn.Module,
    make_student: Callable[[], nn.Module],
    train: Callable[[Distiller], None],
    *,
    generations: int = 2,
    with_labels: bool = True,
) -> list[nn.Module]:
    """Train ``generations`` born-again students in sequence.

    Args:
        teacher: generation 0, already trained.
        make_student: returns a fresh model (the same architecture).
        train: trains a Distiller in place (your loop: ``out = d(x, y); out.total.backward()``...).
        generations: how many students.
        with_labels: add the label CE (weight 1) to the KL.

    Returns:
        ``[teacher, gen1, gen2, …]``; ``BornAgainEnsemble(models[1:])`` is the paper's ensemble.
    """
    if generations < 1:
        raise ValueError(f"generations: expected >= 1, got {generations}")
    models = [teacher]
    for _ in range(generations):
        student = make_student()
        methods = [HintonKD(temperature=1.0, alpha=1.0, name="born_again")]
        if with_labels:
            methods.append(CrossEntropy())
        distiller = Distiller(student, models[-1], methods)
        train(distiller)
        distiller.remove_hooks()
        models.append(student)
    return models


class BornAgainEnsemble(nn.Module):
    """Average of the models' softmax predictions (returns probabilities)."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        if not models:
            raise ValueError("models: expected at least one model")
        self.models = nn.ModuleList(models)

    def forward(self, x, **kwargs) -> torch.Tensor:
        return torch.stack([m(x, **kwargs).float().softmax(-1) for m in self.models]).mean(0)
