"""vlmflow's command line, settings loading and local stack launcher."""

__version__ = "0.1.0"
