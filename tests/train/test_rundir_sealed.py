"""Issue 23: a run directory is owned (one command at a time), sealed (nothing written through a
link, nothing removed that the runner did not write), checked (checksummed checkpoints, the
data fingerprint) and read safely (plain bounded data, bad runs skipped with a reason)."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gsgd_cli.train import runlock

REPO = Path(__file__).resolve().parents[2]
SYNTH = ["data=synthetic", "optimizer=sgd", "train.batch_size=16", "dtype=float64"]


def one_line(code, out, err, expected_code=2):
    assert code == expected_code, out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                         p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def env():
    out = {k: v for k, v in os.environ.items() if k not in ("COMP_LINE", "HYDRA_FULL_ERROR")}
    out.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return out


@pytest.fixture
def finished(gsgd_train_inproc, tmp_path):
    """A completed 6-iteration run in tmp_path/run."""
    code, out, err = gsgd_train_inproc(*SYNTH, "train.iterations=6")
    assert code == 0, err
    return tmp_path / "run"


# -- 1. no write through a planted link -------------------------------------------------------
def test_report_does_not_write_through_a_planted_link(finished, tmp_path, capsys):
    from gsgd_cli.cli.report import main

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (finished / "report.csv").symlink_to(victim)
    assert main([str(finished)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a symbolic link" in err, err
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("planted", [".hydra/config.yaml", ".hydra", "tb", "metrics.jsonl",
                                     "summary.json"])
def test_resume_refuses_a_run_dir_with_planted_links(finished, gsgd_train_inproc, tmp_path,
                                                     planted):
    victim = tmp_path / "victim"
    target = finished / planted
    if target.is_dir():
        os.rename(target, tmp_path / "moved")
    else:
        target.unlink()
    target.symlink_to(victim)   # dangling: a write through it would create `victim`
    line = one_line(*gsgd_train_inproc(*SYNTH, "train.iterations=9", "resume=true"))
    assert "holds symbolic links" in line and planted.split("/")[-1] in line, line
    assert not victim.exists()


@pytest.mark.parametrize("tmp_name", [".summary.json.tmp", ".metrics.jsonl.tmp"])
def test_a_dangling_temp_link_is_removed_not_followed(finished, gsgd_train_inproc, tmp_path,
                                                      tmp_name):
    victim = tmp_path / "victim"
    (finished / tmp_name).symlink_to(victim)
    code, out, err = gsgd_train_inproc(*SYNTH, "train.iterations=9", "resume=true")
    assert code == 0, err
    assert not victim.exists() and not os.path.lexists(finished / tmp_name)


def test_figures_do_not_write_through_links(finished, tmp_path, capsys):
    from gsgd_cli.cli.figures import main

    out = tmp_path / "figs"
    out.mkdir()
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"keep")
    (out / "fig3_curves.png").symlink_to(victim)
    assert main([str(finished), "--out", str(out), "--only", "curves"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a symbolic link" in err, err
    assert victim.read_bytes() == b"keep"


# -- 2. the reader's environment never enters a report -----------------------------------------
@pytest.mark.parametrize("value", ["\\${oc.env:GSGD_TEST_SECRET}", "${ oc.env:GSGD_TEST_SECRET}",
                                   "${oc.decode:${oc.env:GSGD_TEST_SECRET}}",
                                   "${oc.env:GSGD_TEST_SECRET}"])
def test_no_interpolation_bypass_leaks_the_environment(tmp_path, monkeypatch, value):
    from gsgd_cli.analysis.runs import load_run

    monkeypatch.setenv("GSGD_TEST_SECRET", "hunter2")
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(
        json.dumps({"optimizer": {"lr": value, "momentum": "${seed}"}, "seed": 3}))
    config = load_run(run).config
    assert "hunter2" not in json.dumps(config)
    assert config["optimizer.lr"] == value
    assert config["optimizer.momentum"] == 3   # a reference to the file's own key resolves


def test_csv_cells_that_a_spreadsheet_would_run_are_escaped():
    from gsgd_cli.analysis.table import _cell

    assert [_cell(v) for v in ("=cmd|' /C calc'!A0", "+1", "-2+3", "@SUM(A1)", "sgd")] == [
        "'=cmd|' /C calc'!A0", "'+1", "'-2+3", "'@SUM(A1)", "sgd"]
    assert _cell(-0.5) == "-0.5"   # numbers stay numbers


# -- 3. a checkpoint with a code payload is named as such ---------------------------------------
class RunsShell:
    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_payload_checkpoint_is_called_unsafe_not_corrupt(finished, gsgd_train_inproc,
                                                           protocol):
    torch.save({"iteration": 3, "model": {}, "optimizer": RunsShell()},
               finished / "checkpoint.pt", pickle_protocol=protocol)
    line = one_line(*gsgd_train_inproc(*SYNTH, "train.iterations=9", "resume=true"))
    assert "contains objects that are not allowed" in line, line
    assert "it may run code: do not load it unrestricted" in line
    assert "corrupt" not in line and "weights_only=False" not in line


# -- 4. one command per run directory -----------------------------------------------------------
def test_a_second_command_on_a_locked_run_dir_stops_naming_the_holder(finished,
                                                                      gsgd_train_inproc):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from gsgd_cli.train import runlock; "
         f"runlock.lock({str(finished)!r}); print('locked', flush=True); time.sleep(60)"],
        env=env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(finished)
        line = one_line(*gsgd_train_inproc(*SYNTH, "train.iterations=9", "resume=true"))
        assert f"is in use by another gsgd command (pid {holder.pid})" in line, line
        assert snapshot(finished) == before
    finally:
        holder.kill()   # the OS releases the lock of a killed process
        holder.wait()
    code, out, err = gsgd_train_inproc(*SYNTH, "train.iterations=9", "resume=true")
    assert code == 0 and "completed 9 iterations" in out, err


def test_the_lock_is_exclusive_and_released(tmp_path):
    held = runlock.lock(tmp_path / "r")
    probe = [sys.executable, "-c", f"from gsgd_cli.train import runlock; "
             f"runlock.lock({str(tmp_path / 'r')!r})"]
    busy = subprocess.run(probe, env=env(), capture_output=True, text=True)
    assert busy.returncode != 0 and f"pid {os.getpid()}" in busy.stderr
    held.release()
    assert subprocess.run(probe, env=env(), capture_output=True).returncode == 0


# -- 5. an extended run says "running" until it ends --------------------------------------------
def test_a_killed_extension_does_not_keep_the_old_completed_summary(finished):
    code = ("import os, sys; from gsgd_cli.train.trainer import Trainer; "
            "orig = Trainer._record\n"
            "def record(self, w):\n"
            "    os._exit(9)\n"   # killed at the first evaluation of the extension
            "Trainer._record = record\n"
            "from gsgd_cli.__main__ import main\n"
            f"main(['gsgd', 'train', *{SYNTH!r}, 'train.iterations=40', 'train.eval_every=20',"
            f" 'resume=true', 'hydra.run.dir={finished}'])")
    proc = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    summary = json.loads((finished / "summary.json").read_text())
    assert summary["status"] == "running" and summary["iterations"] == 6, summary
    assert "resumed from the checkpoint at iteration 6" in summary["message"]


# -- 6. a checksum over the checkpoint's contents -----------------------------------------------
def _rewrite(ckpt: Path, change) -> None:
    state = torch.load(ckpt, weights_only=True)
    change(state)
    torch.save(state, ckpt)


@pytest.mark.parametrize("change", [
    lambda s: s.update(iteration=4),
    lambda s: next(iter(s["model"].values())).view(-1).__setitem__(0, 0.125),
    lambda s: s.update(perm=s["perm"] + 1),
], ids=["iteration", "weight", "data order"])
def test_changed_checkpoint_contents_are_found(finished, gsgd_train_inproc, change):
    ckpt = finished / "checkpoint.pt"
    assert "content_sha256" in torch.load(ckpt, weights_only=True)
    _rewrite(ckpt, change)
    before = snapshot(finished)
    line = one_line(*gsgd_train_inproc(*SYNTH, "train.iterations=9", "resume=true"))
    assert "does not match its checksum" in line, line
    assert snapshot(finished) == before


def test_an_out_of_range_data_order_without_checksum_is_one_line(finished, gsgd_train_inproc):
    def change(state):
        state.pop("content_sha256")
        state["perm"][0] = 10 ** 6
    _rewrite(finished / "checkpoint.pt", change)
    line = one_line(*gsgd_train_inproc(*SYNTH, "train.iterations=9", "resume=true"))
    assert "data order that is not a permutation" in line, line


# -- 7. resume on other data is refused ---------------------------------------------------------
def test_resume_on_different_data_files_is_refused(gsgd_train_inproc, tmp_path):
    from gsgd_cli.data.idx import read_idx, write_idx

    raw = tmp_path / "data" / "MNIST" / "raw"
    rng = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 64), ("t10k", 32)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte",
                  torch.randint(0, 256, (n, 28, 28), generator=rng, dtype=torch.uint8).numpy())
        write_idx(raw / f"{prefix}-labels-idx1-ubyte",
                  torch.randint(0, 10, (n,), generator=rng, dtype=torch.uint8).numpy())
    args = ["data=mnist", f"data.root={tmp_path / 'data'}", "data.size=7", "optimizer=sgd",
            "train.batch_size=16", "model.width=8"]
    code, out, err = gsgd_train_inproc(*args, "train.iterations=4")
    assert code == 0, err
    labels = raw / "train-labels-idx1-ubyte"
    shuffled = read_idx(labels).flip(0).numpy()
    write_idx(labels, shuffled)
    line = one_line(*gsgd_train_inproc(*args, "train.iterations=8", "resume=true"))
    assert "the data differ from those the run trained on (train-labels-idx1-ubyte" in line, line


# -- 8. the current directory, a foreign folder ---------------------------------------------------
def test_an_empty_run_dir_is_refused_and_touches_nothing(gsgd_train, tmp_path):
    (tmp_path / "tb").mkdir()
    (tmp_path / "summary.json").write_text("mine\n")
    before = snapshot(tmp_path)
    proc = gsgd_train(*SYNTH, "train.iterations=6", "hydra.run.dir=", "overwrite=true")
    line = one_line(proc.returncode, proc.stdout, proc.stderr)
    assert "hydra.run.dir is empty" in line
    assert snapshot(tmp_path) == before and (tmp_path / "tb").is_dir()


@pytest.mark.parametrize("extra", [[], ["overwrite=true"]])
def test_a_folder_with_other_files_is_not_a_run_dir(gsgd_train_inproc, tmp_path, extra):
    run = tmp_path / "run"
    (run / "tb").mkdir(parents=True)
    (run / "notes.txt").write_text("keep\n")
    (run / "summary.json").write_text("{}")
    before = snapshot(run)
    line = one_line(*gsgd_train_inproc(*SYNTH, "train.iterations=6", *extra))
    assert "not a run directory" in line or "already holds a run" in line, line
    assert snapshot(run) == before and (run / "tb").is_dir()


# -- 9. disk trouble ------------------------------------------------------------------------------
def _limited(limit_bytes: int):
    def setup():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return setup


@pytest.mark.parametrize("limit, fails_at", [(2000, ".hydra"), (60000, "checkpoint.pt")])
def test_resume_past_the_file_size_limit_is_one_line_and_keeps_the_run(finished, limit,
                                                                        fails_at):
    before = snapshot(finished)
    proc = subprocess.run([sys.executable, "-m", "gsgd_cli", "train", *SYNTH,
                           "train.iterations=30", "resume=true", f"hydra.run.dir={finished}"],
                          env=env(), capture_output=True, text=True, timeout=120,
                          preexec_fn=_limited(limit), cwd=finished.parent)
    line = one_line(proc.returncode, proc.stdout, proc.stderr)
    assert f"could not write {finished / fails_at}" in line and "file-size limit" in line, line
    assert json.loads((finished / "summary.json").read_text())["status"] == "completed"
    assert not list(finished.glob(".*.tmp"))
    after = snapshot(finished)   # every file's contents as before (TensorBoard's aside)
    assert {k: v[0] for k, v in after.items() if not k.startswith("tb")} == {
        k: v[0] for k, v in before.items() if not k.startswith("tb")}


def test_a_new_run_past_the_file_size_limit_does_not_block_the_next_command(gsgd_train,
                                                                            tmp_path):
    args = [sys.executable, "-m", "gsgd_cli", "train", *SYNTH, "train.iterations=6",
            f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=120,
                          preexec_fn=_limited(20000), cwd=tmp_path)
    assert "file-size limit" in one_line(proc.returncode, proc.stdout, proc.stderr)
    assert not list((tmp_path / "run").glob(".*.tmp"))
    proc = gsgd_train(*SYNTH, "train.iterations=6", "overwrite=true")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("setup, needle", [
    (lambda run: run.write_text("a file"), "is not a directory"),
    (lambda run: (run.mkdir(), (run / "summary.json").mkdir()), "summary.json is a directory"),
    (lambda run: (run.mkdir(), (run / "metrics.jsonl").mkdir()), "metrics.jsonl is a directory"),
    (lambda run: (run.mkdir(), os.mkfifo(run / "summary.json")), "summary.json is a FIFO"),
    (lambda run: (run.mkdir(), (run / "summary.json").symlink_to("/dev/zero")),
     "holds symbolic links (summary.json)"),
    (lambda run: (run.mkdir(), (run / "metrics.jsonl").symlink_to("/dev/null")),
     "holds symbolic links (metrics.jsonl)"),
])
def test_bad_run_dirs_are_one_line(gsgd_train, tmp_path, setup, needle):
    run = tmp_path / "run"
    setup(run)
    proc = gsgd_train(*SYNTH, "train.iterations=6", "resume=true", timeout=60)
    line = one_line(proc.returncode, proc.stdout, proc.stderr)
    assert needle in line, line


def test_a_read_only_parent_and_a_too_long_path_are_one_line(gsgd_train, tmp_path):
    long_dir = tmp_path / ("x" * 300)
    proc = gsgd_train(*SYNTH, "train.iterations=6", f"hydra.run.dir={long_dir}")
    assert "the path is too long for the file system" in one_line(
        proc.returncode, proc.stdout, proc.stderr)
    if os.geteuid() == 0:
        return   # root writes into read-only folders
    parent = tmp_path / "ro"
    parent.mkdir(mode=0o555)
    proc = gsgd_train(*SYNTH, "train.iterations=6", f"hydra.run.dir={parent / 'run'}")
    assert "is not writable" in one_line(
        proc.returncode, proc.stdout, proc.stderr)


# -- 10. readers survive hostile files ------------------------------------------------------------
def _make_run(path: Path, summary=None, metrics=None, config_text=None):
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(config_text or json.dumps(
        {"data": {"name": "synthetic"}, "model": {"name": "mlp"},
         "optimizer": {"_target_": "gsgd_cli.optim.sgd.make", "lr": 0.1}, "seed": 0}))
    (path / "summary.json").write_text(summary if isinstance(summary, str) else json.dumps(
        summary or {"status": "completed", "final_test_acc": 0.9, "best_test_acc": 0.9,
                    "final_train_loss": 0.1, "seed": 0, "config": {"optimizer": "sgd"}}))
    rows = metrics if metrics is not None else [
        {"iteration": 10, "epoch": 1.0, "train_loss": 0.1, "test_acc": 0.9}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


GOOD = {"status": "completed", "final_test_acc": 0.9, "best_test_acc": 0.9,
        "final_train_loss": 0.1, "seed": 0}


@pytest.mark.parametrize("bad, reason", [
    ({"summary": {**GOOD, "final_test_acc": "0.9"}}, "final_test_acc is str"),
    ({"summary": {**GOOD, "final_test_acc": [0.9]}}, "final_test_acc is list"),
    ({"summary": {**GOOD, "final_test_acc": 10 ** 400}}, "too large"),
    ({"summary": {**GOOD, "config": "sgd"}}, "config is not a mapping"),
    ({"summary": "[" * 100000 + "]" * 100000}, "nests deeper"),
    ({"summary": json.dumps({**GOOD, "x": json.loads("[" * 50 + "]" * 50)})}, "nests deeper"),
    ({"metrics": [{"iteration": 10, "epoch": 1.0, "train_loss": 0.1}]}, "has no test_acc"),
    ({"config_text": "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a]\n"
                     "c: [*b, *b, *b, *b, *b, *b, *b]\n"}, "YAML alias"),
    ({"config_text": "a: " + "[" * 5000 + "]" * 5000 + "\n"}, "nests deeper"),
])
def test_a_hostile_run_is_skipped_with_its_reason(tmp_path, capsys, bad, reason):
    from gsgd_cli.cli.report import main

    _make_run(tmp_path / "good")
    _make_run(tmp_path / "bad", **bad)
    start = time.monotonic()
    assert main([str(tmp_path), "--csv", "-"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert time.monotonic() - start < 30
    left_out = [line for line in out.splitlines() if line.startswith("- ")]
    assert len(left_out) == 1 and "bad" in left_out[0] and reason in left_out[0], out


def test_dollars_in_values_do_not_stop_the_figures(tmp_path, capsys):
    from gsgd_cli.cli.figures import main

    for i, value in enumerate(["a$b$c$", "$x"]):
        _make_run(tmp_path / str(i), config_text=json.dumps(
            {"data": {"name": "synthetic"}, "model": {"name": "mlp", "tag": value},
             "optimizer": {"_target_": "gsgd_cli.optim.sgd.make", "lr": 0.1}, "seed": 0}))
    assert main([str(tmp_path), "--out", str(tmp_path / "figs"), "--only", "curves"]) == 0, \
        capsys.readouterr().err
    assert (tmp_path / "figs" / "fig3_curves.png").is_file()


def test_gsgd_train_survives_a_deeply_nested_summary(gsgd_train_inproc, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("[" * 100000 + "]" * 100000)
    line = one_line(*gsgd_train_inproc(*SYNTH, "train.iterations=6"))
    assert "already holds a run" in line, line


# -- 11. special files and bombs in the data folder ---------------------------------------------
def test_a_gzip_bomb_in_the_data_folder_is_refused_without_inflating_it(tmp_path):
    import gzip
    import struct

    from gsgd_cli.data.idx import read_idx

    bomb = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(bomb, "wb") as f:   # a header for 2 images, then 64 MiB of zeros
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 28, 28))
        for _ in range(64):
            f.write(bytes(1 << 20))
    with pytest.raises(ValueError, match="decompresses to more bytes than its header"):
        read_idx(bomb)
    huge = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(huge, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 10 ** 7, 280, 280))
    with pytest.raises(ValueError, match="announces"):
        read_idx(huge)


def test_a_fifo_in_the_data_folder_does_not_hang(tmp_path):
    from gsgd_cli.data.idx import read_idx

    fifo = tmp_path / "train-images-idx3-ubyte"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="is a FIFO"):
        read_idx(fifo)


# -- 12, 13. empty splits and small values ----------------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (["data.noise=nan"], "Invalid data.noise=nan"),
    (["data.noise=inf"], "Invalid data.noise=inf"),
    (["train.tensorboard=maybe"], "Invalid train.tensorboard='maybe'"),
    (["seed=100000000000000000000000"], "Invalid seed=100000000000000000000000"),
    (["data.shape=[1,100000,100000]"], "GiB"),
    (["model.width=100000000000"], "model: cannot build it"),
])
def test_small_bad_values_are_one_line(gsgd_train_inproc, args, needle):
    line = one_line(*gsgd_train_inproc(*SYNTH, "train.iterations=2", *args))
    assert needle in line, line


@pytest.mark.parametrize("batches, split", [(["test_batch"], "test"),
                                            ([f"data_batch_{i}" for i in range(1, 6)], "training")])
def test_an_empty_split_is_one_line_before_training(tmp_path, batches, split):
    from gsgd_cli.data import load_data
    from gsgd_cli.testing.fake_data import write_fake_cifar
    from gsgd_cli.train import UserError

    import numpy as np
    import pickle

    folder = write_fake_cifar(tmp_path / "data", "cifar10", n_per_batch=4, n_test=4)
    for name in batches:   # protocol 2, as CIFAR's own files: an empty array pickles `bytes()`
        with open(folder / name, "wb") as f:
            pickle.dump({"data": np.zeros((0, 3072), np.uint8), "labels": []}, f, protocol=2)
    with pytest.raises(UserError, match=f"the {split} split of data.name=cifar10 holds no"):
        load_data({"name": "cifar10", "root": str(tmp_path / "data")})


@pytest.mark.parametrize("labels, shown", [([3.7] * 4, "3.7"), (["3"] * 4, "'3'"),
                                           ([True] * 4, "True")])
def test_cifar_labels_are_not_coerced(tmp_path, labels, shown):
    import numpy as np
    import pickle

    from gsgd_cli.data import load_data
    from gsgd_cli.testing.fake_data import write_fake_cifar
    from gsgd_cli.train import UserError

    folder = write_fake_cifar(tmp_path / "data", "cifar10", n_per_batch=4, n_test=4)
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({"data": np.zeros((4, 3072), np.uint8), "labels": labels}, f)
    with pytest.raises(UserError, match=f"is not a list of integers \\(found {shown}"):
        load_data({"name": "cifar10", "root": str(tmp_path / "data")})
