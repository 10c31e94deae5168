"""streamkv's packed KV pages inside vLLM (CPU platform), switched on by ``STREAMKV_VLLM=<preset>``.

``register`` is the ``vllm.general_plugins`` entry point. It does nothing unless ``STREAMKV_VLLM`` is
set, so installing streamkv never changes a vLLM run by itself; with it set, it checks the preset
(one-line error on a bad value, before any config or weights) and swaps vLLM's ``CPU_ATTN`` backend
for :class:`~streamkv.integrations.vllm.backend.StreamKVAttentionBackend` (on the CPU platform
``attention_config backend=CUSTOM`` is ignored; an override of ``CPU_ATTN`` is honoured).

* ``STREAMKV_VLLM``: ``k8v8``, ``k8v4``, ``k4v4``, ``k4v2``, ``k2v2`` (or ``k<b>v<b>``, b in 2/3/4/8);
  keys and values Hadamard-rotated, min-max quantized per token (``codec.layout``); engine options the
  slot cannot hold (sinks, outliers, per-channel keys, pre-RoPE keys) are refused in one line (``presets``);
* ``STREAMKV_VLLM_EDGE_LAYERS=N``: the first and last N layers keep the model's dtype (``edge.py``).

Modules: ``presets`` (the variables), ``codec`` (the slot format; the only user of the engine),
``backend`` (vLLM's backend API), ``plan`` (what a step reads: fused decodes, dense prefill chunks),
``kernel`` (launches the compiled ``numba_encode``, ``numba_read`` and ``numba_decode``, which share
``numba_pages`` and ``numba_formats``), ``edge`` (per-layer pages).
Nothing imports numba before the first forward (vLLM 0.32's CPU worker dies if numba is loaded before
it starts): the codec needs the engine's storage modules only.
"""

from __future__ import annotations

BACKEND = "streamkv.integrations.vllm.backend.StreamKVAttentionBackend"


def register() -> None:
    """Entry point: route vLLM's CPU attention to streamkv's packed backend when ``STREAMKV_VLLM`` is set."""
    from .presets import from_env

    preset = from_env()  # a bad value raises here, before vLLM builds its config
    if preset is None:
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND)
    if preset.edge_layers:
        from .edge import keep_edge_layers

        keep_edge_layers(preset.edge_layers)


__all__ = ["BACKEND", "register"]
