"""Full-precision edge layers (``STREAMKV_VLLM_EDGE_LAYERS=N``): the first and last N layers keep
the model's dtype, the others hold packed slots, in one block pool.

vLLM 0.32 allows a different page per layer: full-attention layers that share a block size but not a
page size form one ``UniformTypeKVCacheSpecs`` group, whose block is the sum of the layers' pages,
so nothing is padded. What it lacks is a per-layer hook: ``AttentionBackend.customize_spec`` sees a
layer's spec but not which layer it is. So ``Attention.get_kv_cache_spec`` (which knows its
``layer_name``) is wrapped: for an edge layer served by streamkv's backend it returns the stock spec
with its dense content size made explicit, which ``customize_spec`` then leaves alone; the backend's
impl sends pages that are not uint8 to the stock CPU kernels.
"""

from __future__ import annotations

from dataclasses import replace

_PATCHED = "_streamkv_edge_layers"


def is_edge(layer_name: str, num_layers: int, edge: int) -> bool:
    from vllm.model_executor.models.utils import extract_layer_index

    i = extract_layer_index(layer_name)
    return i < edge or i >= num_layers - edge


def keep_edge_layers(edge: int) -> None:
    """Wrap ``Attention.get_kv_cache_spec`` so the first and last ``edge`` layers keep dense pages."""
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.utils.torch_utils import get_dtype_size

    from .backend import StreamKVAttentionBackend

    original = getattr(Attention.get_kv_cache_spec, _PATCHED, Attention.get_kv_cache_spec)

    def get_kv_cache_spec(self, vllm_config):
        spec = original(self, vllm_config)
        if (
            spec is not None
            and getattr(spec, "state_content_bytes", 1) is None
            and issubclass(self.get_attn_backend(), StreamKVAttentionBackend)
            and is_edge(self.layer_name, vllm_config.model_config.get_total_num_hidden_layers(), edge)
        ):
            dense = (spec.head_size + spec.head_size_v) * get_dtype_size(spec.dtype)
            spec = replace(spec, state_content_bytes=dense)  # explicit, so customize_spec keeps it
        return spec

    setattr(get_kv_cache_spec, _PATCHED, original)
    Attention.get_kv_cache_spec = get_kv_cache_spec
