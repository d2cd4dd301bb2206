#!/usr/bin/env python
"""Where the LV error of real MyoPS fits lies: which manual tissue the false-LV voxels are, and
what each sequence's intensity says there.

    .venv/bin/python benchmarks/lv_error_sources.py --fits OUT [--root DIR] [--cases Case3011..Case3015] [--per-slice]

``OUT`` is a ``benchmarks/real_myops.py --out`` folder (``OUT/CaseN/CaseN_LGE_seg.nii.gz``). Per case:
LV voxels of the fit, false-LV voxels on manual myocardium and how many of those are scar (2221) or
oedema (1220), false-myocardium voxels on the manual LV, and per sequence the median of
t = (I - median of normal myocardium) / (median of LV blood - median of normal myocardium) over the
false-LV voxels (0: like normal myocardium, 1: like blood) and over the true-positive LV voxels.
With ``--per-slice``: per slice instead, its long-axis level from the placement
(``CaseN/params.json``, 0 = apex, 1 = base), the manual LV voxels, the false LV and the missed LV
(what led to ``postprocess.blood_rim``).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from common import argument_parser, parse_args

MYO, OEDEMA, SCAR, LV = 200, 1220, 2221, 500


def case_range(spec: str) -> list[str]:
    if ".." not in spec:
        return spec.split(",")
    a, b = spec.split("..")
    return [f"Case{i}" for i in range(int(a.removeprefix("Case")), int(b.removeprefix("Case")) + 1)]


def main() -> None:
    ap = argument_parser(__doc__, myops=True, overrides=False)
    ap.add_argument("--fits", type=Path, required=True, help="a benchmarks/real_myops.py --out folder")
    ap.add_argument("--cases", default="Case3011..Case3015")
    ap.add_argument("--per-slice", action="store_true", help="per slice: level, manual LV, false LV, missed LV")
    args = parse_args(ap)
    if args.per_slice:
        per_slice(args.fits, args.root, case_range(args.cases))
        return
    print("| case | LV voxels | false LV on myocardium | of which scar | of which oedema | false myocardium on LV | "
          "t C0 false / true LV | t LGE false / true LV | t T2 false / true LV |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case in case_range(args.cases):
        seg_file = args.fits / case / f"{case}_LGE_seg.nii.gz"
        if not seg_file.is_file():
            print(f"| {case} | no fit at {seg_file} | | | | | | | |")
            continue
        gd = np.asarray(nib.load(args.root / case / f"{case}_gd.nii.gz").dataobj)
        seg = np.asarray(nib.load(seg_file).dataobj)
        myo, lv = np.isin(gd, [MYO, OEDEMA, SCAR]), gd == LV
        fp, tp = (seg == LV) & myo, (seg == LV) & lv
        fn = lv & np.isin(seg, [MYO, OEDEMA, SCAR])
        ts = []
        for seq in ("C0", "LGE", "T2"):
            im = np.asarray(nib.load(args.root / case / f"{case}_{seq}.nii.gz").dataobj).astype(float)
            m0, m1 = np.median(im[gd == MYO]), np.median(im[lv])
            t = (im - m0) / (m1 - m0)
            ts.append(f"{np.median(t[fp]):.2f} / {np.median(t[tp]):.2f}" if fp.any() else f"- / {np.median(t[tp]):.2f}")
        print(f"| {case} | {(seg == LV).sum()} | {fp.sum()} | {(fp & (gd == SCAR)).sum()} | {(fp & (gd == OEDEMA)).sum()} | "
              f"{fn.sum()} | " + " | ".join(ts) + " |")


def per_slice(fits: Path, root: Path, cases: list[str]) -> None:
    print("| case | slice | level | manual LV voxels | false LV | missed LV |")
    print("|---|---|---|---|---|---|")
    for case in cases:
        seg_file = fits / case / f"{case}_LGE_seg.nii.gz"
        if not seg_file.is_file():
            print(f"| {case} | no fit at {seg_file} | | | | |")
            continue
        gd = np.asarray(nib.load(root / case / f"{case}_gd.nii.gz").dataobj)
        seg = np.asarray(nib.load(seg_file).dataobj)
        levels = json.loads((fits / case / "params.json").read_text())["placement"]["levels"]
        for z in range(gd.shape[2]):
            truth, ours = gd[..., z] == LV, seg[..., z] == LV
            print(f"| {case} | {z} | {levels[z]:.2f} | {truth.sum()} | {(ours & ~truth).sum()} | {(truth & ~ours).sum()} |")


if __name__ == "__main__":
    main()
