"""Helpers for trying the pipeline without the gated weights (random, tiny, meaningless models)."""
