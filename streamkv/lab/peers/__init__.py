"""Quantizers: how normal (non-sink, non-outlier) keys and values are stored. One module each."""
