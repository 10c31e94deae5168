"""Tasks: what a run measures. Each is a registered dataclass with ``run(ctx) -> results``."""
