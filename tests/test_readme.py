"""Every code block of the README runs as a test.

* ```python blocks run as written, each in a fresh namespace (nothing supplied from outside);
* ```bash blocks: every command is taken apart (continuation lines joined, comments dropped).
  `gsgd train` commands (also behind torchrun and srun) are composed with the real conf/ and
  pass the runner's own override checks, so a renamed key or preset fails here; training them
  would take hours. `gsgd inspect` runs (a placeholder model name such as mypackage.* is only
  parsed), `gsgd report` runs on the committed run data, `gsgd figures`/`report` with a RUN_DIR
  placeholder have their arguments parsed. Commands that install, download or serve (make,
  data.fetch, tensorboard) are named in NOT_RUN and only checked to be those.
* unlabelled blocks are printed output, not code.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
NOT_RUN = {"make": "creates .venv and installs", "tensorboard": "serves a web page",
           "python -m gsgd_cli.data.fetch": "downloads data sets"}
PLACEHOLDERS = ("RUN_DIR", "DIR", "mypackage.", "my_pkg.")


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def commands() -> list[str]:
    out = []
    for block in blocks("bash"):
        text = re.sub(r"\\\n", " ", block)
        for line in text.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if line:
                out.append(line)
    return out


def gsgd_args(command: str) -> tuple[str, list[str]] | None:
    """(subcommand, args) of a gsgd command, also behind torchrun / srun; else None."""
    words = shlex.split(command)
    for k, word in enumerate(words):
        if word == "gsgd" or (word == "gsgd_cli" and words[k - 1] == "-m"):
            return words[k + 1], words[k + 2:]
    return None


def first_job(overrides: list[str]) -> list[str]:
    """A sweep's overrides (`seed=0,1,2`) as those of its first job (`seed=0`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for text, parsed in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        if parsed.is_sweep_override():
            text = f"{text.split('=', 1)[0]}={next(iter(parsed.sweep_string_iterator()))}"
        out.append(text)
    return out


def test_python_blocks_run_as_written():
    found = blocks("python")
    assert found, "no python example in the README"
    for block in found:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})


def test_the_python_example_trains_the_papers_mlp_without_biases():
    namespace: dict = {"__name__": "readme"}
    exec(compile(blocks("python")[0], "README.md", "exec"), namespace)
    assert namespace["opt"].blocks, "the example's model should have a chain block"
    assert all(p.dim() == 2 for p in namespace["model"].parameters()), "biases in the MLP"


COMMANDS = commands()


@pytest.mark.parametrize("command", COMMANDS)
def test_bash_command(command, compose_train, tmp_path, capsys):
    parsed = gsgd_args(command)
    if parsed is None:
        assert any(command.startswith(prefix) for prefix in NOT_RUN), \
            f"README command neither checked here nor listed in NOT_RUN: {command}"
        return
    sub, args = parsed
    if sub == "train":
        from hydra import compose, initialize_config_dir

        from gsgd_cli.runner.hints import check_train_overrides

        overrides = [a for a in args if a != "-m"]
        assert check_train_overrides(overrides) is None
        overrides = first_job(overrides)
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            compose(config_name="train", overrides=overrides, return_hydra_config=True)
    elif sub == "inspect":
        from gsgd_cli.cli import inspect

        if any(p in a for a in args for p in PLACEHOLDERS):
            assert "--model" in args
            return
        assert inspect.main(args) == 0, capsys.readouterr().err
    elif sub in ("report", "figures"):
        from gsgd_cli.cli import figures, report

        module = report if sub == "report" else figures
        names = {"RUN_DIR...": str(tmp_path), "RUN_DIR": str(tmp_path), "DIR": str(tmp_path / "out"),
                 "PATH": str(tmp_path / "x.csv")}
        placeholder = any(a in names for a in args)
        args = [names.get(a, a) for a in args if "[" not in a and "]" not in a]
        if placeholder or sub == "figures":   # the arguments as documented are accepted
            module.parse_args(args)
            return
        args = [str(REPO / a) if (REPO / a).exists() else a for a in args]
        if "--csv" in args:
            args[args.index("--csv") + 1] = str(tmp_path / "report.csv")
        assert module.main(args) == 0, capsys.readouterr().err
    else:
        pytest.fail(f"unknown gsgd command in the README: {command}")


def test_every_kind_of_command_is_checked():
    subs = {parsed[0] for parsed in map(gsgd_args, COMMANDS) if parsed}
    assert {"train", "inspect", "report", "figures"} <= subs
