"""Cohort and sweep summaries: one row per subject (or run), mean and standard deviation per structure."""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path

from mvmm_monai.classes import CLASS_NAMES
from mvmm_monai.files import atomic_write, save_json

log = logging.getLogger(__name__)


def flagged(results: dict[str, dict]) -> list[str]:
    """The subjects whose quality control says not to trust the result (``qc.flag``)."""
    return [name for name, m in results.items() if (m.get("qc") or {}).get("flag")]


def summary_rows(results: dict[str, dict], failed: dict[str, str]) -> tuple[list[str], list[dict]]:
    """One row per subject: status, quality control (estimated myocardium Dice, flag, reasons),
    Dice per sequence and structure where labels exist, log-likelihood, iterations, seconds.
    Failed subjects come first, then those quality control flagged, then the rest."""
    keys = sorted({f"dice/{seq}/{k}" for m in results.values() for seq, d in m.get("dice", {}).items() for k in d})
    header = ["subject", "status", "qc_score", "qc_flag", *keys, "log_likelihood", "iterations", "seconds", "qc_reasons", "error"]
    rows = [{"subject": name, "status": "failed", "error": err} for name, err in failed.items()]
    marked = set(flagged(results))
    for name in sorted(results, key=lambda n: n not in marked):
        m, qc = results[name], results[name].get("qc") or {}
        row = {"subject": name, "status": "flagged" if name in marked else "ok", "log_likelihood": m.get("log_likelihood"),
               "iterations": m.get("iterations"), "seconds": m.get("seconds"), "error": "",
               "qc_score": qc.get("score"), "qc_flag": qc.get("flag"), "qc_reasons": "; ".join(qc.get("reasons", []))}
        for seq, d in m.get("dice", {}).items():
            row.update({f"dice/{seq}/{k}": v for k, v in d.items()})
        rows.append(row)
    return header, rows


def mean_std(rows: list[dict], keys: list[str]) -> tuple[dict, dict]:
    mean, std = {}, {}
    for k in keys:
        vals = [r[k] for r in rows if r.get("status") != "failed" and isinstance(r.get(k), (int, float)) and not math.isnan(r[k])]
        if vals:
            m = sum(vals) / len(vals)
            mean[k] = m
            std[k] = (sum((v - m) ** 2 for v in vals) / max(len(vals) - 1, 1)) ** 0.5
    return mean, std


def write_table(path_stem: Path, header: list[str], rows: list[dict], extra_rows: list[dict] = ()) -> None:
    """``<stem>.csv`` and ``<stem>.md`` (both written atomically)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=header, extrasaction="ignore")
    w.writeheader()
    for r in [*rows, *extra_rows]:
        w.writerow(r)
    atomic_write(path_stem.with_suffix(".csv"), lambda tmp: Path(tmp).write_text(buf.getvalue()))

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in [*rows, *extra_rows]:
        lines.append("| " + " | ".join(fmt(r.get(h)) for h in header) + " |")
    atomic_write(path_stem.with_suffix(".md"), lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))


def write_cohort_summary(out: Path, results: dict[str, dict], failed: dict[str, str]) -> dict:
    header, rows = summary_rows(results, failed)
    keys = ["qc_score"] + [h for h in header if h.startswith("dice/")] + ["log_likelihood", "seconds"]
    mean, std = mean_std(rows, keys)
    write_table(out / "cohort_summary", header, rows,
                [{"subject": "mean", **mean}, {"subject": "std", **std}])
    marked = flagged(results)
    summary = {"subjects": list(results), "failed": failed, "flagged": marked, "mean": mean, "std": std,
               "classes": list(CLASS_NAMES)}
    save_json(out / "cohort_summary.json", summary)
    log.info("cohort: %d fitted (%d flagged by quality control%s), %d failed; summary in %s", len(results), len(marked),
             f": {', '.join(marked)}" if marked else "", len(failed), out / "cohort_summary.md")
    return summary


def read_results(out: Path, names: list[str]) -> tuple[dict[str, dict], dict[str, str]]:
    """Collect what the shards wrote: ``<subject>/metrics.json`` or ``<subject>/error.txt``."""
    import json

    results, failed = {}, {}
    for name in names:
        metrics, error = out / name / "metrics.json", out / name / "error.txt"
        if metrics.is_file():
            results[name] = json.loads(metrics.read_text())
        else:
            failed[name] = error.read_text().strip() if error.is_file() else "no result (the process fitting it died)"
    return results, failed
