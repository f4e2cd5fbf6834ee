"""The runner: a composed Hydra config -> one training job (or a sweep's jobs), its run directory,
its data-parallel session and its records. `gsgd_cli.cli.train` is its command-line entry."""
