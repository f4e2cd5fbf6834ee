"""The optimizers: `GSGD` (G-SGD, Meng et al., ICLR 2019) and `PathSGD` (exact Path-SGD,
Neyshabur et al., 2015), both built from the model: `GSGD(model, lr)`, `PathSGD(model, lr)`.
A failed step raises a `StepError` (`GSGDStepError`, `PathSGDStepError`)."""
from .errors import GSGDStepError, GSGDWarning, PathSGDStepError, StepError
from .gsgd import GSGD
from .path_sgd import PathSGD

__all__ = ["GSGD", "GSGDStepError", "GSGDWarning", "PathSGD", "PathSGDStepError", "StepError"]
