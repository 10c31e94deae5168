"""Kernels the attention backends call: packed-code readers for the CPU (numba) and the GPU (Triton)."""
