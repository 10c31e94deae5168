"""Log nothing beyond the run directory's results.json."""

from dataclasses import dataclass

from ..registry import register


@register("logger", "none")
@dataclass
class NoLogger:
    def start(self, **run) -> None:
        pass

    def log(self, results: dict) -> None:
        pass

    def finish(self) -> None:
        pass
