"""Text sources for the ``data`` config group. Every text is loaded through ``datasets``."""
