#!/usr/bin/env python
"""Images cut to a smaller field of view than the shared ones: is the heart still found?

The shared MyoPS images show the whole chest (a field of view of 294-379 mm); releases cut around
the heart are common. This script cuts each shared case to a square field of view of ``--fovs``
millimetres whose centre lies ``--offset-mm`` from the heart's in-plane centre along each in-plane
axis (the heart is seldom centred: 15 mm puts its centre 21 mm off), every file of the case on the
same voxels (labels included), and fits each version fully automatically as
``benchmarks/crossval.py`` does (each fold's atlas built from the other folds' original cases),
once per ``--variant``, scoring each on its own grid. ``full``: the cases as given.

    .venv/bin/python benchmarks/field_of_view.py [--root DIR] [--fovs 180 150] [--offset-mm 15] [--full] \
        [--variant NAME=OVERRIDE[,OVERRIDE...] ...] [--atlases DIR] [--cases Case3001..Case3025] \
        [--folds 5] [--jobs 2] [--out DIR] [--record NAME] [hydra overrides common to every fit ...]

Reports what ``benchmarks/heart_size.py`` reports, per version and variant. Writes
``benchmarks/results/NAME.json`` (default ``field_of_view``).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from common import argument_parser, parse_args
from crossval import STRUCTS
from heart_size import add_options, fit_versions, setup
from record import write_record

from mvmm_monai.files import save_nifti


def cut_case(src: Path, dst: Path, fov_mm: float, offset_mm: float) -> None:
    """Write case folder ``src`` into ``dst`` cut in-plane to ``fov_mm`` x ``fov_mm`` (whole voxels,
    the LGE grid's) centred ``offset_mm`` beyond the heart's centre (the label's centroid) along the
    first in-plane axis and before it along the second, kept inside the image; every file on the
    same voxels, its origin moved with the cut."""
    case = src.name
    label = nib.load(src / f"{case}_gd.nii.gz")
    spacing = np.asarray(label.header.get_zooms()[:2], dtype=float)
    centre = np.argwhere(np.asarray(label.dataobj) > 0)[:, :2].mean(0) + np.array([offset_mm, -offset_mm]) / spacing
    size = np.round(fov_mm / spacing).astype(int)
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.glob("*.nii.gz")):
        img = nib.load(path)
        shape = np.asarray(img.shape[:2])
        if not np.allclose(img.header.get_zooms()[:2], spacing) or (size > shape).any():
            raise SystemExit(f"{path}: not on the label's in-plane grid, or smaller than {fov_mm} mm")
        lo = np.clip(np.round(centre - size / 2).astype(int), 0, shape - size)
        data = np.asanyarray(img.dataobj)[lo[0] : lo[0] + size[0], lo[1] : lo[1] + size[1]]
        affine = img.affine.copy()
        affine[:3, 3] = (img.affine @ np.array([lo[0], lo[1], 0.0, 1.0]))[:3]
        save_nifti(dst / path.name, data, affine)


def main() -> None:
    ap = argument_parser(__doc__, myops=True, threads=1)
    ap.add_argument("--fovs", type=float, nargs="*", default=[180.0, 150.0], help="fields of view (mm)")
    ap.add_argument("--offset-mm", type=float, default=15.0, help="the cut's centre from the heart's, along each in-plane axis")
    ap.add_argument("--full", action="store_true", help="also fit the cases as given")
    add_options(ap, "field_of_view")
    args = parse_args(ap)
    if any(f <= 0 for f in args.fovs) or not (args.fovs or args.full):
        raise SystemExit(f"--fovs must be > 0 (or give --full), got {args.fovs}")
    cases, folds, atlases = setup(args)
    versions = {"full": args.root} if args.full else {}
    for f in args.fovs:
        versions[f"fov{f:g}"] = args.out / f"data_fov{f:g}"
        for c in cases:
            cut_case(args.root / c, versions[f"fov{f:g}"] / c, f, args.offset_mm)
    figures = {"fovs": args.fovs, "offset_mm": args.offset_mm, **fit_versions(args, versions, cases, folds, atlases)}
    if not args.record:
        return
    table_rows = []
    for v in versions:
        for name in figures["variants"]:
            s = figures["results"][f"{v}/{name}"]["summary"]
            table_rows.append([v if v == "full" else f"{v[3:]} mm", name, *(f"{s['mean'][c]:.3f}" for c in STRUCTS),
                               f"{s['min_myocardium']:.3f}", len(s["below_0.70"]), len(s["flagged"]), len(s["unflagged_below_0_70"]),
                               f"{s['seconds']:.1f}"])
    write_record(args.record, figures, table={
        "columns": ["field of view", "setting", "LGE myocardium", "LV", "RV", "worst myocardium", "cases < 0.70", "qc flagged",
                    "< 0.70 not flagged", "s per fit"],
        "rows": table_rows,
        "caption": f"The {len(cases)} shared MyoPS cases ({args.cases}) cut to square fields of view centred {args.offset_mm:g} mm from "
                   f"the heart along each in-plane axis ('full': as given, 294-379 mm), {args.folds}-fold cross-validated (each fold's "
                   "atlas from the other folds' original cases), fully automatic; mean LGE Dice on each version's own grid.",
    })


if __name__ == "__main__":
    main()
