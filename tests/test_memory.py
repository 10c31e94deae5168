"""A dropped cache frees its memory: nothing a cache held (stored blocks, the arrays readers derive from
them, the view handed to attention) survives ``del cache`` for any reader or storage kind; and the
benchmark's soak measures the resident memory of many sequences in one process."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from streamkv import CompressedCache
from streamkv.lab.compression import build_compression

G = {"key_group_size": 16, "value_group_size": 16}
STORAGES = {
    "uniform-rotated-prerope": ({"name": "uniform", "rotate_keys": True, "rotate_values": True, **G}, "fixed", "ema_relative"),
    "lloyd-max": ({"name": "lloyd_max", "key_bits": 3, "value_bits": 2, **G}, "fixed", "ema_relative"),
    "lloyd-max-budget": ({"name": "lloyd_max", "budget_bits": 5.5, "widths": [2, 8], **G}, "fixed", "ema_relative"),  # kv* presets
    "nonuniform": ({"name": "nonuniform", "key_bits": 3, "value_bits": 3, **G}, "none", "topk"),
    "int-per-token": ({"name": "int_per_token", "key_bits": 4, "value_bits": 4}, "none", "none"),
}


def _held(cache) -> list:
    """Weak references to everything the cache holds or lets readers derive: tensors, blocks, arrays."""
    refs = [weakref.ref(t) for t in cache.tensors()]
    for layer in cache.layers:
        for s in (layer.k, layer.v):
            for block in (s.body, s.sinks):
                while block is not None:
                    refs.append(weakref.ref(block))
                    for value in getattr(block, "derived", {}).values():
                        refs += [weakref.ref(a) for a in (value if isinstance(value, tuple) else (value,)) if hasattr(a, "__array__")]
                    block = getattr(block, "inner", None)
    return refs


@pytest.mark.parametrize("attention", ["dense", "fused", "auto"])
@pytest.mark.parametrize("storage", list(STORAGES))
def test_nothing_of_a_dropped_cache_survives(tiny_llama, storage, attention, one_thread):
    quantizer, sink, outlier = STORAGES[storage]
    comp = build_compression(quantizer, sink, outlier, attention)
    cache = CompressedCache.for_model(tiny_llama, comp, chunk_size=16)
    ids = torch.randint(0, 128, (1, 72), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # (inference mode makes no views: the cycle through a view's base would not show)
        for i in range(0, 64, 16):
            tiny_llama(input_ids=ids[:, i : i + 16], cache=cache, use_cache=True)
        for i in range(64, 72):  # decoding steps: the kernels derive their arrays from the blocks
            tiny_llama(input_ids=ids[:, i : i + 1], cache=cache, use_cache=True)
    refs = _held(cache)
    assert len(refs) >= 20
    del cache
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    assert not alive, f"{len(alive)} of {len(refs)} objects of a dropped cache are alive: {type(alive[0]).__name__}"
