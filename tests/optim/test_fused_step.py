"""The fused CPU step against the eager reference step (float64 to 1e-12; float32 within the
spread of the eager step between float32 and float64), its threads, its fallback without a
compiler, and the eager step's promise never to read a device value (no host sync)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from gsgd_cli.models import MLP, PlainNet, ResNet
from gsgd_cli.optim.native import build as fused_cpu
from gsgd_cli.optim.gsgd import GSGD

from gsgd_cli.testing.helpers import PROFILES, mlp, randomise

pytestmark = pytest.mark.skipif(fused_cpu.library() is None,
                                reason="the fused CPU step cannot be built here")

OPTIONS = [{}, dict(momentum=0.9), dict(weight_decay=0.01), dict(bpr=0.01),
           dict(momentum=0.5, weight_decay=0.01, bpr=0.01)]


def _trajectories(model, x, y, steps, lr=0.05, **kwargs):
    """Weights after each of `steps` steps, for the fused and the eager step."""
    result = {}
    for fused in (True, False):
        m = copy.deepcopy(model)
        opt = GSGD(m, lr=lr, skeleton_init="keep", fused=fused, **kwargs)
        states = []
        for k in range(steps):
            opt.zero_grad()
            F.cross_entropy(m(x[k::2]), y[k::2]).backward()
            opt.step()
            opt.check_steps()
            states.append([p.detach().clone() for p in m.parameters()])
        assert (opt._native is not None) == fused
        result[fused] = states
    return result[True], result[False]


def _max_diff(a, b):
    return max(float((p - q).detach().abs().max()) for p, q in zip(a, b))


def _mlp_case(widths, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = randomise(mlp(widths, bias), gen)
    x = torch.randn(16, widths[0], generator=gen, dtype=torch.float64)
    y = torch.randint(0, widths[-1], (16,), generator=gen)
    return model, x, y


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("name,widths", PROFILES, ids=[n for n, _ in PROFILES])
def test_fused_equals_eager_in_float64_over_five_steps(name, widths, bias, options):
    model, x, y = _mlp_case(widths, bias)
    fused, eager = _trajectories(model, x, y, 5, **options)
    for k, (a, b) in enumerate(zip(fused, eager)):
        assert _max_diff(a, b) < 1e-12, f"step {k}"


@pytest.mark.parametrize("name,widths", PROFILES[1::2], ids=[n for n, _ in PROFILES[1::2]])
def test_fused_float32_is_within_the_eager_float32_spread(name, widths):
    model, x, y = _mlp_case(widths, bias=True)
    options = dict(momentum=0.5, weight_decay=0.01)
    _, eager64 = _trajectories(model, x, y, 5, **options)
    fused32, eager32 = _trajectories(model.float(), x.float(), y, 5, **options)
    for k in range(5):
        spread = _max_diff(eager32[k], [p.float() for p in eager64[k]])
        assert spread > 0
        assert _max_diff(fused32[k], eager32[k]) <= 4 * spread, f"step {k}"


CONV_CASES = [(cls, bn, options) for cls in (PlainNet, ResNet) for bn in (False, True)
              for options in ({}, dict(momentum=0.9, weight_decay=1e-3), dict(block_split="stage"))
              ] + [(PlainNet, True, dict(bn="approx_per_tap")), (ResNet, True, dict(bn="split"))]


@pytest.mark.parametrize("cls,bn,options", CONV_CASES,
                         ids=[f"{c.__name__}-{'bn' if b else 'nobn'}-{','.join(f'{k}={v}' for k, v in o.items()) or 'plain'}"
                              for c, b, o in CONV_CASES])
def test_fused_equals_eager_on_paper_models_at_reduced_width(cls, bn, options):
    # every chain block, batch norm's eq. 39, conv kernels, parameters outside the blocks;
    # one step (34 layers amplify rounding from step to step for eager and fused alike)
    torch.manual_seed(0)
    model = cls(3, 10, widths=[4, 8, 8, 16], bn=bn).double()
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 10, (8,))
    x = torch.cat([x, x])
    y = torch.cat([y, y])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused, eager = _trajectories(model, x, y, 1, lr=1e-3, **options)
    scale = max(float(p.abs().max()) for p in eager[0])
    assert _max_diff(fused[0], eager[0]) < 1e-12 * scale


@pytest.mark.parametrize("threads", [1, 2])
def test_fused_threads_give_the_eager_result(threads):
    # layers above the kernel's threshold (32768 elements) are split over threads; rows and
    # columns are summed per thread, so the result may differ in rounding only
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model, x, y = _mlp_case([40, 300, 200, 10], bias=True)
        fused, eager = _trajectories(model, x, y, 2, momentum=0.5, weight_decay=0.01)
    finally:
        torch.set_num_threads(old)
    scale = max(float(p.abs().max()) for p in eager[-1])
    assert _max_diff(fused[-1], eager[-1]) < 1e-12 * scale


def test_without_a_compiler_it_warns_once_and_uses_the_eager_step(monkeypatch, tmp_path):
    monkeypatch.setattr(fused_cpu, "_library", None)
    monkeypatch.setattr(fused_cpu, "_failure", None)
    monkeypatch.setattr(fused_cpu, "_warned", False)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("GSGD_CACHE_DIR", str(tmp_path / "cache"))
    model, x, y = _mlp_case([3, 4, 4, 2], bias=False)
    reference = copy.deepcopy(model)
    with pytest.warns(RuntimeWarning, match=r"fused CPU step is not available \(no C\+\+ "
                                            r"compiler found .*using the eager step instead"):
        opt = GSGD(model, lr=0.1)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # only once per process
        other = GSGD(copy.deepcopy(model), lr=0.1)
        other.step()
    ref_opt = GSGD(reference, lr=0.1, fused=False)
    F.cross_entropy(reference(x), y).backward()
    ref_opt.step()
    assert _max_diff(list(model.parameters()), list(reference.parameters())) == 0
    assert not list((tmp_path / "cache").glob("*.so"))


@pytest.mark.parametrize("options", [dict(momentum=0.9, weight_decay=1e-3, bpr=1e-3),
                                     dict(bn="approx_per_tap")], ids=["all-options", "per-tap"])
@pytest.mark.parametrize("arch", ["mlp", "resnet-bn"])
def test_the_eager_step_never_reads_a_device_value(arch, options):
    # tensors on the meta device have no values: .item(), bool() or .tolist() on them raise,
    # so a step that runs here never makes the host wait for the device (CUDA included)
    with torch.device("meta"):
        model = (MLP(49, 10, width=8, bias=True) if arch == "mlp"
                 else ResNet(3, 10, widths=[4, 8, 8, 16], bn=True))
    opt = GSGD(model, lr=0.1, **options)
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    opt.step()
    opt.step()
    assert opt._step_record.device.type == "meta"
    strict = GSGD(model, lr=0.1, strict=True, **options)
    with pytest.raises(RuntimeError, match="meta"):     # strict mode does wait, on purpose
        strict.step()


@pytest.mark.parametrize("missing", ["0.weight", "2.bias", "4.weight"])
def test_fused_equals_eager_when_a_layer_has_no_gradient(missing):
    # a None gradient counts as zero in both steps (the layer is still rescaled by 1/R)
    model, x, y = _mlp_case([3, 4, 5, 2], bias=True)
    results = []
    for fused in (True, False):
        m = copy.deepcopy(model)
        opt = GSGD(m, lr=0.1, skeleton_init="keep", momentum=0.5, weight_decay=0.01,
                   fused=fused)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            dict(m.named_parameters())[missing].grad = None
            opt.step()
        opt.check_steps()
        results.append([p.detach().clone() for p in m.parameters()])
    assert _max_diff(*results) < 1e-12
