"""gsgd: G-SGD and Path-SGD for PyTorch, and a runner that reproduces Meng et al. (ICLR 2019)."""

__version__ = "0.1.0"
