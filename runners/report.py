"""Report on a sweep: ``python -m runners.report outputs/sweeps/<name> [--baseline DIR] [--wandb]``.

Writes report.md, report.csv, pareto.png (and ablation.png for the ablation; ruler.md, ruler.csv and
needle_heatmap.png for long-context jobs) into ``<sweep>/report`` and prints the table; ``--wandb``
also publishes a W&B Report of the sweep's group when credentials exist and logs the pictures as images. The logic is in :mod:`streamkv.lab.reports.sweep`.
"""

from __future__ import annotations

from streamkv.kv.errors import ConfigError
from streamkv.lab.reports.sweep import make_report
from streamkv.lab.runs.args import ArgumentParser, run_main


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m runners.report", description=__doc__.splitlines()[0])
    p.add_argument("sweep_dir", help="a sweep directory, e.g. outputs/sweeps/ablation")
    p.add_argument("--out", help="where to write the report (default: <sweep_dir>/report)")
    p.add_argument("--baseline", help="an uncompressed job's directory or results.json (default: the sweep's own)")
    p.add_argument("--wandb", action="store_true", help="also publish a W&B Report of the sweep's group")
    p.add_argument("--project", help="W&B project (default: the jobs' logger.project, else streamkv)")
    p.add_argument("--entity", help="W&B entity (default: the jobs' logger.entity, else your default)")
    args = p.parse_args(argv)
    try:
        report = make_report(args.sweep_dir, args.out, args.baseline)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    text = report.files["markdown"].read_text()
    print(text)
    print("wrote " + ", ".join(str(f) for f in report.files.values()))
    if args.wandb:
        from streamkv.lab.reports.wandb import log_images, publish

        logger = next((j.config.get("logger") for j in report.jobs if j.config.get("logger")), {}) or {}
        project = args.project or logger.get("project") or "streamkv"
        _, message = publish(report.name, project, args.entity or logger.get("entity"), text)
        print(message)
        images = {k: v for k, v in report.files.items() if k in ("heatmap", "pareto")}
        if images:
            print(log_images(report.name, project, args.entity or logger.get("entity"), images, str(report.files["markdown"].parent)))


if __name__ == "__main__":
    run_main(main)
