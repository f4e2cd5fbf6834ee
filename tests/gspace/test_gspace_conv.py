"""Convolutional chain blocks: Theorem 3.4 on the channel graph, one G-SGD step against the
brute-force reference (kernel elements as edges, float64), invariance on the real Plain and
ResNet code without batch norm, the batch-norm approximation, and block options."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gsgd_cli.testing import gsgd_reference as ref
from gsgd_cli.gspace.blocks import find_chain_blocks
from gsgd_cli.models import PlainNet, ResNet
from gsgd_cli.optim.gsgd import GSGD

from gsgd_cli.testing.helpers import randomise


def conv_net(channels, bias=False, pool="avg", stride=1, image=4, classes=2):
    """conv 3x3 layers with the given channels, a pooling layer, flatten and a Linear head."""
    layers = []
    size = image
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias), nn.ReLU()]
        size = (size - 1) // stride + 1
    if pool == "avg":
        layers.append(nn.AvgPool2d(2))
        size //= 2
    elif pool == "max":
        layers.append(nn.MaxPool2d(2))
        size //= 2
    layers += [nn.Flatten(), nn.Linear(channels[-1] * size * size, classes, bias=bias)]
    return nn.Sequential(*layers).double(), size


CONV_CASES = [
    ("increasing-avg", dict(channels=[1, 2, 3])),
    ("decreasing-bias", dict(channels=[2, 3, 2], bias=True)),
    ("equal-max", dict(channels=[1, 2, 2], pool="max")),
    ("stride2-nopool", dict(channels=[2, 2, 3], stride=2, pool=None)),
    ("single-conv", dict(channels=[3, 2])),
]


def reference_net(model):
    """The test's own reading of the model as a channel graph (centre taps are the skeleton)."""
    weights, biases, centres = [], [], []
    previous_channels = None
    for m in model:
        if isinstance(m, nn.Conv2d):
            weights.append(m.weight.detach().reshape(m.out_channels, m.in_channels, -1).clone())
            centres.append(4)                       # 3x3 kernel: centre offset 1 * 3 + 1
            previous_channels = m.out_channels
        elif isinstance(m, nn.Linear):
            weights.append(m.weight.detach().reshape(m.out_features, previous_channels, -1)
                           .clone())
            centres.append(0)
        else:
            continue
        biases.append(m.bias.detach().clone() if m.bias is not None else None)
    return ref.Net(weights, biases, centres)


def flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("name,kwargs", CONV_CASES, ids=[n for n, _ in CONV_CASES])
def test_theorem_3_4_on_the_channel_graph(name, kwargs):
    model, _ = conv_net(**kwargs)
    net = reference_net(model)
    _, _, m = net.edge_ids()
    a = ref.structure_matrix(ref.all_paths(net), m)
    assert torch.linalg.matrix_rank(a).item() == m - ref.hidden_count(net)
    basis = ref.skeleton_basis(net)
    assert torch.linalg.matrix_rank(ref.structure_matrix(basis.paths, m)).item() == m - len(
        basis.free)


@pytest.mark.usefixtures("step_path")
@pytest.mark.parametrize("name,kwargs", CONV_CASES, ids=[n for n, _ in CONV_CASES])
def test_conv_step_equals_brute_force(name, kwargs):
    gen = torch.Generator().manual_seed(len(name))
    model, _ = conv_net(**kwargs)
    randomise(model, gen, low=0.3, high=0.9, positive=0.75)
    x = torch.randn(6, kwargs["channels"][0], 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (6,), generator=gen)
    opt = GSGD(model, lr=0.3, skeleton_init="keep")
    assert len(opt.blocks) == 1 and len(opt.blocks[0].names) == len(kwargs["channels"])
    net = reference_net(model)
    F.cross_entropy(model(x), y).backward()
    expected = ref.gsgd_step(net, flat_grad(model), 0.3)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    expected_flat = expected.flat()
    got_flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got_flat, expected_flat, rtol=0, atol=1e-10)
    moved = max(float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before))
    assert moved > 1e-4


def _rescale_chains(model, generator, discovery):
    """g(w): multiply each hidden channel's incoming weights (and bias) by c > 0 and its
    outgoing weights by 1/c, for every hidden node of every chain block."""
    with torch.no_grad():
        for block in discovery.blocks:
            for left, right, view in zip(block.modules[:-1], block.modules[1:], block.views[1:]):
                c = 0.3 + 3 * torch.rand(view.n_in, generator=generator, dtype=torch.float64)
                left.weight.mul_(c.view(-1, *[1] * (left.weight.dim() - 1)))
                if left.bias is not None:
                    left.bias.mul_(c)
                w = right.weight.view(view.n_out, view.n_in, view.kernel)
                w.div_(c[None, :, None])


@pytest.mark.usefixtures("step_path")
@pytest.mark.parametrize("arch", ["plain", "resnet"])
def test_invariance_on_bn_free_paper_models_at_reduced_width(arch):
    torch.manual_seed(0)
    cls = PlainNet if arch == "plain" else ResNet
    model_a = cls(3, 4, blocks=[2, 1], widths=[3, 4], bn=False).double()
    gen = torch.Generator().manual_seed(1)
    discovery = find_chain_blocks(model_a)
    assert discovery.blocks
    model_b = copy.deepcopy(model_a)
    _rescale_chains(model_b, gen, find_chain_blocks(model_b))
    x = torch.randn(8, 3, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (8,), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(model_a(x), model_b(x), rtol=0, atol=1e-12)

    def run(model, make_opt):
        opt = make_opt(model)
        outs = []
        for k in range(8):
            opt.zero_grad()
            F.cross_entropy(model(x[k % 2::2]), y[k % 2::2]).backward()
            opt.step()
            with torch.no_grad():
                outs.append(model(x))
        return outs

    gsgd = lambda m: GSGD(m, lr=0.02, skeleton_init="keep")   # noqa: E731
    out_a, out_b = run(copy.deepcopy(model_a), gsgd), run(copy.deepcopy(model_b), gsgd)
    for k, (a, b) in enumerate(zip(out_a, out_b)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"step {k}")
    assert (out_a[-1] - out_a[0]).abs().max() > 1e-4
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.02)   # noqa: E731
    sgd_a, sgd_b = run(copy.deepcopy(model_a), sgd), run(copy.deepcopy(model_b), sgd)
    assert (sgd_a[-1] - sgd_b[-1]).abs().max() > 1e-6


def test_discovery_on_paper_models():
    plain = find_chain_blocks(PlainNet(bn=False))
    assert len(plain.blocks) == 1 and len(plain.blocks[0].names) == 34   # stem..classifier
    assert plain.outside == []
    resnet = find_chain_blocks(ResNet(bn=False))
    assert len(resnet.blocks) == 16                                       # one per block
    assert all(len(b.names) == 2 for b in resnet.blocks)
    outside = {name.rsplit(".", 1)[0] for name, _ in resnet.outside}
    assert outside == {"0", "5.shortcut.0", "9.shortcut.0", "15.shortcut.0", "20"}
    bn_plain = find_chain_blocks(PlainNet(bn=True))
    assert len(bn_plain.blocks) == 1 and bn_plain.blocks[0].bn_after[0]
    assert bn_plain.blocks[0].bn_after == [True] * 33 + [False]   # not the classifier
    bn_resnet = find_chain_blocks(ResNet(bn=True))
    assert all(b.bn_after == [True, True] for b in bn_resnet.blocks)   # BN before the add too
    assert find_chain_blocks(PlainNet(bn=True), bn="split").blocks == []


@pytest.mark.usefixtures("step_path")
@pytest.mark.parametrize("mode", ["approx", "approx_per_tap"])
def test_bn_approximation_multiplies_gradients_by_filter_norm(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3),
                          nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)).double()
    reference = copy.deepcopy(model)
    opt = GSGD(model, lr=0.1, skeleton_init="keep", bn=mode)
    assert opt.blocks[0].bn_after == [True, False, False]
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1])
    F.cross_entropy(model(x), y).backward()
    # the same step, by hand: scale the first conv's gradient, then an exact step without BN
    F.cross_entropy(reference(x), y).backward()
    w = reference[0].weight
    if mode == "approx":          # the paper's eq. 39: the whole incoming filter of a channel
        w.grad *= w.detach().reshape(3, -1).norm(dim=1).view(3, 1, 1, 1)
    else:                         # the published code: over input channels, per kernel tap
        w.grad *= torch.sqrt((w.detach() ** 2).sum(dim=1, keepdim=True))
    chain = nn.Sequential(reference[0], nn.ReLU(), reference[3], nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), reference[7])
    GSGD(chain, lr=0.1, skeleton_init="keep").step()
    opt.step()
    for got, want in zip([model[0], model[3], model[7]], [reference[0], reference[3],
                                                         reference[7]]):
        torch.testing.assert_close(got.weight, want.weight, rtol=0, atol=1e-12)


@pytest.mark.usefixtures("step_path")
def test_block_split_by_stage():
    model = PlainNet(3, 10, blocks=[3, 3], widths=[4, 8], bn=False)
    opt = GSGD(model, lr=0.1, block_split="stage")
    # stages of equal width: three 4->4 convs after the stem, two 8->8 convs after the stride-2
    # transition; stem, transition and classifier take plain SGD
    assert [b.widths for b in opt.blocks] == [(4, 4, 4, 4), (8, 8, 8)]
    plain = {id(p) for p in opt._outside}
    for layer in (model[0], model[8], model[16]):
        assert {id(p) for p in layer.parameters()} <= plain


@pytest.mark.usefixtures("step_path")
def test_rescale_init_keeps_the_function_and_sets_free_weights_to_unit():
    torch.manual_seed(0)
    model = PlainNet(3, 5, blocks=[2, 1], widths=[3, 4], bn=False).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    before = model(x).detach()
    opt = GSGD(model, lr=0.1, skeleton_init="rescale")
    torch.testing.assert_close(model(x), before, rtol=1e-12, atol=1e-12)
    plan = opt._plans[0]
    for w, layer in zip(plan.weights, plan.skeleton.layers):
        if layer.role != "pivot":
            values = w.detach().reshape(-1)[layer.flat]
            torch.testing.assert_close(values.abs(), torch.ones_like(values))
    with pytest.raises(ValueError, match="skeleton_init='rescale' keeps the network function "
                                         "only without batch norm"):
        GSGD(PlainNet(3, 5, blocks=[1], widths=[4], bn=True), lr=0.1, skeleton_init="rescale")
