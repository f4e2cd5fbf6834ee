"""Data sets for the runner: device-resident uint8 splits and their preprocessing.

Stable entry points (used by `gsgd train` and `gsgd inspect`):

* `describe(data_cfg) -> (in_shape, num_classes)` without loading any data;
* `load_data(data_cfg, device) -> DeviceData`.
"""
from .datasets import FASHION_SYSTEM_DIR, NAMES, SPECS, load_raw
from .pipeline import DeviceData, describe, load_data, random_crop_flip

__all__ = ["FASHION_SYSTEM_DIR", "NAMES", "SPECS", "DeviceData", "describe", "load_data",
           "load_raw", "random_crop_flip"]
