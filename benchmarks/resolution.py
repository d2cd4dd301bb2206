#!/usr/bin/env python
"""Coarser images than the shared ones: do the fit and its quality control hold?

The shared MyoPS images have in-plane voxels of 0.73 mm (interpolated); LGE is often acquired at
1.4-1.8 mm. This script makes such images from the shared cases: every sequence's ``K x K``
in-plane voxel blocks averaged into one voxel (the acquisition's partial volume; ``K`` of
``--coarsen``), the label map taken as each block's most frequent label, the slices as they are.
Every version is fitted fully automatically as ``benchmarks/crossval.py`` does (each fold's atlas
built from the other folds' original cases), once per ``--variant``, and scored on its own grid.

    .venv/bin/python benchmarks/resolution.py [--root DIR] [--coarsen 1 2] \
        [--variant NAME=OVERRIDE[,OVERRIDE...] ...] [--atlases DIR] [--cases Case3001..Case3025] \
        [--folds 5] [--jobs 2] [--out DIR] [--record NAME] [hydra overrides common to every fit ...]

Reports per case, version and variant what ``benchmarks/heart_size.py`` reports (LGE Dice, the
placement's heart size, the QC score, flag and reasons, seconds); per version and variant the
means, the cases below 0.70, and the fits quality control flags, good ones (myocardium Dice >=
0.80) among them. Writes ``benchmarks/results/NAME.json`` (default ``resolution``).
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


def coarser_case(src: Path, dst: Path, k: int) -> None:
    """Write case folder ``src`` into ``dst`` with ``k x k`` in-plane voxel blocks made one voxel:
    images averaged, the label map (``*_gd.nii.gz``) the block's most frequent label; the grid's
    first voxel centre moved to the first block's centre, the voxel size ``k`` times as large
    in-plane (a last row or column short of a block dropped)."""
    dst.mkdir(parents=True, exist_ok=True)
    files = sorted(src.glob("*.nii.gz"))
    if not files:
        raise SystemExit(f"{src}: no NIfTI files")
    for path in files:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
        x, y = (data.shape[0] // k) * k, (data.shape[1] // k) * k
        blocks = data[:x, :y].reshape(x // k, k, y // k, k, *data.shape[2:])
        if path.name.endswith("_gd.nii.gz"):
            flat = np.moveaxis(blocks, 2, 1).reshape(x // k, y // k, k * k, *data.shape[2:])
            values = np.unique(data)
            out = values[np.stack([(flat == v).sum(2) for v in values]).argmax(0)].astype(data.dtype)
        else:
            out = blocks.astype(np.float32).mean(axis=(1, 3))
        affine = img.affine.copy()
        affine[:3, 3] = (img.affine @ np.array([(k - 1) / 2, (k - 1) / 2, 0.0, 1.0]))[:3]
        affine[:3, :2] *= k
        save_nifti(dst / path.name, out, affine)


def main() -> None:
    ap = argument_parser(__doc__, myops=True, threads=1)
    ap.add_argument("--coarsen", type=int, nargs="+", default=[1, 2], help="in-plane voxel blocks made one voxel (1: as given)")
    add_options(ap, "resolution")
    args = parse_args(ap)
    if any(k < 1 for k in args.coarsen):
        raise SystemExit(f"--coarsen must be >= 1, got {args.coarsen}")
    cases, folds, atlases = setup(args)
    versions = {}
    for k in args.coarsen:
        versions[f"{k}x{k}"] = args.root if k == 1 else args.out / f"data_{k}x{k}"
        if k > 1:
            for c in cases:
                coarser_case(args.root / c, versions[f"{k}x{k}"] / c, k)
    figures = {"coarsen": args.coarsen, **fit_versions(args, versions, cases, folds, atlases)}
    if not args.record:
        return
    table_rows = []
    for k in args.coarsen:
        for name in figures["variants"]:
            s = figures["results"][f"{k}x{k}/{name}"]["summary"]
            table_rows.append([f"{k} x {k}", name, *(f"{s['mean'][c]:.3f}" for c in STRUCTS), f"{s['min_myocardium']:.3f}",
                               len(s["below_0.70"]), len(s["flagged"]), len(s["good_flagged"]), len(s["unflagged_below_0_70"]),
                               f"{s['seconds']:.1f}"])
    write_record(args.record, figures, table={
        "columns": ["in-plane voxels averaged", "setting", "LGE myocardium", "LV", "RV", "worst myocardium", "cases < 0.70",
                    "qc flagged", "... of them good (Dice >= 0.80)", "< 0.70 not flagged", "s per fit"],
        "rows": table_rows,
        "caption": f"The {len(cases)} shared MyoPS cases ({args.cases}) as given (0.73 mm in-plane) and with k x k in-plane voxels "
                   f"averaged into one, {args.folds}-fold cross-validated (each fold's atlas from the other folds' original cases), "
                   "fully automatic; mean LGE Dice on each version's own grid.",
    })


if __name__ == "__main__":
    main()
