"""No attention sinks: the first tokens are compressed like any other."""

from dataclasses import dataclass


@dataclass
class NoSinks:
    size = 0
    key_bits = 16
    value_bits = 16
