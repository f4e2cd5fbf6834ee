"""Tracing a model with torch.fx, written once: one exception, one message format."""
from __future__ import annotations

from torch import fx, nn

__all__ = ["ModelNotTraceable", "trace"]


class ModelNotTraceable(ValueError):
    """torch.fx could not trace the model's forward."""


def trace(model: nn.Module, advice: str, who: str = "") -> fx.GraphModule:
    """`fx.symbolic_trace(model)`, or one `ModelNotTraceable` line: "[who ]cannot trace
    <Model> with torch.fx (<torch's first line>); <advice>"."""
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # torch.fx raises many types; report them all the same way
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        prefix = f"{who} " if who else ""
        raise ModelNotTraceable(f"{prefix}cannot trace {type(model).__name__} with torch.fx "
                                f"({first}); {advice}") from exc
