"""Datasets, the multi-task guidance model, training and evaluation (needs the [train] extra)."""
