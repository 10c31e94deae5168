"""Transforms a stored block may carry and a reader undoes: the Hadamard rotation and RoPE."""
