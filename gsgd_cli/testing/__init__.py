"""Yardsticks for the tests (as `torch.testing`): the brute-force references of both optimizers
(`gsgd_reference`: G-SGD's dense solve of the paper's equations; `path_reference`: Path-SGD's
kappa by enumerating every path) and the small models and helpers the optimizer tests share
(`helpers`). Nothing in the library imports this package."""
