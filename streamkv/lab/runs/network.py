"""Network calls that give up in seconds: one bounded probe per host, then offline.

When a host takes connections but never answers (a dead proxy), the hub and W&B clients wait for
minutes: their timeouts bound one request, not the retries, nor the several requests of one load. So before the first call to a host,
:func:`answers` sends it one request through the environment's proxy in a daemon thread and waits at
most ``STREAMKV_PROBE_SECONDS`` (default 10). A hub that does not answer switches the Hugging Face
libraries to offline mode for the rest of the process, so they use their local caches or fail at once;
W&B logs offline instead (see ``streamkv/loggers/wandb.py``). Offline flags already set
(``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``, ``WANDB_MODE``) skip the probe. Local files never come
here: they are read directly.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import urllib.error
import urllib.request

log = logging.getLogger(__name__)

WANDB_URL = "https://api.wandb.ai"
_TRUE = ("1", "ON", "YES", "TRUE")
_offline_reason: str | None = None


def probe_seconds() -> float:
    return float(os.environ.get("STREAMKV_PROBE_SECONDS") or 10)


@functools.cache
def answers(url: str) -> bool:
    """Whether ``url`` sends any HTTP answer (an error status counts) within :func:`probe_seconds`.

    The thread bounds everything, DNS included; urllib honours ``HTTPS_PROXY``/``NO_PROXY``.
    """
    seconds = probe_seconds()
    result: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=seconds).close()
            result.append(True)
        except urllib.error.HTTPError:
            result.append(True)
        except Exception:  # noqa: BLE001 - refused, timed out, unresolvable: all mean "no answer"
            result.append(False)

    thread = threading.Thread(target=probe, name=f"probe {url}", daemon=True)
    thread.start()
    thread.join(seconds)
    return bool(result and result[0])


def hub_url() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _flag(name: str) -> bool:
    return os.environ.get(name, "").upper() in _TRUE


def hub_offline(datasets: bool = False) -> str | None:
    """Why the hub is not used for models (or ``datasets``): an offline flag, or a probe with no answer."""
    if _offline_reason:
        return _offline_reason
    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") + (("HF_DATASETS_OFFLINE",) if datasets else ())
    for name in flags:
        if _flag(name):
            return f"{name}=1 is set"
    return None


def use_hub(datasets: bool = False) -> None:
    """Call before a hub request (for a data set: ``datasets=True``): unless the hub answers, go offline."""
    if hub_offline(datasets) or answers(hub_url()):
        return
    go_offline(f"{hub_url()} did not answer within {probe_seconds():g} s")


def go_offline(reason: str) -> None:
    """Offline mode for huggingface_hub, transformers and datasets, in this process and its children."""
    global _offline_reason
    _offline_reason = reason
    log.warning("offline: %s; using local caches only", reason)
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True  # read at each request (the libraries read the variable at import)
    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True


def wandb_answers() -> bool:
    return answers(os.environ.get("WANDB_BASE_URL") or WANDB_URL)
