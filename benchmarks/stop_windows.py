#!/usr/bin/env python
"""Where a fit would stop for each convergence window: one long fit, its per-iteration log, and the
stopping point and Dice each ``model.tol_window`` would have given.

    .venv/bin/python benchmarks/stop_windows.py [--root DIR] [--threads 1] [--iterations 150] [--skip-real] [hydra overrides...]

Rows: Case3018 (atlas from Case3001..Case3015, automatic placement) and synthetic patient2 (its
known misalignment), both ``registration=full registration.schedule.settle=false`` and a one-iteration window logged, forced to
``--iterations`` ICM iterations with the TensorBoard logger on. For each window w the table gives
the first iteration whose last w single-step relative changes are all below ``model.tol`` (the
registration schedule's guard included), the per-iteration Dice there (before the LV cavity fill,
as logged) and at 4x that iteration. It chose ``registration.min_tol_window`` (5) of ``registration=full``
and ``atlas_only``.
"""

from __future__ import annotations

import glob
import tempfile
from pathlib import Path

from common import argument_parser, parse_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mvmm_monai import build_atlas, compose_config, fit

WINDOWS = (1, 2, 3, 4, 5, 8)


def curves(out: Path, seq: str) -> tuple[list[float], dict[str, list[float]]]:
    """Per-iteration single-step relative change (logged with ``model.tol_window=1``) and Dice."""
    events = sorted(glob.glob(str(out / "tensorboard" / "**" / "events.out.tfevents.*"), recursive=True))
    acc = EventAccumulator(events[0], size_guidance={"scalars": 0})
    acc.Reload()
    rel = [e.value for e in acc.Scalars("em/relative_change")]
    dice = {k: [e.value for e in acc.Scalars(f"dice/{seq}/{k}")] for k in ("myocardium", "lv", "rv")}
    return rel, dice


def table(name: str, rel: list[float], dice: dict[str, list[float]], tol: float) -> None:
    n = len(rel)
    fmt = lambda i: " / ".join(f"{dice[k][i]:.3f}" for k in dice)  # noqa: E731
    for w in WINDOWS:
        stop = next((i for i in range(w - 1, n) if all(r < tol for r in rel[i - w + 1:i + 1])), None)
        if stop is None:
            print(f"| {name} | {w} | not within {n} | | |")
            continue
        later = min(4 * (stop + 1), n) - 1
        print(f"| {name} | {w} | {stop + 1} | {fmt(stop)} | {later + 1}: {fmt(later)} |")


def main() -> None:
    ap = argument_parser(__doc__, myops=True, threads=1)
    ap.add_argument("--iterations", type=int, default=150)
    ap.add_argument("--skip-real", action="store_true", help="the synthetic row only")
    args = parse_args(ap, quiet=True)
    work = Path(tempfile.mkdtemp(prefix="mvmm_stop_windows_"))
    common = ["registration=full", "registration.schedule.settle=false", "model.tol_window=1", "registration.min_tol_window=1", "callbacks.progress.refresh_rate=0",
              f"trainer.min_epochs={args.iterations}", f"trainer.max_epochs={args.iterations}", *args.overrides]
    runs = [("synthetic patient2", "DE", ["subject=patient2", "data.misalignment=true", f"paths.cache_dir={work / 'cache'}"])]
    if not args.skip_real:
        atlas = work / "atlas.nii.gz"
        build_atlas(compose_config([f"data.root={args.root}", "subjects=Case3001..Case3015", f"output={atlas}"], config_name="build_atlas"))
        runs.append(("Case3018", "LGE", ["data=myops", f"data.root={args.root}", "subject=Case3018", f"atlas.path={atlas}"]))
    print("| fit | window | stops at | Dice myo / LV / RV there (pre-fill) | at 4x that |")
    print("|---|---|---|---|---|")
    for name, seq, extra in runs:
        out = work / name.replace(" ", "_")
        cfg = compose_config([*extra, *common, f"paths.output_dir={out}"])
        fit(cfg)
        table(name, *curves(out, seq), float(cfg.model.tol))


if __name__ == "__main__":
    main()
