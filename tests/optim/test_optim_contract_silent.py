"""Issue 20 (never silently different, round 2): conventions every optimizer built from a
model keeps, as torch.optim does. Runs over OPTIM_DB (the contract suite's table)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gsgd_cli.optim import GSGDWarning, PathSGD
from gsgd_cli.testing.helpers import mlp, randomise
from gsgd_cli.testing.optim_db import OPTIM_DB

DB = pytest.mark.parametrize("info", OPTIM_DB, ids=[info.name for info in OPTIM_DB])
FUSED = pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])


def _data(n=12, features=4, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, classes, (n,), generator=gen)


def _quiet(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GSGDWarning)
        return make()


def _state_options(info, momentum):
    return info.state_options if momentum else {}


class FrozenBackbone(nn.Module):
    """The usual frozen feature extractor: its layers run under torch.no_grad()."""

    def __init__(self):
        super().__init__()
        self.body = mlp([4, 5, 5, 3], bias=True)

    def forward(self, x):
        with torch.no_grad():
            x = self.body[1](self.body[0](x))
        return self.body[4](self.body[3](self.body[2](x)))


# ------------------------------------------------------------------------------------------
# point 1: a parameter whose .grad is None is never moved
# ------------------------------------------------------------------------------------------
@DB
@FUSED
@pytest.mark.parametrize("momentum", [False, True], ids=["plain", "stateful"])
def test_a_backbone_run_under_no_grad_is_not_moved(info, fused, momentum):
    x, y = _data()
    model = randomise(FrozenBackbone(), torch.Generator().manual_seed(0))
    opt = _quiet(lambda: info.make(model, fused=fused, **_state_options(info, momentum)))
    frozen = [p.detach().clone() for p in model.body[0].parameters()]
    trained = model.body[4].weight.detach().clone()
    for k in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x[k % 2::2]), y[k % 2::2]).backward()
        assert model.body[0].weight.grad is None
        _quiet(opt.step)
    for p, q in zip(model.body[0].parameters(), frozen):
        assert torch.equal(p.detach(), q)
    assert not torch.equal(model.body[4].weight.detach(), trained)


@DB
@FUSED
@pytest.mark.parametrize("momentum", [False, True], ids=["plain", "stateful"])
def test_a_layer_whose_grads_are_set_to_none_is_not_moved(info, fused, momentum):
    x, y = _data()
    model = randomise(mlp([4, 5, 5, 3], bias=True), torch.Generator().manual_seed(1))
    opt = _quiet(lambda: info.make(model, fused=fused, **_state_options(info, momentum)))
    for k in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x[k % 2::2]), y[k % 2::2]).backward()
        if k == 1:
            kept = [p.detach().clone() for p in model[2].parameters()]
            for p in model[2].parameters():
                p.grad = None
            _quiet(opt.step)
            for p, q in zip(model[2].parameters(), kept):
                assert torch.equal(p.detach(), q)
        else:
            _quiet(opt.step)


def test_gsgd_leaves_a_block_with_missing_gradients_to_torch_sgd_and_says_so():
    # the rule GSGD chose: the block takes plain SGD from that step on (as a layer frozen
    # after construction), exactly torch.optim.SGD's step, with a warning naming the block
    info = next(i for i in OPTIM_DB if i.name == "gsgd")
    x, y = _data()
    model = randomise(FrozenBackbone(), torch.Generator().manual_seed(0))
    twin = copy.deepcopy(model)
    opt = info.make(model, momentum=0.9)
    sgd = torch.optim.SGD(twin.parameters(), lr=info.lr, momentum=0.9)
    for k in range(3):
        for m, o in ((model, opt), (twin, sgd)):
            o.zero_grad()
            F.cross_entropy(m(x[k % 2::2]), y[k % 2::2]).backward()
        if k == 0:
            with pytest.warns(GSGDWarning, match=r"no gradient \(\.grad is None\) to plain SGD"
                                                 r".*body\.0 -> body\.2 -> body\.4 "
                                                 r"\(no gradient: body\.0\.weight, "
                                                 r"body\.0\.bias\)"):
                opt.step()
        else:
            opt.step()
        sgd.step()
    assert opt.blocks == []
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-14)


# ------------------------------------------------------------------------------------------
# points 2 and 4: what torch.fx never sees is never trusted, at construction or later
# ------------------------------------------------------------------------------------------
def _double(module, args, output):
    return output * 2


def _conv_model(pool=nn.MaxPool2d):
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), pool(2),
                          nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Dropout(0.0), nn.Linear(12, 3)).double()
    return randomise(model, torch.Generator().manual_seed(3), low=0.3, high=0.9)


HOOKED = pytest.mark.parametrize("index,kind", [(1, "post"), (1, "pre"), (2, "post"),
                                                (5, "post"), (6, "pre")],
                                 ids=["relu", "relu-pre", "maxpool", "flatten", "dropout"])


def _hook(module, kind):
    if kind == "post":
        return module.register_forward_hook(_double)
    return module.register_forward_pre_hook(lambda m, args: (args[0] * 2,))


@HOOKED
def test_gsgd_ends_the_chain_at_a_hooked_module_between_layers(index, kind):
    model = _conv_model()
    whole = _quiet(lambda: [b.names for b in
                            OPTIM_DB[0].make(copy.deepcopy(model), input_shape=(2, 4, 4)).blocks])
    assert whole == [["0", "3", "7"]]
    _hook(model[index], kind)
    with pytest.warns(GSGDWarning):
        opt = OPTIM_DB[0].make(model, input_shape=(2, 4, 4))
    assert all(len(b.names) < 3 for b in opt.blocks)
    assert "forward hooks" in opt.describe()


@HOOKED
def test_path_sgd_refuses_a_hooked_module(index, kind):
    model = _conv_model(nn.AvgPool2d)      # Path-SGD refuses max pooling anyway
    _hook(model[index], kind)
    with pytest.raises(ValueError, match=rf"module '{index}' .*forward hooks"):
        PathSGD(model, lr=0.05, input_shape=(2, 4, 4))


def test_a_relu_whose_forward_is_replaced_on_the_instance_is_not_trusted():
    model = _conv_model()
    model[4].forward = F.relu6
    opt = _quiet(lambda: OPTIM_DB[0].make(model, input_shape=(2, 4, 4)))
    assert all(len(b.names) < 3 for b in opt.blocks)
    assert "replaced on the instance" in opt.describe()
    model = _conv_model(nn.AvgPool2d)
    model[4].forward = F.relu6
    with pytest.raises(ValueError, match="forward is replaced on the instance"):
        PathSGD(model, lr=0.05, input_shape=(2, 4, 4))


def test_a_conv_whose_conv_forward_is_replaced_on_the_instance_is_not_trusted():
    model = _conv_model()
    conv = model[3]
    conv._conv_forward = lambda x, w, b: nn.Conv2d._conv_forward(
        conv, x, w - w.mean(), b)            # weight standardisation patched into one conv
    opt = _quiet(lambda: OPTIM_DB[0].make(model, input_shape=(2, 4, 4)))
    assert all("3" not in b.names for b in opt.blocks)
    model = _conv_model(nn.AvgPool2d)
    model[3]._conv_forward = conv._conv_forward
    with pytest.raises(ValueError, match="_conv_forward is replaced on the instance"):
        PathSGD(model, lr=0.05, input_shape=(2, 4, 4))


@DB
@pytest.mark.parametrize("kind", ["forward", "pre"])
def test_global_forward_hooks_are_refused_at_construction_and_at_a_step(info, kind):
    from torch.nn.modules.module import (register_module_forward_hook,
                                         register_module_forward_pre_hook)
    register = (register_module_forward_hook if kind == "forward"
                else register_module_forward_pre_hook)
    model = randomise(mlp([4, 5, 5, 3], bias=True), torch.Generator().manual_seed(1))
    handle = register(lambda *a: None)
    try:
        with pytest.raises(ValueError, match="global forward .*hooks are registered"):
            _quiet(lambda: info.make(model))
    finally:
        handle.remove()
    opt = _quiet(lambda: info.make(model))
    x, y = _data()
    F.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    handle = register(lambda *a: None)
    try:
        with pytest.raises(RuntimeError, match="global forward .*hooks are registered"):
            opt.step()
    finally:
        handle.remove()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q)
    opt.step()


def _orthogonal(model):
    torch.nn.utils.parametrizations.orthogonal(model[2])


@DB
@pytest.mark.parametrize("change", ["hook", "pre-hook", "forward", "parametrization"])
def test_a_change_after_construction_refuses_the_next_step_before_any_write(info, change):
    model = randomise(mlp([4, 5, 5, 3], bias=True), torch.Generator().manual_seed(1))
    opt = _quiet(lambda: info.make(model))
    x, y = _data()
    F.cross_entropy(model(x), y).backward()
    if change == "hook":
        model[1].register_forward_hook(_double)
    elif change == "pre-hook":
        model[2].register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    elif change == "forward":
        model[3].forward = F.relu6
    else:
        _orthogonal(model)
    before = [p.detach().clone() for p in opt.param_groups[0]["params"]]
    with pytest.raises(RuntimeError, match=r"module '\d' \(\w+\) changed after \w+ was built"):
        opt.step()
    for p, q in zip(opt.param_groups[0]["params"], before):
        assert torch.equal(p.detach(), q)


# ------------------------------------------------------------------------------------------
# point 5: param_groups itself is held to the one-group rule at every step
# ------------------------------------------------------------------------------------------
@DB
@pytest.mark.parametrize("change", ["append", "remove", "replace"])
def test_a_changed_param_groups_list_refuses_the_step_before_any_write(info, change):
    model = randomise(mlp([4, 5, 5, 3], bias=True), torch.Generator().manual_seed(1))
    opt = _quiet(lambda: info.make(model))
    x, y = _data()
    F.cross_entropy(model(x), y).backward()
    params = opt.param_groups[0]["params"]
    if change == "append":
        extra = nn.Parameter(torch.ones(2, dtype=torch.float64))
        extra.grad = torch.ones(2, dtype=torch.float64)
        opt.param_groups.append({**opt.param_groups[0], "params": [extra]})
        match = "a param group was added"
    elif change == "remove":
        params.pop(0)
        match = r"param_groups\[0\]\['params'\] was changed"
    else:
        params[0] = nn.Parameter(params[0].detach().clone())
        match = r"param_groups\[0\]\['params'\] was changed"
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        opt.step()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q)


# ------------------------------------------------------------------------------------------
# point 6: sparse gradients are refused before anything is written
# ------------------------------------------------------------------------------------------
class EmbeddingNet(nn.Module):
    def __init__(self, sparse):
        super().__init__()
        self.emb = nn.Embedding(7, 4, sparse=sparse).double()
        self.body = mlp([4, 5, 5, 3], bias=True)

    def forward(self, tokens):
        return self.body(self.emb(tokens))


@DB
def test_an_embedding_with_sparse_gradients_is_refused_at_construction(info):
    with pytest.raises(ValueError, match=r"sparse gradients: module 'emb' \(Embedding\) has "
                                         r"sparse=True"):
        _quiet(lambda: info.make(EmbeddingNet(sparse=True)))


@DB
@FUSED
def test_a_sparse_gradient_at_a_step_is_refused_before_any_write(info, fused):
    # GSGD: an embedding (outside the chain) feeding the chain; Path-SGD takes no embedding,
    # so a chain layer's gradient is made sparse by hand
    x, y = _data()
    if info.outside_params:
        model = randomise(EmbeddingNet(sparse=False), torch.Generator().manual_seed(2))
        x = torch.tensor([1, 2, 3, 4, 5, 6])
        y = y[:6]
    else:
        model = randomise(mlp([4, 5, 5, 3], bias=True), torch.Generator().manual_seed(2))
    opt = _quiet(lambda: info.make(model, fused=fused))
    F.cross_entropy(model(x), y).backward()
    sparse = model.emb.weight if info.outside_params else model[0].weight
    sparse.grad = sparse.grad.to_sparse()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="does not support sparse gradients"):
        opt.step()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q)


# ------------------------------------------------------------------------------------------
# point 7: the state layout is torch's: no entry for a parameter without state
# ------------------------------------------------------------------------------------------
@DB
@FUSED
def test_a_stateless_step_leaves_the_state_empty_as_torch_does(info, fused):
    if not info.stateless:
        pytest.skip(f"{info.name} keeps moments at every step, as torch's Adam/RMSprop do")
    model = randomise(mlp([4, 5, 5, 3], bias=True), torch.Generator().manual_seed(1))
    opt = _quiet(lambda: info.make(model, fused=fused))
    sgd = torch.optim.SGD(copy.deepcopy(model).parameters(), lr=0.1)
    x, y = _data()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    sgd.step()
    assert sgd.state_dict()["state"] == {}
    assert opt.state_dict()["state"] == {}


@DB
def test_a_resume_through_torch_distributed_checkpoint_continues_bit_equal(info, tmp_path):
    # one process, no process group: get_state_dict -> dcp.save -> dcp.load -> set_state_dict
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    x, y = _data()
    # PathSGD(rescale='first') keeps its one ratio in the first parameter's state only, which
    # set_state_dict's strict check refuses (documented in the README); its default is tested
    options = {**(info.state_options if info.outside_params else {}), "fused": False}

    def steps(model, opt, first, count):
        for k in range(first, first + count):
            opt.zero_grad()
            F.cross_entropy(model(x[k % 2::2]), y[k % 2::2]).backward()
            opt.step()

    model = randomise(mlp([4, 5, 5, 3], bias=True), torch.Generator().manual_seed(1))
    opt = _quiet(lambda: info.make(model, **options))
    steps(model, opt, 0, 2)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path))
    steps(model, opt, 2, 2)

    resumed = randomise(mlp([4, 5, 5, 3], bias=True), torch.Generator().manual_seed(7))
    resumed_opt = _quiet(lambda: info.make(resumed, **options))
    model_sd, optim_sd = get_state_dict(resumed, resumed_opt)
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        set_state_dict(resumed, resumed_opt, model_state_dict=loaded["model"],
                       optim_state_dict=loaded["optim"])
    said = [str(w.message) for w in caught if issubclass(w.category, GSGDWarning)]
    assert not any("older version)" in m for m in said)
    assert all("torch.distributed.checkpoint" in m for m in said)
    steps(resumed, resumed_opt, 2, 2)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p.detach(), q.detach())


# ------------------------------------------------------------------------------------------
# point 2: control flow on self.training is read in training mode (the steps' mode)
# ------------------------------------------------------------------------------------------
class TrainingOnlyNoise(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = mlp([4, 5, 5, 3], bias=True)

    def forward(self, x):
        x = self.body[1](self.body[0](x))
        if self.training:
            x = x + torch.randn_like(x)      # not positively homogeneous: ends the chain
        return self.body[4](self.body[3](self.body[2](x)))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gsgd_sees_training_only_code_whatever_mode_it_is_built_in(mode):
    model = randomise(TrainingOnlyNoise(), torch.Generator().manual_seed(0))
    getattr(model, mode)()
    opt = _quiet(lambda: OPTIM_DB[0].make(model))
    assert [b.names for b in opt.blocks] == [["body.2", "body.4"]]
    assert model.training == (mode == "train")          # the mode is kept


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_path_sgd_refuses_training_only_code_whatever_mode_it_is_built_in(mode):
    model = randomise(TrainingOnlyNoise(), torch.Generator().manual_seed(0))
    getattr(model, mode)()
    with pytest.raises(ValueError, match="PathSGD does not support"):
        PathSGD(model, lr=0.05)
    assert model.training == (mode == "train")


class TokenBatchNorm(nn.Module):
    """A Linear over tokens, then BatchNorm1d over the token axis (not the features)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(4, 5), nn.BatchNorm1d(6), nn.Linear(5, 3)

    def forward(self, x):                    # x: (batch, 6 tokens, 4 features)
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def test_batch_norm_over_another_axis_than_the_nodes_ends_the_chain_without_input_shape():
    model = TokenBatchNorm().double()
    opt = _quiet(lambda: OPTIM_DB[0].make(model))
    assert opt.blocks == []
    assert "normalises 6 features, not the layer's 5 nodes" in opt.describe()


# ------------------------------------------------------------------------------------------
# point 8: a step under inference_mode is refused before anything is written
# ------------------------------------------------------------------------------------------
@DB
@FUSED
def test_a_step_inside_inference_mode_is_refused_and_the_next_step_works(info, fused):
    model = randomise(mlp([4, 5, 5, 3], bias=True), torch.Generator().manual_seed(1))
    opt = _quiet(lambda: info.make(model, fused=fused, **info.state_options))
    x, y = _data()
    F.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match=r"step\(\) was called inside "
                                               r"torch.inference_mode\(\)"):
            opt.step()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q)
    opt.step()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.check_steps()


def test_path_sgd_on_a_single_layer_says_to_wrap_it():
    with pytest.raises(ValueError, match=r"a single Linear as the model: .*nn\.Sequential"):
        PathSGD(nn.Linear(6, 3), lr=0.05)


def test_input_shape_describes_an_embedding_first_model_with_integer_indices():
    model = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 5), nn.ReLU(),
                          nn.Linear(5, 3)).double()
    opt = _quiet(lambda: OPTIM_DB[0].make(model, input_shape=(3,)))
    assert [b.names for b in opt.blocks] == [["1", "3"]]


# ------------------------------------------------------------------------------------------
# point 3: approximate (through batch norm) is reported apart from exact
# ------------------------------------------------------------------------------------------
def _conv_bn_model(affine):
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=affine), nn.ReLU(),
                         nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(64, 3)).double()


@pytest.mark.parametrize("affine", [False, True])
def test_a_block_through_batch_norm_is_reported_approximate_not_exact(affine):
    share = "98.3" if affine else "100.0"          # batch norm's own 8 parameters: SGD
    with pytest.warns(GSGDWarning, match=rf"GSGD: {share}% approximate \(through batch norm: "
                                         r"the paper's eq\. 39\) of the trainable parameters "
                                         r"of Sequential \(0 exact, 455 approximate") as rec:
        opt = OPTIM_DB[0].make(_conv_bn_model(affine), input_shape=(3, 8, 8))
    assert not any("exact of the" in str(w.message) for w in rec)
    assert f"455 in chain blocks ({share}%: 0 exact (0.0%), 455 approximate" in opt.describe()


def test_a_block_without_batch_norm_is_reported_exact():
    model = _conv_model()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt = OPTIM_DB[0].make(model, input_shape=(2, 4, 4))
    assert not any("approximate" in str(w.message) for w in rec)    # all exact: no note
    assert ", 0 approximate through batch norm (0.0%)" in opt.describe()


class GainLinear(nn.Linear):
    """A Linear with an extra parameter registered on it (its forward is nn.Linear's)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(()))


def test_a_parameter_registered_on_a_chain_layer_is_not_counted_in_g_space():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(),
                          nn.Linear(5, 3)).double()
    model[2].register_parameter("gain", nn.Parameter(torch.ones((), dtype=torch.float64)))
    opt = _quiet(lambda: OPTIM_DB[0].make(model))
    assert [b.names for b in opt.blocks] == [["0", "2", "4"]]
    table = opt.describe()
    assert "outside: 2.gain (): registered on chain layer '2' beside its weight and bias" in table
    m = sum(p.numel() for name, p in model.named_parameters() if name != "2.gain")
    assert f"m = {m}," in table


def test_a_block_through_batch_norm_in_eval_mode_takes_plain_sgd_and_says_so():
    # fine-tuning with running statistics: batch norm is then affine with an offset
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0])
    model = randomise(_conv_bn_model(affine=True), torch.Generator().manual_seed(4))
    twin = copy.deepcopy(model)
    opt = _quiet(lambda: OPTIM_DB[0].make(model, input_shape=(3, 8, 8)))
    sgd = torch.optim.SGD(twin.parameters(), lr=OPTIM_DB[0].lr)
    assert len(opt.blocks) == 1
    for m in (model, twin):
        m[1].eval()
    for k in range(2):
        for m, o in ((model, opt), (twin, sgd)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
        if k == 0:
            with pytest.warns(GSGDWarning, match=r"through batch norm in eval mode .* plain SGD "
                                                 r".*0 -> 3 -> 6"):
                opt.step()
        else:
            opt.step()
        sgd.step()
    assert opt.blocks == []
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-14)


class TokenNet(nn.Module):
    """A class token registered on the model itself, attention, and a ReLU head."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, 8))
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
        h, _ = self.attn(x, x, x)
        return self.out(torch.relu(self.fc(h[:, 0])))


def test_container_parameters_and_attention_projections_are_explained():
    table = _quiet(lambda: OPTIM_DB[0].make(TokenNet())).describe()
    assert ("outside: cls (1, 1, 8): registered directly on TokenNet, which has submodules, "
            "and used in its forward outside any chain layer") in table
    assert ("outside: attn.out_proj.weight (8, 8): its weight is read inside "
            "MultiheadAttention's own forward") in table
    assert "is not a chain layer" not in table and "not joined" not in table


@pytest.mark.parametrize("index", [0, 7], ids=["conv", "linear"])
def test_path_sgd_refuses_a_hooked_layer_as_gsgd_leaves_it_out(index):
    model = _conv_model(nn.AvgPool2d)
    model[index].register_forward_hook(_double)
    with pytest.raises(ValueError, match=rf"module '{index}' .*forward hooks"):
        PathSGD(model, lr=0.05, input_shape=(2, 4, 4))
    opt = _quiet(lambda: OPTIM_DB[0].make(model, input_shape=(2, 4, 4)))
    assert all(str(index) not in b.names for b in opt.blocks)
