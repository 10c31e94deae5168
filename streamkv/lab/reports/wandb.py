"""Publish a sweep as a W&B Report (wandb-workspaces): its runs are the W&B group named after the sweep.

Only with credentials (``$WANDB_API_KEY`` or a netrc entry from ``wandb login``); offline runs must be
uploaded first with ``wandb sync``. Without credentials :func:`publish` says why and returns ``None``.
:func:`log_images` logs the report's pictures (needle heatmap, Pareto plot) as images of one more run
of the group (offline without credentials, for ``wandb sync`` later).
"""

from __future__ import annotations

import netrc
import os
from typing import Optional
from urllib.parse import urlparse


def has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def build(group: str, project: str, entity: Optional[str], table_md: str):
    """The report object: a scatter of ppl vs average bits, ppl per run, and a run comparer, over the group."""
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    runs = wr.Runset(entity=entity or "", project=project, name=group, filters=[expr.Metric("Group") == group])
    return wr.Report(
        project=project,
        entity=entity or "",
        title=f"streamkv sweep: {group}",
        description="Perplexity against KV-cache bits for every job of the sweep (one W&B run per job).",
        blocks=[
            wr.H1(f"Sweep {group}"),
            wr.PanelGrid(
                runsets=[runs],
                panels=[
                    wr.ScatterPlot(title="ppl vs avg bits", x="compression/avg_bits", y="metrics/ppl"),
                    wr.BarPlot(title="ppl", metrics=["metrics/ppl"]),
                    wr.RunComparer(diff_only="split"),
                ],
            ),
            wr.H2("Local report table"),
            wr.MarkdownBlock(text=table_md),
        ],
    )


def publish(group: str, project: str, entity: Optional[str], table_md: str) -> tuple[Optional[str], str]:
    """(the report's URL or None, a message for the user)."""
    if not has_credentials():
        return None, "no W&B credentials (set WANDB_API_KEY or run `wandb login`): W&B report not published"
    try:
        report = build(group, project, entity, table_md)
        report.save()
    except Exception as e:  # noqa: BLE001 - the local report is already written; say why and go on
        return None, f"W&B report not published: {(str(e).splitlines() or [type(e).__name__])[0]}"
    return report.url, f"W&B report: {report.url}"


def log_images(group: str, project: str, entity: Optional[str], images: dict, run_dir: str) -> str:
    """Log ``images`` (name -> PNG path) to a ``report`` run of ``group``; a message for the user."""
    from ..runs import network

    mode = "online" if has_credentials() and network.wandb_answers() else "offline"
    try:
        import wandb

        run = wandb.init(project=project, entity=entity, group=group, job_type="report", name=f"{group}-report",
                         dir=run_dir, mode=mode, reinit="finish_previous", settings=wandb.Settings(init_timeout=15))
        run.log({name: wandb.Image(str(path)) for name, path in images.items()})
        run.finish()
    except Exception as e:  # noqa: BLE001 - the local report is already written; say why and go on
        return f"W&B images not logged: {(str(e).splitlines() or [type(e).__name__])[0]}"
    return f"W&B images logged ({mode}): {', '.join(images)}" + ("" if mode == "online" else f"; upload with `wandb sync {run_dir}/wandb/offline-run-*`")
