"""The paper's numbers (Meng et al., ICLR 2019) that our runs are compared with.

Sources: Table 1 (test error %, mean and std over 5 runs, 64k iterations), Table 5 (the MLPs
[49:h:h:10] of section 5.2: number of weights m and hidden nodes H), appendix 11.5 (best test
accuracy of ResNet-34 with SGD+weight decay and G-SGD+basis-path regularisation).
"""
from __future__ import annotations

from typing import Any

# (data, model, optimizer) -> (mean, std) test error in %
TABLE1 = {
    ("cifar10", "plain34", "sgd"): (7.76, 0.17),
    ("cifar10", "plain34", "gsgd"): (7.00, 0.10),
    ("cifar10", "resnet34", "sgd"): (7.13, 0.22),
    ("cifar10", "resnet34", "gsgd"): (6.66, 0.13),
    ("cifar100", "plain34", "sgd"): (36.41, 0.54),
    ("cifar100", "plain34", "gsgd"): (30.74, 0.29),
    ("cifar100", "resnet34", "sgd"): (28.60, 0.26),
    ("cifar100", "resnet34", "gsgd"): (27.74, 0.06),
}

# h -> (m, H) of the MLP [49:h:h:10] without biases
TABLE5 = {8: (536, 16), 16: (1200, 32), 32: (2912, 64), 64: (7872, 128), 128: (23936, 256),
          256: (80640, 512), 512: (292352, 1024), 1024: (1108992, 2048)}

# (data, optimizer) -> best test accuracy % of ResNet-34 with the regulariser (appendix 11.5)
APPENDIX_11_5 = {
    ("cifar10", "sgd"): 94.29, ("cifar10", "gsgd"): 94.67,
    ("cifar100", "sgd"): 74.39, ("cifar100", "gsgd"): 75.20,
}

PLAIN34 = ("plain", [6, 8, 12, 6], [64, 128, 256, 512])
RESNET34 = ("resnet", [3, 4, 6, 3], [64, 128, 256, 512])


def model_label(config: dict[str, Any], choice: str) -> str:
    """`plain34`/`resnet34` when the config is exactly the paper's network, else the choice."""
    name = config.get("model.name")
    shape = (name, config.get("model.blocks"), config.get("model.widths"))
    if shape == PLAIN34:
        return "plain34"
    if shape == RESNET34:
        return "resnet34"
    return choice


def paper_reference(data: str, model: str, optimizer: str,
                    config: dict[str, Any]) -> tuple[str, float | None]:
    """(text shown beside our numbers, the comparable test error % or None)."""
    wd = float(config.get("optimizer.weight_decay") or 0.0)
    bpr = float(config.get("optimizer.bpr") or 0.0)
    if model in ("plain34", "resnet34") and data in ("cifar10", "cifar100"):
        if wd == 0.0 and bpr == 0.0 and (data, model, optimizer) in TABLE1:
            mean, std = TABLE1[(data, model, optimizer)]
            return f"Table 1: {mean:.2f} ± {std:.2f}", mean
        regularised = (optimizer == "sgd" and wd > 0) or (optimizer == "gsgd" and bpr > 0)
        if model == "resnet34" and regularised and (data, optimizer) in APPENDIX_11_5:
            err = round(100.0 - APPENDIX_11_5[(data, optimizer)], 2)
            return f"App. 11.5 (best λ): {err:.2f}", err
    return "", None


def invariant_ratio(model: str, config: dict[str, Any],
                    num_parameters: Any) -> tuple[int, int, float] | None:
    """(m, H, H/m) of an MLP without biases: m weights (the run's parameter count), H hidden
    units (width x depth); None for other models. The paper's Table 5 lists m and H of the
    MLPs [49:h:h:10] (`TABLE5`); its printed "ratio" is h/m, half of H/m."""
    if model != "mlp" or config.get("model.bias") or not isinstance(num_parameters, int):
        return None
    width, depth = config.get("model.width"), config.get("model.depth")
    if not isinstance(width, int) or not isinstance(depth, int) or num_parameters <= 0:
        return None
    hidden = width * depth
    return num_parameters, hidden, hidden / num_parameters
