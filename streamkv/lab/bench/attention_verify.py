"""The Triton backend checked against the reference read at a real model's layout, on the device it
runs on (``python -m runners.bench_attention --verify``): several storages, decoding and chunked
prefill, float32 and bf16, with host synchronisation debugging set to "error" on CUDA."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...kv.attention import FusedBackend, TritonBackend
from ...kv.compression import Compression
from ...kv.layer import CompressedLayer
from ...kv.outliers.topk import TopKOutliers
from ...kv.quantizers.uniform import UniformQuantizer
from ...kv.sinks.fixed import FixedSinks
from .attention import Setup


class _Rotary(torch.nn.Module):
    """Llama-3-style rotary embedding (theta 500000): what RopeTable needs of a model's ``rotary_emb``."""

    def __init__(self, dim: int):
        super().__init__()
        self.inv = 1.0 / (500000.0 ** (torch.arange(0, dim, 2).float() / dim))

    def forward(self, x, pos):
        f = pos[..., None].float() * self.inv.to(pos.device)
        emb = torch.cat([f, f], -1)
        return emb.cos(), emb.sin()


VERIFY = {  # storage of each verified layout: (quantizer fields, uniform or codebook, sink bits, outliers on values too)
    "int4 rotated k-channel v-token post-RoPE (bench default)": (dict(rotate_keys=True, rotate_values=True), "uniform", 8, False),
    "int2 rotated pre-RoPE": (dict(key_bits=2, value_bits=2, rotate_keys=True, rotate_values=True, pre_rope=True), "uniform", 8, True),
    "int3 plain k-token v-channel": (dict(key_bits=3, value_bits=3, key_axis="token", value_axis="channel", key_group_size=32,
                                          value_group_size=128), "uniform", 16, True),
    "int8 plain pre-RoPE": (dict(key_bits=8, value_bits=8, pre_rope=True), "uniform", 8, True),
    "nf3 codebook pre-RoPE": (dict(key_bits=3, value_bits=3, pre_rope=True), "nonuniform", 8, True),
}


def verify(setup: Setup, device: torch.device, context: int = 1000, batch: int = 2,
           dtypes: tuple = (torch.float32, torch.bfloat16), quiet: bool = False) -> list[dict]:
    """The triton backend against the dense reference read (+ float64 attention) at this layout, for
    several storages, in decoding (1 and 2 queries per head) and chunked prefill (64, causal mask), in
    float32 and bf16; on CUDA every forward runs with synchronisation debugging set to "error"."""
    from ...kv.quantizers.nonuniform import NonUniformQuantizer
    from ...kv.transforms.rope import RopeTable

    rows_out = []
    rope = RopeTable(_Rotary(setup.dim))
    for name, (fields, kind, sink_bits, vout) in VERIFY.items():
        base = dict(key_group_size=setup.key_group, value_group_size=setup.value_group, pre_rope=False)
        if kind == "uniform":
            q = UniformQuantizer(**{**base, **fields})
        else:
            q = NonUniformQuantizer(**{**base, **{k: v for k, v in fields.items() if not k.startswith("rotate")}})
        comp = Compression(q, FixedSinks(4, sink_bits, sink_bits), TopKOutliers(fraction=0.01, keys=True, values=vout), FusedBackend())
        for dtype in dtypes:
            g = torch.Generator(device=device).manual_seed(0)
            shape = (batch, setup.kv_heads, context, setup.dim)
            k = torch.randn(shape, generator=g, device=device, dtype=dtype)
            v = torch.randn(shape, generator=g, device=device, dtype=dtype)
            layer = CompressedLayer(comp, 0, rope if q.pre_rope else None, backend=FusedBackend())
            for s in range(0, context, 256):
                layer.update(k[:, :, s : s + 256], v[:, :, s : s + 256])
            for ql in (1, 2, 64):
                qry = torch.randn(batch, setup.q_heads, ql, setup.dim, generator=g, device=device, dtype=dtype)
                own_k = torch.randn(batch * setup.kv_heads, ql, setup.dim, generator=g, device=device, dtype=dtype)
                own_v = torch.randn(batch * setup.kv_heads, ql, setup.dim, generator=g, device=device, dtype=dtype)
                view = layer.view(own_k, own_v)
                n = view.history + ql
                mask = None
                if ql > 1:  # what transformers builds for a chunk: causal over history + chunk
                    i = torch.arange(ql, device=device)[:, None] + view.history
                    mask = (torch.arange(n, device=device)[None, :] <= i).expand(batch, 1, ql, n)
                kd, vd = view.dense()
                ref = F.scaled_dot_product_attention(qry.double(), kd.double(), vd.double(), attn_mask=mask, enable_gqa=True)
                ref = ref.transpose(1, 2)
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    got = TritonBackend().attend(view, qry, mask, setup.dim**-0.5)
                finally:
                    if device.type == "cuda":
                        torch.cuda.set_sync_debug_mode("default")
                err = (got.double() - ref).abs().max().item()
                tol = 1e-4 if dtype == torch.float32 else 3e-2
                rows_out.append({"storage": name, "dtype": str(dtype).replace("torch.", ""), "queries": ql, "max_abs_err": err,
                                 "ok": err < tol})
                if not quiet:
                    print(f"{'ok  ' if err < tol else 'FAIL'} {name} {dtype} q_len={ql}: max |triton - reference| = {err:.2e} "
                          f"(tolerance {tol:g})", flush=True)
            del k, v, layer
    return rows_out
