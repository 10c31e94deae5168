"""Which lm-eval tasks a run can name, and loading them: the local ones (their YAML in ``tasks/``,
their documents built at run time, offline) and lm-eval's stock tasks (which need the hub)."""

from __future__ import annotations

from pathlib import Path

from ...kv.errors import ConfigError, check
from ..longctx import TASKS as RULER_TASKS
from ..runs import network

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
PASSKEY = "streamkv_passkey"
RULER = tuple(f"streamkv_{t}" for t in RULER_TASKS)  # RULER's synthetic tasks, one lm-eval task each
RULER_GROUP = "streamkv_ruler"  # all of them, scored as their mean
DOCUMENTS = ("streamkv_rolling", "streamkv_lastword", PASSKEY, *RULER)  # tasks whose documents we build
LOCAL = (*DOCUMENTS, RULER_GROUP)


def ruler_task(name: str) -> str:
    """``streamkv_niah_single_1`` -> ``niah_single_1``."""
    return name.removeprefix("streamkv_")


def expand(names: list[str]) -> list[str]:
    """The local tasks ``names`` run (a group stands for its tasks)."""
    out = []
    for name in names:
        out += list(RULER) if name == RULER_GROUP else [name]
    return list(dict.fromkeys(out))


def check_local_names(names: list[str]) -> None:
    """A ``streamkv_*`` name that is not a local task fails in one line listing them (before any load)."""
    unknown = [n for n in names if n.startswith("streamkv_") and n not in LOCAL]
    check(not unknown, f"task.names: {unknown} are not streamkv tasks; choose from {list(LOCAL)} (or a stock lm-eval task)")


def task_manager(names: list[str], metadata: dict):
    """Local tasks only (fast) unless a stock task is asked for; an unknown name fails in one line.
    ``metadata`` reaches every task's dataset builder (our documents' directory; for lm-eval's stock
    ``ruler``: ``pretrained`` and ``max_seq_lengths``)."""
    from lm_eval.tasks import TaskManager

    if all(n in LOCAL for n in names):
        return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)
    manager = TaskManager(include_path=str(TASKS_DIR), metadata=metadata)
    unknown = [n for n in names if n not in manager.all_tasks]
    check(
        not unknown,
        f"task.names: {unknown} not lm-eval tasks; local (offline) tasks: {list(LOCAL)}, "
        "or any lm-eval task/group name (e.g. hellaswag, arc_easy, ruler, longbench; these need the hub)",
    )
    return manager


def load(manager, name: str) -> list:
    """The top-level object(s) ``name`` denotes: a group, a task, or a tag's tasks."""
    if name not in LOCAL:
        network.use_hub(datasets=True)
    try:
        loaded = manager.load(name)
    except Exception as e:  # noqa: BLE001 - stock tasks fail offline in many ways
        if name in LOCAL:
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        offline = network.hub_offline(datasets=True)
        why = f"offline: {offline}" if offline else "the hub is needed"
        raise ConfigError(
            f"lm-eval task {name!r} cannot load its data set ({type(e).__name__}: {first}); stock tasks need "
            f"the Hugging Face hub ({why}) - offline, use {list(LOCAL)}"
        ) from None
    return [loaded["groups"][name]] if name in loaded["groups"] else list(loaded["tasks"].values())
