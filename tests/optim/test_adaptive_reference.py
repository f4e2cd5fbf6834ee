"""G-Adam and G-RMSprop: the elementwise rules against torch.optim, the dense reference
against G-SGD's in the limits where Adam becomes sign-SGD / SGD, the reference's invariance
under positive rescaling (with weight-space Adam / RMSprop drifting in the same test), and the
closed form per chain block against the reference (float64)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from gsgd_cli.gspace.adaptive import (AdamOptions, RMSpropOptions, adam_rule,
                                      chain_adaptive_step, rmsprop_rule)
from gsgd_cli.gspace.skeleton import build_skeleton
from gsgd_cli.gspace.update import ChainIndex
from gsgd_cli.testing import gsgd_reference as ref
from gsgd_cli.testing import reference_adaptive as refa
from gsgd_cli.testing.helpers import (PROFILES, as_reference_net, flat_grad, mlp, randomise,
                                      rescale_hidden)

ADAM_CASES = {
    "adam": AdamOptions(lr=0.01),
    "adam-amsgrad-wd": AdamOptions(lr=0.02, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1,
                                   amsgrad=True),
    "adam-maximize": AdamOptions(lr=0.01, maximize=True),
    "adam-bpr": AdamOptions(lr=0.01, bpr=0.05),
}
RMSPROP_CASES = {
    "rmsprop": RMSpropOptions(lr=0.003),
    "rmsprop-centered-momentum-wd": RMSpropOptions(lr=0.002, alpha=0.9, eps=1e-6,
                                                   weight_decay=0.05, momentum=0.5,
                                                   centered=True),
    "rmsprop-bpr": RMSpropOptions(lr=0.003, bpr=0.05),
}
CASES = {**ADAM_CASES, **RMSPROP_CASES}


def _torch_optimizer(params, options):
    if isinstance(options, AdamOptions):
        return torch.optim.Adam(params, lr=options.lr, betas=options.betas, eps=options.eps,
                                weight_decay=options.weight_decay, amsgrad=options.amsgrad,
                                maximize=options.maximize)
    return torch.optim.RMSprop(params, lr=options.lr, alpha=options.alpha, eps=options.eps,
                               weight_decay=options.weight_decay, momentum=options.momentum,
                               centered=options.centered, maximize=options.maximize)


def _rule(g, state, step, options):
    if isinstance(options, AdamOptions):
        return adam_rule(g, state, step, options)
    return rmsprop_rule(g, state, options)


@pytest.mark.parametrize("name", [n for n in CASES if "bpr" not in n])
def test_rules_equal_torch_optim_on_a_plain_tensor(name):
    """Five steps of the elementwise rule move a tensor as torch's optimizer does (weight decay
    and maximize, which G-space applies to dw before the rule, applied to the gradient here)."""
    options = CASES[name]
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(7, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    mine = p.detach().clone()
    opt = _torch_optimizer([p], options)
    state = {}
    for step in range(1, 6):
        g = torch.randn(7, 3, generator=gen, dtype=torch.float64)
        p.grad = g.clone()
        opt.step()
        effective = (-g if options.maximize else g) + options.weight_decay * mine
        d, state = _rule(effective, state, step, options)
        mine = mine - d
        torch.testing.assert_close(mine, p.detach(), rtol=1e-13, atol=1e-15)


def _loss_grad(net: ref.Net, x, y):
    weights = [w.clone().requires_grad_(True) for w in net.weights]
    biases = [None if b is None else b.clone().requires_grad_(True) for b in net.biases]
    loss = F.mse_loss(ref.forward(ref.Net(weights, biases), x), y)
    params = [t for pair in zip(weights, biases) for t in pair if t is not None]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def _random_net(widths, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    model = randomise(mlp(widths, bias), gen)
    return as_reference_net(model), gen


def _data(widths, gen, n=16):
    x = torch.randn(n, widths[0], generator=gen, dtype=torch.float64)
    y = torch.randn(n, widths[-1], generator=gen, dtype=torch.float64)
    return x, y


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_reference_adam_without_averaging_is_sign_sgd_on_basis_paths(bias):
    """betas = (0, 0), eps ~ 0: each basis-path value moves by lr * sign(g), g the G-SGD
    reference's basis-path gradient (read off a G-SGD step); eps = 1e-200 rather than 0 so that
    the paths through a dead unit (g = 0) give no NaN (0/0)."""
    widths = [3, 4, 4, 2]
    net, gen = _random_net(widths, bias, 1)
    x, y = _data(widths, gen)
    grad = _loss_grad(net, x, y)
    basis = ref.skeleton_basis(net)
    values = ref.path_values(net, basis)
    eta = 1e-3
    g = (values - ref.path_values(ref.gsgd_step(net, grad, eta, basis), basis)) / eta
    new_net, _ = refa.gadam_step(net, grad, {}, 1, AdamOptions(lr=0.01, betas=(0.0, 0.0),
                                                               eps=1e-200), basis)
    live = g.abs() > 1e-9 * g.abs().max()   # sign(0 + roundoff) is arbitrary: skip dead paths
    assert live.sum() >= len(g) // 2
    torch.testing.assert_close(ref.path_values(new_net, basis)[live],
                               (values - 0.01 * g.sign())[live], rtol=1e-9, atol=1e-12)
    for e in basis.free:                                  # free weights held fixed
        assert new_net.flat()[e] == net.flat()[e]


@pytest.mark.parametrize("kind", ["adam", "rmsprop"])
def test_reference_with_huge_eps_is_the_gsgd_reference(kind):
    """eps -> inf with lr / eps = eta fixed: the step tends to G-SGD's with rate eta (relative
    error about |g| / eps), over three steps."""
    widths = [3, 2, 4, 6, 2]
    net, gen = _random_net(widths, True, 2)
    x, y = _data(widths, gen)
    eta, eps = 0.05, 1e10
    options = (AdamOptions(lr=eta * eps, betas=(0.0, 0.999), eps=eps) if kind == "adam"
               else RMSpropOptions(lr=eta * eps, eps=eps))
    basis = ref.skeleton_basis(net)
    mine, theirs, state = net, net, {}
    for step in range(1, 4):
        if kind == "adam":
            mine, state = refa.gadam_step(mine, _loss_grad(mine, x, y), state, step, options,
                                          basis)
        else:
            mine, state = refa.grmsprop_step(mine, _loss_grad(mine, x, y), state, options,
                                             basis)
        theirs = ref.gsgd_step(theirs, _loss_grad(theirs, x, y), eta, basis)
        moved = (theirs.flat() - net.flat()).abs().max()
        assert moved > 1e-3                               # a real step, not a no-op
        assert (mine.flat() - theirs.flat()).abs().max() <= 1e-6 * moved


def _run_reference(net, x, y, options, steps):
    basis = ref.skeleton_basis(net)
    state, outputs = {}, []
    for step in range(1, steps + 1):
        grad = _loss_grad(net, x, y)
        if isinstance(options, AdamOptions):
            net, state = refa.gadam_step(net, grad, state, step, options, basis)
        else:
            net, state = refa.grmsprop_step(net, grad, state, options, basis)
        outputs.append(ref.forward(net, x))
    return outputs


def _run_torch(model, x, y, options, steps):
    opt = _torch_optimizer(model.parameters(), options)
    outputs = []
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        with torch.no_grad():
            outputs.append(model(x))
    return outputs


@pytest.mark.parametrize("name", ["adam", "rmsprop", "rmsprop-centered-momentum"])
def test_reference_is_invariant_under_rescaling_while_torch_drifts(name):
    """Two networks that differ by a positive rescaling of hidden units compute the same
    function after each of 20 G-Adam / G-RMSprop steps (1e-10), while torch's Adam / RMSprop
    from the same two networks end up computing different functions."""
    options = {"adam": AdamOptions(lr=0.01),
               "rmsprop": RMSpropOptions(lr=0.003),
               "rmsprop-centered-momentum": RMSpropOptions(lr=0.002, momentum=0.5,
                                                           centered=True)}[name]
    widths = [3, 4, 4, 2]
    gen = torch.Generator().manual_seed(3)
    model = randomise(mlp(widths, True), gen)
    rescaled = rescale_hidden(copy.deepcopy(model), gen)
    x, y = _data(widths, gen)
    with torch.no_grad():
        torch.testing.assert_close(model(x), rescaled(x), rtol=1e-12, atol=1e-12)
    ours_a = _run_reference(as_reference_net(model), x, y, options, 20)
    ours_b = _run_reference(as_reference_net(rescaled), x, y, options, 20)
    for a, b in zip(ours_a, ours_b):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert (ours_a[-1] - ours_a[0]).abs().max() > 1e-2     # the function did move
    torch_a = _run_torch(model, x, y, options, 20)
    torch_b = _run_torch(rescaled, x, y, options, 20)
    assert (torch_a[-1] - torch_b[-1]).abs().max() > 1e-3


def _chain_run(widths, bias, options, steps, seed):
    """The closed form and the reference side by side from the same net and data."""
    net, gen = _random_net(widths, bias, seed)
    x, y = _data(widths, gen)
    skeleton = build_skeleton(widths)
    index = ChainIndex.build(skeleton, torch.device("cpu"))
    basis = ref.skeleton_basis(net)
    ref_net, ref_state = net, {}
    weights, biases, state = list(net.weights), list(net.biases), {}
    for step in range(1, steps + 1):
        grad = _loss_grad(ref_net, x, y)
        if isinstance(options, AdamOptions):
            ref_net, ref_state = refa.gadam_step(ref_net, grad, ref_state, step, options, basis)
        else:
            ref_net, ref_state = refa.grmsprop_step(ref_net, grad, ref_state, options, basis)
        model = mlp(widths, bias)
        layers = [m for m in model if isinstance(m, torch.nn.Linear)]
        with torch.no_grad():
            for layer, w, b in zip(layers, weights, biases):
                layer.weight.copy_(w)
                if b is not None:
                    layer.bias.copy_(b)
        F.mse_loss(model(x), y).backward()
        weights, biases, state = chain_adaptive_step(
            skeleton, index, weights, biases, [m.weight.grad for m in layers],
            [None if m.bias is None else m.bias.grad for m in layers], state, step, options)
        mine = ref.Net(weights, biases).flat()
        scale = ref_net.flat().abs().max()
        assert (mine - ref_net.flat()).abs().max() <= 1e-10 * scale, f"step {step}"
    return ref_net


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("widths", [w for _, w in PROFILES], ids=[n for n, _ in PROFILES])
def test_closed_form_equals_reference_over_three_steps(widths, bias, name):
    _chain_run(widths, bias, CASES[name], 3, seed=4)


@pytest.mark.parametrize("name", ["adam-amsgrad-wd", "rmsprop-centered-momentum-wd"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_closed_form_equals_reference_on_a_conv_chain(bias, name):
    """Kernels with parallel edges per channel pair (skeleton at an off-zero centre): the
    channel graph of a conv chain. Random gradients (the step is defined for any dw)."""
    options = CASES[name]
    widths, kernels, centres = [2, 3, 4, 2], (3, 2, 1), (1, 1, 0)
    gen = torch.Generator().manual_seed(5)

    def rand(*shape, low=0.5):
        sign = torch.where(torch.rand(shape, generator=gen) < 0.7, 1.0, -1.0)
        return sign.double() * (low + torch.rand(shape, generator=gen, dtype=torch.float64))

    weights = [rand(b, a, k) for a, b, k in zip(widths[:-1], widths[1:], kernels)]
    biases = [rand(b) if bias else None for b in widths[1:]]
    net = ref.Net(weights, biases, list(centres))
    basis = ref.skeleton_basis(net)
    skeleton = build_skeleton(widths, kernels, centres)
    index = ChainIndex.build(skeleton, torch.device("cpu"))
    ref_net, ref_state, state = net, {}, {}
    for step in range(1, 4):
        grads = [rand(*w.shape, low=-1.0) for w in weights]
        bias_grads = [None if b is None else rand(*b.shape, low=-1.0) for b in biases]
        flat = ref.Net(grads, bias_grads).flat()
        if isinstance(options, AdamOptions):
            ref_net, ref_state = refa.gadam_step(ref_net, flat, ref_state, step, options, basis)
        else:
            ref_net, ref_state = refa.grmsprop_step(ref_net, flat, ref_state, options, basis)
        weights, biases, state = chain_adaptive_step(skeleton, index, weights, biases, grads,
                                                     bias_grads, state, step, options)
        mine = ref.Net(weights, biases).flat()
        assert (mine - ref_net.flat()).abs().max() <= 1e-10 * ref_net.flat().abs().max()


def test_closed_form_state_is_shaped_like_the_parameters_with_free_entries_zero():
    widths = [3, 2, 4, 6, 2]
    net, gen = _random_net(widths, True, 6)
    skeleton = build_skeleton(widths)
    index = ChainIndex.build(skeleton, torch.device("cpu"))
    grads = [torch.randn(w.shape, generator=gen, dtype=torch.float64) for w in net.weights]
    bias_grads = [torch.randn(b.shape, generator=gen, dtype=torch.float64) for b in net.biases]
    _, _, state = chain_adaptive_step(skeleton, index, net.weights, net.biases, grads,
                                      bias_grads, {}, 1, AdamOptions(amsgrad=True))
    for i, (w, b) in enumerate(zip(net.weights, net.biases)):
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert state["w", i][key].shape == w.shape
            assert state["b", i][key].shape == b.shape
            at_skeleton = state["w", i][key].reshape(-1)[index.flat[i]]
            if skeleton.layers[i].role == "pivot":
                assert (at_skeleton != 0).all()        # the pivots' own moments
            else:
                assert (at_skeleton == 0).all()        # free weights: no coordinate


def test_reference_bpr_term_is_the_gradient_of_the_bpr_value():
    """The term `bpr` adds to the basis-path gradient is the basis-path gradient (eq. 4 solved
    densely) of the weight gradient that autograd gives for `ref.bpr_value`, checked directly
    and through a G-Adam step whose eps makes it magnitude-sensitive (SGD-like)."""
    net, _ = _random_net([3, 2, 4, 6, 2], True, 7)
    basis = ref.skeleton_basis(net)
    tensors = [t.clone().requires_grad_(True) for pair in zip(net.weights, net.biases)
               for t in pair]
    live = ref.Net(tensors[0::2], tensors[1::2])
    weight_grad = torch.cat([g.reshape(-1) for g in
                             torch.autograd.grad(ref.bpr_value(live, 0.05, basis), tensors)])
    term = refa._add_bpr(torch.zeros(len(basis.paths), dtype=torch.float64), net, basis, 0.05)
    torch.testing.assert_close(term, refa.basis_gradient(net, weight_grad, basis),
                               rtol=1e-10, atol=1e-13)
    options = AdamOptions(lr=10.0, eps=1e3)
    with_term, _ = refa.gadam_step(net, torch.zeros_like(weight_grad), {}, 1,
                                   AdamOptions(lr=10.0, eps=1e3, bpr=0.05), basis)
    from_loss, _ = refa.gadam_step(net, weight_grad, {}, 1, options, basis)
    torch.testing.assert_close(with_term.flat(), from_loss.flat(), rtol=1e-12, atol=1e-14)
