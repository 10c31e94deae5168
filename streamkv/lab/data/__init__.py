"""Text sources for the ``data`` config group: local files are read directly, the hub through ``datasets``."""
