"""G-SGD (Meng et al., ICLR 2019) as a `torch.optim.Optimizer`.

Usage::

    model = MLP(49, 10, width=64, depth=2)
    opt = GSGD(model, lr=0.01)            # sets skeleton weights to 1 (paper, appendix 11.3)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, [30, 60])
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

The optimizer takes the model, not a parameter list: it traces the model to find its chain
blocks (`gsgd_cli.gspace.blocks`), builds the skeleton of each (`gsgd_cli.gspace.skeleton`)
once, and every `step()` runs the closed-form update of `gsgd_cli.gspace.update`: plain SGD
on the values of the basis paths (the coordinates of G-space), mapped back to the weights with
the free skeleton weights held fixed. Parameters outside every chain block take a plain SGD
step with the same learning rate.

Symbols of the paper and their arguments: `eta_t` is `lr` (per step, so schedulers work);
the skeleton weights' initial value 1 is `skeleton_init="one"`; `"keep"` keeps the model's
values (any sign) instead. Free skeleton weights never change after construction.

Checkpoints: construct the optimizer *before* loading a saved model state (construction with
`skeleton_init="one"` overwrites the skeleton weights), then load the model and optimizer
states, or pass `skeleton_init="keep"` when wrapping an already trained model.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..gspace.blocks import ChainBlock, find_chain_blocks
from ..gspace.skeleton import ChainSkeleton, UnsupportedWidthProfile, build_skeleton
from ..gspace.update import (ChainIndex, StepOptions, Workspace, apply_chain_step,
                             plan_chain_step)
from .validation import check_lr

SKELETON_INITS = ("one", "keep", "rescale")
BN_OPTIONS = ("approx", "approx_per_tap", "split")
BLOCK_SPLITS = ("none", "stage")


class GSGDStepError(RuntimeError):
    """A G-SGD step would write a non-finite value or divide by a vanished pivot."""


@dataclass
class _BlockPlan:
    block: ChainBlock
    skeleton: ChainSkeleton
    weights: list[nn.Parameter]
    biases: list[nn.Parameter | None]
    indices: dict[torch.device, ChainIndex]
    per_tap: bool = False      # bn="approx_per_tap": the published code's norm
    workspace: Workspace = field(default_factory=Workspace)

    def index_on(self, device: torch.device) -> ChainIndex:
        if device not in self.indices:
            self.indices[device] = ChainIndex.build(self.skeleton, device)
        return self.indices[device]

    def tensors(self):
        """(weights, biases, grads, bias grads), detached, in layer order.

        For a layer followed by batch norm (bn="approx") the weight gradient is multiplied,
        per output channel, by the norm of that channel's incoming filter (paper, eq. 39);
        with `per_tap` by the norm over input channels at each kernel position instead."""
        weights = [w.detach() for w in self.weights]
        grads = [w.grad for w in self.weights]
        for i, follows in enumerate(self.block.bn_after):
            if follows and grads[i] is not None:
                w = weights[i]
                if self.per_tap and w.dim() > 2:
                    norms = w.norm(dim=1, keepdim=True)            # [out, 1, kh, kw]
                else:
                    norms = w.reshape(w.shape[0], -1).norm(dim=1).view(-1, *[1] * (w.dim() - 1))
                grads[i] = grads[i] * norms
        return (weights, [b.detach() if b is not None else None for b in self.biases],
                grads, [b.grad if b is not None else None for b in self.biases])


def _check_positive(name: str, value, strictly: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        value > 0 if strictly else value >= 0)
    if not ok:
        raise ValueError(f"Invalid {name}={value!r}. Must be a number "
                         f"{'> 0' if strictly else '>= 0'}.")


class GSGD(Optimizer):
    """G-SGD: SGD in the positively scale-invariant space of a ReLU network.

    Args:
        model: the network; its chain blocks are found by tracing it with torch.fx.
        lr: learning rate `eta` (a finite number > 0).
        skeleton_init: `"one"` (default) sets every skeleton weight to 1 at construction, as
            the paper does; `"keep"` keeps the current values (none may be 0); `"rescale"`
            rescales hidden units (a positive scaling: the network function is unchanged)
            so that every free skeleton weight becomes +1 or -1; the pivots then carry the
            paths' scale. The paper (appendix 11.3) notes that the magnitudes of the skeleton
            weights set the scale of the learning rate: with `"keep"` and `"rescale"` tune
            `lr` afresh. Deep networks without batch norm explode at initialisation with
            `"one"` (their kernel centres set to 1).
        min_pivot_ratio: a step that shrinks a pivot to less than this fraction of its
            magnitude (or to 0) raises `GSGDStepError` instead of dividing the weights
            downstream by a vanishing number.
        bn: `"approx"` (default) lets chains run through batch norm and applies the paper's
            approximation (appendix 11.2, eqs. 39-40): the gradient of every incoming weight
            of a channel followed by batch norm is multiplied by the norm of that channel's
            whole incoming filter before the G-space step. It is an approximation: batch norm
            makes each filter scale-invariant by itself, which is not the chain's invariance.
            `"approx_per_tap"`: the published code's variant, the norm over input channels
            only, per output channel and kernel position (not the paper's filter norm).
            `"split"`: batch norm ends a chain (the layers around it take plain SGD unless
            they form chains of their own).
        momentum: heavy-ball momentum `mu` on the basis-path gradient (`b <- mu b + g`,
            `v <- v - lr b`); its buffers live in v-space in `state` (per edge under
            `"momentum_buffer"`, per pivot under `"pivot_momentum_buffer"` of the pivot layer's
            weight) and survive `state_dict()` round trips. Parameters outside chain blocks
            use SGD's momentum.
        weight_decay: L2 on the weights, as in `torch.optim.SGD`: `dw <- dw + wd * w` before
            the G-space step (not invariant under rescaling).
        bpr: basis-path regularisation coefficient `lambda`: the smooth regulariser
            `lambda * (sum_{P+} v_p^2 + sum_{P-} log(|v_p|)^2)` over the basis paths (P-: the
            all-skeleton paths, P+: the paths with one non-skeleton weight) is added to the
            loss inside the optimizer, i.e. `2 lambda v_p` resp. `2 lambda log|v_p| / v_p` is
            added to each basis path's gradient. This is the smooth form of the basis-path
            norm of Zheng et al. (AAAI 2019) that the paper pairs with G-SGD (appendix 11.5).
        block_split: `"none"` (default): each chain found is one block, e.g. the whole
            plain network from stem to classifier. `"stage"`: one block per run of
            equal-width layers (per stage, as the published code does); the layers that change
            the width (stem, stride-2 transitions, classifier) then take plain SGD.
    """

    def __init__(self, model: nn.Module, lr: float = 0.01, *, skeleton_init: str = "one",
                 momentum: float = 0.0, weight_decay: float = 0.0, bpr: float = 0.0,
                 min_pivot_ratio: float = 1e-6, bn: str = "approx", block_split: str = "none"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"GSGD takes the model (an nn.Module), got {type(model).__name__}; "
                            "write GSGD(model, lr) rather than GSGD(model.parameters(), lr)")
        check_lr(lr)
        if skeleton_init not in SKELETON_INITS:
            raise ValueError(f"Invalid skeleton_init={skeleton_init!r}. Must be one of "
                             f"{', '.join(repr(s) for s in SKELETON_INITS)}.")
        for name, value in (("momentum", momentum), ("weight_decay", weight_decay),
                            ("bpr", bpr), ("min_pivot_ratio", min_pivot_ratio)):
            _check_positive(name, value, strictly=False)
        if momentum >= 1:
            raise ValueError(f"Invalid momentum={momentum!r}. Must be a number in [0, 1).")
        for name, value, choices in (("bn", bn, BN_OPTIONS), ("block_split", block_split,
                                                            BLOCK_SPLITS)):
            if value not in choices:
                raise ValueError(f"Invalid {name}={value!r}. Must be one of "
                                 f"{', '.join(repr(c) for c in choices)}.")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("GSGD got a model with no trainable parameters")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      bpr=bpr, min_pivot_ratio=min_pivot_ratio))
        self.skeleton_init = skeleton_init
        self.discovery = find_chain_blocks(model, bn="split" if bn == "split" else "approx")
        self._per_tap = bn == "approx_per_tap"
        blocks = self.discovery.blocks
        if block_split == "stage":
            blocks = [part for block in blocks for part in split_by_stage(block)]
        frozen = [b for b in blocks if any(not p.requires_grad for m in b.modules
                                           for p in m.parameters(recurse=False))]
        if frozen:
            warnings.warn("GSGD leaves chain block(s) with frozen layers to plain SGD (a step "
                          "would have to rescale the frozen weights): "
                          + "; ".join(" -> ".join(b.names) for b in frozen), stacklevel=2)
            blocks = [b for b in blocks if b not in frozen]
        self._plans = [self._plan(block) for block in blocks]
        if not self._plans and not frozen:
            warnings.warn(f"GSGD found no chain block (Linear/Conv2d layers joined by ReLU) in "
                          f"{type(model).__name__}; every parameter takes a plain SGD step",
                          stacklevel=2)
        in_blocks = {id(p) for plan in self._plans for p in (*plan.weights, *plan.biases)
                     if p is not None}
        self._outside = [p for p in params if id(p) not in in_blocks]
        with torch.no_grad():
            for plan in self._plans:
                self._init_skeleton(plan)

    def _plan(self, block: ChainBlock) -> _BlockPlan:
        try:
            views = block.views
            skeleton = build_skeleton(block.widths, tuple(v.kernel for v in views),
                                      tuple(v.centre for v in views))
        except UnsupportedWidthProfile as exc:
            layer = block.names[exc.hidden_layer - 1]
            raise UnsupportedWidthProfile(
                f"G-SGD cannot handle chain block {' -> '.join(block.names)}: the output of "
                f"'{layer}' is a {exc}. Make the hidden widths rise and then fall (a single "
                "peak), or leave this part of the model to SGD", exc.hidden_layer) from None
        weights = [m.weight for m in block.modules]
        biases = [m.bias for m in block.modules]
        for name, p in zip(block.names, weights):
            if not p.is_contiguous():
                raise ValueError(f"layer '{name}' has a non-contiguous weight; G-SGD indexes "
                                 "weights in place and needs contiguous tensors")
        return _BlockPlan(block, skeleton, weights, biases, {}, self._per_tap)

    def _init_skeleton(self, plan: _BlockPlan) -> None:
        for name, w, layer in zip(plan.block.names, plan.weights, plan.skeleton.layers):
            flat = w.data.view(-1)
            index = layer.flat.to(w.device)
            if self.skeleton_init == "one":
                flat.index_fill_(0, index, 1.0)
            elif bool((flat.index_select(0, index) == 0).any()):
                raise ValueError(f"layer '{name}' has a skeleton weight equal to 0; G-SGD "
                                 "divides by skeleton weights: use skeleton_init='one' or "
                                 "re-initialise the layer")
        if self.skeleton_init == "rescale":
            if plan.block.bn_approx:
                raise ValueError(f"skeleton_init='rescale' keeps the network function only "
                                 f"without batch norm, and block {plan.block.names[0]} -> ... "
                                 "has batch norm: use skeleton_init='one'")
            rescale_free_weights_to_unit(plan.skeleton, [w.data for w in plan.weights],
                                         [b.data if b is not None else None
                                          for b in plan.biases])

    def add_param_group(self, param_group: dict) -> None:
        if self.param_groups:
            raise ValueError("GSGD keeps all parameters of its model in one param group (the "
                             "step needs the model's structure); add_param_group is not "
                             "supported: construct GSGD from the whole model instead")
        super().add_param_group(param_group)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, default in (("min_pivot_ratio", 1e-6), ("momentum", 0.0),
                                 ("weight_decay", 0.0), ("bpr", 0.0)):
                group.setdefault(key, default)

    @property
    def blocks(self) -> list[ChainBlock]:
        return [plan.block for plan in self._plans]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        lr = group["lr"]
        options = StepOptions(lr, group["momentum"], group["weight_decay"], group["bpr"],
                              group["min_pivot_ratio"])
        planned = []
        for plan in self._plans:
            tensors = plan.tensors()
            if all(g is None for g in tensors[2] + tensors[3]):
                continue
            index = plan.index_on(plan.weights[0].device)
            pivot_state = self.state[plan.weights[plan.skeleton.pivot_layer]]
            step = plan_chain_step(plan.skeleton, index, *tensors, options,
                                   pivot_state.get("pivot_momentum_buffer"), plan.workspace)
            planned.append((plan, index, step, tensors))
        if planned:   # every check of every block in one device sync; nothing written yet
            checks = torch.stack([step.ok() for _, _, step, _ in planned])
            if not bool(checks.all()):
                self._raise_step_error(planned, lr)
            for plan, index, step, tensors in planned:
                buffers = bias_buffers = None
                if options.momentum:
                    buffers = [self._buffer(w) for w in plan.weights]
                    bias_buffers = [self._buffer(b) if b is not None else None
                                    for b in plan.biases]
                    self.state[plan.weights[plan.skeleton.pivot_layer]][
                        "pivot_momentum_buffer"] = step.pivot_buffer
                apply_chain_step(plan.skeleton, index, step, *tensors, options, buffers,
                                 bias_buffers, plan.workspace)
        self._sgd_outside(options)
        return loss

    def _buffer(self, param: Tensor) -> Tensor:
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
        return state["momentum_buffer"]

    def _sgd_outside(self, options: StepOptions) -> None:
        """torch.optim.SGD's step (momentum, weight decay) for parameters outside blocks."""
        params = [p for p in self._outside if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        if options.weight_decay:
            grads = torch._foreach_add(grads, params, alpha=options.weight_decay)
        if options.momentum:
            buffers = [self._buffer(p) for p in params]
            torch._foreach_mul_(buffers, options.momentum)
            torch._foreach_add_(buffers, grads)
            grads = buffers
        torch._foreach_add_(params, grads, alpha=-options.lr)

    def _raise_step_error(self, planned, lr: float) -> None:
        advice = f"lower the learning rate (lr={lr:g}) or check the inputs and loss"
        for plan, _, step, _ in planned:
            for name, p in zip(plan.block.names * 2, [*plan.weights, *plan.biases]):
                if p is not None and p.grad is not None and not bool(p.grad.isfinite().all()):
                    raise GSGDStepError(f"G-SGD step failed in layer '{name}': its gradient is "
                                        f"not finite; {advice}. Nothing was updated.")
        for plan, _, step, _ in planned:
            if not bool(step.pivot_ok):
                r = step.pivot_ratio
                min_ratio = self.param_groups[0]["min_pivot_ratio"]
                j = int((~(torch.isfinite(r) & (r != 0)) | (r.abs() < min_ratio)).nonzero()[0])
                name = plan.block.names[plan.skeleton.pivot_layer]
                raise GSGDStepError(
                    f"G-SGD step failed in layer '{name}': pivot {j} would change by the ratio "
                    f"{float(r[j]):.3g} (to 0 or not finite); {advice}. Nothing was updated.")
            for name, bound in zip(plan.block.names, step.bounds):
                if not bool(torch.isfinite(bound)):
                    raise GSGDStepError(f"G-SGD step failed in layer '{name}': the update is not "
                                        f"finite; {advice}. Nothing was updated.")


def rescale_free_weights_to_unit(skeleton: ChainSkeleton, weights: list[Tensor],
                                 biases: list[Tensor | None]) -> None:
    """Positively rescale the hidden nodes so that every free skeleton weight is +1 or -1.

    Node scales `c` (1 on inputs and outputs) follow the free weights: forwards through the
    layers before the pivot layer (`c_j = c_a / |w_{j,a}|` for node j's incoming free
    weight), backwards through the layers after it (`c_j = c_b * |w_{b,j}|`); then every
    layer is multiplied by `c_out / c_in` and every bias by `c_out`. In place."""
    widths = skeleton.widths
    device, dtype = weights[0].device, weights[0].dtype
    scales = [torch.ones(n, device=device, dtype=dtype) for n in widths]
    free = [w.reshape(-1).index_select(0, layer.flat.to(device)).abs()
            for w, layer in zip(weights, skeleton.layers)]
    for i, layer in enumerate(skeleton.layers[: skeleton.pivot_layer]):
        scales[i + 1] = scales[i][layer.cols.to(device)] / free[i]
    for i in range(len(skeleton.layers) - 1, skeleton.pivot_layer, -1):
        layer = skeleton.layers[i]
        scales[i] = scales[i + 1][layer.rows.to(device)] * free[i]
    for i, layer in enumerate(skeleton.layers):
        view = weights[i].view(layer.n_out, layer.n_in, layer.kernel)
        view.mul_((scales[i + 1][:, None] / scales[i][None, :])[:, :, None])
        if biases[i] is not None:
            biases[i].mul_(scales[i + 1])


def split_by_stage(block: ChainBlock) -> list[ChainBlock]:
    """One block per stage: maximal runs of >= 2 consecutive layers that keep the width.

    Width-changing layers (stem, stride-2 transitions, classifier) fall outside and take
    plain SGD, as in the published code's per-stage blocks."""
    parts, run = [], []
    for k, view in enumerate(block.views + [None]):
        if view is not None and view.n_in == view.n_out:
            run.append(k)
            continue
        if len(run) >= 2:
            parts.append(ChainBlock([block.names[i] for i in run],
                                    [block.modules[i] for i in run],
                                    [block.bn_after[i] for i in run]))
        run = []
    return parts
