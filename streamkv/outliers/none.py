"""No outlier detection."""

from dataclasses import dataclass

from ..registry import register


@register("outlier", "none")
@dataclass
class NoOutliers:
    enabled = False
    key_bits = 16
    value_bits = 16
