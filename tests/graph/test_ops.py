"""graph.ops is the one table both optimizers read: whatever it calls ReLU-like (or a dropout)
joins G-SGD's chain and passes into Path-SGD's squared copy, with the same kappa as nn.ReLU."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from gsgd_cli.graph.ops import FUNCTION_OPS, METHOD_OPS, MODULE_OPS, Op, module_op
from gsgd_cli.optim import GSGD, GSGDWarning, PathSGD

RELU_LIKE = ([("function", f) for f, op in FUNCTION_OPS.items() if op is Op.RELU]
             + [("method", m) for m, op in METHOD_OPS.items() if op is Op.RELU]
             + [("module", t) for t, op in MODULE_OPS.items() if op is Op.RELU])
DROPOUT_LIKE = ([("module", t) for t, op in MODULE_OPS.items() if op in (Op.DROPOUT,
                                                                           Op.DROPOUT_ND)]
                + [("function", f) for f, op in FUNCTION_OPS.items()
                   if op in (Op.DROPOUT, Op.DROPOUT_ND)])


class TwoLayers(nn.Module):
    """Linear -> (the operation under test) -> ReLU -> Linear, in float64."""

    def __init__(self, how: str, what):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6).double(), nn.Linear(6, 3).double()
        self.how, self.what = how, what
        self.op = what() if how == "module" and what is not nn.ReLU else nn.Identity()
        if how == "module" and what is nn.ReLU:
            self.op = nn.ReLU()

    def forward(self, x):
        h = self.a(x)
        if self.how == "function":
            h = self.what(h)
        elif self.how == "method":
            h = getattr(h, self.what)()
        else:
            h = self.op(h)
        return self.b(torch.relu(h))


def _name(case):
    how, what = case
    return f"{how}-{getattr(what, '__name__', what)}"


@pytest.mark.parametrize("case", RELU_LIKE + DROPOUT_LIKE, ids=[_name(c) for c in
                                                                 RELU_LIKE + DROPOUT_LIKE])
def test_both_optimizers_accept_what_the_table_calls_relu_like_or_dropout(case):
    torch.manual_seed(0)
    model = TwoLayers(*case).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GSGDWarning)
        gsgd = GSGD(model, lr=0.1, skeleton_init="keep")
    assert [b.names for b in gsgd.blocks] == [["a", "b"]]
    reference = TwoLayers("module", nn.ReLU)
    reference.load_state_dict(model.state_dict(), strict=False)
    kappa = PathSGD(model, lr=0.1).compute_kappa()
    expected = PathSGD(reference, lr=0.1).compute_kappa()
    for k, e in zip(kappa, expected):
        assert torch.equal(k, e)


def test_a_subclass_is_read_through_its_class_hierarchy_unless_exact():
    class MyReLU(nn.ReLU):
        pass

    assert module_op(MyReLU()) is Op.RELU
    assert module_op(MyReLU(), exact=True) is Op.OTHER
    assert module_op(nn.SyncBatchNorm(3)) is Op.NORM
    assert module_op(nn.BatchNorm2d(3), exact=True) is Op.BATCH_NORM_2D
