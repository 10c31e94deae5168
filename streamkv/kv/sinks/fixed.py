"""A fixed number of leading tokens kept at a higher precision (StreamingLLM's attention sinks)."""

from dataclasses import dataclass

from ..errors import check, one_of
from ..storage.packing import RAW_BITS, WIDTHS

SINK_BITS = (*(b for b in WIDTHS if b >= 2), RAW_BITS)  # packed per token, or fp16


@dataclass
class FixedSinks:
    """The first ``size`` tokens of the sequence, per-token quantized at ``key_bits``/``value_bits``.

    Attention concentrates on them whatever their content, so their error is felt by every later
    query; 16 keeps them as fp16.
    """

    size: int = 4
    key_bits: int = 8
    value_bits: int = 8

    def __post_init__(self) -> None:
        check(self.size >= 0, f"sink.size={self.size} must be >= 0")
        one_of("sink.key_bits", self.key_bits, SINK_BITS)
        one_of("sink.value_bits", self.value_bits, SINK_BITS)
