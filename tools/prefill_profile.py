"""Where a compressed streaming prefill's time goes: cProfile of one prefill on the embedded model.

    STREAMKV_WIKITEXT=<test.txt> python tools/prefill_profile.py kv4 [tokens]   # any experiment=<name>

``tokens`` (default 4096) of wikitext-2 in chunks of 512 through the experiment's cache, after a
1024-token warm-up (kernels compiled); prints the seconds and the 20 functions with the most own time.
"""

import cProfile
import os
import pstats
import sys
import time

import torch

from streamkv.lab.bench.plan import compression_for
from streamkv.lab.context import new_cache
from streamkv.lab.models.causal_lm import CausalLM
from streamkv.lab.streaming import prefill

CHUNK = 512


def main(experiment: str, tokens: int) -> None:
    text = os.environ.get("STREAMKV_WIKITEXT")
    if not text or not os.path.isfile(text):
        sys.exit("error: set STREAMKV_WIKITEXT to wikitext-2's test.txt")
    model, tokenizer = CausalLM().load()
    with open(text, encoding="utf-8") as f:
        ids = torch.tensor(tokenizer(f.read()[: 20 * tokens])["input_ids"][:tokens])
    compression, _ = compression_for([f"experiment={experiment}"])
    with torch.inference_mode():
        prefill(model, ids[:1024], new_cache(model, compression, CHUNK), CHUNK)
        profile, start = cProfile.Profile(), time.perf_counter()
        profile.enable()
        prefill(model, ids, new_cache(model, compression, CHUNK), CHUNK)
        profile.disable()
    print(f"{experiment}: {len(ids)} tokens in {time.perf_counter() - start:.1f} s")
    pstats.Stats(profile).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "kv4", int(sys.argv[2]) if len(sys.argv) > 2 else 4096)
