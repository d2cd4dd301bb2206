"""Hydra multirun: one summary table of every run's settings, Dice and log-likelihood.

The :class:`SweepSummary` callback writes it in the process that launched the sweep, once every
job is done: with the basic launcher the jobs ran in that process, with the submitit launchers
(``hydra/launcher=slurm``, ``local``) in their own processes or nodes; the table is read from the
job folders either way. A sweep whose launching process ended before its SLURM jobs gets its
summary with ``python -m mvmm_monai.cohort.sweep SWEEP_DIR``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mvmm_monai.cohort.summary import write_table

log = logging.getLogger(__name__)


def collect_runs(sweep_dir: Path) -> tuple[list[str], list[dict]]:
    """Rows of ``summary``: one per job folder of ``sweep_dir`` (its overrides and its results)."""
    rows, override_keys, metric_keys = [], [], set()
    jobs = sorted((p for p in sweep_dir.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()),
                  key=lambda p: int(p.name) if p.name.isdigit() else p.name)
    for job in jobs:
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
        row: dict[str, Any] = {"run": job.name}
        for o in overrides:
            key, _, value = str(o).partition("=")
            key = key.lstrip("+~")
            if key not in override_keys:
                override_keys.append(key)
            row[key] = value
        metrics_file = job / "metrics.json"
        cohort_file = job / "cohort_summary.json"
        if metrics_file.is_file():
            m = json.loads(metrics_file.read_text())
            row["status"] = "ok"
            row["log_likelihood"] = m.get("log_likelihood")
            row["iterations"] = m.get("iterations")
            for seq, d in (m.get("dice") or {}).items():
                for k, v in d.items():
                    row[f"dice/{seq}/{k}"] = v
                    metric_keys.add(f"dice/{seq}/{k}")
        elif cohort_file.is_file():
            m = json.loads(cohort_file.read_text())
            row["status"] = f"cohort ({len(m['subjects'])} ok, {len(m['failed'])} failed)"
            for k, v in m["mean"].items():
                row[f"mean {k}"] = v
                metric_keys.add(f"mean {k}")
        else:
            row["status"] = "failed (no metrics.json)"
        rows.append(row)
    header = ["run", *override_keys, "status", *sorted(metric_keys), "log_likelihood", "iterations"]
    return header, rows


def write_sweep_summary(sweep_dir: str | Path) -> Path:
    """Write ``summary.csv`` and ``summary.md`` into ``sweep_dir``; returns the Markdown path."""
    sweep_dir = Path(sweep_dir)
    header, rows = collect_runs(sweep_dir)
    best = max((r for r in rows if r.get("status") == "ok"), key=lambda r: r.get("log_likelihood") or float("-inf"), default=None)
    write_table(sweep_dir / "summary", header, rows)
    if best is not None:
        log.info("sweep: %d runs; highest log-likelihood in run %s", len(rows), best["run"])
    return sweep_dir / "summary.md"


class SweepSummary(Callback):
    """Hydra callback: at the end of ``-m`` runs, summarise every run of the sweep."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path = write_sweep_summary(Path(config.hydra.sweep.dir))
        log.info("sweep summary: %s", path)


def main(argv: list[str] | None = None) -> None:
    """``python -m mvmm_monai.cohort.sweep SWEEP_DIR``: write the summary of a sweep folder."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mvmm_monai.cohort.sweep", description=main.__doc__)
    parser.add_argument("sweep_dir", type=Path, help="the sweep folder (hydra.sweep.dir): runs 0/, 1/, ...")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"sweep folder {args.sweep_dir} not found")
    print(write_sweep_summary(args.sweep_dir))


if __name__ == "__main__":
    main()
