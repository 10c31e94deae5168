"""What ``STREAMKV_VLLM`` and ``STREAMKV_VLLM_EDGE_LAYERS`` ask for, checked before vLLM builds anything.

Parsing needs neither vLLM nor torch, so the entry point rejects a bad value with one line before the
engine's config, model or weights exist. The value is a preset, optionally followed by the engine's own
option names (``STREAMKV_VLLM=k4v4,quantizer.pre_rope=false``): a vLLM page slot is one fixed-size
entry per token, so the engine settings that need more than that (sinks, sparse outliers, 128-token
per-channel key groups, keys stored before RoPE) are refused by name, saying why, rather than ignored.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

ENV = "STREAMKV_VLLM"
EDGE_ENV = "STREAMKV_VLLM_EDGE_LAYERS"
PRESETS = ("k8v8", "k8v4", "k4v4", "k4v2", "k2v2")  # all with the Hadamard rotation
BITS = (2, 3, 4, 8)
_PATTERN = re.compile(r"k([0-9]+)v([0-9]+)")

# engine options that describe what the slot already does: accepted, change nothing
NO_OPS = {"sink": "none", "sink.size": "0", "outlier": "none", "quantizer.key_axis": "token",
          "quantizer.value_axis": "token", "quantizer.pre_rope": "false", "quantizer.rotate_keys": "true",
          "quantizer.rotate_values": "true"}
# engine options the slot cannot hold, and why (the value that asks for them is any other one)
REFUSED = {
    "sink": "attention sinks need a second, 8-bit copy of a sequence's first tokens; a vLLM page slot "
            "holds each token once at one width (STREAMKV_VLLM_EDGE_LAYERS keeps whole layers at bf16 instead)",
    "outlier": "sparse outliers need variable-size per-block storage; a vLLM page slot has a fixed size",
    "quantizer.key_axis": "per-channel key groups span 128 tokens; vLLM writes each token into its slot "
                          "alone, so keys are grouped per token (after the Hadamard rotation)",
    "quantizer.value_axis": "values are grouped per token; a slot holds one token",
    "quantizer.pre_rope": "vLLM applies RoPE before the attention backend sees the keys, so they are "
                          "stored post-RoPE",
    "quantizer.rotate_keys": "the slot format always rotates keys (the read path relies on it)",
    "quantizer.rotate_values": "the slot format always rotates values (the read path relies on it)",
}
REFUSED["sink.size"] = REFUSED["sink"]


class PresetError(ValueError):
    """A bad ``STREAMKV_VLLM*`` value; the message names it and what is allowed."""


@dataclass(frozen=True)
class Preset:
    name: str
    key_bits: int
    value_bits: int
    edge_layers: int = 0  # first and last N layers kept at the model's dtype


def _check_option(item: str) -> None:
    key, eq, value = (s.strip().lower() for s in item.partition("="))
    if key not in NO_OPS or not eq:
        raise PresetError(f"{ENV}: option {item.strip()!r} is not allowed; the vLLM backend takes "
                          f"<preset>[,option=value] with options {sorted(NO_OPS)}")
    if value != NO_OPS[key] and not (key == "sink.size" and value.isdigit() and int(value) == 0):
        raise PresetError(f"{ENV}: {key}={value} is not supported by the vLLM backend: {REFUSED[key]}")


def parse(spec: str, edge: str | None = None) -> Preset:
    """``spec`` = ``k<bits>v<bits>`` (bits in 2/3/4/8) then optional engine options; ``edge`` edge layers."""
    name, *options = spec.split(",")
    m = _PATTERN.fullmatch(name.strip().lower())
    if not m or int(m[1]) not in BITS or int(m[2]) not in BITS:
        raise PresetError(
            f"{ENV}={spec!r} is not allowed; choose one of {list(PRESETS)} "
            f"(or k<b>v<b> with b in {list(BITS)})"
        )
    for item in options:
        _check_option(item)
    n = 0
    if edge not in (None, ""):
        if not edge.strip().isdigit():
            raise PresetError(f"{EDGE_ENV}={edge!r} is not allowed; give a whole number of layers >= 0")
        n = int(edge)
    return Preset(f"k{m[1]}v{m[2]}", int(m[1]), int(m[2]), n)


def from_env() -> Preset | None:
    """The preset the environment asks for, or None when ``STREAMKV_VLLM`` is unset or empty."""
    name = os.environ.get(ENV, "")
    if not name.strip():
        return None
    return parse(name, os.environ.get(EDGE_ENV))
