"""The Hydra-independent trainer: budget, schedule, records, resume equality, divergence."""
from __future__ import annotations

import json

import pytest
import torch

from gsgd_cli.data import load_data
from gsgd_cli.models import MLP, ResNet
from gsgd_cli.optim.sgd import make_sgd
from gsgd_cli.train import Schedule, Trainer, TrainSettings, UserError
from gsgd_cli.train.checkpoint import load

SYNTH = {"name": "synthetic", "shape": [3, 8, 8], "num_classes": 4, "train_size": 100,
         "test_size": 40, "augment": True}


def make_trainer(run_dir, *, iterations=20, dtype=torch.float64, lr=0.05, model="mlp",
                 schedule=None, **settings):
    torch.manual_seed(0)
    data = load_data(SYNTH)
    if model == "mlp":
        net = MLP(3 * 8 * 8, 4, width=16)
    else:
        net = ResNet(3, 4, blocks=[1, 1], widths=[4, 8])
    net = net.to(dtype)
    opt = make_sgd(net, lr=lr, momentum=0.9)
    settings = TrainSettings(**{"iterations": iterations, "batch_size": 16, "dtype": dtype,
                                "progress": False, "tensorboard": False, **settings})
    return Trainer(net, opt, data, run_dir, settings,
                   schedule or Schedule("multistep", "iteration", (7, 15), 0.5), log=lambda m: None)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("model", ["mlp", "resnet"])
def test_resume_gives_the_same_weights(tmp_path, model):
    # float64, SGD with momentum (optimizer state), augmentation on (data RNG), a multistep
    # schedule, BN running stats (resnet) and an interruption in the middle of an epoch.
    full = make_trainer(tmp_path / "full", iterations=17, model=model, eval_every=5)
    full.fit()
    part = make_trainer(tmp_path / "part", iterations=9, model=model, eval_every=5)
    part.fit()
    assert part.iteration == 9 and 9 % part.iterations_per_epoch != 0
    resumed = make_trainer(tmp_path / "part", iterations=17, model=model, eval_every=5)
    resumed.fit(resume=True)
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert [m["iteration"] for m in read_metrics(tmp_path / "part")] == [5, 9, 10, 15, 17]
    full_metrics = {m["iteration"]: m for m in read_metrics(tmp_path / "full")}
    assert read_metrics(tmp_path / "part")[-1]["test_loss"] == full_metrics[17]["test_loss"]


def test_resume_from_mid_run_checkpoint_drops_later_metrics(tmp_path):
    first = make_trainer(tmp_path, iterations=12, eval_every=2, checkpoint_every=5)
    first.fit()
    # Pretend the run was killed after iteration 12's metrics but the checkpoint said 10.
    state = load(tmp_path / "checkpoint.pt")
    assert state["iteration"] == 12
    reference = make_trainer(tmp_path / "ref", iterations=10, eval_every=2, checkpoint_every=5)
    reference.fit()
    (tmp_path / "checkpoint.pt").write_bytes((tmp_path / "ref" / "checkpoint.pt").read_bytes())
    again = make_trainer(tmp_path, iterations=12, eval_every=2, checkpoint_every=5)
    again.fit(resume=True)
    iterations = [m["iteration"] for m in read_metrics(tmp_path)]
    assert iterations == [2, 4, 6, 8, 10, 12]
    for a, b in zip(first.model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)


def test_resume_without_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="resume=true but there is no checkpoint at"):
        make_trainer(tmp_path).fit(resume=True)


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, iterations=50, lr=1e12, checkpoint_every=1,
                           schedule=Schedule(), dtype=torch.float32)
    summary = trainer.fit()
    assert summary["status"] == "diverged"
    assert "training diverged" in summary["message"] and "last good checkpoint" in summary["message"]
    state = load(tmp_path / "checkpoint.pt")
    assert state["iteration"] == trainer.iteration < 50
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["status"] == "diverged"


def test_schedule_factors():
    ms = Schedule("multistep", "epoch", (2, 4), 0.1)
    assert [ms.factor(i, 10) for i in (0, 19, 20, 39, 40, 99)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])
    it = Schedule("multistep", "iteration", (3,), 0.5)
    assert [it.factor(i, 100) for i in (2, 3)] == [1, 0.5]
    ex = Schedule("exponential", "epoch", gamma=0.5)
    assert [ex.factor(i, 10) for i in (0, 9, 10, 25)] == [1, 1, 0.5, 0.25]
    assert Schedule("exponential", "iteration", gamma=0.5).factor(3, 10) == 0.125
    assert Schedule().factor(12345, 10) == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "cosine"}, "Invalid schedule.name='cosine'"),
    ({"unit": "step"}, "Invalid schedule.unit='step'"),
    ({"kind": "multistep", "milestones": (5, 2)}, r"Invalid schedule.milestones=\[5, 2\]"),
    ({"gamma": 0}, "Invalid schedule.gamma=0"),
])
def test_schedule_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        Schedule(**kwargs)


def test_lr_in_metrics_follows_schedule(tmp_path):
    make_trainer(tmp_path, iterations=18, eval_every=6).fit()
    assert [m["lr"] for m in read_metrics(tmp_path)] == pytest.approx([0.05, 0.025, 0.0125])


def test_epoch_budget_and_records(tmp_path):
    trainer = make_trainer(tmp_path, iterations=None, epochs=2, tensorboard=True)
    summary = trainer.fit()
    assert trainer.iterations_per_epoch == 100 // 16
    assert summary["iterations"] == 2 * 6 and summary["status"] == "completed"
    metrics = read_metrics(tmp_path)
    assert [m["epoch"] for m in metrics] == [1.0, 2.0]
    assert set(metrics[0]) == {"iteration", "epoch", "lr", "train_loss", "train_acc",
                               "test_loss", "test_acc", "elapsed_s"}
    assert summary["final_test_acc"] == metrics[-1]["test_acc"]
    assert summary["best_test_acc"] == max(m["test_acc"] for m in metrics)
    assert summary["final_train_loss"] == metrics[-1]["train_loss"]
    for key in ("wall_time_s", "seed", "torch_version", "device"):
        assert key in summary


@pytest.mark.parametrize("settings, message", [
    ({"batch_size": 0}, r"Invalid train.batch_size=0. Must be a positive integer"),
    ({"iterations": -3}, r"Invalid train.iterations=-3"),
    ({"iterations": None, "epochs": None}, "No training budget"),
    ({"eval_every": 0}, r"Invalid train.eval_every=0"),
    ({"batch_size": 1000}, r"train.batch_size=1000: larger than the training split"),
])
def test_bad_settings(tmp_path, settings, message):
    with pytest.raises(UserError, match=message):
        make_trainer(tmp_path, **settings)


def test_non_finite_weights_never_reach_a_checkpoint(tmp_path):
    class Poison(torch.optim.SGD):
        """SGD that writes an Inf into the weights at its 3rd step (the loss is still finite)."""

        def step(self, closure=None):
            super().step(closure)
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 3:
                with torch.no_grad():
                    self.param_groups[0]["params"][0].view(-1)[0] = float("inf")

    trainer = make_trainer(tmp_path, iterations=10, checkpoint_every=1)
    trainer.optimizer = Poison(trainer.model.parameters(), lr=0.01)
    summary = trainer.fit()
    assert summary["status"] == "diverged" and "non-finite weights" in summary["message"]
    state = load(tmp_path / "checkpoint.pt")
    assert state["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_resume_with_another_model_is_a_user_error(tmp_path):
    make_trainer(tmp_path, iterations=3).fit()
    other = make_trainer(tmp_path, iterations=6, model="resnet")
    with pytest.raises(UserError, match="does not fit this model/optimizer"):
        other.fit(resume=True)


@pytest.mark.parametrize("module, name", [("gsgd_cli.optim.gsgd", "GSGDStepError"),
                                          ("gsgd_cli.optim.path_sgd", "PathSGDStepError")])
def test_optimizer_step_errors_count_as_divergence(tmp_path, module, name):
    error = getattr(pytest.importorskip(module), name)

    class Refuses(torch.optim.SGD):
        def step(self, closure=None):
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 4:
                raise error("pivot vanished\nmore detail")
            return super().step(closure)

    trainer = make_trainer(tmp_path, iterations=10, checkpoint_every=2)
    trainer.optimizer = Refuses(trainer.model.parameters(), lr=0.01)
    summary = trainer.fit()
    assert summary["status"] == "diverged"
    assert "optimizer step failed (pivot vanished)" in summary["message"]
    assert load(tmp_path / "checkpoint.pt")["iteration"] == 2


# --------------------------------------------------------------------------------------------
# The loop waits for the device only at its sync points
# --------------------------------------------------------------------------------------------
class NaNAt(torch.nn.Module):
    """Wraps a model; its output is NaN from the `at`-th training forward pass on."""

    def __init__(self, model, at):
        super().__init__()
        self.model, self.at, self.calls = model, at, 0

    def forward(self, x):
        out = self.model(x)
        if self.training:
            self.calls += 1
            if self.calls >= self.at:
                out = out * float("nan")
        return out


@pytest.mark.parametrize("optimizer", ["sgd", "gsgd"])
def test_a_non_finite_loss_stops_the_run_naming_its_iteration(tmp_path, optimizer):
    from gsgd_cli.optim.gsgd import GSGD

    trainer = make_trainer(tmp_path, iterations=30, checkpoint_every=5, eval_every=10,
                           dtype=torch.float32)
    if optimizer == "gsgd":
        trainer.optimizer = GSGD(trainer.model, lr=0.01)
    trainer.model = NaNAt(trainer.model, at=13)
    summary = trainer.fit()
    assert summary["status"] == "diverged" and summary["iterations"] == 12
    assert "training diverged: loss=nan at iteration 13" in summary["message"]
    assert "last good checkpoint" in summary["message"]
    state = load(tmp_path / "checkpoint.pt")
    assert state["iteration"] == 10
    assert all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.parametrize("strict", [False, True], ids=["deferred", "strict"])
def test_a_failed_gsgd_step_stops_the_run_naming_its_iteration_and_layer(tmp_path, strict):
    from gsgd_cli.optim.gsgd import GSGD

    class PoisonGrad(torch.nn.Module):
        """Identity on the way forward; a NaN gradient on the way back from the 7th pass."""

        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += self.training
            return x if self.calls < 7 else _NaNGrad.apply(x)

    trainer = make_trainer(tmp_path, iterations=20, checkpoint_every=5, dtype=torch.float32)
    net = torch.nn.Sequential(trainer.model, PoisonGrad())
    trainer.optimizer = GSGD(net, lr=0.01, strict=strict)     # (traces net: forward once)
    trainer.model = net
    net[1].calls = 0
    summary = trainer.fit()
    assert summary["status"] == "diverged" and summary["iterations"] == 6
    assert ("optimizer step failed (G-SGD step 7 failed in layer '0.1': its gradient is not "
            "finite") in summary["message"]
    assert "at iteration 7 " in summary["message"]
    assert load(tmp_path / "checkpoint.pt")["iteration"] == 5


class _NaNGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_syncing_every_iteration_gives_the_same_run(tmp_path):
    runs = {}
    for every in (1, 7, 1000):
        trainer = make_trainer(tmp_path / str(every), iterations=17, eval_every=5,
                               sync_every=every)
        trainer.fit()
        runs[every] = (trainer.model.state_dict(), read_metrics(tmp_path / str(every)))
    for every in (7, 1000):
        for a, b in zip(runs[1][0].values(), runs[every][0].values()):
            assert torch.equal(a, b)
        assert runs[every][1] == [{**m, "elapsed_s": runs[every][1][k]["elapsed_s"]}
                                  for k, m in enumerate(runs[1][1])]


def test_the_loop_checks_only_at_its_sync_points(tmp_path, monkeypatch):
    from gsgd_cli.optim.gsgd import GSGD
    from gsgd_cli.train.step import RunningSums

    trainer = make_trainer(tmp_path, iterations=30, eval_every=10, checkpoint_every=15,
                           sync_every=1000)
    trainer.optimizer = GSGD(trainer.model, lr=0.01)
    checks, takes = [], []
    original_check, original_take = trainer.optimizer.check_steps, RunningSums.take
    monkeypatch.setattr(trainer.optimizer, "check_steps",
                        lambda: (checks.append(trainer.iteration), original_check())[1])
    monkeypatch.setattr(RunningSums, "take",
                        lambda self: (takes.append(trainer.iteration), original_take(self))[1])
    assert trainer.fit()["status"] == "completed"
    assert checks == takes == [10, 15, 20, 30]


def test_cuda_graphs_need_a_cuda_device(tmp_path):
    trainer = make_trainer(tmp_path, cuda_graphs=True)
    with pytest.raises(UserError, match="train.cuda_graphs=true needs a CUDA device"):
        trainer.fit()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("optimizer", ["sgd", "gsgd", "path_sgd"])
def test_cuda_graph_training_follows_the_eager_run(tmp_path, optimizer):
    from gsgd_cli.optim.gsgd import GSGD
    from gsgd_cli.optim.path_sgd import PathSGD

    results = {}
    for graphs in (False, True):
        torch.manual_seed(0)
        data = load_data({**SYNTH, "augment": True}, "cuda")
        net = MLP(3 * 8 * 8, 4, width=16).cuda()
        opt = {"sgd": lambda: make_sgd(net, lr=0.05, momentum=0.9),
               "gsgd": lambda: GSGD(net, lr=0.05, momentum=0.9),
               "path_sgd": lambda: PathSGD(net, lr=0.05)}[optimizer]()
        settings = TrainSettings(iterations=40, batch_size=16, progress=False, tensorboard=False,
                                 eval_every=10, cuda_graphs=graphs)
        trainer = Trainer(net, opt, data, tmp_path / str(graphs), settings,
                          Schedule("multistep", "iteration", (20,), 0.5), log=lambda m: None)
        assert trainer.fit()["status"] == "completed"
        results[graphs] = (net.state_dict(), read_metrics(tmp_path / str(graphs)))
    for a, b in zip(results[False][0].values(), results[True][0].values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(results[False][1], results[True][1]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
