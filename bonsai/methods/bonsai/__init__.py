"""Bonsai's own method: the sub-model search (probe selection, the paper's selection and its ablations)."""
