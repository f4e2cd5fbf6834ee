"""`gsgd` console script: takes the subcommand off argv and hands the rest over.

`gsgd train ...` and `gsgd inspect ...` are Hydra applications: the dispatcher rewrites
`sys.argv` to `[argv0, *rest]` before calling them, so overrides, `-m` multirun, `--cfg job`
and shell completion keep working (for completion it also drops the subcommand word from
`COMP_LINE`).
"""
from __future__ import annotations

import importlib
import os
import sys

# OpenMP threads that wait for work sleep instead of spinning. libgomp reads this once, when
# torch is first imported, so it is set here, before any command imports torch (a user's own
# value wins). With spinning, a second process on the same cores (another job of a joblib
# sweep, another user) slows every step of both; measured on 2 shared cores, a loop of short
# parallel ops with pauses: 89% of a core burnt and 1.49 s wall unset, 41% and 0.36 s with
# PASSIVE (README, "Threads").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# subcommand -> (module, one-line help)
COMMANDS = {
    "train": ("gsgd_cli.cli.train", "train a model (Hydra app: overrides, -m multirun, --cfg job)"),
    "inspect": ("gsgd_cli.cli.inspect", "print a model's G-space chain blocks and m, H, m-H, H/m"),
    "report": ("gsgd_cli.cli.report", "summarise run directories as a markdown/CSV table"),
    "figures": ("gsgd_cli.cli.figures", "draw the paper's figures from run directories"),
    "eval": ("gsgd_cli.cli.eval", "test metrics of a run's last or best checkpoint, no training"),
}


def version() -> str:
    """`gsgd --version`: the installed package's version (and the checkout's commit)."""
    from gsgd_cli import __version__
    from gsgd_cli.runner.hints import git_commit

    commit = git_commit()
    return f"gsgd {__version__}" + (f" (git {commit})" if commit else "")


def _usage() -> str:
    lines = ["usage: gsgd COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `gsgd COMMAND --help` for the options of one command; `gsgd --version`."]
    return "\n".join(lines)


def _strip_subcommand_from_comp_line(command: str) -> None:
    comp_line = os.environ.get("COMP_LINE")
    if comp_line is None:
        return
    words = comp_line.split(" ")
    if command in words[1:2]:
        del words[1]
        os.environ["COMP_LINE"] = " ".join(words)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[1] in ("-V", "--version"):
        print(version())
        return 0
    command, rest = argv[1], argv[2:]
    if command.startswith(("-sc", "--shell-completion")):
        # Hydra's installed completion script calls `gsgd -sc query=bash` with no subcommand
        command, rest = "train", argv[1:]
    if command not in COMMANDS:
        print(f"gsgd: unknown command '{command}'. Choose one of: {', '.join(COMMANDS)} "
              "(see `gsgd --help`).", file=sys.stderr)
        return 2
    _strip_subcommand_from_comp_line(command)
    module = importlib.import_module(COMMANDS[command][0])
    sys.argv = [argv[0], *rest]
    if command == "train":
        from gsgd_cli.runner.hints import check_train_overrides

        problem = check_train_overrides(rest)
        if problem is not None:
            print(f"gsgd train: error: {problem}", file=sys.stderr)
            return 2
    try:
        result = module.main()
    except BrokenPipeError:          # e.g. `gsgd inspect ... | head`
        sys.stderr.close()
        return 0
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
