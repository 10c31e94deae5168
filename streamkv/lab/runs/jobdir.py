"""A sweep job's directory name from its overrides, safe as one path component.

Hydra names a job's directory after its overrides (``hydra.job.override_dirname``), which is
readable and stable across launchers and re-runs (so a re-run finds its finished jobs). But a
path-valued override (``data.path=/tmp/x.txt``) would nest directories, and many overrides can pass
the file-name limit. ``slug`` keeps the name readable, replaces path separators and shortens long
names with a hash of the whole, so distinct overrides keep distinct directories. It is the
``${job_dir:...}`` resolver used by ``hydra.sweep.subdir`` in conf/eval.yaml.
"""

from __future__ import annotations

import hashlib

from omegaconf import OmegaConf

MAX_LEN = 200  # bytes; file systems allow 255 per component


def slug(override_dirname: str) -> str:
    name = override_dirname.replace("/", "_").replace("\\", "_") or "default"
    if name.startswith("."):
        name = "_" + name
    if len(name.encode()) <= MAX_LEN:
        return name
    digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:10]
    return name.encode()[: MAX_LEN - 11].decode(errors="ignore") + "~" + digest


def register_resolver() -> None:
    OmegaConf.register_new_resolver("job_dir", slug, replace=True)
