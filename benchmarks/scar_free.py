#!/usr/bin/env python
"""Scar found where there is none: the shared MyoPS cases made scar-free, fitted fully automatically.

Every shared case has scar (3-64 ml), so issue "Automatic results that hold"'s "under 2 ml on
hearts without scar" cannot be read off them as they are. This script makes scar-free versions of
them: in each case's LGE image every manual scar voxel (MyoPS 2221) takes the intensity of a voxel
of normal myocardium (MyoPS 200) of the same slice, drawn at random (the whole heart's normal
myocardium where a slice has fewer than ``MIN_NORMAL`` such voxels), and the label calls it
oedema (1220: still myocardium, no longer scar); C0, T2 and everything else are left as they are.
The enhancement at the scar's borders (partial volume with the normal wall) stays, as it would at
the border of any bright structure. Then, as ``benchmarks/crossval.py`` does, each fold's atlas is
built from the other folds' (scar-free) cases and every case is fitted fully automatically with
the default settings (the default scar rule, ``model.scar``), and the scar volume each fit reports
(``metrics.json`` ``scar.volume_ml``, on the LGE grid) is collected.

    .venv/bin/python benchmarks/scar_free.py [--root DIR] [--out DIR] [--folds 5] [--cases Case3001..Case3025] \
        [--jobs 2] [--seed 0] [--record NAME] [hydra overrides of the fit ...]

Reports per case: the scar volume found, the manual scar volume that was removed, and the LGE
myocardium Dice (against the scar-free label, which is the original myocardium); pooled: the cases
under ``LIMIT_ML`` (the issue's 2 ml), the mean, median and largest volume found. Writes
``benchmarks/results/NAME.json`` (default ``scar_free``).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import nibabel as nib
import numpy as np
from common import argument_parser, parse_args
from crossval import fit_case, folds_of
from record import add_record_option, write_record

SCAR, NORMAL, OEDEMA = 2221, 200, 1220  # MyoPS label values
MIN_NORMAL = 20  # normal myocardium voxels a slice needs to lend its own intensities
LIMIT_ML = 2.0  # issue "Automatic results that hold": under 2 ml on hearts without scar


def scar_free_case(src: Path, dst: Path, rng: np.random.Generator) -> float:
    """Write ``src``'s case (``<case>_{C0,LGE,T2,gd}.nii.gz``) scar-free into ``dst``; returns the
    manual scar volume removed (ml, LGE grid)."""
    case = src.name
    dst.mkdir(parents=True, exist_ok=True)
    lge_img, gd_img = nib.load(src / f"{case}_LGE.nii.gz"), nib.load(src / f"{case}_gd.nii.gz")
    lge, gd = np.asarray(lge_img.dataobj).copy(), np.asarray(gd_img.dataobj).copy()
    if lge.shape != gd.shape:
        raise SystemExit(f"{src}: LGE {lge.shape} and label {gd.shape} differ")
    scar, normal = gd == SCAR, gd == NORMAL
    if not normal.any():
        raise SystemExit(f"{src}: no normal myocardium (label {NORMAL}) to draw intensities from")
    for z in np.unique(np.nonzero(scar)[2]):
        lend = normal[..., z] if normal[..., z].sum() >= MIN_NORMAL else None
        values = lge[..., z][lend] if lend is not None else lge[normal]
        where = scar[..., z]
        lge[..., z][where] = rng.choice(values, size=int(where.sum()))
    gd[scar] = OEDEMA
    nib.save(nib.Nifti1Image(lge, lge_img.affine, lge_img.header), dst / f"{case}_LGE.nii.gz")
    nib.save(nib.Nifti1Image(gd, gd_img.affine, gd_img.header), dst / f"{case}_gd.nii.gz")
    for seq in ("C0", "T2"):
        link = dst / f"{case}_{seq}.nii.gz"
        if not link.exists():
            link.symlink_to((src / link.name).resolve())
    return float(scar.sum() * np.prod(lge_img.header.get_zooms()[:3]) / 1000.0)


def main() -> None:
    ap = argument_parser(__doc__, myops=True, threads=1)
    ap.add_argument("--out", type=Path, default=Path("/tmp/mvmm_scar_free"))
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--cases", default="Case3001..Case3025")
    ap.add_argument("--jobs", type=int, default=2, help="fits at once (processes; default %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="the random draw of normal-myocardium intensities")
    add_record_option(ap, "scar_free")
    args = parse_args(ap)

    from mvmm_monai import build_atlas, compose_config
    from mvmm_monai.config import build
    from mvmm_monai.pipeline.build_atlas import select_subjects

    dataset = build(compose_config(["data=myops", f"data.root={args.root}"]).data)
    cases = select_subjects(args.cases, dataset.subjects(), "--cases")
    data = args.out / "data"
    removed = {c: scar_free_case(args.root / c, data / c, np.random.default_rng([args.seed, i])) for i, c in enumerate(cases)}
    folds = folds_of(cases, args.folds)
    atlases = {}
    for i, fold in enumerate(folds):
        atlases[i] = args.out / f"fold{i}" / "atlas.nii.gz"
        training = [c for c in cases if c not in fold]
        build_atlas(compose_config([f"data.root={data}", f"subjects=[{','.join(training)}]", f"output={atlases[i]}"],
                                   config_name="build_atlas"))

    t0 = time.perf_counter()
    rows = {}
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(fit_case, data, atlases[i], case, args.out / "fits" / case, list(args.overrides), args.threads or 1): (i, case)
                   for i, fold in enumerate(folds) for case in fold}
        for future, (i, case) in futures.items():
            row = {**future.result(), "fold": i, "removed_scar_ml": removed[case]}
            metrics = args.out / "fits" / case / "metrics.json"
            if "error" not in row and metrics.is_file():
                scar = json.loads(metrics.read_text()).get("scar") or {}
                row.update(scar_ml=scar.get("volume_ml"), true_scar_ml=scar.get("true_volume_ml"), scar_contrast=scar.get("contrast"))
            rows[case] = row
            print(json.dumps(row), flush=True)
    ordered = [rows[c] for c in cases]
    found = np.array([r.get("scar_ml", np.nan) if r.get("scar_ml") is not None else np.nan for r in ordered], dtype=float)
    fitted = np.isfinite(found)
    myo = np.array([r["dice"]["myocardium"] if "dice" in r else np.nan for r in ordered], dtype=float)
    under = int((found[fitted] < LIMIT_ML).sum())
    figures = {
        "cases": ordered, "folds": folds, "seed": args.seed, "overrides": list(args.overrides), "fit_seconds": time.perf_counter() - t0,
        "summary": {"fitted": int(fitted.sum()), "under_limit": under, "limit_ml": LIMIT_ML,
                    "mean_ml": float(np.nanmean(found)), "median_ml": float(np.nanmedian(found)), "max_ml": float(np.nanmax(found)),
                    "removed_mean_ml": float(np.mean(list(removed.values()))), "myocardium_dice": float(np.nanmean(myo)),
                    "errors": [r["case"] for r in ordered if "error" in r]},
    }
    s = figures["summary"]
    print(json.dumps(s, indent=1))
    if not args.record:
        return
    table_rows = [[r["case"], f"{r['removed_scar_ml']:.1f}",
                   "error" if r.get("scar_ml") is None else f"{r['scar_ml']:.1f}",
                   "error" if "dice" not in r else f"{r['dice']['myocardium']:.3f}"] for r in ordered]
    table_rows.append(["all", f"{s['removed_mean_ml']:.1f} (mean)", f"{s['mean_ml']:.1f} (mean), {s['median_ml']:.1f} (median), "
                       f"{s['max_ml']:.1f} (largest); {under}/{s['fitted']} under {LIMIT_ML:g} ml", f"{s['myocardium_dice']:.3f}"])
    write_record(args.record, figures, table={
        "columns": ["case", "manual scar removed (ml)", "scar found (ml)", "LGE myocardium Dice"],
        "rows": table_rows,
        "caption": f"The {len(cases)} shared MyoPS cases made scar-free (every manual scar voxel of LGE given the intensity of a random "
                   f"normal-myocardium voxel of its slice), {args.folds}-fold cross-validated (each fold's atlas from the other folds' "
                   "scar-free cases), fully automatic, default settings: the scar volume each fit reports (LGE grid).",
    })


if __name__ == "__main__":
    main()
