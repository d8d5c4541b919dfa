"""Training schemes beyond the offline teacher: online mutual learning and self-distillation."""

from kdkernels.distill.schemes.born_again import BornAgainEnsemble, born_again
from kdkernels.distill.schemes.byot import BYOT, AuxiliaryHead
from kdkernels.distill.schemes.mutual_learning import (
    MutualLearning,
    mutual_learning_losses,
)

__all__ = ["BYOT", "AuxiliaryHead", "BornAgainEnsemble", "MutualLearning", "born_again", "mutual_learning_losses"]
