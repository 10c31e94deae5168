"""Shared fixtures: a tiny random Llama (unit tests) and the embedded model (integration tests)."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent


def _random_llama(**shape):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, num_hidden_layers=2, max_position_embeddings=1024, attn_implementation="sdpa", **shape)
    return LlamaForCausalLM(config).eval()


def _save_with_char_tokenizer(model, path: Path) -> Path:
    """Save ``model`` with a one-character-per-token tokenizer (printable ASCII), for runner tests."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i - 32 for i in range(32, 127)}
    vocab["<unk>"] = 95
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>", pad_token="<unk>")
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama():
    """A 2-layer random Llama with GQA (4 query heads, 2 kv heads, head_dim 16)."""
    return _random_llama(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_llama, tmp_path_factory):
    """The tiny Llama saved as a model directory with a small tokenizer, for runner tests."""
    return _save_with_char_tokenizer(tiny_llama, tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny64():
    """A 2-layer random Llama with head_dim 64 (the default group sizes fit it) and 1 kv head."""
    return _random_llama(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="session")
def tiny64_dir(tiny64, tmp_path_factory):
    return _save_with_char_tokenizer(tiny64, tmp_path_factory.mktemp("tiny64"))


@pytest.fixture(scope="module")
def one_thread():
    """Toy models run fastest on one thread; on a busy machine more threads only spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct (model, tokenizer); skipped where it is not installed."""
    from streamkv.kv.errors import ConfigError
    from streamkv.lab.models.causal_lm import CausalLM

    try:
        return CausalLM().load()
    except ConfigError as e:
        pytest.skip(f"embedded model unavailable: {e}")


# -- tiny random models of every supported family (built offline from configs) ----------------------
_TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, pad_token_id=None, bos_token_id=1, eos_token_id=2)
WINDOW = 12  # the tiny sliding window: shorter than the prompts, not a multiple of the 16-token groups
_SW = ["sliding_attention", "full_attention"]
TINY_FAMILIES = {
    # Llama-3.x scaled RoPE
    "llama": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": dict(sliding_window=WINDOW),
    "qwen2": dict(bos_token_id=None),
    "qwen3": dict(head_dim=16, bos_token_id=None),
    # 3 linear-attention layers, then a full-attention layer with partial rotary (0.25 of head_dim 32)
    "qwen3_5_text": dict(head_dim=32, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                         linear_num_value_heads=4, bos_token_id=None),
    "gemma2": dict(head_dim=16, sliding_window=WINDOW),
    "gemma3_text": dict(head_dim=16, sliding_window=WINDOW, layer_types=_SW * 2),
    # sliding head_dim 16 / global head_dim 32 with 1 KV head and keys as values, proportional RoPE on the global
    # layers, and the last two layers reading the KV of earlier ones
    "gemma4_text": dict(num_hidden_layers=6, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                        attention_k_eq_v=True, num_kv_shared_layers=2, sliding_window=WINDOW, layer_types=_SW * 3,
                        hidden_size_per_layer_input=8, vocab_size_per_layer_input=128),
    "olmo2": {},
    "olmo3": dict(sliding_window=WINDOW),
    "phi3": dict(sliding_window=WINDOW),
    "smollm3": dict(no_rope_layer_interval=2),  # layers 1 and 3 have no RoPE
}


def tiny_family_config(family: str, **overrides):
    from transformers import AutoConfig

    return AutoConfig.for_model(family, **{**_TINY, **TINY_FAMILIES[family], **overrides})


_TINY_MODELS: dict = {}


def tiny_family_model(family: str):
    """A tiny random model of ``family`` in eval mode (cached per session)."""
    if family not in _TINY_MODELS:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        config = tiny_family_config(family)
        _TINY_MODELS[family] = AutoModelForCausalLM.from_config(config).eval()
    return _TINY_MODELS[family]


class DeadProxy:
    """A loopback TCP server that accepts every connection and never answers (a proxy that hangs)."""

    def __init__(self, seconds: float = 900) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted, self._conns, self._stop = 0, [], threading.Event()
        self._deadline = time.monotonic() + seconds  # bounded even if nobody closes it
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            self._conns.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for c in self._conns:
            c.close()
        self.sock.close()


@pytest.fixture
def dead_proxy():
    proxy = DeadProxy()
    yield proxy
    proxy.close()
