"""What a fit command runs: one subject, or a cohort (in one process, one subject after another or
``cohort.batch_size`` at a time; or sharded across devices), every subject into its own folder and
a summary of them all."""

from __future__ import annotations

import gc
import logging
import traceback
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig

from mvmm_monai.cohort.summary import write_cohort_summary
from mvmm_monai.config import build
from mvmm_monai.pipeline.fit import cohort_batch_size, fit_cohort, fit_subject

log = logging.getLogger(__name__)


def _subjects(cfg: DictConfig, dataset) -> list[str] | None:
    """``subject``: null (the first), a name, ``all``, or a list. ``None`` means a single fit."""
    sel = cfg.subject
    if sel is None:
        return None
    if isinstance(sel, str) and sel != "all":
        return None
    names = dataset.subjects() if sel == "all" else [str(x) for x in sel]
    if not names:
        raise ValueError(f"{dataset.name}: no subjects found")
    return names


@contextmanager
def heap_frozen():
    """Python's cyclic garbage collector left to the objects made inside the block: everything
    alive on entry (the imported torch, Lightning, MONAI and matplotlib, the caller's objects) is
    moved to the permanent generation (``gc.freeze``) and given back on exit (``gc.unfreeze``).
    Objects made during a fit still are collected as usual, but a full collection no longer walks
    the imported libraries' million objects: 0.4 s of a 1.5 s slice fit here (issue "Fast"). A
    caller that froze its heap itself keeps it frozen."""
    own = gc.get_freeze_count() == 0
    gc.freeze()
    try:
        yield
    finally:
        if own:
            gc.unfreeze()


def fit(cfg: DictConfig) -> dict:
    """Fit what ``cfg`` asks for and write the results under ``cfg.paths.output_dir``.

    One subject (``subject=NAME`` or null): returns the content of its ``metrics.json``. A cohort
    (``subject=all`` or ``subject=[a,b]``): every subject into its own folder, a failing subject
    reported with its error while the others go on, and ``cohort_summary.{csv,md}``; returns the
    summary (``{"subjects": [...], "failed": {...}, "mean": ..., "std": ...}``).
    """
    with heap_frozen():
        return _fit(cfg)


def _fit(cfg: DictConfig) -> dict:
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    cohort_batch_size(cfg)  # a bad value is refused before any work
    several = str(devices) not in ("1", "auto") or int(nodes) != 1
    dataset = build(cfg.data)
    names = _subjects(cfg, dataset)
    out = Path(cfg.paths.output_dir)
    if names is None:
        if several:
            raise ValueError(
                f"trainer.devices={devices}, trainer.num_nodes={nodes}: one subject is fitted on one device; "
                "several devices shard a cohort (subject=all or subject=[a,b,...])"
            )
        name = cfg.subject if cfg.subject is not None else dataset.subjects()[0]
        return fit_subject(cfg, dataset, name, out)
    if several:
        from mvmm_monai.cohort.distributed import run_cohort_distributed

        return run_cohort_distributed(cfg, names, out, fit_cohort)
    return run_cohort(cfg, dataset, names, out)


def run_cohort(cfg: DictConfig, dataset, names: list[str], out: Path) -> dict:
    """Fit ``names`` into ``out/<subject>/`` (:func:`~mvmm_monai.pipeline.fit.fit_cohort`) and
    write ``out/cohort_summary.*``."""
    results: dict[str, dict] = {}
    failed: dict[str, str] = {}
    for name, outcome in fit_cohort(cfg, dataset, names, out):
        if isinstance(outcome, Exception):  # a cohort goes on; the summary says what went wrong
            failed[name] = f"{type(outcome).__name__}: {outcome}"
            log.error("subject %s failed: %s\n%s", name, failed[name], "".join(traceback.format_exception(outcome, limit=3)))
        else:
            results[name] = outcome
    return write_cohort_summary(out, results, failed)
