"""A sweep's jobs as found on disk: each job directory's results.json / failed.json and Hydra's
.hydra/overrides.yaml (for a short label), read back at any time, also while a sweep runs or after
some jobs were killed (those show as incomplete)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..runs.results import FAILED, RESULTS, read_json

OK, FAILED_STATUS, INCOMPLETE = "ok", "failed", "incomplete"


@dataclass
class Job:
    """One job directory of a sweep, as found on disk."""

    path: Path
    status: str
    results: dict = field(default_factory=dict)
    error: Optional[str] = None
    overrides: list[str] = field(default_factory=list)
    label: str = ""

    @property
    def config(self) -> dict:
        return self.results.get("config", {})

    @property
    def ppl(self) -> Optional[float]:
        return self.results.get("metrics", {}).get("ppl")

    @property
    def avg_bits(self) -> Optional[float]:
        return self.results.get("compression", {}).get("avg_bits")

    @property
    def components(self) -> dict:
        return self.results.get("components", {})

    @property
    def is_baseline(self) -> bool:
        return self.status == OK and self.components.get("quantizer") == "none"

    @property
    def protocol(self) -> tuple:
        """What a ppl is measured on: two jobs' ppl compare only when this is equal."""
        return tuple(repr(self.config.get(k)) for k in ("model", "data", "task"))


def load_job(path: Path) -> Job:
    """A job's state: the newer of results.json and failed.json wins (a later re-run may have failed)."""
    done, failed = path / RESULTS, path / FAILED
    overrides_file = path / ".hydra" / "overrides.yaml"
    overrides = _read_overrides(overrides_file) if overrides_file.is_file() else []
    if done.is_file() and not (failed.is_file() and failed.stat().st_mtime > done.stat().st_mtime):
        return Job(path, OK, read_json(done), overrides=overrides)
    if failed.is_file():
        info = read_json(failed)
        error = f"{info.get('type', 'Error')}: {info.get('error', '')}"
        return Job(path, FAILED_STATUS, error=error, overrides=overrides)
    return Job(path, INCOMPLETE, error="no results (killed, or still running)", overrides=overrides)


def _read_overrides(path: Path) -> list[str]:
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.load(path)]


def collect(sweep_dir: str | Path) -> list[Job]:
    """Every job under ``sweep_dir`` (a directory with results.json, failed.json or Hydra's .hydra/), labelled."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    marks = [*root.rglob(RESULTS), *root.rglob(FAILED), *root.rglob(".hydra")]
    dirs = sorted({m.parent for m in marks if "wandb" not in m.relative_to(root).parts})
    jobs = [load_job(d) for d in dirs]
    _label(jobs, root)
    return jobs


def _label(jobs: list[Job], root: Path) -> None:
    """Label each job by the overrides that differ between the sweep's jobs (else its directory)."""
    quiet = ("force", "progress", "logger")  # run switches, not what was measured (as in job directory names)
    split = [dict(o.split("=", 1) for o in j.overrides if "=" in o and o.split("=", 1)[0].lstrip("+") not in quiet) for j in jobs]
    keys = sorted({k for s in split for k in s})
    varying = [k for k in keys if len({s.get(k) for s in split}) > 1]
    for job, s in zip(jobs, split):
        label = ",".join(f"{k.lstrip('+')}={s[k]}" for k in varying if k in s)
        job.label = label or (str(job.path.relative_to(root)) if job.path != root else job.path.name)


def pick_baseline(jobs: list[Job], job: Job, explicit: Optional[Job] = None) -> Optional[Job]:
    """The uncompressed job to compare ``job`` with: ``explicit``, else one of the sweep's (same chunk size
    first); ``None`` when it was measured on another model, text or task."""
    candidates = [j for j in ([explicit] if explicit else jobs) if j.is_baseline and j.protocol == job.protocol]
    same = [j for j in candidates if j.results.get("chunk_size") == job.results.get("chunk_size")]
    return (same or candidates or [None])[0]
