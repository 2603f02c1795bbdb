"""Subcommands of `vlmflow`, one module per area; each has `register(subcommands)`."""
