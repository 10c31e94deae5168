"""Model loading: the embedded default (SmolLM2-135M-Instruct from a PyPI wheel), local dirs, GGUF files, the hub."""
