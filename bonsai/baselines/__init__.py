"""Baselines users compare Bonsai against, as methods of `bonsai prune`: Wanda, LLM-Pruner, BESA."""
