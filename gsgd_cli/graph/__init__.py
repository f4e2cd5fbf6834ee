"""The traced ReLU network as both optimizers read it: `ops` is the one table of what each
module, function and method is to a ReLU network."""
