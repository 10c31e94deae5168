"""Min-max groups against the Lloyd-Max codebook on the embedded model's own keys and values.

One 2048-token window of wikitext-2 goes through SmolLM2-135M once; hooks keep every layer's queries
(after RoPE), keys (before RoPE, as the cache stores them) and values. Each kind is then quantized at
2, 3 and 4 bits, both ways, after the Hadamard rotation:

* keys per channel over 128 (or 256) tokens: min-max (fp16 scale and zero) or Lloyd-Max (the
  least-squares scale among candidates, projection reconstruction) with and without a mean;
* values per token over the head (64): min-max (fp16 scale and zero) or Lloyd-Max with an fp16 or a
  log8 scale, with and without a mean.

It prints, per kind and width, the relative squared error of the stored values and the relative error
of the attention output of the last chunk's queries over the quantized history (the first 1536
tokens, 4 sinks exact), averaged over layers: what a codebook does to the model, not just to the data.

    python docs/codebook_error.py [path/to/wikitext-2-raw/test.txt]
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch

from streamkv.kv.storage.codebook import quantize_lloyd_max
from streamkv.kv.storage.packed import quantize
from streamkv.kv.transforms.hadamard import hadamard_on, rotate
from streamkv.lab.models.causal_lm import CausalLM

WINDOW, HISTORY, SINKS = 2048, 1536, 4


def capture(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q after RoPE, K before RoPE, V), each (layers, heads, tokens, head_dim), of the first window."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, tok = CausalLM().load()
    ids = torch.tensor(tok(path.read_text()[:200000], add_special_tokens=False)["input_ids"])[:WINDOW]
    got: dict[int, tuple] = {}

    def hook(i):
        def pre(mod, args, kwargs):
            h = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            d = mod.head_dim
            q = mod.q_proj(h).view(1, h.shape[1], -1, d).transpose(1, 2)
            k = mod.k_proj(h).view(1, h.shape[1], -1, d).transpose(1, 2)
            v = mod.v_proj(h).view(1, h.shape[1], -1, d).transpose(1, 2)
            q, _ = apply_rotary_pos_emb(q, q, cos, sin)
            got[i] = (q[0], k[0], v[0])

        return pre

    hooks = [layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(model.model.layers)]
    with torch.inference_mode():
        model(input_ids=ids[None])
    for h in hooks:
        h.remove()
    q, k, v = (torch.stack([got[i][j] for i in range(len(got))]) for j in range(3))
    return q, k, v, model


def attention_error(q, k, v, k_hat, v_hat, rope) -> float:
    """Relative error of the last chunk's attention output when the history is read from k_hat/v_hat."""
    errs = []
    n = q.shape[2] - HISTORY
    mask = torch.ones(n, q.shape[2], dtype=torch.bool).tril(HISTORY)
    for layer in range(q.shape[0]):
        group = q.shape[1] // k.shape[1]
        outs = []
        for kk, vv in ((k[layer], v[layer]), (k_hat[layer], v_hat[layer])):
            kr = rope.rotate(kk, 0).repeat_interleave(group, 0)
            s = (q[layer, :, HISTORY:] @ kr.transpose(-1, -2)) / math.sqrt(q.shape[-1])
            p = torch.softmax(s.masked_fill(~mask, -math.inf), -1)
            outs.append(p @ vv.repeat_interleave(group, 0))
        errs.append(float((outs[1] - outs[0]).square().sum() / outs[0].square().sum()))
    return sum(errs) / len(errs)


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ["STREAMKV_WIKITEXT"])
    torch.set_num_threads(1)
    q, k, v, model = capture(path)
    from streamkv.kv.model_facts import rotary_module
    from streamkv.kv.transforms.rope import RopeTable

    rope = RopeTable(rotary_module(model))
    h = hadamard_on(k.shape[-1], k.device, k.dtype)
    flat = lambda x: x.reshape(-1, x.shape[2], x.shape[3])  # noqa: E731  (layers x heads, tokens, dim)

    def lm(axis, g, fmt, zero):
        return lambda hist, bits: quantize_lloyd_max(hist, bits, axis, g, "mse", fmt, zero, True, None, "projection").dequantize(torch.float32)

    def minmax(axis, g):
        return lambda hist, bits: quantize(rotate(hist), bits, axis, g).dequantize(torch.float32) @ h.T

    formats = {  # kind -> (label, metadata bits per element, quantize-dequantize of the history)
        "keys": [
            ("min-max, 128 tokens, fp16 scale + zero", 32 / 128, minmax("channel", 128)),
            ("min-max, 256 tokens, fp16 scale + zero", 32 / 256, minmax("channel", 256)),
            ("Lloyd-Max, 128 tokens, fp16 mean + log8 scale", 24 / 128, lm("channel", 128, "log8", True)),
            ("Lloyd-Max, 128 tokens, log8 scale, no zero", 8 / 128, lm("channel", 128, "log8", False)),
        ],
        "values": [
            ("min-max, 64 channels, fp16 scale + zero", 32 / 64, minmax("token", 64)),
            ("Lloyd-Max, 64 channels, fp16 scale", 16 / 64, lm("token", 64, "fp16", False)),
            ("Lloyd-Max, 64 channels, log8 scale", 8 / 64, lm("token", 64, "log8", False)),
            ("Lloyd-Max, 64 channels, fp16 mean + log8 scale", 24 / 64, lm("token", 64, "log8", True)),
        ],
    }

    def quantized(fn, bits: int, x: torch.Tensor) -> torch.Tensor:
        y = fn(flat(x[:, :, :HISTORY]), bits).reshape(x.shape[0], x.shape[1], HISTORY, x.shape[3])
        y[:, :, :SINKS] = x[:, :, :SINKS]  # sinks are stored apart at 8 bits or more
        return torch.cat([y, x[:, :, HISTORY:]], 2)

    print("| kind | bits | format (after the Hadamard rotation) | metadata bits/element | rel. squared error | rel. attention-output error |")
    print("|---|---|---|---|---|---|")
    for kind in ("keys", "values"):
        x = k if kind == "keys" else v
        for bits in (2, 3, 4):
            for label, meta, fn in formats[kind]:
                y = quantized(fn, bits, x)
                hist, yh = x[:, :, SINKS:HISTORY], y[:, :, SINKS:HISTORY]
                centred = hist - hist.mean(2, keepdim=True)
                mse = float((yh - hist).square().sum() / centred.square().sum())
                err = attention_error(q, k, v, y, v, rope) if kind == "keys" else attention_error(q, k, v, k, y, rope)
                print(f"| {kind} | {bits} | {label} | {meta:.4f} | {mse:.4f} | {err:.5f} |", flush=True)


if __name__ == "__main__":
    main()
