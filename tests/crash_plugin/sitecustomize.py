"""A task with a bug, for the failure tests: on PYTHONPATH it registers itself at start-up (with
``hydra.searchpath=[file://<this dir>/conf]`` for its ``task=crash`` option)."""

from dataclasses import dataclass
from typing import Optional

from streamkv.lab.registry import register


@register("task", "crash")
@dataclass
class Crash:
    window: int = 256
    max_windows: Optional[int] = 1

    def precheck(self, positions, text):
        return self.window

    def run(self, ctx):
        raise RuntimeError("boom: a bug in the task")
