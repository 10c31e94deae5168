"""One place that knows a model: what the cache must know about each layer, read from the config.

:func:`read_facts` works on a config alone (before any weights load) and :func:`facts_of` on a loaded
model; both give :class:`ModelFacts`: the family, and per layer its kind (full attention, sliding
window with its size, linear attention with a recurrent state and no KV, or a layer that reuses
another layer's KV), which rotary embedding its keys carry (none: NoPE), the rotated fraction of the
head, head_dim and KV heads; plus the model's maximum positions and whether its sequences must start
with BOS. Everything else in streamkv asks these facts instead of reading config attributes.

A family the cache does not know, a multi-head-latent-attention model (DeepSeek-V3, Mistral-4: its
cache is a latent, not per-head K/V) or a feature the cache cannot handle fails with a one-line
:class:`~streamkv.kv.errors.ConfigError` naming it.

Layer types come from transformers' own ``get_layer_types_and_kwargs`` (what ``DynamicCache(config=)``
builds from), so the compressed cache lays its layers out exactly as transformers would.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .errors import ConfigError, check

# family -> what it covers (the family is the text decoder's model_type without "_text")
SUPPORTED_FAMILIES: dict[str, str] = {
    "llama": "Llama 2 / 3.x, SmolLM2",
    "mistral": "Mistral",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3 (q/k normalised before RoPE)",
    "qwen3_5": "Qwen3.5 (linear-attention layers with a recurrent state, partial-rotary full attention)",
    "gemma2": "Gemma-2 (alternating sliding / global layers)",
    "gemma3": "Gemma-3 text (sliding / global layers with their own RoPE bases)",
    "gemma4": "Gemma-4 text (sliding / global layers, global head_dim, proportional RoPE, KV sharing)",
    "olmo2": "OLMo-2",
    "olmo3": "OLMo-3 (sliding layers)",
    "phi3": "Phi-3 (fused qkv)",
    "smollm3": "SmolLM3 (NoPE layers)",
}

# families whose checkpoints are trained with BOS at the start of every sequence and break without it
_BOS_REQUIRED = ("gemma2", "gemma3", "gemma4")
# RoPE types whose frequencies depend on the sequence length (the model recomputes them per forward):
# a stored pre-RoPE key cannot be rotated back the way it was rotated
DYNAMIC_ROPE = ("dynamic", "longrope")

FULL, SLIDING, LINEAR, SHARED = "full", "sliding", "linear", "shared"


@dataclass(frozen=True)
class LayerFacts:
    """What the cache must know about one decoder layer."""

    index: int
    layer_type: str  # transformers' name ("full_attention", "sliding_attention", "linear_attention", "dummy")
    kind: str  # FULL | SLIDING | LINEAR (recurrent state, no KV) | SHARED (reuses an earlier layer's KV)
    window: Optional[int] = None  # SLIDING: a query at p sees keys at p - window + 1 .. p
    head_dim: int = 0
    kv_heads: int = 0
    rope: bool = False  # keys carry RoPE (False: NoPE, or no KV at all)
    rope_key: Optional[str] = None  # the layer_type the rotary module takes (per-type RoPE), None if it takes none
    rope_type: Optional[str] = None  # "default", "llama3", "yarn", "linear", "proportional", ...
    rope_theta: Optional[float] = None
    rotary_fraction: float = 1.0  # share of head_dim that is rotated
    rotary_dim: int = 0  # width of the rotary module's cos/sin (the leading dims; proportional RoPE: head_dim)
    cache_kwargs: tuple = ()  # what transformers' cache layer of this type is built with, as (name, value) pairs

    @property
    def has_kv(self) -> bool:
        return self.kind in (FULL, SLIDING)

    @property
    def static_rope(self) -> bool:
        """Whether the rotary table depends only on the position (so pre-RoPE storage can undo it)."""
        return self.rope and self.rope_type not in DYNAMIC_ROPE


@dataclass(frozen=True)
class ModelFacts:
    family: str
    model_type: str
    layers: tuple[LayerFacts, ...]
    max_positions: Optional[int]
    wants_bos: Optional[bool]  # True: sequences must start with BOS; False: the family has none; None: as the tokenizer does
    bos_token_id: Optional[int]
    attn_softcap: Optional[float] = None  # attention logit soft-capping (Gemma-2): only the model's own attention applies it

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def kv_layers(self) -> tuple[LayerFacts, ...]:
        return tuple(layer for layer in self.layers if layer.has_kv)

    @property
    def head_dims(self) -> tuple[int, ...]:
        """The distinct head_dims of the layers that hold K/V, in layer order."""
        return tuple(dict.fromkeys(layer.head_dim for layer in self.kv_layers))

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(layer.kind for layer in self.layers))

    def summary(self) -> str:
        """One line: family, layer kinds with counts, head_dims, max positions."""
        counts = {k: sum(layer.kind == k for layer in self.layers) for k in self.kinds}
        windows = sorted({layer.window for layer in self.layers if layer.window})
        nope = sum(layer.has_kv and not layer.rope for layer in self.layers)
        parts = [f"{n} {k}" + (f" (window {windows[0]})" if k == SLIDING and len(windows) == 1 else "") for k, n in counts.items()]
        extra = f", {nope} NoPE" if nope else ""
        return f"{self.family}: {', '.join(parts)} layers{extra}; head_dim {list(self.head_dims)}; {self.max_positions} positions"


def family_of(config: Any) -> str:
    """The family name of a (text decoder) config: its model_type without a ``_text`` suffix."""
    model_type = getattr(config, "model_type", "?") or "?"
    return model_type[: -len("_text")] if model_type.endswith("_text") else model_type


def text_config(config: Any) -> Any:
    """The decoder's config (a multimodal config's text part)."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _unsupported(family: str, what: str) -> ConfigError:
    return ConfigError(f"model family {family!r}: {what} is not supported by the compressed cache")


def check_family(config: Any) -> str:
    """The family of ``config``; a one-line :class:`ConfigError` if the cache cannot serve it."""
    tc = text_config(config)
    family = family_of(tc)
    rank = _get(tc, "kv_lora_rank")
    if rank:
        raise ConfigError(
            f"model family {family!r} uses multi-head latent attention (kv_lora_rank={rank}): "
            "their cache is a latent, not per-head K/V, so the compressed cache cannot hold it"
        )
    check(
        family in SUPPORTED_FAMILIES,
        f"model family {family!r} is not supported by the compressed cache; supported: {list(SUPPORTED_FAMILIES)}",
    )
    return family


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    """An attribute of a (per-layer) config without tripping heterogeneous configs' global guard."""
    try:
        value = getattr(cfg, name)
    except (AttributeError, RuntimeError):  # a heterogeneous config's global read raises a RuntimeError
        return default
    return default if value is None else value


def _rope_params(tc: Any, layer_type: str) -> tuple[Optional[dict], Optional[str]]:
    """(the RoPE parameters of ``layer_type``, the key the rotary module takes or None)."""
    rp = _get(tc, "rope_parameters")
    if not isinstance(rp, dict) or not rp:
        return None, None
    if all(isinstance(v, dict) or v is None for v in rp.values()) and any(k.endswith("_attention") for k in rp):
        return rp.get(layer_type), layer_type  # per-layer-type RoPE (Gemma-3/4, OLMo-3)
    return rp, None


def read_facts(config: Any) -> ModelFacts:
    """The :class:`ModelFacts` of a model from its config (no weights needed)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    family = check_family(config)
    tc = text_config(config)
    bidirectional = _get(tc, "use_bidirectional_attention")
    if bidirectional in (True, "all"):  # Gemma-3: a bool, Gemma-4: "all" | "vision" (vision tokens only: fine)
        raise _unsupported(family, f"bidirectional attention (use_bidirectional_attention={bidirectional!r})")
    try:
        layer_types, kwargs = get_layer_types_and_kwargs(tc)
    except Exception as e:  # noqa: BLE001 - an inconsistent config: say what transformers said, in one line
        raise ConfigError(f"model family {family!r}: cannot read its layer types: {str(e).strip().splitlines()[0]}") from None
    declared = list(_get(tc, "layer_types", None) or layer_types)
    no_rope = _get(tc, "no_rope_layers")  # SmolLM3: 1 = RoPE, 0 = NoPE
    per_layer = tc.per_layer_config
    layers = []
    for i, (lt, kw) in enumerate(zip(layer_types, kwargs)):
        lc = per_layer[i]
        head_dim = _get(lc, "head_dim") or _get(lc, "hidden_size") // _get(lc, "num_attention_heads")
        kv_heads = _get(lc, "num_key_value_heads") or _get(lc, "num_attention_heads")
        if lt == "full_attention":
            kind, window = FULL, None
        elif lt == "sliding_attention":
            kind, window = SLIDING, int(kw["sliding_window"])
        elif lt in ("linear_attention", "conv"):
            layers.append(LayerFacts(i, lt, LINEAR, cache_kwargs=tuple(sorted(kw.items()))))
            continue
        elif lt == "dummy":
            # a layer that reads another layer's KV (Gemma-4 KV sharing) and keeps none of its own
            layers.append(LayerFacts(i, declared[i], SHARED, head_dim=head_dim, kv_heads=kv_heads))
            continue
        else:
            what = {"chunked_attention": "chunked attention (attention_chunk_size)"}.get(lt, f"layer type {lt!r}")
            raise _unsupported(family, f"{what} (layer {i})")
        rope = no_rope is None or bool(no_rope[i])
        params, key = _rope_params(tc, lt)
        rope_type = theta = None
        fraction, rotary_dim = 1.0, 0
        if rope:
            check(params is not None, f"model family {family!r}: layer {i} ({lt}) has no RoPE parameters")
            rope_type = params.get("rope_type", "default")
            theta = params.get("rope_theta")
            fraction = float(params.get("partial_rotary_factor", _get(lc, "partial_rotary_factor", 1.0)))
            rotary_dim = head_dim if rope_type == "proportional" else int(head_dim * fraction)
        layers.append(
            LayerFacts(i, lt, kind, window, head_dim, kv_heads, rope, key, rope_type, theta, fraction, rotary_dim)
        )
    wants_bos = True if family in _BOS_REQUIRED else (False if _get(tc, "bos_token_id") is None else None)
    return ModelFacts(
        family=family,
        model_type=getattr(tc, "model_type", family),
        layers=tuple(layers),
        max_positions=_get(tc, "max_position_embeddings"),
        wants_bos=wants_bos,
        bos_token_id=_get(tc, "bos_token_id"),
        attn_softcap=_get(tc, "attn_logit_softcapping"),
    )


def facts_of(model: torch.nn.Module) -> ModelFacts:
    """The :class:`ModelFacts` of a loaded model."""
    return read_facts(model.config)


def max_positions(model: torch.nn.Module) -> Optional[int]:
    """The model's maximum positions (None if its config does not say): no family check."""
    return _get(text_config(model.config), "max_position_embeddings")


def set_max_positions(model: torch.nn.Module, n: int) -> None:
    """Override the model's maximum positions (``model.max_positions=``)."""
    text_config(model.config).max_position_embeddings = n


def rotary_module(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder's rotary embedding module (shared by all layers; per-type RoPE takes a layer_type)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    rot = getattr(decoder, "rotary_emb", None)
    check(rot is not None, f"model {type(model).__name__}: its decoder has no rotary_emb module to undo RoPE with")
    return rot


def takes_layer_type(rotary: torch.nn.Module) -> bool:
    """Whether the rotary module's forward takes a ``layer_type`` (per-type RoPE)."""
    try:
        return "layer_type" in inspect.signature(rotary.forward).parameters
    except (TypeError, ValueError):
        return False
