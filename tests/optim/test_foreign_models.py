"""G-SGD on networks written elsewhere: never silently wrong (issue 10).

The oracle: for every block GSGD steps, the positive rescaling of its hidden nodes that G-SGD
assumes (through each layer's `[n_out, n_in, K]` view) must leave the network's function
unchanged, and two copies related by it must compute the same function after every G-SGD step
(float64). A join that G-SGD cannot rescale exactly must end the chain, with a note."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gsgd_cli.testing import gsgd_reference as ref
from gsgd_cli.gspace.skeleton import UnsupportedWidthProfile
from gsgd_cli.optim import GSGD, GSGDStepError, GSGDWarning

from gsgd_cli.testing.helpers import as_reference_net, linears, mlp, randomise


def quiet_gsgd(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GSGDWarning)
        return GSGD(model, **kwargs)


def rescale_blocks(model, blocks, generator, low=0.3, high=3.0):
    """g(w) as G-SGD sees it: hidden node j of each block gets c_j > 0 on its incoming weights
    (and bias) and 1/c_j on its outgoing ones, through the layers' [n_out, n_in, K] views."""
    with torch.no_grad():
        for block in blocks:
            layers = [model.get_submodule(name) for name in block.names]
            for left, right, view in zip(layers[:-1], layers[1:], block.views[1:]):
                c = low + (high - low) * torch.rand(view.n_in, generator=generator,
                                                    dtype=torch.float64)
                left.weight.mul_(c.view(-1, *[1] * (left.weight.dim() - 1)))
                if left.bias is not None:
                    left.bias.mul_(c)
                right.weight.view(view.n_out, view.n_in, view.kernel).div_(c[None, :, None])
    return model


def assert_invariant(make, x, y, steps=6, lr=0.05, own_init=False, **kwargs):
    """The oracle on two models from `make()`; returns the optimizer of the first one.
    Weights are randomised (both signs, well conditioned) unless `own_init`; every forward
    pass of the two copies draws the same dropout masks."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    model, twin = make().double(), make().double()
    for m in (model, twin):
        if not own_init:
            randomise(m, torch.Generator().manual_seed(0), low=0.3, high=1.0, positive=0.75)

    def forward(m, inputs, seed):
        torch.manual_seed(seed)
        return m(inputs)

    opt = quiet_gsgd(model, lr=lr, skeleton_init="keep", **kwargs)
    rescale_blocks(twin, opt.blocks, torch.Generator().manual_seed(1))
    twin_opt = quiet_gsgd(twin, lr=lr, skeleton_init="keep", **kwargs)
    assert [b.names for b in twin_opt.blocks] == [b.names for b in opt.blocks]
    with torch.no_grad():
        torch.testing.assert_close(forward(twin, x, 0), forward(model, x, 0), rtol=1e-10,
                                   atol=1e-10,
                                   msg="the rescaling G-SGD assumes changes the function")
    for k in range(steps):
        for m, o in ((model, opt), (twin, twin_opt)):
            o.zero_grad()
            F.cross_entropy(forward(m, x[k % 2::2], k + 1), y[k % 2::2]).backward()
            o.step()
        with torch.no_grad():
            torch.testing.assert_close(forward(twin, x, 0), forward(model, x, 0), rtol=1e-9,
                                       atol=1e-9, msg=f"step {k}")
    return opt


def _xy(*shape, classes=3, n=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *shape, generator=gen, dtype=torch.float64),
            torch.randint(0, classes, (n,), generator=gen))


def _names(opt):
    return [b.names for b in opt.blocks]


# ------------------------------------------------------------------------------------------
# flatten layouts
# ------------------------------------------------------------------------------------------
class TokenMLP(nn.Module):
    """A Linear over tokens, then flatten(1): fc2's columns are grouped by token."""

    def __init__(self, tokens=3, features=4, hidden=5, classes=3):
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(tokens * hidden, classes)

    def forward(self, x):
        return self.fc2(torch.flatten(F.relu(self.fc1(x)), 1))


class TokenConv(nn.Module):
    """The same computation as a 1x1 convolution: exact (channels are fc2's slow axis)."""

    def __init__(self, tokens=3, features=4, hidden=5, classes=3):
        super().__init__()
        self.fc1 = nn.Conv2d(features, hidden, 1)
        self.fc2 = nn.Linear(tokens * hidden, classes)

    def forward(self, x):            # x: [B, T, F] -> [B, F, T, 1]
        return self.fc2(torch.flatten(F.relu(self.fc1(x.transpose(1, 2)[..., None])), 1))


class SpatialLinear(nn.Module):
    """conv -> ReLU -> Flatten(2) -> Linear over the spatial axis of every channel."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.flat = nn.Flatten(2)
        self.fc = nn.Linear(16, 4)          # 16 positions, a multiple of the 4 channels
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        return self.out(torch.flatten(self.fc(self.flat(F.relu(self.conv(x)))), 1))


@pytest.mark.parametrize("input_shape", [None, (3, 4)], ids=["no-shape", "shape"])
def test_a_flatten_that_merges_tokens_with_features_ends_the_chain(input_shape):
    x, y = _xy(3, 4)
    opt = assert_invariant(TokenMLP, x, y, input_shape=input_shape)
    assert _names(opt) == []
    assert any(("fc1" in note and ("reshapes" in note)) for note in opt.describe().splitlines())


def test_the_same_computation_as_a_1x1_convolution_is_one_exact_block():
    x, y = _xy(3, 4)
    opt = assert_invariant(TokenConv, x, y)
    assert _names(opt) == [["fc1", "fc2"]]


def test_a_linear_over_the_spatial_axis_is_not_joined_to_the_convolution():
    x, y = _xy(2, 4, 4)
    for input_shape in (None, (2, 4, 4)):
        opt = assert_invariant(SpatialLinear, x, y, input_shape=input_shape)
        assert ["conv", "fc"] not in _names(opt) and ["conv", "fc", "out"] not in _names(opt)


class ViewNet(nn.Module):
    """A chain through `x.view(x.size(0), -1)` (a common hand-written flatten)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = F.relu(self.conv(x))
        h = h.view(h.size(0), -1)
        return self.out(F.relu(self.fc(h)))


@pytest.mark.parametrize("input_shape", [None, (2, 4, 4)], ids=["no-shape", "shape"])
def test_a_view_flatten_joins_the_chain(input_shape):
    x, y = _xy(2, 4, 4)
    opt = assert_invariant(ViewNet, x, y, input_shape=input_shape)
    assert _names(opt) == [["conv", "fc", "out"]]


class TokensThenBatch(nn.Module):
    """Linear over tokens, flatten(0, 1) keeps the feature axis last: exact with shapes."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.flatten(F.relu(self.fc1(x)), 0, 1)        # [B*T, H]
        return self.fc2(h).view(x.size(0), -1, 3).mean(1)


def test_a_reshape_that_keeps_the_feature_axis_is_exact_given_the_shapes():
    x, y = _xy(3, 4)
    assert _names(assert_invariant(TokensThenBatch, x, y)) == []      # needs the shapes
    opt = assert_invariant(TokensThenBatch, x, y, input_shape=(3, 4))
    assert _names(opt) == [["fc1", "fc2"]]


def test_pooling_a_linear_layers_features_ends_the_chain():
    def pooled():            # [B, 2, 4] -> [B, 2, 6] -> pool over (2, 6) -> [B, 1, 3] -> [B, 3]
        return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(3, 3))
    x, y = _xy(2, 4)
    for input_shape in (None, (2, 4)):
        opt = assert_invariant(pooled, x, y, input_shape=input_shape)
        assert _names(opt) == []
        assert "MaxPool2d acts on the dimensions that hold a Linear layer's features" in \
            opt.describe()


# ------------------------------------------------------------------------------------------
# parametrized weights, weights used outside their module
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["parametrizations", "old-style"])
def test_a_weight_normed_layer_is_left_to_sgd_and_its_parameters_take_sgd(kind):
    made = []

    def make():
        model = mlp([4, 5, 5, 3], bias=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")        # the old weight_norm is deprecated
            if kind == "parametrizations":
                nn.utils.parametrizations.weight_norm(model[2])
            else:
                nn.utils.weight_norm(model[2])
        made.append(model)
        return model
    x, y = _xy(4)
    opt = assert_invariant(make, x, y)
    model = made[0]
    assert all("2" not in names for names in _names(opt))
    assert "parametrized" in opt.describe() or "not a plain parameter" in opt.describe()
    # the real parameters of the layer take a plain SGD step
    real = [p for n, p in model.named_parameters() if n.startswith("2.")]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    expected = [p.detach() - 0.05 * p.grad for p in real]
    opt.step()
    for p, e in zip(real, expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=0)


class Tied(nn.Module):
    """fc2's weight is read again, transposed, after fc2: not invariant under fc1 -> fc2."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.fc2 = nn.Linear(5, 5)

    def forward(self, x):
        h = F.relu(self.fc2(F.relu(self.fc1(x))))
        return F.linear(h, self.fc2.weight.t())


def test_a_weight_used_outside_its_module_keeps_the_layer_out_of_every_block():
    x, y = _xy(4, classes=5)
    opt = assert_invariant(Tied, x, y)
    assert _names(opt) == []
    assert "'fc2.weight' is also used outside the module" in opt.describe()


def test_a_layer_with_a_forward_hook_is_left_out():
    def make():
        model = mlp([4, 5, 5, 3], bias=True)
        model[2].register_forward_hook(lambda module, inputs, output: 2 * output)
        return model
    opt = assert_invariant(make, *_xy(4))
    assert _names(opt) == []
    assert "forward hooks" in opt.describe()


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = mlp([4, 5, 5, 5, 3], bias=False)
        self.other = nn.Linear(5, 5, bias=False)
        self.other.weight = self.body[4].weight     # shared with another module

    def forward(self, x):
        return self.body(x)


def test_a_shared_parameter_no_longer_refuses_the_whole_model():
    opt = assert_invariant(Shared, *_xy(4))
    assert _names(opt) == [["body.0", "body.2"]]
    assert "shares a parameter with another module" in opt.describe()


# ------------------------------------------------------------------------------------------
# channels_last
# ------------------------------------------------------------------------------------------
def _conv_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).double()


@pytest.mark.parametrize("when", ["after", "before"])
def test_channels_last_steps_exactly_like_contiguous_weights(when):
    x, y = _xy(2, 5, 5)
    model, twin = _conv_model(), _conv_model()
    if when == "before":
        model = model.to(memory_format=torch.channels_last)
    opt, twin_opt = GSGD(model, lr=0.1, momentum=0.9), GSGD(twin, lr=0.1, momentum=0.9)
    if when == "after":
        model = model.to(memory_format=torch.channels_last)
    assert not model[0].weight.is_contiguous()
    for k in range(3):
        for m, o in ((model, opt), (twin, twin_opt)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    assert not model[0].weight.is_contiguous()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_a_failed_step_on_channels_last_weights_writes_nothing():
    x, y = _xy(2, 5, 5)
    model = _conv_model()
    opt = GSGD(model, lr=0.1)
    model.to(memory_format=torch.channels_last)
    F.cross_entropy(model(x), y).backward()
    model[2].weight.grad[0, 0, 0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()                                   # the check gates the writes on the device
    with pytest.raises(GSGDStepError, match="Nothing was updated"):
        opt.check_steps()                        # ... and is raised where the caller syncs
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


# ------------------------------------------------------------------------------------------
# width valleys
# ------------------------------------------------------------------------------------------
def test_a_valley_splits_the_block_into_exact_blocks():
    widths = [3, 5, 3, 6, 2]
    model = randomise(mlp(widths, bias=True), torch.Generator().manual_seed(3))
    with pytest.warns(GSGDWarning, match=r"the output of '2' \(hidden layer 2, width 3\) is "
                                         r"narrower .* split there"):
        opt = GSGD(model, lr=0.3, skeleton_init="keep")
    assert [b.widths for b in opt.blocks] == [(3, 5, 3), (3, 6, 2)]
    x, y = _xy(3, classes=2)
    F.cross_entropy(model(x), y).backward()
    nets, grads = [], []
    for part in (slice(0, 2), slice(2, 4)):
        layers = linears(model)[part]
        nets.append(as_reference_net(nn.Sequential(*layers)))
        grads.append(torch.cat([t for m in layers for t in (m.weight.grad.reshape(-1),
                                                             m.bias.grad)]))
    opt.step()
    for net, grad, part in zip(nets, grads, (slice(0, 2), slice(2, 4))):
        expected = ref.gsgd_step(net, grad, 0.3)
        for layer, w, b in zip(linears(model)[part], expected.weights, expected.biases):
            torch.testing.assert_close(layer.weight.detach(), w, rtol=0, atol=1e-10)
            torch.testing.assert_close(layer.bias.detach(), b, rtol=0, atol=1e-10)
    assert_invariant(lambda: mlp(widths, bias=True), x, y)


def test_a_valley_next_to_the_output_leaves_one_layer_to_sgd():
    model = mlp([3, 6, 2, 6, 2], bias=False)          # valley at hidden layer 2
    opt = quiet_gsgd(model, lr=0.1)
    assert [b.widths for b in opt.blocks] == [(3, 6, 2), (2, 6, 2)]
    model = mlp([3, 6, 2, 4, 2, 6, 2], bias=False)    # valleys at hidden layers 2 and 4
    opt = quiet_gsgd(model, lr=0.1)
    assert [b.widths for b in opt.blocks] == [(3, 6, 2), (2, 4, 2), (2, 6, 2)]
    with pytest.raises(UnsupportedWidthProfile, match="valleys='split' splits"):
        GSGD(model, lr=0.1, valleys="refuse")


class AlexLike(nn.Module):
    """AlexNet's profile at toy width: 4 -> 8 -> 6 -> 6 -> classifier 16 -> 16 -> 3."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(),
            nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.classifier = nn.Sequential(nn.Dropout(0.0), nn.Linear(24, 16), nn.ReLU(),
                                        nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def test_alexnet_profile_is_split_at_its_valley_and_stays_invariant():
    x, y = _xy(3, 8, 8)
    opt = assert_invariant(AlexLike, x, y)
    assert [b.widths for b in opt.blocks] == [(3, 4, 8, 6), (6, 6, 16, 16, 3)]


def test_stage_split_that_leaves_no_block_says_why():
    model = AlexLike().double()
    with pytest.warns(GSGDWarning) as record:
        GSGD(model, lr=0.1, block_split="stage")
    text = " ".join(str(w.message) for w in record)
    assert "block_split='stage': not in a run of >= 2 equal-width layers" in text


# ------------------------------------------------------------------------------------------
# coverage: said at construction, listed by describe()
# ------------------------------------------------------------------------------------------
class Fire(nn.Module):
    """SqueezeNet's fire module: squeeze, then two expand convs joined by cat."""

    def __init__(self):
        super().__init__()
        self.squeeze = nn.Conv2d(4, 2, 1)
        self.expand1 = nn.Conv2d(2, 3, 1)
        self.expand3 = nn.Conv2d(2, 3, 3, padding=1)

    def forward(self, x):
        s = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1(s)), F.relu(self.expand3(s))], 1)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.fire = Fire()
        self.norm = nn.LayerNorm(6)
        self.head = nn.Sequential(nn.Linear(6, 8), nn.LeakyReLU(), nn.Linear(8, 8), nn.ReLU(),
                                  nn.Linear(8, 3))

    def forward(self, x):
        h = self.fire(F.relu(self.stem(x)))
        h = self.norm(F.adaptive_avg_pool2d(h, 1).flatten(1))
        return self.head(h)


def test_the_share_in_g_space_and_the_reasons_are_said_at_construction():
    with pytest.warns(GSGDWarning, match=r"GSGD: \d+\.\d% of the trainable parameters of Mixed "
                                         r"\(\d+ of \d+\) are in 2 G-space chain block") as rec:
        opt = GSGD(Mixed().double(), lr=0.1)
    summary = next(str(w.message) for w in rec if "trainable parameters" in str(w.message))
    assert "LeakyReLU" in summary and "cat" in summary and "opt.describe()" in summary
    table = opt.describe()
    for name in ("fire.expand3.weight", "fire.expand1.weight", "norm.weight", "head.0.weight"):
        assert f"outside: {name} " in table
    assert "LayerNorm's own parameter" in table and "followed by LeakyReLU" in table
    assert "outside: fire.expand1.weight (3, 2, 1, 1): chain ends here: it is followed by cat" \
        in table
    assert "chain block 1: stem -> fire.squeeze" in table
    assert "chain block 2: head.2 -> head.4" in table


def test_a_chain_end_is_listed_even_for_a_layer_inside_a_block():
    opt = quiet_gsgd(Mixed().double(), lr=0.1)
    assert "note: chain ends at fire.squeeze: not joined to a next layer (its output is " \
           "used more than once)" in opt.describe()
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5), nn.Tanh(),
                          nn.Linear(5, 3))
    opt = quiet_gsgd(model, lr=0.1)
    assert "note: chain ends at 2: not joined to a next layer (it is followed by Tanh)" in \
        opt.describe()


def test_describe_survives_a_copy():
    opt = quiet_gsgd(Mixed().double(), lr=0.1)
    assert copy.deepcopy(opt).describe() == opt.describe()


# ------------------------------------------------------------------------------------------
# the range of skeleton path values, checked at construction
# ------------------------------------------------------------------------------------------
def _deep_he_mlp(depth=24, width=16, dtype=torch.float32):
    torch.manual_seed(0)
    model = mlp([8] + [width] * depth + [3], bias=False, dtype=dtype)
    with torch.no_grad():
        for layer in linears(model):
            layer.weight.normal_(0, (2 / layer.in_features) ** 0.5)
            layer.weight.mul_(0.05)        # small: the chains' products underflow float32
    return model


def test_a_step_that_float32_cannot_represent_is_announced_at_construction():
    model = _deep_he_mlp()
    with pytest.warns(GSGDWarning, match=r"in chain block 0 -> \.\.\. -> 48 \(25 layers\) the "
                                         r"products s of skeleton weights .* beyond float32 .*"
                                         r"skeleton_init='one'"):
        opt = GSGD(model, lr=1e-20, skeleton_init="keep")
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 0])
    F.cross_entropy(model(x), y).backward()
    opt.step()
    with pytest.raises(GSGDStepError):           # the warning is not a false alarm
        opt.check_steps()


def test_no_range_warning_when_the_step_fits():
    with warnings.catch_warnings():
        warnings.simplefilter("error", GSGDWarning)
        GSGD(_deep_he_mlp(dtype=torch.float64), lr=0.1, skeleton_init="keep")
        GSGD(mlp([4, 5, 5, 3], bias=False, dtype=torch.float32), lr=0.1,
             skeleton_init="keep")


def test_step_range_bounds_the_brute_force_path_products():
    from gsgd_cli.gspace.conditioning import step_range
    from gsgd_cli.gspace.skeleton import build_skeleton
    from gsgd_cli.gspace.update import ChainIndex

    widths = [3, 4, 6, 3, 2]
    model = randomise(mlp(widths, bias=True), torch.Generator().manual_seed(9), low=0.01,
                      high=3.0)
    net = as_reference_net(model)
    basis = ref.skeleton_basis(net)
    w = net.flat()
    products = [float(torch.prod(w[[f for f in path if f != e]]).abs())
                for path in basis.paths for e in path if e not in basis.pivots
                and e not in basis.free and len([f for f in path if f not in basis.free
                                                 and f not in basis.pivots]) == 1]
    products += [float(v.abs()) for path, v in zip(basis.paths, ref.path_values(net, basis))
                 if set(path) <= set(basis.free) | set(basis.pivots)]
    skeleton = build_skeleton(widths)
    found = step_range(skeleton, ChainIndex.build(skeleton, torch.device("cpu")),
                       [m.weight for m in linears(model)])
    import math
    low, high = math.log10(min(products)), math.log10(max(products))
    assert found.s_min <= low + 1e-9 and found.s_max >= high - 1e-9
    assert found.s_min > low - 1.5 and found.s_max < high + 1.5
    assert found.coefficient_max == pytest.approx(-2 * found.s_min)


@pytest.mark.parametrize("arch", ["resnet18_nobn", "squeezenet1_0"])
def test_torchvision_networks_pass_the_oracle(arch):
    """Real torchvision code, float64, CIFAR shape: every block G-SGD finds is exact."""
    models = pytest.importorskip("torchvision.models")

    def make():
        torch.manual_seed(0)
        if arch == "resnet18_nobn":
            return models.resnet18(num_classes=4, norm_layer=lambda c: nn.Identity())
        return models.squeezenet1_0(num_classes=4)
    x, y = _xy(3, 32, 32, classes=4, n=4)
    opt = assert_invariant(make, x, y, steps=3, lr=1e-8, own_init=True,
                           input_shape=(3, 32, 32))
    assert len(opt.blocks) == (8 if arch == "resnet18_nobn" else 1)


def test_a_wrong_input_shape_is_one_clear_error_and_prints_nothing(capfd):
    # torch's fake-tensor log and ShapeProp's traceback went to stderr, and the message was an
    # fx node dump
    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)
            self.fc1 = nn.Linear(8 * 8 * 8, 10)

        def forward(self, x):
            return self.fc1(torch.flatten(F.max_pool2d(F.relu(self.c1(x)), 2), 1))

    capfd.readouterr()
    with pytest.raises(ValueError) as info:
        GSGD(ConvNet(), lr=0.1, input_shape=(3, 32, 32))
    message = str(info.value)
    assert message.startswith("ConvNet does not run on an input of shape (2, *(3, 32, 32)) at "
                              "fc1: ") and message.endswith("; check input_shape")
    assert "\n" not in message and "call_module" not in message
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    GSGD(ConvNet(), lr=0.1, input_shape=(3, 16, 16))      # the right shape builds
