"""Optuna studies over aggregator heads."""
