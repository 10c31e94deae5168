"""Thin command-line entry points over the streamkv library (Hydra apps)."""
