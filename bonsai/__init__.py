"""bonsai: structured pruning of large language models with forward passes only."""

__version__ = "0.1.0"
