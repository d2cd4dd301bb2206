#!/usr/bin/env python
"""A copy of the MyoPS folder whose bSSFP (C0) slices are moved onto LGE by image similarity: an
experiment, not kept (RESULTS 5j).

    .venv/bin/python benchmarks/experiments/c0_ncc_alignment.py --fits OUT/A OUT/B --out DIR [--root DIR]

For each of Case3001..Case3015, every C0 slice gets the whole-pixel in-plane translation (within
+-6 pixels) that maximises the normalised cross-correlation with the LGE slice, over the heart
dilated by 15 pixels, and is moved by it (nearest neighbour). The heart is the placed atlas's
(myocardium + LV probability > 0.5, from ``CaseN_atlas_warped.nii.gz`` of the fits under
``--fits``, i.e. no label) where a fit exists, else the manual label's (atlas cases that are never
fitted). LGE, T2 and the label are linked unchanged. ``DIR/shifts.json`` records the shifts.
Then run the two 5c fold commands with ``--root DIR``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import argument_parser, parse_args  # noqa: E402


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum() + 1e-9))


def heart_mask(case: str, root: Path, fits: dict[str, Path], lge: nib.Nifti1Image) -> np.ndarray:
    if case not in fits:
        return np.asarray(nib.load(root / case / f"{case}_gd.nii.gz").dataobj) > 0
    warped = nib.load(fits[case] / f"{case}_atlas_warped.nii.gz")
    prob = np.asarray(warped.dataobj)
    off = np.round((np.linalg.inv(lge.affine) @ warped.affine)[:3, 3]).astype(int)
    heart = np.zeros(lge.shape, dtype=bool)
    inner = (prob[..., 1] + prob[..., 2]) > 0.5
    heart[off[0] : off[0] + inner.shape[0], off[1] : off[1] + inner.shape[1], off[2] : off[2] + inner.shape[2]] = inner
    return heart


def main() -> None:
    ap = argument_parser(__doc__, myops=True, overrides=False)
    ap.add_argument("--fits", type=Path, nargs="+", required=True, help="benchmarks/real_myops.py --out folders")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--reach", type=int, default=6, help="largest shift searched, pixels")
    args = parse_args(ap)
    fits = {d.name: d for f in args.fits for d in f.iterdir() if d.is_dir() and d.name.startswith("Case")}
    shifts = {}
    for number in range(3001, 3016):
        case = f"Case{number}"
        (args.out / case).mkdir(parents=True, exist_ok=True)
        for seq in ("LGE", "T2", "gd"):
            link = args.out / case / f"{case}_{seq}.nii.gz"
            if not link.exists():
                os.symlink((args.root / case / f"{case}_{seq}.nii.gz").resolve(), link)
        lge_img = nib.load(args.root / case / f"{case}_LGE.nii.gz")
        lge = np.asarray(lge_img.dataobj, dtype=float)
        c0_img = nib.load(args.root / case / f"{case}_C0.nii.gz")
        c0 = np.asarray(c0_img.dataobj)
        heart = heart_mask(case, args.root, fits, lge_img)
        moved, case_shifts = c0.copy(), []
        for z in range(lge.shape[2]):
            near = ndimage.binary_dilation(heart[..., z], iterations=15)
            if not near.any():
                case_shifts.append((0, 0))
                continue
            xs, ys = np.where(near)
            x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
            r = args.reach
            scores = {
                (dx, dy): ncc(lge[x0:x1, y0:y1, z], c0[x0 + dx : x1 + dx, y0 + dy : y1 + dy, z].astype(float))
                for dx in range(-r, r + 1)
                for dy in range(-r, r + 1)
            }
            dx, dy = max(scores, key=scores.get)
            case_shifts.append((dx, dy))
            moved[..., z] = ndimage.shift(c0[..., z], (-dx, -dy), order=0, mode="nearest")
        shifts[case] = case_shifts
        nib.save(nib.Nifti1Image(moved, c0_img.affine, c0_img.header), args.out / case / f"{case}_C0.nii.gz")
        print(case, case_shifts, flush=True)
    (args.out / "shifts.json").write_text(json.dumps(shifts))


if __name__ == "__main__":
    main()
