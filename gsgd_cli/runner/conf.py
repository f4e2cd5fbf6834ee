"""Where the Hydra configuration tree lives (`conf/` at the project root), for every command."""
from __future__ import annotations

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
