"""The README's Python example runs as written (with a small `loader` supplied)."""
from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "no python example in the README"
    example = blocks[0]
    assert "GSGD(model" in example
    torch.manual_seed(0)
    loader = [(torch.randn(8, 1, 7, 7), torch.randint(0, 10, (8,))) for _ in range(3)]
    namespace = {"loader": loader}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["opt"].blocks, "the example's model should have a chain block"
