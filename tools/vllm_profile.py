"""Where a vLLM step's time goes with the plugin (or stock): cProfile of one decode-heavy batch.

    STREAMKV_WIKITEXT=<test.txt> python tools/vllm_profile.py k4v4      # or bf16; in the vLLM venv

16 requests of 1,024 prompt tokens and 64 greedy output tokens on the embedded model, after a warm-up
(kernels compiled, pages laid out); prints the seconds and the 25 functions with the most own time.
"""

import cProfile
import os
import pstats
import sys
import time
from pathlib import Path

os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1")
MODEL = Path(os.environ.get("STREAMKV_CACHE", Path.home() / ".cache" / "streamkv")) / "smollm2-135m-instruct"


def main(config: str) -> None:
    if config != "bf16":
        os.environ["STREAMKV_VLLM"] = config
        import streamkv.integrations.vllm as plugin

        plugin.register()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(MODEL), dtype="bfloat16", enforce_eager=True, enable_prefix_caching=False, seed=0,
              max_model_len=2048, max_num_batched_tokens=1024, max_num_seqs=16)
    text = Path(os.environ["STREAMKV_WIKITEXT"]).read_text(encoding="utf-8")[:200_000]
    ids = llm.get_tokenizer()(text)["input_ids"]
    prompts = [TokensPrompt(prompt_token_ids=ids[i * 1024:(i + 1) * 1024]) for i in range(16)]
    llm.generate(prompts[:2], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
    profile, t0 = cProfile.Profile(), time.perf_counter()
    profile.enable()
    llm.generate(prompts, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True), use_tqdm=False)
    profile.disable()
    print(config, "seconds", round(time.perf_counter() - t0, 2))
    pstats.Stats(profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "k4v4")
