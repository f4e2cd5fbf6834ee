"""The optimizers built from a model (OPTIM_DB: GSGD, GAdam, GRMSprop, PathSGD) behave like
torch.optim optimizers: layers frozen after construction, copies (deepcopy, pickle, torch.save),
checkpoints that know their structure and resume bit-equal, param-group flags, schedulers,
wrapped models, parameters without a gradient, non-finite gradients refused before any write,
and a visible weight change at construction (issue 13)."""
from __future__ import annotations

import copy
import io
import pickle
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gsgd_cli.optim import GSGD, GSGDWarning, PathSGD

from gsgd_cli.testing.helpers import mlp, randomise
from gsgd_cli.testing.optim_db import OPTIM_DB

DB = pytest.mark.parametrize("info", OPTIM_DB, ids=[info.name for info in OPTIM_DB])


def _data(n=12, features=4, classes=3, seed=0, shape=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *(shape or (features,)), generator=gen, dtype=torch.float64)
    return x, torch.randint(0, classes, (n,), generator=gen)


def _backward(model, x, y, sign=1.0):
    (sign * F.cross_entropy(model(x), y)).backward()


def _train(model, opt, x, y, steps, sign=1.0):
    """`steps` steps on alternating halves of the data (continuing where the last call left)."""
    for _ in range(steps):
        k = getattr(opt, "_test_steps", 0)
        opt._test_steps = k + 1
        opt.zero_grad()
        _backward(model, x[k % 2::2], y[k % 2::2], sign)
        opt.step()


class Net(nn.Module):
    """A chain block with biases (`body`) plus a parameter outside every block."""

    def __init__(self):
        super().__init__()
        self.body = mlp([4, 5, 5, 3], bias=True)
        self.scale = nn.Parameter(torch.ones(3, dtype=torch.float64))

    def forward(self, x):
        return self.body(x) * self.scale


def _net(seed=0):
    return randomise(Net(), torch.Generator().manual_seed(seed))


def _conv_net(seed=0):
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                          nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(12, 3)).double()
    return randomise(model, torch.Generator().manual_seed(seed), low=0.3, high=0.9)


def _same(a, b):
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p.detach(), q.detach())


def _quiet(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GSGDWarning)
        return make()


# ------------------------------------------------------------------------------------------
# 1. a layer frozen after construction
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_freezing_after_construction_equals_freezing_before(momentum):
    x, y = _data()
    before, after = _net(), _net()
    before.body[0].requires_grad_(False)
    with pytest.warns(GSGDWarning, match="frozen layers to plain SGD"):
        opt_before = GSGD(before, lr=0.1, momentum=momentum, skeleton_init="keep")
    opt_after = GSGD(after, lr=0.1, momentum=momentum, skeleton_init="keep")
    assert [b.names for b in opt_after.blocks] == [["body.0", "body.2", "body.4"]]
    after.body[0].requires_grad_(False)
    frozen = after.body[0].weight.detach().clone()
    with pytest.warns(GSGDWarning, match=r"frozen after construction to plain SGD .*"
                                         r"body\.0 -> body\.2 -> body\.4"):
        _train(after, opt_after, x, y, 1)
    _train(after, opt_after, x, y, 2)
    _train(before, opt_before, x, y, 3)
    assert torch.equal(after.body[0].weight.detach(), frozen)
    assert opt_after.blocks == [] and opt_before.blocks == []
    _same(before, after)


def test_freezing_mid_training_leaves_the_block_to_torch_sgd():
    x, y = _data()
    model = _net().body
    opt = GSGD(model, lr=0.1, momentum=0.9, skeleton_init="keep")
    _train(model, opt, x, y, 2)                        # G-SGD with v-space momentum
    model[2].requires_grad_(False)
    twin = copy.deepcopy(model)
    sgd = torch.optim.SGD([p for p in twin.parameters() if p.requires_grad], lr=0.1,
                          momentum=0.9)
    sgd._test_steps = opt._test_steps
    frozen = model[2].weight.detach().clone()
    with pytest.warns(GSGDWarning, match="momentum is dropped"):
        _train(model, opt, x, y, 3)
    _train(twin, sgd, x, y, 3)
    assert torch.equal(model[2].weight.detach(), frozen)
    _same(model, twin)                                 # fresh SGD momentum, bit for bit


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_a_layer_frozen_at_construction_and_unfrozen_later_is_trained(momentum):
    # fine-tuning: freeze, build the optimizer, unfreeze later; as with
    # torch.optim.SGD(model.parameters()), the layer then takes its (plain SGD) step
    x, y = _data()
    model = _net().body
    model[0].requires_grad_(False)
    with pytest.warns(GSGDWarning, match="frozen layers to plain SGD"):
        opt = GSGD(model, lr=0.1, momentum=momentum)
    twin = copy.deepcopy(model)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=momentum)
    frozen = model[0].weight.detach().clone()
    _train(model, opt, x, y, 1)
    _train(twin, sgd, x, y, 1)
    assert torch.equal(model[0].weight.detach(), frozen)
    model[0].requires_grad_(True)
    twin[0].requires_grad_(True)
    _train(model, opt, x, y, 3)
    _train(twin, sgd, x, y, 3)
    assert not torch.equal(model[0].weight.detach(), frozen)
    for p, q in zip(model.parameters(), twin.parameters()):   # the fused SGD step rounds
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-14)  # as FMA


def test_freezing_after_construction_survives_a_state_dict_round_trip():
    x, y = _data()
    model = _net()
    opt = GSGD(model, lr=0.1, momentum=0.9, skeleton_init="keep")
    _train(model, opt, x, y, 1)
    model.body[0].requires_grad_(False)
    with pytest.warns(GSGDWarning):
        _train(model, opt, x, y, 1)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    clone = _net(seed=5)
    clone_opt = GSGD(clone, lr=0.1, momentum=0.9, skeleton_init="keep")
    clone_opt._test_steps = opt._test_steps
    clone.body[0].requires_grad_(False)        # frozen after construction, as in the run
    clone.load_state_dict(saved[0])
    clone_opt.load_state_dict(saved[1])        # the record says: the block takes SGD already
    assert clone_opt.blocks == []
    _train(model, opt, x, y, 2)
    _train(clone, clone_opt, x, y, 2)
    _same(model, clone)


def test_path_sgd_leaves_a_layer_frozen_after_construction_alone():
    x, y = _data()
    model = _net()
    opt = PathSGD(model.body, lr=0.05)
    model.body[2].requires_grad_(False)
    frozen = model.body[2].weight.detach().clone()
    _train(model, opt, x, y, 2)
    assert torch.equal(model.body[2].weight.detach(), frozen)


# ------------------------------------------------------------------------------------------
# 2. copies: deepcopy, pickle, torch.save
# ------------------------------------------------------------------------------------------
def _make(info, model, shape):
    """`info`'s optimizer with every state it keeps switched on."""
    return info.make(model, **info.state_options, input_shape=shape)


COPY_CASES = [(f"{info.name}{suffix}", info, make, shape) for info in OPTIM_DB
              for suffix, make, shape in (("", lambda info=info: info.model_for(_net), None),
                                          ("-conv", _conv_net, (2, 4, 4)))]


def _copy(how, obj):
    if how == "deepcopy":
        return copy.deepcopy(obj)
    if how == "pickle":
        return pickle.loads(pickle.dumps(obj))
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("name,info,make_model,shape", COPY_CASES,
                         ids=[c[0] for c in COPY_CASES])
def test_a_copied_optimizer_continues_bit_equal(name, info, make_model, shape, how):
    x, y = _data(shape=shape)
    model = make_model()
    opt = _make(info, model, shape)
    _train(model, opt, x, y, 2)
    model_copy, opt_copy = _copy(how, (model, opt))
    assert opt_copy.param_groups[0]["params"][0] is next(iter(model_copy.parameters()))
    _train(model, opt, x, y, 3)
    _train(model_copy, opt_copy, x, y, 3)
    _same(model, model_copy)
    assert repr(opt_copy) == repr(opt)


@pytest.mark.parametrize("name,info,make_model,shape", COPY_CASES,
                         ids=[c[0] for c in COPY_CASES])
def test_deepcopy_of_the_optimizer_alone_steps_its_own_parameters(name, info, make_model, shape):
    x, y = _data(shape=shape)
    model = make_model()
    opt = _make(info, model, shape)
    _train(model, opt, x, y, 2)
    twin = copy.deepcopy(opt)
    params, twin_params = opt.param_groups[0]["params"], twin.param_groups[0]["params"]
    assert all(p is not q for p, q in zip(params, twin_params))
    opt.zero_grad()
    _backward(model, x, y)
    for p, q in zip(params, twin_params):
        q.grad = p.grad.clone()
    before = [p.detach().clone() for p in params]
    twin.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))   # untouched
    opt.step()
    for p, q in zip(params, twin_params):
        assert torch.equal(p.detach(), q.detach())


def test_a_copy_keeps_the_blocks():
    opt = _quiet(lambda: GSGD(_net(), lr=0.1))
    twin = copy.deepcopy(opt)
    assert [b.names for b in twin.blocks] == [b.names for b in opt.blocks]
    assert [b.widths for b in twin.blocks] == [(4, 5, 5, 3)]


# ------------------------------------------------------------------------------------------
# 3. the structure is part of the optimizer's identity
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("saved,loading,option", [
    (dict(block_split="stage"), dict(block_split="none"), "block_split"),
    (dict(bn="split"), dict(bn="approx"), "bn"),
    (dict(skeleton_init="keep"), dict(skeleton_init="one"), "skeleton_init"),
])
def test_a_state_saved_under_other_options_is_refused_naming_the_option(saved, loading,
                                                                       option):
    def model():
        return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(64, 3))

    state = _quiet(lambda: GSGD(model(), lr=0.1, momentum=0.9, **saved)).state_dict()
    target = _quiet(lambda: GSGD(model(), lr=0.1, momentum=0.9, **loading))
    with pytest.raises(ValueError, match=rf"saved by GSGD with {option}=.*this GSGD has "
                                         rf"{option}="):
        target.load_state_dict(state)


def test_a_state_of_another_block_layout_is_refused_naming_the_block():
    first = mlp([3, 4, 4, 2], bias=False)
    second = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Tanh(), nn.Linear(4, 4, bias=False),
                           nn.ReLU(), nn.Linear(4, 2, bias=False)).double()
    state = _quiet(lambda: GSGD(first, lr=0.1)).state_dict()
    with pytest.raises(ValueError, match=r"block 1 is 0 -> 2 -> 4 there and 2 -> 4 here"):
        _quiet(lambda: GSGD(second, lr=0.1)).load_state_dict(state)


def test_state_dict_with_the_record_loads_with_weights_only():
    x, y = _data()
    model = _net()
    opt = GSGD(model, lr=0.1, momentum=0.9, skeleton_init="keep")
    _train(model, opt, x, y, 2)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["gsgd"]["options"] == {"skeleton_init": "keep", "bn": "approx",
                                         "block_split": "none", "valleys": "split",
                                         "input_shape": None}
    clone = copy.deepcopy(model)
    clone_opt = GSGD(clone, lr=1.0, momentum=0.9, skeleton_init="keep")
    clone_opt.load_state_dict(loaded)
    _train(model, opt, x, y, 2)
    _train(clone, clone_opt, x, y, 2)
    _same(model, clone)


def test_an_sgd_state_is_refused():
    model = _net()
    sgd_state = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).state_dict()
    with pytest.raises(ValueError, match="not saved by GSGD"):
        GSGD(model, lr=0.1, skeleton_init="keep").load_state_dict(sgd_state)
    with pytest.raises(ValueError, match="not saved by PathSGD"):
        PathSGD(model.body, lr=0.1).load_state_dict(
            torch.optim.SGD(model.body.parameters(), lr=0.1).state_dict())


def test_path_sgd_state_of_another_input_shape_is_refused():
    state = PathSGD(_conv_net(), lr=0.1, input_shape=(2, 4, 4)).state_dict()
    with pytest.raises(ValueError, match=r"input_shape=\(2, 4, 4\), this PathSGD has "
                                         r"input_shape=\(2, 8, 8\)"):
        PathSGD(nn.Sequential(*list(_conv_net())[:-1], nn.Linear(48, 3)).double(), lr=0.1,
                input_shape=(2, 8, 8)).load_state_dict(state)


def test_repr_shows_every_option():
    text = repr(GSGD(_net(), lr=0.1, skeleton_init="keep", bn="split", block_split="stage",
                     maximize=True))
    for option in ("lr: 0.1", "momentum: 0.0", "weight_decay: 0.0", "bpr: 0.0",
                   "min_pivot_ratio: 1e-06", "skeleton_init: keep", "bn: split",
                   "block_split: stage", "maximize: True"):
        assert option in text
    text = repr(PathSGD(_conv_net(), lr=0.1, input_shape=(2, 4, 4)))
    for option in ("lr: 0.1", "eps: 0.0", "rescale: None", "input_shape: (2, 4, 4)",
                   "maximize: False"):
        assert option in text


# ------------------------------------------------------------------------------------------
# 4. flags written into param_groups
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["constructor", "param_group"])
@DB
def test_maximize_is_the_step_on_minus_the_loss(info, where):
    x, y = _data()
    up, down = info.model_for(_net), info.model_for(_net)

    def make(m, **kw):
        return info.make(m, lr=0.05, **info.state_options, **kw)
    if where == "constructor":
        opt_up = make(up, maximize=True)
    else:
        opt_up = make(up)
        opt_up.param_groups[0]["maximize"] = True
    opt_down = make(down)
    _train(up, opt_up, x, y, 3, sign=1.0)        # maximise L ...
    _train(down, opt_down, x, y, 3, sign=-1.0)   # ... is minimising -L
    _same(up, down)
    start = info.model_for(_net)
    moved = max(float((p - q).abs().max()) for p, q in zip(up.parameters(), start.parameters()))
    assert moved > 1e-3


@DB
@pytest.mark.parametrize("key,value,needle", [
    ("nesterov", True, "does not support nesterov=True"),
    ("dampening", 0.5, "does not support dampening=0.5"),
    ("betas", (0.9, 0.99), "does not use param_groups[0]['betas']"),
    ("lr_decay", 0.01, "does not use param_groups[0]['lr_decay']"),
])
def test_unknown_or_unsupported_group_keys_are_refused_before_any_write(info, key, value,
                                                                       needle):
    x, y = _data()
    model = _net()
    opt = info.make(model if info.outside_params else model.body, lr=0.1)
    if key in opt.defaults:
        pytest.skip(f"{info.name} uses {key}")
    opt.param_groups[0][key] = value
    _backward(model, x, y)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=re.escape(needle)):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


@DB
def test_neutral_sgd_flags_and_scheduler_keys_are_accepted(info):
    x, y = _data()
    model = _net()
    opt = info.make(model if info.outside_params else model.body, lr=0.1)
    opt.param_groups[0].update(nesterov=False, dampening=0, foreach=None, differentiable=False,
                               fused=None)
    opt.param_groups[0].update({key: 0 for key in info.sgd_zeros})
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=4,
                                                cycle_momentum=info.scheduler_momentum)
    for _ in range(3):
        _train(model, opt, x, y, 1)
        sched.step()


def test_a_structural_option_changed_in_the_group_is_refused():
    model = _net()
    opt = GSGD(model, lr=0.1, skeleton_init="keep")
    opt.param_groups[0]["block_split"] = "stage"
    _backward(model, *_data())
    with pytest.raises(ValueError, match="block_split is fixed when it is built"):
        opt.step()


# ------------------------------------------------------------------------------------------
# 5. wrapped models
# ------------------------------------------------------------------------------------------
def _ddp(model, tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1,
                                init_method=f"file://{tmp_path / 'rendezvous'}")
    return nn.parallel.DistributedDataParallel(model)


WRAPPERS = {
    "compile": lambda model, tmp_path: torch.compile(model),
    "DataParallel": lambda model, tmp_path: nn.DataParallel(model),
    "DistributedDataParallel": _ddp,
    "nested": lambda model, tmp_path: nn.DataParallel(torch.compile(model)),
}


@DB
@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_a_wrapped_model_is_unwrapped_and_traced(wrapper, info, tmp_path):
    x, y = _data()
    model, plain = _net().body, _net().body
    wrapped = WRAPPERS[wrapper](model, tmp_path)
    opt = info.make(wrapped, **info.state_options)
    reference = info.make(plain, **info.state_options)
    if isinstance(opt, GSGD):
        assert [b.names for b in opt.blocks] == [["0", "2", "4"]]
    _train(model, opt, x, y, 3)        # the wrapper shares its parameters with `model`
    _train(plain, reference, x, y, 3)
    _same(model, plain)


@DB
def test_building_on_the_model_then_wrapping_it_is_bit_exact(info):
    x, y = _data()
    model, plain = _net().body, _net().body
    opt, reference = info.make(model), info.make(plain)
    _train(nn.DataParallel(model), opt, x, y, 3)
    _train(plain, reference, x, y, 3)
    _same(model, plain)


# ------------------------------------------------------------------------------------------
# 6. construction changes the weights: say so
# ------------------------------------------------------------------------------------------
def test_skeleton_init_one_says_how_many_weights_it_set():
    from gsgd_cli.models.mlp import MLP

    model = MLP(49, 10, width=8, depth=2)              # 8 pivots + 16 free weights
    with pytest.warns(GSGDWarning, match=r"set 24 skeleton weights to 1 .* different function"
                                         r".*skeleton_init='keep'"):
        GSGD(model, lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GSGDWarning)
        GSGD(model, lr=0.01)                           # already 1: nothing changes, no word
        GSGD(MLP(49, 10, width=8, depth=2), lr=0.01, skeleton_init="keep")


def test_the_optimizers_are_exported_from_the_package():
    import gsgd_cli.optim as optim
    from gsgd_cli.optim.gsgd import GSGD as GSGDModule
    from gsgd_cli.optim.path_sgd import PathSGD as PathSGDModule

    assert optim.GSGD is GSGDModule and optim.PathSGD is PathSGDModule


def test_the_runner_reports_notes_and_refuses_a_resume_under_other_options(gsgd_train_inproc,
                                                                          tmp_path):
    import json

    base = ["data=synthetic", "train.batch_size=16", "train.checkpoint_every=2",
            "optimizer.momentum=0.9"]
    code, out, err = gsgd_train_inproc(*base, "train.iterations=2")
    assert code in (0, None), err
    assert "gsgd train: note: GSGD set" in out and "skeleton weights to 1" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert any("skeleton weights to 1" in note for note in summary["optimizer_notes"])
    code, out, err = gsgd_train_inproc(*base, "train.iterations=4", "resume=true",
                                       "optimizer.block_split=stage")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    # the runner compares the settings first (the optimizer's own refusal of another block
    # layout is tested above through load_state_dict)
    assert "cannot resume" in lines[0] and "optimizer.block_split: none -> stage" in lines[0]


# ------------------------------------------------------------------------------------------
# 7. every optimizer: resume, frozen parameters, missing gradients, non-finite values
# ------------------------------------------------------------------------------------------
@DB
def test_a_resumed_run_continues_bit_equal(info):
    """model + optimizer state_dicts, saved with torch.save and loaded with weights_only into
    an optimizer built on another model: the next steps equal the uninterrupted run's."""
    x, y = _data()
    model = info.model_for(_net)
    opt = _quiet(lambda: _make(info, model, None))
    _train(model, opt, x, y, 2)
    buffer = io.BytesIO()
    torch.save((model.state_dict(), opt.state_dict()), buffer)
    buffer.seek(0)
    model_state, opt_state = torch.load(buffer, weights_only=True)
    clone = info.model_for(lambda: _net(seed=5))
    clone_opt = _quiet(lambda: info.make(clone, **{**info.state_options, "lr": 0.5}))
    clone.load_state_dict(model_state)
    clone_opt.load_state_dict(opt_state)
    assert clone_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    clone_opt._test_steps = opt._test_steps
    _train(model, opt, x, y, 3)
    _train(clone, clone_opt, x, y, 3)
    _same(model, clone)


@DB
@pytest.mark.parametrize("when", ["before", "after"])
def test_a_frozen_parameter_is_never_moved(info, when):
    """A layer frozen before construction or after a step (requires_grad=False, no .grad):
    its weights stay as they are; the others keep training."""
    x, y = _data()
    model = info.model_for(_net)
    body = model.body if info.outside_params else model
    if when == "before":
        body[2].requires_grad_(False)
    opt = _quiet(lambda: _make(info, model, None))
    _train(model, opt, x, y, 1)
    body[2].requires_grad_(False)
    frozen = [p.detach().clone() for p in body[2].parameters()]
    others = body[0].weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GSGDWarning)
        _train(model, opt, x, y, 3)
    assert all(torch.equal(p.detach(), q) for p, q in zip(body[2].parameters(), frozen))
    assert not torch.equal(body[0].weight.detach(), others)


@DB
def test_a_step_without_gradients_writes_nothing(info):
    """step() after zero_grad(set_to_none=True) moves no parameter and keeps the state."""
    x, y = _data()
    model = info.model_for(_net)
    opt = _quiet(lambda: _make(info, model, None))
    _train(model, opt, x, y, 2)
    opt.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    after = opt.state_dict()["state"]
    assert after.keys() == state.keys()
    for k in state:
        assert all(torch.equal(torch.as_tensor(after[k][n]), torch.as_tensor(v))
                   for n, v in state[k].items())


@pytest.mark.parametrize("info", [i for i in OPTIM_DB if i.outside_params],
                         ids=[i.name for i in OPTIM_DB if i.outside_params])
def test_a_parameter_outside_without_a_gradient_is_left_alone(info):
    """As torch.optim: a parameter whose .grad is None (here the one outside every block)
    is not moved, while the rest takes its step."""
    x, y = _data()
    model = info.model_for(_net)
    opt = _quiet(lambda: _make(info, model, None))
    _train(model, opt, x, y, 1)
    opt.zero_grad()
    _backward(model, x, y)
    model.scale.grad = None
    scale, weight = model.scale.detach().clone(), model.body[0].weight.detach().clone()
    opt.step()
    assert torch.equal(model.scale.detach(), scale)
    assert not torch.equal(model.body[0].weight.detach(), weight)


@DB
@pytest.mark.parametrize("where", ["body.2.weight", "body.0.bias"])
def test_a_non_finite_gradient_is_refused_before_any_write(info, where):
    """A NaN in one gradient: the step raises a StepError (at once, or at check_steps() for
    an optimizer that does not wait for the device) and no parameter or state has moved."""
    from gsgd_cli.optim.errors import StepError

    x, y = _data()
    model = _net() if info.outside_params else _net().body
    opt = _quiet(lambda: _make(info, model, None))
    _train(model, opt, x, y, 2)
    opt.zero_grad()
    _backward(model, x, y)
    name = where if info.outside_params else where.removeprefix("body.")
    dict(model.named_parameters())[name].grad.view(-1)[0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    with pytest.raises(StepError, match=r"not finite") as caught:
        opt.step()
        opt.check_steps()
    assert caught.value.step == 3
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    after = opt.state_dict()["state"]
    assert after.keys() == state.keys()
    for k in state:
        assert all(torch.equal(torch.as_tensor(after[k][n]), torch.as_tensor(v))
                   for n, v in state[k].items())
