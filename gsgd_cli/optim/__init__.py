"""The optimizers: `GSGD` (G-SGD, Meng et al., ICLR 2019) and `PathSGD` (exact Path-SGD,
Neyshabur et al., 2015), both built from the model: `GSGD(model, lr)`, `PathSGD(model, lr)`."""
from .gsgd import GSGD, GSGDStepError, GSGDWarning
from .path_sgd import PathSGD, PathSGDStepError

__all__ = ["GSGD", "GSGDStepError", "GSGDWarning", "PathSGD", "PathSGDStepError"]
