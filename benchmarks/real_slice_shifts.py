#!/usr/bin/env python
"""Known in-plane motion added to the C0 and T2 slices of a real MyoPS case, undone by the fit.

    .venv/bin/python benchmarks/real_slice_shifts.py [--root DIR] [--case Case3018] [--out DIR] [--record NAME] \
        [hydra overrides...]

Builds the atlas from Case3001..Case3015, copies the case twice (as is, and with integer-voxel
shifts rolled into its C0 and T2 slices: image(p) = original(p - shift)), fits both with
automatic placement on the reference LGE alone (``atlas.auto.sequences=[LGE]``: the added shifts
leave it untouched, so both fits share one placement; pass ``atlas.auto.sequences=null`` to place on
all three), every sequence at full weight (``model.sequence_weights={}``: MvMM as written) and
``registration=slice_shift``, and prints, per slice, the added shift, the recovered
one (the difference of the two fits' shifts: the real sequences carry their own small misalignment)
and the error in mm. Writes the record ``benchmarks/results/NAME.json`` (``--record``, default
``real_slice_shifts``; name each case's run, e.g. ``real_slice_shifts_Case3016``): both fits' Dice
and every slice's added, recovered shift and error, which is also its table.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from common import argument_parser, parse_args
from record import add_record_option, write_record

from mvmm_monai import build_atlas, compose_config, fit

ADDED = {"C0": [(3, -2), (-2, 2), (2, 3)], "T2": [(-3, 1), (2, -2), (0, 3)]}  # voxels, per slice


def main() -> None:
    ap = argument_parser(__doc__, myops=True)
    ap.add_argument("--case", default="Case3018")
    ap.add_argument("--out", default="/tmp/mvmm_real_slice_shifts")
    add_record_option(ap, "real_slice_shifts")
    args = parse_args(ap)
    root, case, work = Path(args.root), args.case, Path(args.out)
    atlas = work / "atlas.nii.gz"
    if not atlas.exists():
        build_atlas(compose_config([f"data.root={root}", "subjects=Case3001..Case3015", f"output={atlas}"], config_name="build_atlas"))
    for name in ("orig", "shifted"):
        d = work / name / case
        if d.exists():
            shutil.rmtree(d)
        shutil.copytree(root / case, d)
    for seq, shifts in ADDED.items():
        img = nib.load(root / case / f"{case}_{seq}.nii.gz")
        a = np.asarray(img.dataobj).copy()
        for z, (dx, dy) in enumerate(shifts[: a.shape[2]]):
            a[..., z] = np.roll(a[..., z], (dx, dy), axis=(0, 1))
        nib.save(nib.Nifti1Image(a, img.affine, img.header), work / "shifted" / case / f"{case}_{seq}.nii.gz")
    fitted, fits = {}, {}
    for name in ("orig", "shifted"):
        t = time.perf_counter()
        out = work / f"out_{name}"
        m = fit(compose_config(["data=myops", f"data.root={work / name}", f"subject={case}", f"atlas.path={atlas}",
                                f"paths.output_dir={out}", "callbacks.progress.refresh_rate=0", "~logger",
                                "registration=slice_shift", "atlas.auto.sequences=[LGE]", "model.sequence_weights={}",
                                *args.overrides]))
        fitted[name] = json.loads((out / "params.json").read_text())["slice_shifts_mm"]
        fits[name] = {"dice_lge": m["dice"]["LGE"], "iterations": m["iterations"], "seconds": time.perf_counter() - t}
        print(f"{name}: LGE Dice {m['dice']['LGE']}, {m['iterations']} iterations, {time.perf_counter() - t:.0f} s")
    sp = nib.load(root / case / f"{case}_C0.nii.gz").header.get_zooms()[:2]
    print("\n| sequence | slice | added (mm) | recovered (mm) | error (mm) |\n|---|---|---|---|---|")
    slices = []
    for seq, shifts in ADDED.items():
        for z, (dx, dy) in enumerate(shifts[: len(fitted["orig"][seq])]):
            added = np.array([dx, dy]) * sp
            rec = np.array(fitted["shifted"][seq][z][:2]) - np.array(fitted["orig"][seq][z][:2])
            err = float(np.hypot(*(rec - added)))
            print(f"| {seq} | {z} | {added[0]:.2f}, {added[1]:.2f} | {rec[0]:.2f}, {rec[1]:.2f} | {err:.2f} |")
            slices.append({"sequence": seq, "slice": z, "added_mm": added, "recovered_mm": rec, "error_mm": err})
    if args.record:
        errors = [s["error_mm"] for s in slices]
        figures = {"case": case, "overrides": list(args.overrides), "fits": fits, "slices": slices,
                   "max_error_mm": max(errors, default=None), "median_error_mm": float(np.median(errors)) if errors else None,
                   "under_1mm": sum(e < 1.0 for e in errors)}
        write_record(args.record, figures, table={
            "columns": ["sequence", "slice", "added (mm)", "recovered (mm)", "error (mm)"],
            "rows": [[s["sequence"], s["slice"], ", ".join(f"{v:.2f}" for v in s["added_mm"]),
                      ", ".join(f"{v:.2f}" for v in s["recovered_mm"]), s["error_mm"]] for s in slices],
            "caption": f"Known in-plane shifts added to {case}'s C0 and T2 slices, recovered by registration=slice_shift.",
        })


if __name__ == "__main__":
    main()
