#!/usr/bin/env python
"""Where along the ventricle fully automatic fits lose: Dice and volume ratio per structure at the
apical, middle and basal third of each heart, from saved fits.

    .venv/bin/python benchmarks/level_dice.py --fits DIR [--root DIR] [--record NAME]

``--fits``: one variant folder of ``benchmarks/crossval.py`` (``DIR/<case>/<case>_LGE_seg.nii.gz``,
each fitted with an atlas from the other folds). The slices where the manual label has heart are
split into thirds along the stack (apex and base told apart by the LV's area: the apex is the end
where the LV is smaller). Per level and structure: Dice (summed over the cases' voxels of that
level, and the per-case mean), and the volume ratio predicted / manual (above 1: over-segmented);
the share of the manual slices where the fit has no such structure at all tells missed slices
from misdrawn ones. Where a structure's errors lie: how far its centroid is from the manual one on
each slice, the share of its false and of its missed voxels that are background (not another
structure: the boundary with the surroundings, or the structure drawn elsewhere), and, for the RV,
the angle between its direction from the LV's centre in the fit and in the manual label (the
heart's turn about its long axis, slice by slice). Writes ``benchmarks/results/NAME.json``
(default ``level_dice``).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from common import argument_parser, parse_args
from record import add_record_option, write_record

from mvmm_monai.classes import MYOPS_LABELS

LEVELS = ("apex", "mid", "base")
STRUCTS = {"myocardium": 1, "lv": 2, "rv": 3}


def _centre_mm(mask: np.ndarray, mm: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0) * mm


def centroid_offset(pred: np.ndarray, true: np.ndarray, mm: np.ndarray) -> float:
    """Distance (mm) between the centroids of two non-empty 2D masks."""
    return float(np.linalg.norm(_centre_mm(pred, mm) - _centre_mm(true, mm)))


def angle_about_lv(pred: np.ndarray, true: np.ndarray, mm: np.ndarray) -> float | None:
    """Unsigned angle (degrees) between the direction from the LV's centroid to the RV's in the fit's
    class map of one slice and in the manual one; None where either lacks an LV or an RV."""
    vectors = []
    for m in (pred, true):
        if not ((m == STRUCTS["lv"]).any() and (m == STRUCTS["rv"]).any()):
            return None
        vectors.append(_centre_mm(m == STRUCTS["rv"], mm) - _centre_mm(m == STRUCTS["lv"], mm))
    a, b = vectors
    cos = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-9))
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def case_levels(fits: Path, root: Path, case: str) -> dict:
    seg = np.asarray(nib.load(fits / case / f"{case}_LGE_seg.nii.gz").dataobj).astype(np.int64)
    gd = np.asarray(nib.load(root / case / f"{case}_gd.nii.gz").dataobj).astype(np.int64)
    import torch

    pred = MYOPS_LABELS.to_classes(torch.from_numpy(seg), "fit").numpy()
    truth = MYOPS_LABELS.to_classes(torch.from_numpy(gd), "label").numpy()
    mm = np.asarray(nib.load(root / case / f"{case}_gd.nii.gz").header.get_zooms()[:2], dtype=np.float64)
    zs = [z for z in range(truth.shape[2]) if (truth[..., z] > 0).any()]
    thirds = np.array_split(np.array(zs), 3)
    lv = [(truth[..., z] == 2).sum() for z in zs]
    if np.mean(lv[: len(lv) // 2 or 1]) > np.mean(lv[len(lv) // 2:]):  # the LV shrinks towards the apex
        thirds = thirds[::-1]
    out = {}
    for level, z in zip(LEVELS, thirds):
        per = {}
        for name, k in STRUCTS.items():
            p, t = pred[..., z] == k, truth[..., z] == k
            missed = [bool(t[..., i].any() and not p[..., i].any()) for i in range(len(z))]
            per[name] = {"inter": int((p & t).sum()), "pred": int(p.sum()), "true": int(t.sum()),
                         "missed_slices": int(sum(missed)), "slices_with": int(sum(t[..., i].any() for i in range(len(z)))),
                         # where the errors lie: the fit's false voxels of this structure that are manual background,
                         # and the manual voxels it misses that it calls background (the rest: another structure)
                         "false_on_background": int((p & ~t & (truth[..., z] == 0)).sum()),
                         "missed_as_background": int((t & ~p & (pred[..., z] == 0)).sum()),
                         "centroid_offsets_mm": [centroid_offset(p[..., i], t[..., i], mm) for i in range(len(z))
                                                 if p[..., i].any() and t[..., i].any()]}
        # the RV's direction from the LV's centre, fit against manual (the heart's turn about its long axis)
        per["rv"]["angles_about_lv_deg"] = [
            a for i in range(len(z))
            if (a := angle_about_lv(pred[..., z][..., i], truth[..., z][..., i], mm)) is not None
        ]
        out[level] = per
    return out


def main() -> None:
    ap = argument_parser(__doc__, myops=True, overrides=False)
    ap.add_argument("--fits", type=Path, required=True)
    add_record_option(ap, "level_dice")
    args = parse_args(ap)
    cases = sorted(p.name for p in args.fits.iterdir() if (p / f"{p.name}_LGE_seg.nii.gz").is_file())
    if not cases:
        raise SystemExit(f"{args.fits}: no fits (<case>/<case>_LGE_seg.nii.gz) found")
    rows = {c: case_levels(args.fits, args.root, c) for c in cases}
    figures: dict = {"cases": cases, "levels": {}}
    table = []
    for level in LEVELS:
        figures["levels"][level] = {}
        for name in STRUCTS:
            cells = [rows[c][level][name] for c in cases]
            inter, pred, true = (sum(x[k] for x in cells) for k in ("inter", "pred", "true"))
            per_case = [2 * x["inter"] / (x["pred"] + x["true"]) for x in cells if x["pred"] + x["true"] > 0]
            missed, present = sum(x["missed_slices"] for x in cells), sum(x["slices_with"] for x in cells)
            offsets = [o for x in cells for o in x["centroid_offsets_mm"]]
            false, lost = pred - inter, true - inter
            f = {"dice_pooled": 2 * inter / max(pred + true, 1), "dice_case_mean": float(np.mean(per_case)),
                 "volume_ratio": pred / max(true, 1), "missed_slices": missed, "manual_slices": present,
                 "centroid_offset_mm_median": float(np.median(offsets)) if offsets else None,
                 "false_on_background": sum(x["false_on_background"] for x in cells) / max(false, 1),
                 "missed_as_background": sum(x["missed_as_background"] for x in cells) / max(lost, 1)}
            angles = [a for x in cells for a in x.get("angles_about_lv_deg", [])]
            if name == "rv":
                f["angle_about_lv_deg_median"] = float(np.median(angles)) if angles else None
                f["angles_over_20_deg"] = [sum(a > 20 for a in angles), len(angles)]
            figures["levels"][level][name] = f
            table.append([level, name, f"{f['dice_case_mean']:.3f}", f"{f['volume_ratio']:.2f}", f"{missed}/{present}",
                          "–" if f["centroid_offset_mm_median"] is None else f"{f['centroid_offset_mm_median']:.1f}",
                          f"{100 * f['false_on_background']:.0f} % / {100 * f['missed_as_background']:.0f} %",
                          f"{f['angle_about_lv_deg_median']:.1f} ({f['angles_over_20_deg'][0]}/{f['angles_over_20_deg'][1]} over 20)"
                          if name == "rv" and f["angle_about_lv_deg_median"] is not None else "–"])
    figures["rows"] = rows
    print(json.dumps(figures["levels"], indent=1))
    if args.record:
        write_record(args.record, figures, table={
            "columns": ["level", "structure", "LGE Dice (mean over cases)", "volume fit / manual", "manual slices the fit misses",
                        "centroid offset, fit to manual (mm, median over slices)",
                        "errors against background: false voxels / missed voxels",
                        "RV direction from the LV, fit against manual (degrees, median; slices over 20)"],
            "rows": table,
            "caption": f"Dice by level on the LGE grids of {len(cases)} MyoPS cases (fully automatic cross-validated fits, "
                       f"{args.fits.name}): the slices with manual heart split into apical, middle and basal thirds.",
        })


if __name__ == "__main__":
    main()
