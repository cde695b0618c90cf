"""Evaluation: traces -> per-unit signals, metrics and summaries. NumPy, pandas and scikit-learn only."""
