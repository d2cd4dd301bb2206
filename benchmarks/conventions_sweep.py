#!/usr/bin/env python
"""Dice of saved real MyoPS fits relabelled with other labelling conventions (the ``postprocess``
group): minimum wall thicknesses (``postprocess.min_wall_mm``), endocardium medians
(``postprocess.endocardium_median_deg``), blood rims (``postprocess.blood_rim``), epicardium
medians (``postprocess.epicardium_median_deg``), one RV region per slice or not
(``postprocess.rv_main_region``), wall rims (``postprocess.wall_rim``, ``postprocess.wall_rim_mm``)
and the rims' reference, the whole heart or each slice (``postprocess.rim_reference``), every
combination of the values given.

    .venv/bin/python benchmarks/conventions_sweep.py --fits OUT/A [OUT/B ...] [--root DIR] [--walls 6] \
        [--medians 32] [--rims C0:0.25,T2:0] [--epicardium 0,10,20,32,45,60] [--rv-main off,on] \
        [--wall-rims off T2:-0.25 ...] [--wall-rim-depths 0,2] [--rim-references heart,slice] [--folds 5] [--record NAME]

Each ``OUT/*`` is a folder of fits (``benchmarks/crossval.py --out``'s variant folders,
``benchmarks/real_myops.py --out``; any ``postprocess``): their ``CaseN/CaseN_posterior.nii.gz`` is
the mixture's posterior, never relabelled, so the replay below is exactly what a fit with those
settings gives. Every combination is applied the way a fit applies it
(:func:`mvmm_monai.conventions.labelling.follow_labelling_conventions`: the wall, the cavity fill,
the endocardium median, the blood rim and the wall rim on the case's images as a fit scales them
within its region of interest, the epicardium median, then the RV's main region), and the labels are scored on the LGE grid against
``CaseN_gd`` (myocardium = 200 + 1220 + 2221). No fit is rerun, so a sweep takes a minute.

A setting is *chosen* per fold (``--folds``, interleaved as ``benchmarks/crossval.py``: the i-th case
of the sorted cases in fold i mod k) by its Dice averaged over the three structures and the other
folds' cases only,
and scored on the held-out fold: with cross-validated fits (each fold's atlas from the other
folds), the chosen row is a cross-validated figure. Writes ``benchmarks/results/NAME.json``
(default ``conventions_sweep``; ``--record ''``: none). ``--smooth-before-fill`` replays the order
that was rejected (the endocardium median before the cavity fill, no rim, no epicardium median).
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
from crossval import folds_of
from record import add_record_option, write_record

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
    case_dir: Path, root: Path, settings: list[tuple[float, float, dict[str, float], float, bool, dict[str, float], float, str]],
    smooth_before_fill: bool = False,
) -> list[list[float]]:
    """Dice of myocardium, LV and RV for each (wall, median, rim, epicardium, RV main region, wall
    rim, wall rim depth, rim reference) of ``settings``, in their order."""
    fit = load_saved_fit(case_dir, root)
    posterior, spacing = fit.posterior, fit.spacing
    seen = None  # the case's images, read once a rim needs them
    out = []
    for wall, median, fractions, epicardium, rv_main, wall_rim, depth, reference in settings:
        if smooth_before_fill:  # the rejected order: the raw pool's notches pull the median in
            final = fill_lv_cavity(smooth_endocardium(thin_lv_at_wall(posterior, spacing, wall), spacing, median))
        else:
            if (fractions or wall_rim) and seen is None:
                seen = saved_fit_images(case_dir, root, fit)
            final = follow_labelling_conventions(
                posterior, spacing, min_wall_mm=wall, endocardium_median_deg=median,
                blood_rim={seen.sequences.index(k): v for k, v in fractions.items()} if fractions else None,
                images=seen.images if seen else None, coverage=seen.coverage if seen else None,
                epicardium_median_deg=epicardium, rv_main_region=rv_main,
                wall_rim={seen.sequences.index(k): v for k, v in wall_rim.items()} if wall_rim else None, wall_rim_mm=depth,
                rim_reference=reference,
            )
        out.append(fit.dice(final.argmax(0).numpy()))
    return out


def main() -> None:
    ap = argument_parser(__doc__, myops=True, overrides=False)
    ap.add_argument("--fits", type=Path, nargs="+", required=True, help="folders of saved fits (CaseN/CaseN_posterior.nii.gz)")
    ap.add_argument("--walls", default="6", help="comma-separated minimum walls, mm")
    ap.add_argument("--medians", default="32", help="comma-separated endocardium median half-windows, degrees")
    ap.add_argument("--rims", nargs="+", default=["C0:0.25,T2:0"], help="blood rims: off, or SEQ:FRACTION,... (e.g. C0:0.25,T2:0)")
    ap.add_argument("--epicardium", default="0,10,20,32,45,60", help="comma-separated epicardium median half-windows, degrees")
    ap.add_argument("--rv-main", default="off,on", help="comma-separated: off and/or on (postprocess.rv_main_region)")
    ap.add_argument("--wall-rims", nargs="+", default=["off"], help="wall rims: off, or SEQ:FRACTION,... (e.g. T2:-0.25)")
    ap.add_argument("--wall-rim-depths", default="0", help="comma-separated wall rim depths, mm (0: one voxel)")
    ap.add_argument("--rim-references", default="heart", help="comma-separated: heart and/or slice (postprocess.rim_reference)")
    ap.add_argument("--folds", type=int, default=5, help="folds of the per-fold choice (interleaved as benchmarks/crossval.py)")
    ap.add_argument("--smooth-before-fill", action="store_true", help="median before the cavity fill (not what a fit does; no rim)")
    add_record_option(ap, "conventions_sweep")
    args = parse_args(ap, quiet=True)
    sequences = MyoPSDataset(args.root).sequences
    rims = {r: parse_rim(r, sequences) for r in [*args.rims, *args.wall_rims]}  # a bad one fails before any work
    rv_main = args.rv_main.split(",")
    if not rv_main or set(rv_main) - {"off", "on"}:
        ap.error(f"--rv-main {args.rv_main}: give off, on or off,on")
    if args.smooth_before_fill and (any(rims.values()) or args.epicardium != "0" or rv_main != ["off"]):
        ap.error("--smooth-before-fill replays the rejected order (median before the fill) alone: use --rims off --epicardium 0 --rv-main off")
    depths = args.wall_rim_depths.split(",")
    references = args.rim_references.split(",")
    if not references or set(references) - {"heart", "slice"}:
        ap.error(f"--rim-references {args.rim_references}: give heart, slice or heart,slice")
    keys = [(w, m, r, e, v, x, d, h) for w in args.walls.split(",") for m in args.medians.split(",") for r in args.rims
            for e in args.epicardium.split(",") for v in rv_main for x in args.wall_rims for d in (depths if x != "off" else ["0"])
            for h in references]
    settings = [(float(w), float(m), rims[r], float(e), v == "on", rims[x], float(d), h) for w, m, r, e, v, x, d, h in keys]
    dirs = [case_dir for fits in args.fits for case_dir in saved_fit_dirs(fits)]
    cases = [d.name for d in dirs]
    if len(set(cases)) != len(cases):
        raise SystemExit("--fits: a case appears in more than one folder (give one variant's fits)")
    scores = np.array([case_scores(d, args.root, settings, args.smooth_before_fill) for d in dirs])  # [case][setting][structure]
    names = [f"wall {float(w):g} mm, endocardium {float(m):g} deg, rim {r}, epicardium {float(e):g} deg, one RV region {v}"
             + ("" if x == "off" else f", wall rim {x} {float(d):g} mm") + (", rims per slice" if h == "slice" else "")
             for w, m, r, e, v, x, d, h in keys]
    order = sorted(range(len(cases)), key=lambda i: cases[i])
    folds = folds_of([cases[i] for i in order], args.folds)
    fold_of = {c: f for f, members in enumerate(folds) for c in members}
    chosen, chosen_scores = [], np.zeros((len(cases), len(NAMES)))
    for f in range(len(folds)):
        held = np.array([fold_of[c] == f for c in cases])
        best = int(np.argmax(scores[~held].mean((0, 2))))  # mean Dice of the structures on the other folds' cases
        chosen.append(names[best])
        chosen_scores[held] = scores[held, best]
    means = scores.mean(0)
    rows = [[n, *(float(v) for v in row)] for n, row in zip(names, means)]
    rows.append([f"chosen per fold ({'; '.join(sorted(set(chosen), key=chosen.index))})", *(float(v) for v in chosen_scores.mean(0))])
    for row in rows:
        print(f"{row[0]}: " + ", ".join(f"{k} {v:.4f}" for k, v in zip(NAMES, row[1:])))
    if args.record:
        write_record(args.record, {
            "fits": [str(f) for f in args.fits],
            "cases": cases,
            "settings": names,
            "dice": {c: {n: dict(zip(NAMES, map(float, s))) for n, s in zip(names, case_rows)} for c, case_rows in zip(cases, scores)},
            "chosen_per_fold": chosen,
            "folds": folds,
            # against the first setting: cases whose myocardium / RV Dice rose, and fell
            "vs_first_setting": {n: {f"{s}_{way}": int((sign * (scores[:, i, j] - scores[:, 0, j]) > 1e-9).sum())
                                     for j, s in ((0, "myocardium"), (2, "rv")) for way, sign in (("up", 1), ("down", -1))}
                                 for i, n in enumerate(names)},
        }, table={
            "columns": ["labelling conventions (postprocess)", *(f"LGE {n} Dice (mean)" for n in NAMES)],
            "rows": rows,
            "caption": f"The saved fits of {len(cases)} MyoPS cases ({', '.join(str(f) for f in args.fits)}) relabelled with each "
                       f"setting (no refit), LGE-grid Dice against the manual labels; 'chosen per fold' picks the setting by its "
                       f"Dice averaged over the three structures on the other {args.folds - 1} folds' cases.",
        })


if __name__ == "__main__":
    main()
