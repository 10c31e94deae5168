"""Runs one in-process vLLM engine and prints what the tests check, as one JSON line.

A subprocess per configuration: vLLM caches its attention backend (and loads plugins) once per
process. Usage: ``python engine_probe.py '<json options>'``; options: ``model``, ``prompt_tokens``,
``new_tokens``, ``chunk``, ``kv_dtype``, ``kv_space_gib``, ``edge_layers``, ``second_prompt_tokens`` (then, in the
same engine, the prompt again beside a second request of that many tokens, reported under ``mixed``: the second's
prefill overlaps the first's decoding, so steps mix both; one engine start serves both runs). ``STREAMKV_VLLM``
comes from the environment and the plugin through the ``vllm.general_plugins`` entry point (or ``register_directly``).
"""

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: its state is readable
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def text_ids(tokenizer, n: int) -> list[int]:
    from pydoc_data.topics import topics  # in every CPython: no download

    return tokenizer("\n\n".join(topics[k] for k in sorted(topics)))["input_ids"][:n]


def main(opts: dict) -> dict:
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(opts.get("kv_space_gib", 1))
    if opts.get("edge_layers"):
        os.environ["STREAMKV_VLLM_EDGE_LAYERS"] = str(opts["edge_layers"])
    if opts.get("register_directly"):
        import streamkv.integrations.vllm as plugin

        plugin.register()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=opts["model"], dtype="bfloat16", kv_cache_dtype=opts.get("kv_dtype", "auto"),
              max_model_len=2048, enforce_eager=True, max_num_batched_tokens=opts.get("chunk", 256),
              max_num_seqs=2, enable_prefix_caching=False, seed=0)
    config = llm.llm_engine.vllm_config
    layers = config.compilation_config.static_forward_context  # layer name -> Attention module
    from vllm.model_executor.models.utils import extract_layer_index

    ordered = [layers[n] for n in sorted(layers, key=extract_layer_index)]
    prompt = opts.get("prompt_tokens", 600)
    ids = text_ids(llm.get_tokenizer(), prompt + opts.get("second_prompt_tokens", 0))
    params = SamplingParams(max_tokens=opts.get("new_tokens", 8), temperature=0, prompt_logprobs=0, logprobs=2)

    def generate(prompts: list[list[int]]) -> tuple[list, dict | None]:
        """The requests' outputs and the plugin's calls they made (None: the stock backend)."""
        before = calls()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        after = calls()
        return outs, None if after is None else {k: v - before.get(k, 0) for k, v in after.items()}

    outs, made = generate([ids[:prompt]])
    report = {
        "blocks": config.cache_config.num_gpu_blocks,
        "block_size": config.cache_config.block_size,
        "layers": len(layers),
        "impls": sorted({type(m.impl).__name__ for m in layers.values()}),
        "kv_dtypes": [str(m.kv_cache.dtype).removeprefix("torch.") for m in ordered],
        "kv_shapes": [list(m.kv_cache.shape) for m in ordered],
        **tokens(outs[0], ids[:prompt]),
        "calls": made,
    }
    if opts.get("second_prompt_tokens"):
        outs, made = generate([ids[:prompt], ids[prompt:]])
        report["mixed"] = {"first": tokens(outs[0], ids[:prompt]), "second": tokens(outs[1], ids[prompt:]),
                           "calls": made}
    return report


def calls() -> dict | None:
    """The plugin's call counters so far (None: the stock backend serves this process)."""
    if not os.environ.get("STREAMKV_VLLM"):
        return None
    from streamkv.integrations.vllm.backend import StreamKVAttentionImpl

    return dict(StreamKVAttentionImpl.calls)


def tokens(out, ids: list[int]) -> dict:
    """One request's greedy tokens, their logprobs and leads, and its prompt's logprobs."""
    logprobs = [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])]
    # per generated step: the chosen token's logprob and its lead over the runner-up (near-ties flip)
    steps = [sorted((lp.logprob for lp in d.values()), reverse=True) for d in out.outputs[0].logprobs]
    return {
        "greedy": list(out.outputs[0].token_ids),
        "greedy_logprobs": [step[0] for step in steps],
        "greedy_margins": [step[0] - step[1] if len(step) > 1 else None for step in steps],
        "logprobs": logprobs,
    }


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
