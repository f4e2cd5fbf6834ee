"""Tracing a model with torch.fx, written once: one exception, one message format."""
from __future__ import annotations

import contextlib

from torch import fx, nn

from .ops import global_hooks

__all__ = ["ModelNotTraceable", "trace", "train_mode", "leaf_modules"]


class ModelNotTraceable(ValueError):
    """torch.fx could not trace the model's forward."""


@contextlib.contextmanager
def train_mode(model: nn.Module):
    """`model.train()` inside, every module's own `training` flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.train()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def trace(model: nn.Module, advice: str, who: str = "", train: bool = False) -> fx.GraphModule:
    """`fx.symbolic_trace(model)`, or one `ModelNotTraceable` line: "[who ]cannot trace
    <Model> with torch.fx (<torch's first line>); <advice>". `train`: traced in training mode
    (code under `if self.training:` is what the steps run through), whatever mode the model
    is in; its modules keep their modes."""
    if train:
        with train_mode(model):
            return trace(model, advice, who)
    prefix = f"{who} " if who else ""
    hooks = global_hooks()
    if hooks:
        raise ModelNotTraceable(f"{prefix}cannot read {type(model).__name__}: {hooks}")
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # torch.fx raises many types; report them all the same way
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotTraceable(f"{prefix}cannot trace {type(model).__name__} with torch.fx "
                                f"({first}); {advice}") from exc


def leaf_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The submodules torch.fx records as one call (not traced into), in `named_modules`
    order: what it does not see of them (hooks, an instance forward) it cannot report."""
    tracer = fx.Tracer()
    return [(name, m) for name, m in model.named_modules()
            if name and tracer.is_leaf_module(m, name)]
