"""Aggregator heads, bag batching, the trainer, metrics and prediction."""
