#!/usr/bin/env python
"""Dice of saved real MyoPS fits relabelled with several minimum wall thicknesses (``model.min_wall_mm``).

    .venv/bin/python benchmarks/min_wall_sweep.py --fits OUT/A OUT/B [--root DIR] [--walls 0,5,6,8]

Each ``OUT/*`` is a ``benchmarks/real_myops.py --out`` folder of fits made with
``model.min_wall_mm=0`` (their ``CaseN/CaseN_posterior.nii.gz`` is the final posterior, cavity fill
included). Every wall is applied to it the way a fit applies it
(:func:`mvmm_monai.postprocess.thin_lv_at_wall`), then the cavity fill again, and the labels are
scored on the LGE grid against ``CaseN_gd`` (myocardium = 200 + 1220 + 2221). No fit is rerun, so a
sweep takes seconds; the fit itself thins before its first fill, so a value chosen here is then
run in full (RESULTS 5i).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from mvmm_monai.postprocess import fill_lv_cavity, thin_lv_at_wall

from common import argument_parser, parse_args

MYO_VALUES, LV_VALUE, RV_VALUE = (200, 1220, 2221), 500, 600
NAMES = ("myocardium", "lv", "rv")


def case_scores(case_dir: Path, root: Path, walls: list[float]) -> dict[float, list[float]]:
    case = case_dir.name
    img = nib.load(case_dir / f"{case}_posterior.nii.gz")  # [X, Y, Z, K] on the fit's (cropped) LGE grid
    posterior = torch.from_numpy(np.moveaxis(np.asarray(img.dataobj, dtype=np.float32), -1, 0))
    gd_img = nib.load(root / case / f"{case}_gd.nii.gz")
    gd = np.asarray(gd_img.dataobj)
    truth = np.select([np.isin(gd, MYO_VALUES), gd == LV_VALUE, gd == RV_VALUE], [1, 2, 3], 0)
    offset = np.round((np.linalg.inv(gd_img.affine) @ img.affine)[:3, 3]).astype(int)
    if (offset < 0).any() or any(o + s > g for o, s, g in zip(offset, posterior.shape[1:], gd.shape)):
        raise ValueError(f"{case_dir}: the posterior's grid does not lie inside {case}_gd's grid (offset {offset.tolist()})")
    spacing = tuple(float(v) for v in img.header.get_zooms()[:2])
    out = {}
    for wall in walls:
        labels = fill_lv_cavity(thin_lv_at_wall(posterior, spacing, wall)).argmax(0).numpy()
        full = np.zeros(gd.shape, dtype=np.int64)
        x, y, z = offset
        full[x : x + labels.shape[0], y : y + labels.shape[1], z : z + labels.shape[2]] = labels
        out[wall] = [2 * ((full == k) & (truth == k)).sum() / max((full == k).sum() + (truth == k).sum(), 1) for k in (1, 2, 3)]
    return out


def main() -> None:
    ap = argument_parser(__doc__, myops=True, overrides=False)
    ap.add_argument("--fits", type=Path, nargs="+", required=True, help="benchmarks/real_myops.py --out folders")
    ap.add_argument("--walls", default="0,2,3,4,5,6,7,8,10", help="comma-separated minimum walls, mm")
    args = parse_args(ap)
    walls = [float(w) for w in args.walls.split(",")]
    rows = {w: [] for w in walls}
    for fits in args.fits:
        cases = sorted(d for d in fits.iterdir() if d.is_dir() and (d / f"{d.name}_posterior.nii.gz").is_file())
        if not cases:
            raise FileNotFoundError(f"{fits}: no CaseN/CaseN_posterior.nii.gz (a benchmarks/real_myops.py --out folder?)")
        for case_dir in cases:
            for w, d in case_scores(case_dir, args.root, walls).items():
                rows[w].append(d)
    print(f"| `model.min_wall_mm` | {' | '.join(NAMES)} (mean over {len(rows[walls[0]])} cases) |")
    print("|---|" + "---|" * len(NAMES))
    for w in walls:
        print(f"| {w:g} | " + " | ".join(f"{v:.4f}" for v in np.mean(rows[w], axis=0)) + " |")


if __name__ == "__main__":
    main()
