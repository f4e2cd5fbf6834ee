"""The optimizers the contract suite (`tests/optim/test_optim_contract.py`) runs over, as
torch's `optim_db`: one `OptimizerInfo` per optimizer built from a model. A new optimizer joins
every contract test by adding one entry to `OPTIM_DB`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from ..optim import GSGD, GAdam, GRMSprop, PathSGD


@dataclass(frozen=True)
class OptimizerInfo:
    """How the contract tests build and drive one optimizer.

    `cls(model, lr=..., **required, **options)` builds it; `required` holds the options every
    contract test needs (e.g. GSGD's `skeleton_init="keep"`, so that construction does not
    change the weights); `lr` is a learning rate that trains the contract models without
    diverging; `state_options` switch on everything that keeps state (momentum, ...);
    `outside_params`: whether a parameter outside every Linear/Conv2d is trained (else the
    tests give it the chain alone); `scheduler_momentum`: whether a scheduler may cycle the
    group's momentum; `sgd_zeros`: SGD keys accepted only as 0 (e.g. Path-SGD has no momentum);
    `stateless`: whether a step under the default options keeps no per-parameter state (as
    torch.optim.SGD without momentum; Adam and RMSprop keep their moments)."""

    name: str
    cls: type
    lr: float
    required: dict[str, Any] = field(default_factory=dict)
    state_options: dict[str, Any] = field(default_factory=dict)
    outside_params: bool = True
    scheduler_momentum: bool = True
    sgd_zeros: tuple[str, ...] = ()
    stateless: bool = True

    def make(self, model: nn.Module, **options):
        """The optimizer on `model` (`options` override `lr` and add to `required`)."""
        return self.cls(model, **{"lr": self.lr, **self.required, **options})

    def model_for(self, make_net: Callable[[], nn.Module]) -> nn.Module:
        """`make_net()` (a chain `.body` and a parameter outside it), or its `.body` alone
        when this optimizer does not train parameters outside the chains."""
        net = make_net()
        return net if self.outside_params else net.body


OPTIM_DB: list[OptimizerInfo] = [
    OptimizerInfo("gsgd", GSGD, lr=0.1, required=dict(skeleton_init="keep"),
                  state_options=dict(momentum=0.9, weight_decay=1e-3, bpr=1e-3)),
    OptimizerInfo("gadam", GAdam, lr=0.01, required=dict(skeleton_init="keep"),
                  state_options=dict(amsgrad=True, weight_decay=1e-3, bpr=1e-3), stateless=False),
    OptimizerInfo("grmsprop", GRMSprop, lr=0.005, required=dict(skeleton_init="keep"),
                  state_options=dict(momentum=0.5, centered=True, weight_decay=1e-3, bpr=1e-3),
                  stateless=False),
    OptimizerInfo("path_sgd", PathSGD, lr=0.05, state_options=dict(rescale="first"),
                  outside_params=False,
                  scheduler_momentum=False, sgd_zeros=("momentum", "weight_decay")),
]
