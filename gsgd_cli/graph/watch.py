"""What an optimizer built from a model watches after construction: the facts torch.fx cannot
see and that can change later (forward hooks, a forward replaced on an instance, a
parametrization, global hooks). Read once at construction, compared at every step (cheap:
dict keys of the leaf modules torch.fx does not trace into)."""
from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from .ops import global_hooks
from .trace import leaf_modules

__all__ = ["ModelChanged", "ModelWatch"]


class ModelChanged(RuntimeError):
    """The model changed after the optimizer was built in a way its plan cannot account for."""


def _snapshot(module: nn.Module) -> tuple:
    return (tuple(module._forward_pre_hooks), tuple(module._forward_hooks),
            vars(module).get("forward"), vars(module).get("_conv_forward"),
            parametrize.is_parametrized(module))


def _what_changed(before: tuple, now: tuple) -> str:
    if before[0] != now[0] or before[1] != now[1]:
        return "a forward hook was added or removed"
    if before[2] is not now[2] or before[3] is not now[3]:
        return "its forward was replaced on the instance"
    return "a parametrization was registered or removed"


class ModelWatch:
    """The leaf modules of `model` (those torch.fx records as one call, not traced into) and
    their hooks, instance forwards and parametrizations at construction."""

    def __init__(self, model: nn.Module):
        self.modules = leaf_modules(model)
        self.snapshots = [_snapshot(m) for _, m in self.modules]

    def check(self, who: str) -> None:
        """Raise `ModelChanged` (one line: what changed, where, how to fix) if a watched fact
        differs from construction or global forward hooks are registered now."""
        hooks = global_hooks()
        if hooks:
            raise ModelChanged(f"{who}: {hooks}")
        for (name, module), before in zip(self.modules, self.snapshots):
            now = _snapshot(module)
            if now != before:
                raise ModelChanged(
                    f"{who}: module '{name}' ({type(module).__name__}) changed after {who} was "
                    f"built ({_what_changed(before, now)}); torch.fx never sees that, so the "
                    f"plan made at construction may no longer describe what the model "
                    f"computes. Build {who} after changing the model (it then leaves what it "
                    f"cannot step exactly to plain SGD, or refuses it), or undo the change")
