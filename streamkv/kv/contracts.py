"""What the cache asks of its components, declared once.

The engine never discovers a component's abilities with ``getattr`` defaults: a quantizer, a sink
policy and an outlier detector are whatever satisfies these protocols. The lab builds them from
config groups (``streamkv.lab.registry``) and hands them down; a serving stack can build them directly.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class StoredBlock(Protocol):
    """Encoded keys or values of a run of tokens, ``(rows, tokens, dim)`` with rows = batch x KV heads:
    everything a layer and a reader ask of one (:mod:`streamkv.kv.storage` holds the classes).

    A block never changes once made (``append`` makes a new one), so readers may derive data from it
    once and keep it in ``derived``, which goes with the block."""

    @property
    def tokens(self) -> int: ...

    @property
    def dim(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def unit_tokens(self) -> int:
        """Tokens per storage unit: a reader's slice starts and ends on their boundaries."""
        ...

    @property
    def numel(self) -> int: ...

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor held: what every size report sums."""
        ...

    @property
    def layout(self) -> tuple:
        """Blocks of equal layouts concatenate into one; others append as a composite."""
        ...

    @property
    def derived(self) -> dict: ...

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor held (what byte counts sum)."""
        ...

    def append(self, other: Any) -> Any:
        """``self`` followed by ``other`` along tokens."""
        ...

    def slice_tokens(self, start: int, stop: int) -> Any:
        """Tokens ``[start, stop)`` as views (ends on unit boundaries)."""
        ...

    def dequantize(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """``(rows, tokens, dim)`` in ``dtype`` (into ``out`` when given): the dense reference read."""
        ...


@runtime_checkable
class Quantizer(Protocol):
    """How normal (non-sink, non-outlier) tokens are stored.

    ``token_block`` tokens must gather before keys and values are encoded together (a per-channel key
    group spans that many tokens). ``layer`` lets a quantizer choose per-layer widths.
    """

    enabled: bool  # False: the cache stores everything at full precision (the uncompressed baseline)
    pre_rope: bool  # keys are stored before the rotary embedding
    residual_length: int  # most recent tokens kept at full precision (KIVI's window)

    @property
    def token_block(self) -> int: ...

    def check_shapes(self, head_dim: int, chunk_size: int | None) -> None:
        """Raise a one-line ``ConfigError`` if this quantizer cannot serve ``head_dim`` / ``chunk_size``."""
        ...

    def encode_keys(self, x: torch.Tensor, exclude: torch.Tensor | None = None, *, layer: int = 0) -> StoredBlock: ...

    def encode_values(self, x: torch.Tensor, exclude: torch.Tensor | None = None, *, layer: int = 0) -> StoredBlock: ...


@runtime_checkable
class PerSequence(Protocol):
    """A quantizer that keeps state per sequence (e.g. bit widths allocated online from the stream's
    statistics): each cache encodes with a quantizer of its own, ``for_stream(num_layers)``."""

    def for_stream(self, num_layers: int) -> Quantizer: ...


@runtime_checkable
class SinkPolicy(Protocol):
    """The first ``size`` tokens, kept per token at ``key_bits``/``value_bits`` (16 = fp16)."""

    size: int
    key_bits: int
    value_bits: int


@runtime_checkable
class OutlierDetector(Protocol):
    """Which values leave their group for sparse storage at ``key_bits``/``value_bits``."""

    enabled: bool
    keys: bool
    values: bool
    key_bits: int
    value_bits: int

    def new_state(self) -> Any:
        """Per-stream state carried across chunks (e.g. EMA statistics)."""
        ...

    def detect(self, x: torch.Tensor, state: Any) -> torch.Tensor:
        """A bool mask of ``x`` (rows, tokens, dim): the outliers of this block."""
        ...


@runtime_checkable
class BringsOwnCache(Protocol):
    """A quantizer that is a whole cache of its own (transformers' ``QuantizedCache`` peers)."""

    def build_cache(self, model: torch.nn.Module, chunk_size: int | None = None, quantize_own_chunk: bool = False) -> Any: ...
