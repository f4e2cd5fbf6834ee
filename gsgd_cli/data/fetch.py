"""`python -m gsgd_cli.data.fetch NAME [--root DIR]`: make a data set available, in one line.

For `fashion_mnist` (the default experiment's data): nothing to do when the Debian package's
files (`/usr/share/datasets/fashion-mnist`) or `<root>/FashionMNIST/raw` are there; otherwise
`apt-get install -y dataset-fashion-mnist` when running as root with apt-get, and otherwise
torchvision's download into `<root>`. Other data sets use torchvision's download.
Prints exactly one line saying what it did; exit code 2 with a one-line reason on failure.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from gsgd_cli.errors import UserError

from .datasets import FASHION_SYSTEM_DIR, _has_idx, load_raw

APT_PACKAGE = "dataset-fashion-mnist"
TORCHVISION_DIRS = {"mnist": "MNIST/raw", "fashion_mnist": "FashionMNIST/raw",
                    "cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def _present(name: str, root: Path, system_dir: Path) -> Path | None:
    if name == "fashion_mnist" and _has_idx(system_dir, ".gz"):
        return system_dir
    folder = root / TORCHVISION_DIRS[name]
    if name in ("mnist", "fashion_mnist"):
        return folder if _has_idx(folder) else None
    try:
        load_raw({"name": name, "root": str(root), "download": False})
    except UserError:
        return None
    return folder


def _apt_usable() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get") is not None


def _apt_install() -> bool:
    for cmd in (["apt-get", "install", "-y", APT_PACKAGE], ["apt-get", "update"],
                ["apt-get", "install", "-y", APT_PACKAGE]):
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if cmd[1] == "install" and done.returncode == 0:
            return True
    return False


def fetch(name: str, root: str | Path = "data", system_dir: str | Path = FASHION_SYSTEM_DIR,
          use_apt: bool | None = None) -> str:
    """Make `name` available; return the one line that says how."""
    if name not in TORCHVISION_DIRS:
        raise UserError(f"Unknown data set {name!r}. Choose one of: {', '.join(TORCHVISION_DIRS)}.")
    root, system_dir = Path(root), Path(system_dir)
    where = _present(name, root, system_dir)
    if where is not None:
        return f"{name}: data already there ({where})"
    if name == "fashion_mnist" and (_apt_usable() if use_apt is None else use_apt):
        if _apt_install() and _has_idx(system_dir, ".gz"):
            return f"{name}: installed the Debian package {APT_PACKAGE} ({system_dir})"
    try:
        load_raw({"name": name, "root": str(root), "download": True, "system_dir": None})
    except UserError as exc:
        raise UserError(f"{name}: torchvision download failed. {exc}") from None
    return f"{name}: downloaded with torchvision into {root / TORCHVISION_DIRS[name]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gsgd_cli.data.fetch", description=__doc__)
    parser.add_argument("name", choices=sorted(TORCHVISION_DIRS))
    parser.add_argument("--root", default=os.environ.get("GSGD_DATA", "data"),
                        help="data root (default: $GSGD_DATA or ./data, as data.root)")
    parser.add_argument("--system-dir", default=FASHION_SYSTEM_DIR,
                        help="where the Debian package puts Fashion-MNIST")
    parser.add_argument("--no-apt", action="store_true", help="never run apt-get")
    args = parser.parse_args(argv)
    try:
        print(fetch(args.name, args.root, args.system_dir, use_apt=False if args.no_apt else None))
    except UserError as exc:
        print(f"fetch: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
