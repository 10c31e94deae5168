"""Sink policies: which leading tokens keep a higher precision (attention sinks)."""
