"""The lines a finished `kedro run` ends on: where its results are, and a stable link to the newest report.

Versioned outputs live in folders named by the run's timestamp (data/08_reporting/report.html/<UTC>/...),
which nobody can type; the summary names each result this run wrote, its MLflow run (name and the
address `make mlflow-ui` serves it at) and the registered model, and data/08_reporting/latest/ links
to the newest report.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

# (catalog name, what it is) in the order the summary lists them
RESULTS = (("report_html", "report"), ("report_md", "report summary"), ("eval_metrics", "full-set metrics"),
           ("predictions", "full-set predictions"), ("best_model", "best model"),
           ("image_predictions", "predictions of new images"))
MLFLOW_UI = "http://127.0.0.1:5000"  # `make mlflow-ui`'s default address


def newest_version(folder: Path) -> Path | None:
    """The newest version of a versioned dataset saved at FOLDER (FOLDER/<version>/<name>), or None."""
    if not folder.is_dir():
        return None
    versions = sorted(p for p in folder.iterdir() if p.is_dir())
    return versions[-1] / folder.name if versions else None


def link_latest(target: Path, link: Path) -> None:
    """Point `link` at `target` (relative, so the project folder can move), replaced atomically."""
    link.parent.mkdir(parents=True, exist_ok=True)
    staged = link.with_name(f".{link.name}.{os.getpid()}")
    staged.unlink(missing_ok=True)
    staged.symlink_to(os.path.relpath(target, link.parent))
    os.replace(staged, link)


def summary_lines(project: Path, written: dict[str, Path], run: dict | None, registered: dict | None) -> list[str]:
    lines = ["Results of this run:"]
    for name, what in RESULTS:
        if name in written:
            path = written[name]
            lines.append(f"  {what + ':':<28}{path.relative_to(project) if path.is_relative_to(project) else path}")
    if "report_html" in written:
        lines.append(f"  {'newest report, always at:':<28}data/08_reporting/latest/report.html")
    if run:
        lines.append(f"  {'MLflow run:':<28}'{run['name']}' ({run['status']}): `make mlflow-ui`, then "
                     f"{MLFLOW_UI}/#/experiments/{run['experiment_id']}/runs/{run['run_id']}")
    if registered and registered.get("logged"):
        lines.append(f"  {'registered model:':<28}{registered['registry_uri']}: `make serve "
                     f"MODEL={registered['registry_uri']}`")
    return lines if len(lines) > 1 else []


def report_run_results(project: Path, catalog_config: dict, outputs: set[str], run_id: str | None) -> None:
    """Log where this run's results are and link the newest report. Never fails the finished run."""
    try:
        written = {}
        for name, _ in RESULTS:
            config = catalog_config.get(name) or {}
            if name in outputs and "filepath" in config:
                path = project / config["filepath"]
                found = newest_version(path) if config.get("versioned") else path
                if found is not None and found.exists():
                    written[name] = found
        for name in ("report_html", "report_md"):
            if name in written:
                link_latest(written[name], project / "data/08_reporting/latest" / written[name].name)
        registered = None
        config = catalog_config.get("registered_model") or {}
        if "registered_model" in outputs and "filepath" in config:
            found = newest_version(project / config["filepath"])
            registered = json.loads(found.read_text()) if found and found.is_file() else None
        run = None
        if run_id:
            from mlflow.tracking import MlflowClient

            info = MlflowClient().get_run(run_id).info
            run = {"name": info.run_name, "status": "FINISHED" if info.status == "RUNNING" else info.status,
                   "experiment_id": info.experiment_id, "run_id": run_id}
        for line in summary_lines(project, written, run, registered):
            logger.info(line)
    except Exception as exc:  # a courtesy at the end of a run that has succeeded
        logger.warning("Could not list this run's results: %s", exc)
