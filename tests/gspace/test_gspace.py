"""G-space structure: Theorem 3.4, the skeleton, block discovery, and the fast step against
the brute-force reference (all paths enumerated, dense solves, float64)."""
from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gsgd_cli.testing import gsgd_reference as ref
from gsgd_cli.gspace.blocks import ModelNotTraceable, find_chain_blocks
from gsgd_cli.gspace.skeleton import UnsupportedWidthProfile, build_skeleton
from gsgd_cli.optim.gsgd import GSGD

from gsgd_cli.testing.helpers import (PROFILES, VALLEYS, Branchy, as_reference_net, flat_grad, linears,
                          mlp, randomise)

ALL_PROFILES = [w for _, w in PROFILES] + VALLEYS


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("widths", ALL_PROFILES, ids=str)
def test_theorem_3_4_rank_of_structure_matrix(widths, bias):
    net = as_reference_net(mlp(widths, bias))
    _, _, m = net.edge_ids()
    paths = ref.all_paths(net)
    a = ref.structure_matrix(paths, m)
    assert torch.linalg.matrix_rank(a).item() == m - ref.hidden_count(net)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("name,widths", PROFILES, ids=[n for n, _ in PROFILES])
def test_skeleton_basis_has_m_minus_h_independent_paths(name, widths, bias):
    net = as_reference_net(mlp(widths, bias))
    _, _, m = net.edge_ids()
    basis = ref.skeleton_basis(net)
    h = ref.hidden_count(net)
    assert len(basis.free) == h
    assert len(basis.paths) == m - h
    # every basis path is a real path of the network
    assert set(basis.paths) <= {tuple(sorted(p)) for p in ref.all_paths(net)}
    a = ref.structure_matrix(basis.paths, m)
    assert torch.linalg.matrix_rank(a).item() == m - h


@pytest.mark.parametrize("name,widths", PROFILES, ids=[n for n, _ in PROFILES])
def test_fast_skeleton_matches_reference_skeleton(name, widths):
    net = as_reference_net(mlp(widths, bias=False))
    weight_id, _, _ = net.edge_ids()
    basis = ref.skeleton_basis(net)
    skeleton = build_skeleton(widths)
    fast_free, fast_pivots = set(), set()
    for layer in skeleton.layers:
        ids = {weight_id[layer.index][int(r)][int(c)][layer.centre]
               for r, c in zip(layer.rows, layer.cols)}
        (fast_pivots if layer.role == "pivot" else fast_free).update(ids)
    assert fast_free == set(basis.free)
    assert fast_pivots == set(basis.pivots)
    assert skeleton.num_hidden == len(basis.free)


@pytest.mark.usefixtures("step_path")
@pytest.mark.parametrize("lr", [0.05, 0.7])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("name,widths", PROFILES, ids=[n for n, _ in PROFILES])
def test_one_step_equals_brute_force(name, widths, bias, lr):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}{bias}{lr}".encode()))
    model = randomise(mlp(widths, bias), gen)
    x = torch.randn(9, widths[0], generator=gen, dtype=torch.float64)
    y = torch.randint(0, widths[-1], (9,), generator=gen)
    opt = GSGD(model, lr=lr, skeleton_init="keep")
    net = as_reference_net(model)
    F.cross_entropy(model(x), y).backward()
    expected = ref.gsgd_step(net, flat_grad(model), lr)
    opt.step()
    for layer, w, b in zip(linears(model), expected.weights, expected.biases):
        torch.testing.assert_close(layer.weight.detach(), w, rtol=0, atol=1e-10)
        if bias:
            torch.testing.assert_close(layer.bias.detach(), b, rtol=0, atol=1e-10)
    # the step actually moved something (so equality is not trivial)
    assert any((layer.weight.detach() - w0).abs().max() > 1e-4
               for layer, w0 in zip(linears(model), net.weights))


def test_reference_forward_matches_model():
    gen = torch.Generator().manual_seed(0)
    model = randomise(mlp([3, 4, 2], True), gen)
    x = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(ref.forward(as_reference_net(model), x), model(x))


@pytest.mark.parametrize("widths", VALLEYS, ids=str)
def test_valley_profiles_are_refused_naming_the_layer(widths):
    model = mlp(widths, bias=False)
    narrow = widths.index(min(widths[1:-1]), 1)          # node layer of the valley
    layer_name = str(2 * (narrow - 1))                    # Sequential index of its Linear
    with pytest.raises(UnsupportedWidthProfile,
                       match=rf"^G-SGD cannot handle chain block 0 -> 2 -> 4 -> 6: the output "
                             rf"of '{layer_name}' \(hidden layer {narrow}, width "
                             rf"{widths[narrow]}\) is narrower than hidden layers on both sides "
                             rf"\(widths \[{':'.join(map(str, widths))}\]\), a width valley\. "
                             r"With valleys='refuse' .*valleys='split' splits the block there "
                             r"instead$"):
        GSGD(model, lr=0.1, valleys="refuse")
    with pytest.raises(UnsupportedWidthProfile, match="valley"):
        build_skeleton(widths)


def test_discovery_traces_a_user_module_with_functional_relu():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(6, 5)
            self.hid = nn.Linear(5, 4)
            self.out = nn.Linear(4, 3)
            self.norm = nn.LayerNorm(6)

        def forward(self, x):
            x = self.norm(x.flatten(1))
            x = F.relu(self.inp(x))
            x = torch.relu(self.hid(x))
            return self.out(x).log_softmax(-1)

    found = find_chain_blocks(Net())
    assert [b.names for b in found.blocks] == [["inp", "hid", "out"]]
    assert [name for name, _ in found.outside] == ["norm.weight", "norm.bias"]
    assert found.blocks[0].widths == (6, 5, 4, 3)
    assert found.blocks[0].num_hidden == 9
    assert found.blocks[0].num_weights == 6 * 5 + 5 + 5 * 4 + 4 + 4 * 3 + 3


def test_discovery_leaves_out_layers_whose_activations_leak_or_lack_relu():
    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.c = nn.Linear(4, 4)
            self.d = nn.Linear(4, 2)

        def forward(self, x):
            h = F.relu(self.a(x))
            h = self.b(h) + h            # b's input is also used by the skip connection
            h = torch.tanh(self.c(h))    # tanh is not positively homogeneous
            return self.d(h)

    found = find_chain_blocks(Leaky())
    assert found.blocks == []
    assert len(found.outside) == 8
    assert any(note.startswith("a:") and "more than once" in note for note in found.notes)
    assert any(note.startswith("c:") and "tanh" in note for note in found.notes)


def test_untraceable_model_gives_one_clear_error():
    with pytest.raises(ModelNotTraceable, match="cannot trace Branchy with torch.fx"):
        find_chain_blocks(Branchy())
