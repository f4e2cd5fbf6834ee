"""The traced ReLU network as both optimizers read it: `trace` (torch.fx, once), `ops` (the one
table of what each module, function and method is to a ReLU network) and `layers` (the facts
about each linear layer)."""
