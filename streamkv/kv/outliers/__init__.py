"""Outlier detectors: which values leave the dense groups for sparse, higher-precision storage."""
