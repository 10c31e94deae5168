"""The two measurements, one configuration per process: ``python -m streamkv.lab.serving.measure
<quality|serve> '<json options>'`` prints one JSON line (:func:`child` runs it and reads it back)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

from .engine import capture_prompt_logprobs, engine, text_ids


def quality(opts: dict) -> dict:
    """Capacity (blocks from the same ``VLLM_CPU_KVCACHE_SPACE``, bytes per token and layer as the pages
    declare them), perplexity over non-overlapping windows prefilled in chunks, KL(stock || config) over
    the whole vocabulary (stock's rows go to ``opts["reference"]``, read back by the others), greedy tokens."""
    import numpy as np
    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    ref, kls, top1 = Path(opts["reference"]), [], []
    state = {"row": 0}

    def sink(rows: torch.Tensor) -> None:
        rows = rows.float()
        if opts["config"] == "bf16":
            with ref.open("ab") as f:
                f.write(rows.numpy().tobytes())
            return
        table = np.memmap(ref, dtype=np.float32, mode="r").reshape(-1, rows.shape[1])
        r = torch.from_numpy(np.array(table[state["row"]: state["row"] + len(rows)]))
        state["row"] += len(rows)
        p = r.exp()
        kls.append(torch.where(p > 0, p * (r - rows), 0.0).sum(-1).clamp_min(0))
        top1.append(r.argmax(-1) == rows.argmax(-1))

    capture_prompt_logprobs(sink)
    w, chunk = opts["window"], opts["chunk"]
    llm = engine(opts["config"], opts["kv_space"], model=opts["model"], max_model_len=w + 64,
                 max_num_batched_tokens=chunk, max_num_seqs=1)
    cache, layers = llm.llm_engine.vllm_config.cache_config, llm.llm_engine.vllm_config.compilation_config
    pages = [m.kv_cache for m in layers.static_forward_context.values()]
    per_token = sum(p.shape[1] * p.shape[3] * p.element_size() for p in pages) / len(pages)
    ids = text_ids(llm, opts["text"])
    windows = [ids[i * w: (i + 1) * w] for i in range(min(opts["windows"], len(ids) // w))]
    outs = llm.generate([TokensPrompt(prompt_token_ids=x) for x in windows],
                        SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    lps = [d[t].logprob for o, x in zip(outs, windows) for d, t in zip(o.prompt_logprobs[1:], x[1:])]
    start = len(windows) * w
    g = llm.generate(TokensPrompt(prompt_token_ids=ids[start: start + opts["greedy_prompt"]]),
                     SamplingParams(max_tokens=opts["greedy_tokens"], temperature=0), use_tqdm=False)[0]
    result = dict(blocks=cache.num_gpu_blocks, block_size=cache.block_size, bytes_per_token_layer=per_token,
                  ppl=math.exp(-sum(lps) / len(lps)), tokens=len(lps), windows=len(windows),
                  greedy=list(g.outputs[0].token_ids))
    if kls:
        kl = torch.cat(kls).double()
        result.update(kl=kl.mean().item(), kl_p99=torch.quantile(kl, 0.99).item(),
                      top1_agreement=torch.cat(top1).double().mean().item())
    return result


def serve(opts: dict) -> dict:
    """N requests of P prompt + M output tokens submitted at once under ``kv_mib`` MiB of KV cache
    (vLLM's ``kv_cache_memory_bytes``): requests/s, output tokens/s, vLLM's preemption count."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    n, p, m = opts["requests"], opts["prompt"], opts["output"]
    llm = engine(opts["config"], None, model=opts["model"], max_model_len=p + m,
                 max_num_batched_tokens=opts["serve_chunk"], max_num_seqs=n,
                 kv_cache_memory_bytes=opts["kv_mib"] << 20, disable_log_stats=False)
    ids = text_ids(llm, opts["text"])
    prompts = [TokensPrompt(prompt_token_ids=ids[i * p: (i + 1) * p]) for i in range(n)]
    # two of the requests first, four tokens each: the plugin's kernels compile, or load from numba's disk
    # cache, on their first call, and that is not serving
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=m, temperature=0, ignore_eos=True), use_tqdm=False)
    seconds = time.perf_counter() - t0
    metrics = {x.name: getattr(x, "value", None) for x in llm.get_metrics()}
    cache = llm.llm_engine.vllm_config.cache_config
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return dict(kv_mib=opts["kv_mib"], blocks=cache.num_gpu_blocks,
                fits=cache.num_gpu_blocks * cache.block_size >= n * (p + m), seconds=seconds,
                requests_per_s=n / seconds, output_tokens_per_s=out_tokens / seconds,
                preemptions=metrics.get("vllm:num_preemptions"))


PARTS = {"quality": quality, "serve": serve}


def child(part: str, opts: dict, timeout: int) -> dict:
    """``PARTS[part](opts)`` in a fresh process; ``{"error": one line}`` when it fails."""
    try:
        r = subprocess.run([sys.executable, "-m", __name__, part, json.dumps(opts)], capture_output=True,
                           text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"{part} {opts['config']}: no result within {timeout} s (--timeout)"}
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    if r.returncode or not lines:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"{part} {opts['config']}: exit {r.returncode}: {tail}"}
    return json.loads(lines[-1])


if __name__ == "__main__":
    part, options = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps({"config": options["config"], **PARTS[part](options)}))
