"""`data.grayscale=true`: colour images as one grey channel (the paper's Figure 5, appendix
11.7: "input images of gray scale"), checked pixel by pixel against exact arithmetic."""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from gsgd_cli.data import gray
from gsgd_cli.testing.fake_data import write_fake_cifar
from gsgd_cli.data.pipeline import describe, load_data
from gsgd_cli.train import UserError

WEIGHTS = (Fraction(299, 1000), Fraction(587, 1000), Fraction(114, 1000))


def reference_gray(x: torch.Tensor) -> torch.Tensor:
    """Pixel by pixel in exact rational arithmetic, halves rounded up."""
    out = torch.empty((x.shape[0], 1, *x.shape[2:]), dtype=torch.uint8)
    for n in range(x.shape[0]):
        for i in range(x.shape[2]):
            for j in range(x.shape[3]):
                luma = sum(w * int(x[n, c, i, j]) for c, w in enumerate(WEIGHTS))
                out[n, 0, i, j] = int(luma + Fraction(1, 2))     # floor(luma + 1/2)
    return out


def test_to_gray_is_the_bt601_luma_rounded(monkeypatch):
    monkeypatch.setattr(gray, "CHUNK", 3)           # several chunks, the last one partial
    x = torch.randint(0, 256, (7, 3, 5, 4), generator=torch.Generator().manual_seed(0),
                      dtype=torch.uint8)
    x[0, :, 0, 0] = 255                             # white stays 255
    x[0, :, 0, 1] = 0                               # black stays 0
    x[0, :, 0, 2] = torch.tensor([0, 0, 5])         # 0.57 -> 1
    x[0, :, 0, 3] = torch.tensor([5, 0, 0])         # 1.495 -> 1
    got = gray.to_gray(x)
    assert got.dtype == torch.uint8 and got.shape == (7, 1, 5, 4)
    assert torch.equal(got, reference_gray(x))
    assert got[0, 0, 0].tolist() == [255, 0, 1, 1]
    one = x[:, :1]
    assert gray.to_gray(one) is one                 # already grey: unchanged


def test_pixel_stats_are_the_mean_and_std_on_the_unit_scale():
    x = torch.randint(0, 256, (6, 1, 9, 9), generator=torch.Generator().manual_seed(1),
                      dtype=torch.uint8)
    (mean,), (std,) = gray.pixel_stats(x)
    values = x.to(torch.float64) / 255
    assert mean == pytest.approx(float(values.mean()), abs=1e-12)
    assert std == pytest.approx(float(values.std()), abs=1e-12)


@pytest.mark.parametrize("normalize", ["unit", "standard"])
def test_cifar_in_gray_scale_is_one_channel_end_to_end(tmp_path, normalize):
    write_fake_cifar(tmp_path, "cifar10", n_per_batch=8, n_test=16)
    colour_cfg = {"name": "cifar10", "root": str(tmp_path), "normalize": normalize,
                  "augment": False, "val_size": 4}
    gray_cfg = {**colour_cfg, "grayscale": True}
    assert describe(colour_cfg) == ((3, 32, 32), 10)
    assert describe(gray_cfg) == ((1, 32, 32), 10)  # the MLP gets 1024 inputs, not 3072
    colour, grey = load_data(colour_cfg), load_data(gray_cfg)
    assert grey.in_shape == (1, 32, 32)
    for split in ("train_x", "val_x", "test_x"):    # the same images, the same hold-out
        assert torch.equal(getattr(grey, split), gray.to_gray(getattr(colour, split)))
    assert torch.equal(grey.train_y, colour.train_y) and torch.equal(grey.val_y, colour.val_y)
    inputs = grey.inputs(grey.test_x[:5], train=False)
    assert inputs.shape == (5, 1, 32, 32)
    pixels = grey.test_x[:5].float() / 255
    if normalize == "unit":
        assert torch.equal(inputs, pixels)
    else:   # the grey training images' own mean and std (all 40 of them, before the hold-out)
        (mean,), (std,) = gray.pixel_stats(gray.to_gray(torch.cat([colour.train_x,
                                                                   colour.val_x])))
        assert torch.allclose(inputs, (pixels - mean) / std, atol=1e-6)


def test_gray_scale_leaves_one_channel_data_alone():
    cfg = {"name": "synthetic", "shape": [1, 8, 8], "num_classes": 4, "train_size": 16,
           "test_size": 8, "normalize": "unit"}
    plain, grey = load_data(cfg), load_data({**cfg, "grayscale": True})
    assert grey.in_shape == plain.in_shape == (1, 8, 8)
    assert torch.equal(grey.train_x, plain.train_x)


@pytest.mark.parametrize("value", ["yes", 1, "true"])
def test_a_wrong_value_is_one_clear_error(value):
    with pytest.raises(UserError, match=r"^Invalid data.grayscale=.*Must be true .* or false\.$"):
        describe({"name": "cifar10", "grayscale": value})
