"""lm-evaluation-harness through the compressed cache: the model adapter, local tasks and their documents."""
