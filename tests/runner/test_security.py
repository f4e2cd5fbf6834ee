"""Issue 14: resuming or reporting on a run directory, or reading a data folder, never runs code
from it; the files the runner writes are not world-writable."""
from __future__ import annotations

import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gsgd_cli.data import load_data
from gsgd_cli.testing.fake_data import write_fake_cifar
from gsgd_cli.train import UserError

REPO = Path(__file__).resolve().parents[2]
SYNTH = ["data=synthetic", "optimizer=sgd", "train.iterations=6", "train.batch_size=16"]


class WritesMarker:
    """Unpickling this calls open(marker, "w"): a stand-in for any code a crafted file runs."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def env_for_subprocess():
    env = {k: v for k, v in os.environ.items() if k not in ("COMP_LINE", "HYDRA_FULL_ERROR")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def test_a_crafted_checkpoint_is_refused_and_runs_nothing(gsgd_train, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "marker"
    ckpt = run / "checkpoint.pt"
    torch.save({"iteration": 3, "model": {}, "optimizer": WritesMarker(marker)}, ckpt)
    proc = gsgd_train(*SYNTH, "resume=true", f"hydra.run.dir={run}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"refusing to load {ckpt}: it contains objects that are not allowed" in lines[0]
    assert "(e.g. io.open)" in lines[0]
    assert not marker.exists()
    # the file really is hostile: an unrestricted load runs its payload
    torch.load(ckpt, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("optimizer", [["optimizer=sgd", "optimizer.momentum=0.9"],
                                       ["optimizer=gsgd", "optimizer.momentum=0.5"],
                                       ["optimizer=path_sgd"]])
def test_checkpoints_hold_only_what_the_restricted_loader_accepts(gsgd_train_inproc, tmp_path,
                                                                  optimizer):
    base = ["data=synthetic", "train.batch_size=16", "dtype=float64", *optimizer]
    assert gsgd_train_inproc(*base, "train.iterations=3")[0] == 0
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["iteration"] == 3 and state["config"]["train"]["batch_size"] == 16
    code, out, err = gsgd_train_inproc(*base, "train.iterations=5", "resume=true")
    assert code == 0 and "completed 5 iterations" in out, err


def test_a_crafted_cifar_batch_is_refused_and_runs_nothing(tmp_path, gsgd_train_inproc):
    folder = write_fake_cifar(tmp_path / "data", "cifar10", n_per_batch=4, n_test=4)
    marker = tmp_path / "marker"
    batch = folder / "data_batch_3"
    with open(batch, "wb") as f:
        pickle.dump({"data": np.zeros((4, 3072), np.uint8), "labels": WritesMarker(marker)}, f)
    with pytest.raises(UserError) as info:
        load_data({"name": "cifar10", "root": str(tmp_path / "data")})
    message = str(info.value)
    assert message.startswith(f"refusing to read {batch}: it contains objects that are not "
                              "allowed in a CIFAR batch (io.open)")
    assert "\n" not in message and "data.download=true" in message
    assert not marker.exists()
    code, out, err = gsgd_train_inproc("data=cifar10", f"data.root={tmp_path / 'data'}",
                                       "model=resnet_tiny", "optimizer=sgd", "train.iterations=1",
                                       "train.batch_size=4")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "refusing to read" in err
    assert not marker.exists()
    with open(batch, "rb") as f:     # the file really is hostile
        pickle.load(f)
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_batches_of_every_pickle_protocol_read_as_torchvision_reads_them(tmp_path, name,
                                                                                protocol):
    import torchvision

    folder = write_fake_cifar(tmp_path, name, n_per_batch=3, n_test=5)
    for path in folder.iterdir():     # rewrite with this protocol, keys as bytes (Python 2 style)
        with open(path, "rb") as f:
            entry = pickle.load(f)
        if protocol == 2:
            entry = {k.encode(): v for k, v in entry.items()}
        with open(path, "wb") as f:
            pickle.dump(entry, f, protocol=protocol)
    ours = load_data({"name": name, "root": str(tmp_path)})
    if protocol == 2:
        return   # torchvision looks keys up as str
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100

    class Unchecked(cls):
        train_list = [[f, None] for f, _ in cls.train_list]
        test_list = [[f, None] for f, _ in cls.test_list]
        meta = {**cls.meta, "md5": None}

    for train, x, y in ((True, ours.train_x, ours.train_y), (False, ours.test_x, ours.test_y)):
        ref = Unchecked(str(tmp_path), train=train)
        assert torch.equal(x, torch.from_numpy(ref.data).permute(0, 3, 1, 2))
        assert torch.equal(y, torch.as_tensor(ref.targets))


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode)
            for p in folder.rglob("*")}


@pytest.mark.parametrize("umask, file_mode", [(0o000, 0o664), (0o022, 0o644), (0o077, 0o600)])
def test_run_files_share_one_mode_and_are_never_world_writable(tmp_path, umask, file_mode):
    proc = subprocess.run([sys.executable, "-m", "gsgd_cli", "train", *SYNTH,
                           "train.checkpoint_every=2", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env_for_subprocess(), capture_output=True, text=True,
                          timeout=120, umask=umask)
    assert proc.returncode == 0, proc.stderr
    modes = _modes(tmp_path / "run")
    assert {"checkpoint.pt", "summary.json", "metrics.jsonl", ".hydra/config.yaml"} <= set(modes)
    for name, mode in modes.items():
        assert mode & stat.S_IWOTH == 0, (name, oct(mode))
        if not (tmp_path / "run" / name).is_dir():
            assert mode == file_mode, (name, oct(mode))


def test_report_does_not_put_the_readers_environment_into_a_table(tmp_path, monkeypatch):
    from gsgd_cli.analysis.runs import load_run

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(
        "optimizer:\n  lr: ${oc.env:GSGD_TEST_SECRET}\n  momentum: ${seed}\nseed: 3\n")
    monkeypatch.setenv("GSGD_TEST_SECRET", "hunter2")
    config = load_run(run).config
    assert config["optimizer.lr"] == "${oc.env:GSGD_TEST_SECRET}"
    assert config["optimizer.momentum"] == 3     # other interpolations still resolve
