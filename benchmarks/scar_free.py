#!/usr/bin/env python
"""Scar found where there is none: the shared MyoPS cases made scar-free, fitted fully automatically.

Every shared case has scar (3-64 ml), so issue "Automatic results that hold"'s "under 2 ml on
hearts without scar" cannot be read off them as they are. This script makes scar-free versions of
them: in each case's LGE image the manual scar and oedema (MyoPS 2221 and 1220: the MyoPS labels
often draw the enhanced wall next to the scar as oedema) are filled from the normal myocardium
(MyoPS 200) around them, slice by slice (:func:`fill_from_normal`: the smooth level of the normal
wall carried in by diffusion within the myocardium, plus noise as strong and as coarse as the
normal wall's own), and the label calls them normal myocardium; C0, T2 and everything else are
left as they are. Enhancement that the manual labels leave outside both (their border, partial
volume with the normal wall) stays: the fill cannot know it, so the volumes below are an upper
bound of what a heart that never had scar would get. Then, as ``benchmarks/crossval.py`` does, each fold's atlas is
built from the other folds' (scar-free) cases and every case is fitted fully automatically with
the default settings (the default scar rule, ``model.scar``), and the scar volume each fit reports
(``metrics.json`` ``scar.volume_ml``, on the LGE grid) is collected.

    .venv/bin/python benchmarks/scar_free.py [--root DIR] [--out DIR] [--folds 5] [--cases Case3001..Case3025] \
        [--jobs 2] [--seed 0] [--record NAME] [hydra overrides of the fit ...]

Reports per case: the scar volume found, the part of it farther than ``NEAR_MM`` from the filled
scar and oedema (what enhancement the fill left cannot explain: a lower bound of what a heart
that never had scar would get, the whole volume being the upper one), the manual scar volume
that was removed, and the LGE myocardium Dice (against the scar-free label, which is the original myocardium); pooled: the cases
under ``LIMIT_ML`` (the issue's 2 ml), the mean, median and largest volume found. Writes
``benchmarks/results/NAME.json`` (default ``scar_free``).
"""

from __future__ import annotations

import json
import math
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
NEAR_MM = 3.0  # found scar this close to the filled scar and oedema may be the fill's own doing (enhancement it left)
SMOOTH_PX = 3.0  # Gaussian sigma (voxels) of the normal wall's smooth level; what is finer is its noise
DIFFUSION_STEPS = 400  # Jacobi steps carrying the normal wall's level into the scar


def _masked_smooth(image: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of ``image`` over ``mask`` only (normalised convolution), 2D."""
    from scipy import ndimage

    num = ndimage.gaussian_filter(np.where(mask, image, 0.0), sigma)
    den = ndimage.gaussian_filter(mask.astype(float), sigma)
    return np.where(den > 1e-6, num / np.maximum(den, 1e-6), 0.0)


def fill_from_normal(image: np.ndarray, scar: np.ndarray, normal: np.ndarray, rng: np.random.Generator,
                     heart_normal: np.ndarray) -> np.ndarray:
    """One slice's ``image`` with ``scar`` (here scar and oedema) filled like the ``normal`` wall: the normal wall's smooth
    level (:data:`SMOOTH_PX`) diffused into the scar within the myocardium (scar and normal wall;
    4-neighbour Jacobi steps, the normal wall held), plus white noise smoothed to the correlation
    length of the normal wall's residual and scaled to its standard deviation. A slice with fewer
    than :data:`MIN_NORMAL` normal voxels gets the whole heart's normal median (``heart_normal``:
    its normal-wall intensities) and noise of their spread, smoothed by one voxel."""
    from scipy import ndimage

    out = image.astype(float).copy()
    if normal.sum() < MIN_NORMAL:
        noise = ndimage.gaussian_filter(rng.standard_normal(image.shape), 1.0)
        out[scar] = float(np.median(heart_normal)) + (noise / max(float(noise.std()), 1e-12) * float(heart_normal.std()))[scar]
        return out

    level = _masked_smooth(image, normal, SMOOTH_PX)
    wall = scar | normal
    value = np.where(normal, level, float(np.median(image[normal])))
    kernel = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=float)
    weight = ndimage.convolve(wall.astype(float), kernel, mode="constant")
    for _ in range(DIFFUSION_STEPS):
        mean = ndimage.convolve(np.where(wall, value, 0.0), kernel, mode="constant") / np.maximum(weight, 1.0)
        value = np.where(scar & (weight > 0), mean, value)
    residual = image - level
    # its correlation length: the lag-1 autocorrelation (along the first axis) of white noise
    # smoothed by a Gaussian of sigma s is exp(-1 / (4 s^2))
    pair = normal[:-1] & normal[1:]
    lag = float(np.corrcoef(residual[:-1][pair], residual[1:][pair])[0, 1]) if normal.sum() > 50 else 0.0
    rho = min(max(lag, 1e-3), 0.99)
    sigma = math.sqrt(-1.0 / (4.0 * math.log(rho))) if rho > math.exp(-4.0) else 0.0
    noise = rng.standard_normal(image.shape)
    if sigma > 0:
        noise = ndimage.gaussian_filter(noise, sigma)
    noise = noise / max(float(noise.std()), 1e-12) * float(residual[normal].std())
    out[scar] = value[scar] + noise[scar]
    return out


def scar_free_case(src: Path, dst: Path, rng: np.random.Generator) -> float:
    """Write ``src``'s case (``<case>_{C0,LGE,T2,gd}.nii.gz``) scar-free (and oedema-free) into
    ``dst``; returns the manual scar volume removed (ml, LGE grid)."""
    case = src.name
    dst.mkdir(parents=True, exist_ok=True)
    lge_img, gd_img = nib.load(src / f"{case}_LGE.nii.gz"), nib.load(src / f"{case}_gd.nii.gz")
    lge, gd = np.asarray(lge_img.dataobj).copy(), np.asarray(gd_img.dataobj).copy()
    if lge.shape != gd.shape:
        raise SystemExit(f"{src}: LGE {lge.shape} and label {gd.shape} differ")
    scar, normal = np.isin(gd, (SCAR, OEDEMA)), gd == NORMAL
    if not normal.any():
        raise SystemExit(f"{src}: no normal myocardium (label {NORMAL}) to draw intensities from")
    lge = lge.astype(np.float32)
    heart = np.argwhere(gd > 0)
    box = tuple(slice(max(int(heart[:, a].min()) - 20, 0), int(heart[:, a].max()) + 21) for a in range(2))  # the heart and 20 voxels
    for z in np.unique(np.nonzero(scar)[2]):
        lge[box + (z,)] = fill_from_normal(lge[box + (z,)], scar[box + (z,)], normal[box + (z,)], rng, lge[normal])
    removed = float((gd == SCAR).sum() * np.prod(lge_img.header.get_zooms()[:3]) / 1000.0)
    gd[scar] = NORMAL
    header = lge_img.header.copy()
    header.set_data_dtype(np.float32)
    nib.save(nib.Nifti1Image(lge, lge_img.affine, header), dst / f"{case}_LGE.nii.gz")
    nib.save(nib.Nifti1Image(gd, gd_img.affine, gd_img.header), dst / f"{case}_gd.nii.gz")
    for seq in ("C0", "T2"):
        link = dst / f"{case}_{seq}.nii.gz"
        if not link.exists():
            link.symlink_to((src / link.name).resolve())
    return removed


def found_away(fits: Path, root: Path, case: str) -> float | None:
    """The volume (ml) of the scar a fit of the scar-free ``case`` found farther than :data:`NEAR_MM`
    from the manual scar and oedema that were filled (``root``: the original cases): what no
    enhancement left by the fill can explain. None without the fit's scar file."""
    from scipy import ndimage

    found_file = fits / case / f"{case}_scar.nii.gz"
    if not found_file.is_file():
        return None
    label = nib.load(root / case / f"{case}_gd.nii.gz")
    filled = np.isin(np.asarray(label.dataobj), (SCAR, OEDEMA))
    spacing = label.header.get_zooms()[:3]
    far = ndimage.distance_transform_edt(~filled, sampling=spacing) > NEAR_MM if filled.any() else np.ones_like(filled)
    found = np.asarray(nib.load(found_file).dataobj) > 0
    return float((found & far).sum() * np.prod(spacing) / 1000.0)


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
                row.update(scar_ml=scar.get("volume_ml"), true_scar_ml=scar.get("true_volume_ml"), scar_contrast=scar.get("contrast"),
                           scar_away_ml=found_away(args.out / "fits", args.root, case))
            rows[case] = row
            print(json.dumps(row), flush=True)
    ordered = [rows[c] for c in cases]
    found = np.array([r.get("scar_ml", np.nan) if r.get("scar_ml") is not None else np.nan for r in ordered], dtype=float)
    fitted = np.isfinite(found)
    myo = np.array([r["dice"]["myocardium"] if "dice" in r else np.nan for r in ordered], dtype=float)
    under = int((found[fitted] < LIMIT_ML).sum())
    away = np.array([r["scar_away_ml"] if r.get("scar_away_ml") is not None else np.nan for r in ordered], dtype=float)
    under_away = int((away[np.isfinite(away)] < LIMIT_ML).sum())
    figures = {
        "cases": ordered, "folds": folds, "seed": args.seed, "overrides": list(args.overrides), "fit_seconds": time.perf_counter() - t0,
        "summary": {"fitted": int(fitted.sum()), "under_limit": under, "limit_ml": LIMIT_ML,
                    "mean_ml": float(np.nanmean(found)), "median_ml": float(np.nanmedian(found)), "max_ml": float(np.nanmax(found)),
                    "removed_mean_ml": float(np.mean(list(removed.values()))), "myocardium_dice": float(np.nanmean(myo)),
                    "away_mean_ml": float(np.nanmean(away)), "under_limit_away": under_away, "near_mm": NEAR_MM,
                    "errors": [r["case"] for r in ordered if "error" in r]},
    }
    s = figures["summary"]
    print(json.dumps(s, indent=1))
    if not args.record:
        return
    table_rows = [[r["case"], f"{r['removed_scar_ml']:.1f}",
                   "error" if r.get("scar_ml") is None else f"{r['scar_ml']:.1f}",
                   "error" if r.get("scar_away_ml") is None else f"{r['scar_away_ml']:.1f}",
                   "error" if "dice" not in r else f"{r['dice']['myocardium']:.3f}"] for r in ordered]
    table_rows.append(["all", f"{s['removed_mean_ml']:.1f} (mean)", f"{s['mean_ml']:.1f} (mean), {s['median_ml']:.1f} (median), "
                       f"{s['max_ml']:.1f} (largest); {under}/{s['fitted']} under {LIMIT_ML:g} ml",
                       f"{s['away_mean_ml']:.1f} (mean); {under_away}/{s['fitted']} under {LIMIT_ML:g} ml", f"{s['myocardium_dice']:.3f}"])
    write_record(args.record, figures, table={
        "columns": ["case", "manual scar removed (ml)", "scar found (ml)", f"... of it farther than {NEAR_MM:g} mm from the filled scar and oedema (ml)",
                    "LGE myocardium Dice"],
        "rows": table_rows,
        "caption": f"The {len(cases)} shared MyoPS cases made scar-free (LGE's manual scar and oedema filled from the normal wall "
                   f"around them), {args.folds}-fold cross-validated (each fold's atlas from the other folds' "
                   "scar-free cases), fully automatic, default settings: the scar volume each fit reports (LGE grid).",
    })


if __name__ == "__main__":
    main()
