"""Prices and the budget: one cost rule for the run, status and the caps."""
