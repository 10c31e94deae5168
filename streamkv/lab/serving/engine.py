"""An in-process vLLM engine per configuration: stock bf16, vLLM's fp8 cache, or a plugin preset."""

from __future__ import annotations

import os
from pathlib import Path

STOCK = ("bf16", "fp8")  # vLLM's own caches; every other configuration is a STREAMKV_VLLM preset


def engine(config: str, kv_space_gib: int | None, **kw):
    """``LLM(...)`` for ``config``; ``kv_space_gib`` is ``VLLM_CPU_KVCACHE_SPACE`` (None: left to ``kw``)."""
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1")
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    if kv_space_gib is not None:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_space_gib)
    if config not in STOCK:
        os.environ["STREAMKV_VLLM"] = config
        import streamkv.integrations.vllm as plugin

        plugin.register()  # what the vllm.general_plugins entry point does
    from vllm import LLM

    return LLM(model=kw.pop("model"), dtype="bfloat16", kv_cache_dtype="fp8" if config == "fp8" else "auto",
               enforce_eager=True, enable_prefix_caching=False, seed=0, **kw)


def text_ids(llm, path: str) -> list[int]:
    return llm.get_tokenizer()(Path(path).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]


def capture_prompt_logprobs(sink) -> None:
    """Call ``sink(rows)`` with every log-softmax block vLLM computes for prompt log-probs (in order).

    vLLM returns only the top-k of each row; KL needs the whole vocabulary, so the rows are taken where
    the model runner gathers them (this process only: the engine runs in-process)."""
    from vllm.v1.sample.sampler import Sampler
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original, gather, active = GPUModelRunner._get_prompt_logprobs_dict, Sampler.gather_logprobs, [False]

    def prompt_logprobs_dict(self, *a, **k):
        active[0] = True
        try:
            return original(self, *a, **k)
        finally:
            active[0] = False

    def gather_logprobs(logprobs, num_logprobs, token_ids):
        if active[0]:
            sink(logprobs)
        return gather(logprobs, num_logprobs, token_ids)

    GPUModelRunner._get_prompt_logprobs_dict = prompt_logprobs_dict
    Sampler.gather_logprobs = staticmethod(gather_logprobs)
