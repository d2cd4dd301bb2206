#!/usr/bin/env python
"""Dice of saved real MyoPS fits relabelled with several minimum wall thicknesses (``postprocess.min_wall_mm``),
endocardium medians (``postprocess.endocardium_median_deg``) and blood rims (``postprocess.blood_rim``).

    .venv/bin/python benchmarks/min_wall_sweep.py --fits OUT/A OUT/B [--root DIR] [--walls 0,5,6,8] [--medians 0,32] [--rims off C0:0.25,T2:0] [--smooth-before-fill]

Each ``OUT/*`` is a ``benchmarks/real_myops.py --out`` folder of fits (any ``postprocess``: their
``CaseN/CaseN_posterior.nii.gz`` is the mixture's posterior, never relabelled): the replay below is
exactly what a fit with those settings gives. Every pair of wall and median is applied to it the way
a fit applies them (:func:`mvmm_monai.conventions.labelling.follow_labelling_conventions`: the wall, the
cavity fill again, the median, then the blood rim on the case's images as a fit scales them, within
its region of interest), and the labels are
scored on the LGE grid against ``CaseN_gd`` (myocardium = 200 + 1220 + 2221). No fit is rerun, so a
sweep takes seconds; a value chosen here is then run in full (``benchmarks/real_myops.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from common import (
    argument_parser,
    load_saved_fit,
    parse_args,
    saved_fit_dirs,
    saved_fit_images,
)

from mvmm_monai.conventions.labelling import (
    fill_lv_cavity,
    follow_labelling_conventions,
    smooth_endocardium,
    thin_lv_at_wall,
)
from mvmm_monai.data.datasets import MyoPSDataset

NAMES = ("myocardium", "lv", "rv")


def parse_rim(text: str, sequences: tuple[str, ...]) -> dict[str, float]:
    """``off`` -> {}; ``C0:0.25,T2:0`` -> {"C0": 0.25, "T2": 0.0} (names among ``sequences``)."""
    if text == "off":
        return {}
    rim = {k: float(v) for k, v in (item.split(":") for item in text.split(","))}
    unknown = sorted(set(rim) - set(sequences))
    if unknown:
        raise SystemExit(f"--rims {text}: {unknown} not among {sequences}")
    return rim


def case_scores(
    case_dir: Path, root: Path, settings: list[tuple[float, float, dict[str, float]]], smooth_before_fill: bool = False
) -> list[list[float]]:
    """Dice of myocardium, LV and RV for each (wall, median, rim) of ``settings``, in their order."""
    fit = load_saved_fit(case_dir, root)
    posterior, spacing = fit.posterior, fit.spacing
    seen = None  # the case's images, read once a rim needs them
    out = []
    for wall, median, fractions in settings:
        if smooth_before_fill:  # the rejected order: the raw pool's notches pull the median in
            final = fill_lv_cavity(smooth_endocardium(thin_lv_at_wall(posterior, spacing, wall), spacing, median))
        else:
            if fractions and seen is None:
                seen = saved_fit_images(case_dir, root, fit)
            final = follow_labelling_conventions(
                posterior, spacing, min_wall_mm=wall, endocardium_median_deg=median,
                blood_rim={seen.sequences.index(k): v for k, v in fractions.items()} if fractions else None,
                images=seen.images if seen else None, coverage=seen.coverage if seen else None,
            )
        out.append(fit.dice(final.argmax(0).numpy()))
    return out


def main() -> None:
    ap = argument_parser(__doc__, myops=True, overrides=False)
    ap.add_argument("--fits", type=Path, nargs="+", required=True, help="benchmarks/real_myops.py --out folders")
    ap.add_argument("--walls", default="0,2,3,4,5,6,7,8,10", help="comma-separated minimum walls, mm")
    ap.add_argument("--medians", default="0", help="comma-separated endocardium median half-windows, degrees")
    ap.add_argument("--rims", nargs="+", default=["off"], help="blood rims: off, or SEQ:FRACTION,... (e.g. C0:0.25,T2:0)")
    ap.add_argument("--smooth-before-fill", action="store_true", help="median before the cavity fill (not what a fit does; no rim)")
    args = parse_args(ap)
    rims = {r: parse_rim(r, MyoPSDataset(args.root).sequences) for r in args.rims}  # a bad one fails before any work
    if args.smooth_before_fill and any(rims.values()):
        ap.error("--smooth-before-fill replays the rejected order (median before the fill), without a blood rim: use --rims off")
    keys = [(w, m, r) for w in args.walls.split(",") for m in args.medians.split(",") for r in args.rims]
    settings = [(float(w), float(m), rims[r]) for w, m, r in keys]
    scores = [case_scores(case_dir, args.root, settings, args.smooth_before_fill)
              for fits in args.fits for case_dir in saved_fit_dirs(fits)]  # [case][setting][structure]
    means = np.mean(scores, axis=0)
    print(f"| `postprocess.min_wall_mm` | `postprocess.endocardium_median_deg` | `postprocess.blood_rim` | {' | '.join(NAMES)} (mean over {len(scores)} cases) |")
    print("|---|---|---|" + "---|" * len(NAMES))
    for (w, m, r), row in zip(keys, means):
        print(f"| {float(w):g} | {float(m):g} | {r} | " + " | ".join(f"{v:.4f}" for v in row) + " |")


if __name__ == "__main__":
    main()
