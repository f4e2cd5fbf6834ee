"""GAdam and GRMSprop (the optimizers) against the dense brute-force reference
(`gsgd_cli.testing.reference_adaptive`) on whole models, step by step in float64: MLPs of every
width profile with and without biases, conv chains, residual blocks, batch norm under
bn="approx", parameters outside every block (torch's own Adam / RMSprop); invariance under
positive rescaling while torch's optimizers drift; the checks before any write."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gsgd_cli.gspace.adaptive import AdamOptions, RMSpropOptions
from gsgd_cli.models.convnets import BasicBlock
from gsgd_cli.optim import GAdam, GAdamStepError, GRMSprop, GRMSpropStepError, GSGDWarning
from gsgd_cli.testing import gsgd_reference as ref
from gsgd_cli.testing import reference_adaptive as refa
from gsgd_cli.testing.helpers import PROFILES, mlp, randomise, rescale_hidden

ADAM = AdamOptions(lr=0.02, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05, amsgrad=True,
                   bpr=0.01)
RMSPROP = RMSpropOptions(lr=0.005, alpha=0.9, eps=1e-6, weight_decay=0.05, momentum=0.5,
                         centered=True, bpr=0.01)
CASES = {"gadam": ADAM, "grmsprop": RMSPROP}


@pytest.fixture(autouse=True, params=["fused", "eager"])
def step_path(request, monkeypatch):
    """Every test twice: with the fused CPU kernel (native/gadam.py) and with the eager step
    (the default of `fused=` set), checking that the intended path was taken."""
    from gsgd_cli.optim.native import build

    fused = request.param == "fused"
    if fused and build.library() is None:
        pytest.skip("the fused CPU step cannot be built here (no C++ compiler)")
    used = []
    for cls in (GAdam, GRMSprop):
        monkeypatch.setitem(cls.__init__.__kwdefaults__, "fused", fused)
        original = cls._fused_step

        def spy(self, *args, original=original):
            result = original(self, *args)
            used.append(result is not None)
            return result

        monkeypatch.setattr(cls, "_fused_step", spy)
    yield request.param
    assert all(used) if fused else not any(used), f"the {request.param} path was not taken"


def _make(model, options, **structure):
    kwargs = {k: v for k, v in vars(options).items() if k != "maximize"}
    cls = GAdam if isinstance(options, AdamOptions) else GRMSprop
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GSGDWarning)
        return cls(model, skeleton_init="keep", **kwargs, **structure)


def _torch_opt(params, options):
    """torch's own optimizer with the same hyper-parameters (for the parameters outside)."""
    if isinstance(options, AdamOptions):
        return torch.optim.Adam(params, lr=options.lr, betas=options.betas, eps=options.eps,
                                weight_decay=options.weight_decay, amsgrad=options.amsgrad)
    return torch.optim.RMSprop(params, lr=options.lr, alpha=options.alpha, eps=options.eps,
                               weight_decay=options.weight_decay, momentum=options.momentum,
                               centered=options.centered)


class Reference:
    """The same training run by the dense reference: each chain block (its layout given by
    `layouts`: names, [out, in, K] views, centres, batch norm after) steps by
    `refa.gadam_step` / `grmsprop_step` on its basis paths; every other parameter by torch's
    optimizer. Batch norm (bn="approx", paper eq. 39): a layer followed by it has its gradient
    multiplied, per output channel, by the norm of that channel's whole incoming filter."""

    def __init__(self, model, layouts, options):
        self.model, self.options = model, options
        modules = dict(model.named_modules())
        self.blocks = [[modules[name] for name in layout.names] for layout in layouts]
        self.layouts = layouts
        inside = {id(p) for layers in self.blocks for m in layers for p in m.parameters()}
        outside = [p for p in model.parameters() if id(p) not in inside]
        self.outside = _torch_opt(outside, options) if outside else None
        self.states = [{} for _ in layouts]
        self.steps = 0

    def _net(self, layers, layout, grads: bool) -> ref.Net:
        weights, biases = [], []
        for m, view in zip(layers, layout.views):
            w = m.weight.grad if grads else m.weight.detach()
            if grads and layout.bn_after[len(weights)]:
                w = w * m.weight.detach().reshape(view.n_out, -1).norm(dim=1).view(
                    -1, *[1] * (w.dim() - 1))
            weights.append(w.reshape(view.n_out, view.n_in, view.kernel).clone())
            b = m.bias
            biases.append(None if b is None else (b.grad if grads else b.detach()).clone())
        return ref.Net(weights, biases, [v.centre for v in layout.views])

    def step(self):
        self.steps += 1
        for k, (layers, layout) in enumerate(zip(self.blocks, self.layouts)):
            net = self._net(layers, layout, grads=False)
            grad = self._net(layers, layout, grads=True).flat()
            if isinstance(self.options, AdamOptions):
                new, self.states[k] = refa.gadam_step(net, grad, self.states[k], self.steps,
                                                      self.options)
            else:
                new, self.states[k] = refa.grmsprop_step(net, grad, self.states[k],
                                                         self.options)
            with torch.no_grad():
                for m, w, b in zip(layers, new.weights, new.biases):
                    m.weight.copy_(w.reshape(m.weight.shape))
                    if b is not None:
                        m.bias.copy_(b)
        if self.outside is not None:
            self.outside.step()


def _close(model, other, where):
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        scale = max(float(q.detach().abs().max()), 1e-300)
        diff = float((p.detach() - q.detach()).abs().max())
        assert diff <= 1e-10 * scale, f"{where}: {name} differs by {diff:.3g} (scale {scale:.3g})"


def _run(model, x, y, options, steps=3, expected_blocks=None, loss=F.cross_entropy,
         **structure):
    """`steps` steps of the optimizer and of the reference from the same model and data,
    compared after every step (one step and several)."""
    twin = copy.deepcopy(model)
    opt = _make(model, options, **structure)
    if expected_blocks is not None:
        assert [b.names for b in opt.blocks] == expected_blocks
    reference = Reference(twin, opt.blocks, options)
    for step in range(1, steps + 1):
        for m in (model, twin):
            m.zero_grad()
            loss(m(x), y).backward()
        opt.step()
        reference.step()
        _close(model, twin, f"step {step}")
    return opt


def _data(shape, classes=3, n=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *shape, generator=gen, dtype=torch.float64),
            torch.randint(0, classes, (n,), generator=gen))


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("widths", [w for _, w in PROFILES], ids=[n for n, _ in PROFILES])
def test_mlp_equals_the_reference_on_every_width_profile(widths, bias, name):
    model = randomise(mlp(widths, bias), torch.Generator().manual_seed(1))
    x, y = _data((widths[0],), classes=widths[-1])
    names = [str(k) for k in range(0, 2 * len(widths) - 2, 2)]
    _run(model, x, y, CASES[name], expected_blocks=[names])


class WithOutside(nn.Module):
    """A chain block plus parameters outside every block (a scale and a lone Linear)."""

    def __init__(self):
        super().__init__()
        self.body = mlp([4, 5, 6, 3], bias=True)
        self.scale = nn.Parameter(torch.ones(3, dtype=torch.float64))
        self.head = nn.Linear(3, 3).double()

    def forward(self, x):
        return self.head(torch.tanh(self.body(x) * self.scale))


@pytest.mark.parametrize("name", CASES)
def test_parameters_outside_every_block_take_torchs_step(name):
    model = randomise(WithOutside(), torch.Generator().manual_seed(2))
    x, y = _data((4,))
    opt = _run(model, x, y, CASES[name], expected_blocks=[["body.0", "body.2", "body.4"]])
    assert {id(p) for p in opt._outside} == {id(model.scale), id(model.head.weight),
                                             id(model.head.bias)}


def _conv_chain():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(12, 3)).double()


@pytest.mark.parametrize("name", CASES)
def test_conv_chain_equals_the_reference(name):
    """Kernels (9 parallel edges per channel pair, skeleton at the centre) and a Linear layer
    reading the flattened map (4 positions per channel)."""
    model = randomise(_conv_chain(), torch.Generator().manual_seed(3), low=0.3, high=0.9)
    x, y = _data((2, 4, 4))
    _run(model, x, y, CASES[name], expected_blocks=[["0", "3", "6"]], input_shape=(2, 4, 4))


def _residual(bn):
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), BasicBlock(3, 3, 1, False),
                         BasicBlock(3, 4, 2, bn), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).double()


@pytest.mark.parametrize("name", CASES)
def test_residual_blocks_equal_the_reference(name):
    """The chains inside two residual blocks (identity and projection shortcut, batch norm
    in the second under bn='approx'); the stem, shortcut, batch norm and head take torch's."""
    model = randomise(_residual(bn=True), torch.Generator().manual_seed(4), low=0.3, high=0.9)
    model.train()
    x, y = _data((2, 4, 4))
    _run(model, x, y, CASES[name], expected_blocks=[["2.body.0", "2.body.2"],
                                                    ["3.body.0", "3.body.3"]],
         input_shape=(2, 4, 4))


@pytest.mark.parametrize("name", CASES)
def test_batch_norm_mlp_equals_the_reference_under_bn_approx(name):
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 6),
                          nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
    randomise(model, torch.Generator().manual_seed(5))
    x, y = _data((4,))
    opt = _run(model, x, y, CASES[name], expected_blocks=[["0", "3", "6"]], bn="approx")
    assert opt.blocks[0].bn_after == [True, True, False]


def test_the_reference_harness_can_fail():
    """A wrong step (lr differing in the 8th digit) is caught by the comparison."""
    model = randomise(mlp([3, 4, 4, 2], True), torch.Generator().manual_seed(1))
    x, y = _data((3,), classes=2)
    twin = copy.deepcopy(model)
    opt = _make(model, ADAM)
    reference = Reference(twin, opt.blocks, AdamOptions(**{**vars(ADAM), "lr": ADAM.lr *
                                                             (1 + 1e-8)}))
    for m in (model, twin):
        F.cross_entropy(m(x), y).backward()
    opt.step()
    reference.step()
    with pytest.raises(AssertionError, match="differs"):
        _close(model, twin, "step 1")


# ------------------------------------------------------------------------------------------
# invariance: G-space steps commute with positive rescaling of hidden units
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gadam", "grmsprop"])
def test_rescaled_copies_stay_function_equal_while_torch_drifts(name):
    """Two copies that differ by a positive rescaling of hidden units compute the same
    function; after 20 steps the G-space optimizer's copies still do (1e-10 relative), torch's
    Adam / RMSprop with the same hyper-parameters take them apart."""
    options = CASES[name]
    options = type(options)(**{**vars(options), "weight_decay": 0.0, "bpr": 0.0})
    gen = torch.Generator().manual_seed(7)
    base = randomise(mlp([4, 6, 5, 3], bias=True), gen)
    rescaled = rescale_hidden(copy.deepcopy(base), gen)
    x, y = _data((4,), n=16)
    assert torch.allclose(base(x), rescaled(x), rtol=1e-12, atol=1e-12)
    runs = {}
    for kind in ("g-space", "torch"):
        outputs = []
        for model in (copy.deepcopy(base), copy.deepcopy(rescaled)):
            opt = (_make(model, options) if kind == "g-space"
                   else _torch_opt(model.parameters(), options))
            for step in range(20):
                opt.zero_grad()
                F.cross_entropy(model(x[step % 2::2]), y[step % 2::2]).backward()
                opt.step()
            outputs.append(model(x).detach())
        runs[kind] = float((outputs[0] - outputs[1]).abs().max() / outputs[0].abs().max())
    assert runs["g-space"] <= 1e-10, runs
    assert runs["torch"] > 1e-3, runs


# ------------------------------------------------------------------------------------------
# checks before any write
# ------------------------------------------------------------------------------------------
def _snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()})


def _unchanged(model, opt, snapshot):
    params, state = snapshot
    assert all(torch.equal(p.detach(), q) for p, q in zip(model.parameters(), params))
    assert {id(p) for p in opt.state} == set(state)
    for p, s in opt.state.items():
        assert s.keys() == state[id(p)].keys()
        assert all(torch.equal(v, state[id(p)][k]) for k, v in s.items())


STEP_ERRORS = {"gadam": GAdamStepError, "grmsprop": GRMSpropStepError}


@pytest.mark.parametrize("where,message", [
    ("body.2.weight", r"G-.* step 3 failed in layer 'body.2': its gradient is not finite"),
    ("body.2.bias", r"step 3 failed in layer 'body.2': its bias gradient is not finite"),
    ("scale", r"step 3 failed in parameter 'scale' \(plain .* step outside the chain "
              r"blocks\): its gradient is not finite"),
])
@pytest.mark.parametrize("name", CASES)
def test_a_non_finite_gradient_is_refused_before_any_write(name, where, message):
    model = randomise(WithOutside(), torch.Generator().manual_seed(2))
    x, y = _data((4,))
    opt = _make(model, CASES[name])
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    dict(model.named_parameters())[where].grad.view(-1)[1] = float("nan")
    snapshot = _snapshot(model, opt)
    with pytest.raises(STEP_ERRORS[name], match=message) as caught:
        opt.step()
    assert caught.value.step == 3 and "Nothing was updated" in str(caught.value)
    _unchanged(model, opt, snapshot)
    opt.zero_grad()                            # the next finite step writes again
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert not torch.equal(model.body[2].weight.detach(), snapshot[0][2])


@pytest.mark.parametrize("name", CASES)
def test_a_vanishing_pivot_is_refused_before_any_write(name):
    """A step that moves a pivot below min_pivot_ratio of its value raises, naming the pivot
    layer, and writes nothing (min_pivot_ratio=2: every small step fails the check)."""
    model = randomise(mlp([3, 4, 6, 2], bias=True), torch.Generator().manual_seed(3))
    x, y = _data((3,), classes=2)
    opt = _make(model, CASES[name], min_pivot_ratio=2.0)
    F.cross_entropy(model(x), y).backward()
    snapshot = _snapshot(model, opt)
    with pytest.raises(STEP_ERRORS[name], match=r"step 1 failed in layer '2': pivot \d+ would "
                                                r"change by the ratio"):
        opt.step()
    _unchanged(model, opt, snapshot)


@pytest.mark.parametrize("name", CASES)
def test_state_is_per_parameter_and_shaped_like_it_as_torch_keeps_it(name):
    model = randomise(WithOutside(), torch.Generator().manual_seed(2))
    x, y = _data((4,))
    opt = _make(model, CASES[name])
    torch_opt = _torch_opt([p.detach().clone().requires_grad_() for p in model.parameters()],
                           CASES[name])
    F.cross_entropy(model(x), y).backward()
    opt.step()
    for p in torch_opt.param_groups[0]["params"]:
        p.grad = torch.zeros_like(p)
    torch_opt.step()
    torch_state = list(torch_opt.state.values())
    for p, theirs in zip(model.parameters(), torch_state):
        mine = opt.state[p]
        assert mine.keys() == theirs.keys()
        for key, value in mine.items():
            assert value.shape == theirs[key].shape and value.dtype == theirs[key].dtype, key
    assert int(opt.state[model.body[0].weight]["step"]) == 1


@pytest.mark.parametrize("name", ["gadam", "grmsprop"])
def test_rescaled_conv_chains_stay_function_equal_while_torch_drifts(name):
    """The same on a conv chain (pooling, and a Linear layer reading the flattened map):
    hidden channel c of a convolution scaled by k_c > 0, its outgoing kernels (or the Linear
    columns of its positions) divided by k_c."""
    options = CASES[name]
    options = type(options)(**{**vars(options), "weight_decay": 0.0, "bpr": 0.0})
    gen = torch.Generator().manual_seed(8)
    base = randomise(_conv_chain(), gen, low=0.3, high=0.9)
    rescaled = copy.deepcopy(base)
    with torch.no_grad():
        k0 = 0.2 + 4.8 * torch.rand(3, generator=gen, dtype=torch.float64)
        k3 = 0.2 + 4.8 * torch.rand(3, generator=gen, dtype=torch.float64)
        rescaled[0].weight.mul_(k0[:, None, None, None])
        rescaled[0].bias.mul_(k0)
        rescaled[3].weight.div_(k0[None, :, None, None]).mul_(k3[:, None, None, None])
        rescaled[3].bias.mul_(k3)
        rescaled[6].weight.div_(k3.repeat_interleave(4)[None, :])
    x, y = _data((2, 4, 4), n=16)
    assert torch.allclose(base(x), rescaled(x), rtol=1e-12, atol=1e-12)
    gaps = {}
    for kind in ("g-space", "torch"):
        outputs = []
        for model in (copy.deepcopy(base), copy.deepcopy(rescaled)):
            opt = (_make(model, options, input_shape=(2, 4, 4)) if kind == "g-space"
                   else _torch_opt(model.parameters(), options))
            for step in range(20):
                opt.zero_grad()
                F.cross_entropy(model(x[step % 2::2]), y[step % 2::2]).backward()
                opt.step()
            outputs.append(model(x).detach())
        gaps[kind] = float((outputs[0] - outputs[1]).abs().max() / outputs[0].abs().max())
    assert gaps["g-space"] <= 1e-10, gaps
    assert gaps["torch"] > 1e-3, gaps
