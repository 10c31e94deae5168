"""The vLLM plugin tests (run in the vLLM venv: tools/vllm_env.sh); a package so its conftest is not tests/conftest."""
