"""Helpers the tests share: generated data, child processes of vlmflow, readers of topics. Not tests themselves."""
