"""The optimizers built from the model: `GSGD` (G-SGD, Meng et al., ICLR 2019), `GAdam` and
`GRMSprop` (Adam / RMSprop on the same G-space coordinates) and `PathSGD` (exact Path-SGD,
Neyshabur et al., 2015): `GSGD(model, lr)`, `GAdam(model, lr)`, `PathSGD(model, lr)`.
A failed step raises a `StepError` (`GSGDStepError`, `GAdamStepError`, `GRMSpropStepError`,
`PathSGDStepError`)."""
from .errors import (GAdamStepError, GRMSpropStepError, GSGDStepError, GSGDWarning,
                     PathSGDStepError, StepError)
from .gadam import GAdam, GRMSprop
from .gsgd import GSGD
from .path_sgd import PathSGD

__all__ = ["GSGD", "GSGDStepError", "GSGDWarning", "GAdam", "GAdamStepError", "GRMSprop",
           "GRMSpropStepError", "PathSGD", "PathSGDStepError", "StepError"]
