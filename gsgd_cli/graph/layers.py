"""The facts about each linear layer of a traced network, read once: what it is, how it is
called and what else touches its parameters. Each optimizer decides from these facts which
layers it can step (G-SGD: `gspace.blocks.layer_problem`; Path-SGD:
`pathnorm.squared_copy`)."""
from __future__ import annotations

import collections
from dataclasses import dataclass

from torch import fx, nn
from torch.nn.parameter import UninitializedParameter
from torch.nn.utils import parametrize

from .ops import Op, module_op

__all__ = ["LayerFacts", "read_layers"]


@dataclass(frozen=True)
class LayerFacts:
    """One `nn.Linear`/`nn.Conv2d` (or subclass) called in forward."""

    name: str
    type_name: str
    exact: bool                 # exactly nn.Linear / nn.Conv2d
    forward_overridden: bool    # its class overrides forward (or Conv2d's _conv_forward)
    groups: int                 # 1 for a Linear
    padding_mode: str           # "zeros" for a Linear
    parametrized: bool          # torch.nn.utils.parametrize on it
    not_plain: str | None       # "weight" / "bias" when that is not a plain, initialised Parameter
    hooks: bool                 # forward (pre-)hooks
    calls: int                  # how often forward calls it
    attribute_read: str | None  # a get_attr of it (or inside it) in forward
    shared: tuple[tuple[str, tuple[str, ...]], ...]   # (param, other owners' names) if shared


def read_layers(graph_module: fx.GraphModule, model: nn.Module) -> dict[str, LayerFacts]:
    """The facts of every layer called in `graph_module` (traced from `model`), in the order
    of their first call. Sharing is counted over all of `model`'s modules."""
    modules = dict(graph_module.named_modules())
    layer_nodes = [n for n in graph_module.graph.nodes
                   if n.op == "call_module" and module_op(modules[n.target]) is Op.LAYER]
    calls = collections.Counter(n.target for n in layer_nodes)
    reads = [n.target for n in graph_module.graph.nodes if n.op == "get_attr"]
    owners: dict[int, list[str]] = collections.defaultdict(list)
    for owner, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            owners[id(p)].append(f"{owner}.{pname}" if owner else pname)
    facts = {}
    for name in calls:
        module = modules[name]
        base = nn.Linear if isinstance(module, nn.Linear) else nn.Conv2d
        overridden = type(module).forward is not base.forward or (
            base is nn.Conv2d and type(module)._conv_forward is not nn.Conv2d._conv_forward)
        not_plain = None
        for pname in ("weight", "bias"):
            value = getattr(module, pname, None)
            if pname == "bias" and value is None:
                continue
            if not isinstance(value, nn.Parameter) or isinstance(value, UninitializedParameter):
                not_plain = pname
                break
        read = next((t for t in reads if t == name or t.startswith(name + ".")), None)
        shared = tuple((pname, tuple(o for o in owners[id(p)] if o != f"{name}.{pname}"))
                       for pname, p in module.named_parameters(recurse=False)
                       if len(owners[id(p)]) > 1)
        facts[name] = LayerFacts(
            name, type(module).__name__, type(module) in (nn.Linear, nn.Conv2d), overridden,
            getattr(module, "groups", 1), getattr(module, "padding_mode", "zeros"),
            parametrize.is_parametrized(module), not_plain,
            bool(module._forward_pre_hooks or module._forward_hooks), calls[name], read, shared)
    return facts
