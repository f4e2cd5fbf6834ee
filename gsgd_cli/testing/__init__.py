"""Brute-force references and test helpers (as `torch.testing`): slow, explicit, float64."""
