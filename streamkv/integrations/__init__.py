"""Adapters that put streamkv's storage codecs inside serving stacks (optional; each needs its stack)."""
