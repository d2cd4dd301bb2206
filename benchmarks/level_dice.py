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
from misdrawn ones. Writes ``benchmarks/results/NAME.json`` (default ``level_dice``).
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


def case_levels(fits: Path, root: Path, case: str) -> dict:
    seg = np.asarray(nib.load(fits / case / f"{case}_LGE_seg.nii.gz").dataobj).astype(np.int64)
    gd = np.asarray(nib.load(root / case / f"{case}_gd.nii.gz").dataobj).astype(np.int64)
    import torch

    pred = MYOPS_LABELS.to_classes(torch.from_numpy(seg), "fit").numpy()
    truth = MYOPS_LABELS.to_classes(torch.from_numpy(gd), "label").numpy()
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
                         "missed_slices": int(sum(missed)), "slices_with": int(sum(t[..., i].any() for i in range(len(z))))}
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
            f = {"dice_pooled": 2 * inter / max(pred + true, 1), "dice_case_mean": float(np.mean(per_case)),
                 "volume_ratio": pred / max(true, 1), "missed_slices": missed, "manual_slices": present}
            figures["levels"][level][name] = f
            table.append([level, name, f"{f['dice_case_mean']:.3f}", f"{f['volume_ratio']:.2f}", f"{missed}/{present}"])
    figures["rows"] = rows
    print(json.dumps(figures["levels"], indent=1))
    if args.record:
        write_record(args.record, figures, table={
            "columns": ["level", "structure", "LGE Dice (mean over cases)", "volume fit / manual", "manual slices the fit misses"],
            "rows": table,
            "caption": f"Dice by level on the LGE grids of {len(cases)} MyoPS cases (fully automatic cross-validated fits, "
                       f"{args.fits.name}): the slices with manual heart split into apical, middle and basal thirds.",
        })


if __name__ == "__main__":
    main()
