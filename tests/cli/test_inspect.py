"""`gsgd inspect`: chain blocks and m, H, m-H, H/m; the paper's Table 5."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

# Paper, Table 5 (appendix 11.6): h -> (#weights, H)
PAPER = {8: (536, 16), 16: (1200, 32), 32: (2912, 64), 64: (7872, 128), 128: (23936, 256),
         256: (80640, 512), 512: (292352, 1024), 1024: (1108992, 2048)}


def gsgd(*args):
    return subprocess.run([sys.executable, "-m", "gsgd_cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_inspect_mlp_prints_blocks_and_counts():
    result = gsgd("inspect", "model=mlp", "model.width=8", "model.depth=2", "data=fashion_mnist",
                  "data.size=7")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "chain block 1: 1 -> 3 -> 5" in out
    assert "widths [49:8:8:10], pivot layer '1'" in out
    assert "m = 536, H = 16, m - H = 520, H/m = 2.985e-02" in out
    assert "h/m = 1.493e-02" in out and "prints h/m" in out


def test_inspect_counts_biases():
    out = gsgd("inspect", "model.width=5", "model.depth=1", "model.bias=true").stdout
    assert "m = 310, H = 5, m - H = 305" in out          # 49*5 + 5 + 5*10 + 10


def test_table5_matches_the_paper_exactly():
    result = gsgd("inspect", "--table5")
    assert result.returncode == 0, result.stderr
    rows = re.findall(r"^\| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| ([\d.e+-]+) \|",
                      result.stdout, flags=re.M)
    assert len(rows) == 8
    for h, m, paper_m, hidden, paper_h, dim, ratio in rows:
        assert (int(m), int(hidden)) == PAPER[int(h)] == (int(paper_m), int(paper_h))
        assert int(dim) == int(m) - int(hidden)
        assert float(ratio) == pytest.approx(int(hidden) / int(m), rel=1e-3)
    assert "prints h/m" in result.stdout


@pytest.mark.parametrize("override,message", [
    ("model=nope", "Could not find 'model/nope'; Available options in 'model': custom; mlp"),
    ("model.width=-3", "Invalid MLP width=-3. Must be a positive integer."),
])
def test_inspect_bad_config_gives_one_line(override, message):
    result = gsgd("inspect", override)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_describe_structure_flags_a_width_valley_and_lists_outside_layers():
    from torch import nn

    from gsgd_cli.cli.inspect import describe_structure

    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 6),
                          nn.ReLU(), nn.Linear(6, 2), nn.LayerNorm(2))
    text = describe_structure(model)
    assert "chain block 1: 0 -> 2\n  widths [3:5:3]" in text
    assert "chain block 2: 4 -> 6\n  widths [3:6:2]" in text
    assert ("note: chain block 0 -> 2 -> 4 -> 6: the output of '2' (hidden layer 2, width 3) is "
            "narrower than hidden layers on both sides (widths [3:5:3:6:2]), a width valley: "
            "split there") in text
    assert "outside: 7.weight (2,): LayerNorm's own parameter" in text
    with pytest.raises(ValueError, match="valleys='split' splits the block there instead"):
        describe_structure(model, valleys="refuse")


def test_inspect_any_importable_model_with_its_coverage(tmp_path):
    result = gsgd("inspect", "--model", "torchvision.models.squeezenet1_0", "--input-shape",
                  "3,64,64", "--num-classes", "10")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("model: torchvision.models.squeezenet1_0 (SqueezeNet), input (3, 64, 64)")
    assert "in chain blocks (2.1%: " in out and ", 0 approximate through batch norm" in out
    assert "outside: features.3.expand1x1.weight (64, 16, 1, 1): chain ends here: it is " \
           "followed by cat" in out
    bad = gsgd("inspect", "--model", "torchvision.models.nothing")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip() == ("gsgd inspect: cannot import --model "
                                  "'torchvision.models.nothing': give a dotted name such as "
                                  "torchvision.models.vgg11 or mypackage.models.Net")


def test_inspect_paper_conv_models():
    plain = gsgd("inspect", "model=plain34", "model.bn=false", "data=cifar10")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.count("chain block ") == 1
    # 7 x 64 + 8 x 128 + 12 x 256 + 6 x 512 hidden channels, stem to classifier in one block
    assert "H = 7616" in plain.stdout and "0 outside (plain SGD step)" in plain.stdout
    resnet = gsgd("inspect", "model=resnet34", "data=cifar100")
    assert resnet.returncode == 0, resnet.stderr
    assert resnet.stdout.count("chain block ") == 16
    assert resnet.stdout.count("APPROXIMATION") == 16
    assert "total over chain blocks:" in resnet.stdout and "H/m = " in resnet.stdout
