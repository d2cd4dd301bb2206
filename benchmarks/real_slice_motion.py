#!/usr/bin/env python
"""Known in-plane rotations and shifts added to the C0 and T2 slices of real MyoPS cases, undone by
the rigid slice motion (issue 21: rotation about each slice's centre plus translation).

    .venv/bin/python benchmarks/real_slice_motion.py [--root DIR] [--cases Case3016,...] [--modes stack,slice] \
        [--max-angle-deg 10] [--max-shift-mm 6] [--seed 0] [--out DIR] [--threads 1] [--record NAME] [--registration PRESET] \
        [hydra overrides of the registered fits...]

For every case and every mode (``stack``: the whole case; ``slice``: the 2D mid-ventricular crop of
:mod:`mvmm_monai.atlas.midslice`, 192 x 192 around the label centroid), every C0 and T2 slice gets
a known motion: an angle uniform in +-``--max-angle-deg`` and a shift of length uniform in
[0, ``--max-shift-mm``] in a uniform direction (seeded by the case and ``--seed``). The motion is
applied with ``scipy.ndimage.affine_transform`` (cubic spline) in :class:`SliceMotion`'s convention:
anatomy at ``p`` appears at ``R(theta) (p - c) + c + t``, ``c`` the slice centre, so the slice is
put back by ``(theta, t)`` (checked on a synthetic blob at start-up). LGE (the reference) is left
as it is. Each case is fitted four times: the unmoved and the moved data, each with
``registration=none`` and with ``registration=PRESET registration.model.slice_motion.rotation=true``
(``--registration PRESET``, default ``slice_shift``; ``slice_align``: the poses from the edges);
every sequence at full weight (``model.sequence_weights={}``: MvMM as written, as
``benchmarks/real_slice_shifts.py``), placement on LGE alone for stacks (``atlas.auto.sequences=[LGE]``:
the added motion leaves it untouched) and the crop's own atlas as it lies for slices. Stacks use the
atlas of Case3001..Case3015 (``build_atlas``), slices the mid-slice atlas of the same cases.

The real sequences carry their own misalignment, so the recovered motion is judged against the fit
of the unmoved data: with its pose ``(theta_0, t_0)`` the moved slice should be fitted at
``theta_0 + theta`` and ``R(theta) t_0 + t`` (the composition of both motions about one centre);
the errors are the differences from those, in degrees and mm. Prints, per case and mode, the mean
rotation and shift errors and the mean LGE Dice (myocardium, LV, RV) of the four fits, and writes
the record ``benchmarks/results/NAME.json`` (``--record``, default ``real_slice_motion``): every
slice's added and recovered motion, every fit's Dice, and the per-case table.

Each finished case and mode is kept in ``OUT/results/CASE_MODE.json`` and reused by a later run
with the same ``--out`` (so runs of different cases can share the work, e.g. in parallel once the
atlas is built); ``--collect`` fits nothing and writes the record from what is there, naming the
cases and modes that are missing.
"""

from __future__ import annotations

import json
import shutil
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from common import argument_parser, parse_args
from record import add_record_option, write_record
from scipy import ndimage

from mvmm_monai import build_atlas, compose_config, fit
from mvmm_monai.atlas.midslice import (
    fit_overrides,
    mid_slice_atlas,
    mid_slice_crop,
    write_atlas,
    write_crop,
)

MOVED = ("C0", "T2")
CLASSES = ("myocardium", "lv", "rv")
# the registration itself is measured: the guard (registration.guard) would keep the fit without it where QC prefers that
def rigid(preset: str) -> list[str]:
    """The registered fits' overrides: ``registration=preset`` with rotations and no guard."""
    return [f"registration={preset}", "registration.model.slice_motion.rotation=true", "registration.guard=false"]


def rotation(theta: float) -> np.ndarray:
    """``2 x 2`` rotation by ``theta`` radians, turning the first voxel axis towards the second."""
    return np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])


def move_slice(a: np.ndarray, theta: float, shift_vox: np.ndarray) -> np.ndarray:
    """Slice ``a`` ``[X, Y]`` with its content turned by ``theta`` (radians) about the slice centre
    ``((X - 1) / 2, (Y - 1) / 2)`` and then moved by ``shift_vox`` (voxels): the output at ``q`` is
    ``a(R^-1 (q - c - t) + c)`` (cubic spline, nearest edge)."""
    c = (np.array(a.shape[:2], dtype=np.float64) - 1) / 2
    inv = rotation(theta).T
    return ndimage.affine_transform(a.astype(np.float64), inv, offset=c - inv @ (c + shift_vox), order=3, mode="nearest").astype(a.dtype)


def check_convention() -> None:
    """The motion of :func:`move_slice` is undone by :func:`~mvmm_monai.data.common_space.sample`
    with the same angle and shift (the slice motion's convention); raise if not."""
    from mvmm_monai.data.common_space import Grid, sample, sampling_map

    x, y = np.meshgrid(np.arange(60), np.arange(50), indexing="ij")
    blob = np.exp(-((x - 20) ** 2 / 30 + (y - 30) ** 2 / 80)).astype(np.float32)
    theta, t = np.deg2rad(8.0), np.array([3.0, -2.0])
    moved = move_slice(blob, theta, t)
    grid = Grid(torch.diag(torch.tensor([1.5, 1.5, 8.0, 1.0], dtype=torch.float64)), (60, 50, 1))
    back = sample(torch.from_numpy(moved)[None, ..., None], sampling_map(grid, grid),
                  slice_shifts=torch.tensor(t[None], dtype=torch.float32), slice_angles=torch.tensor([theta], dtype=torch.float32))
    err, before = np.abs(back[0, ..., 0].numpy() - blob)[10:50, 10:40].max(), np.abs(moved - blob)[10:50, 10:40].max()
    if not err < 0.05 * before:
        raise RuntimeError(f"move_slice does not follow SliceMotion's convention: undone to {err:.3f} (moved {before:.3f})")


def draw_motion(case: str, mode: str, seed: int, slices: int, max_angle_deg: float, max_shift_mm: float) -> dict:
    """Sequence -> ``{"angle_deg": [Z], "shift_mm": [Z, 2]}``, drawn from a generator seeded by
    ``case``, ``mode`` and ``seed``."""
    rng = np.random.default_rng([seed, zlib.crc32(f"{case}/{mode}".encode())])
    out = {}
    for seq in MOVED:
        angle = rng.uniform(-max_angle_deg, max_angle_deg, slices)
        length, direction = rng.uniform(0, max_shift_mm, slices), rng.uniform(0, 2 * np.pi, slices)
        out[seq] = {"angle_deg": angle, "shift_mm": np.stack((length * np.cos(direction), length * np.sin(direction)), -1)}
    return out


def move_volume(a: np.ndarray, motion: dict, spacing: np.ndarray) -> np.ndarray:
    """``a`` ``[X, Y, Z]`` with every slice moved by ``motion`` (one sequence's, from :func:`draw_motion`)."""
    out = a.copy()
    for z in range(a.shape[2]):
        out[..., z] = move_slice(a[..., z], np.deg2rad(motion["angle_deg"][z]), motion["shift_mm"][z] / spacing)
    return out


def mean_dice(d: dict) -> float:
    return float(np.mean([d[c] for c in CLASSES]))


def run_fit(overrides: list[str], out: Path) -> dict:
    """One fit; its LGE Dice per class, mean, the fitted slice poses and the time."""
    t = time.perf_counter()
    m = fit(compose_config([*overrides, f"paths.output_dir={out}", "callbacks.progress.refresh_rate=0", "~logger"]))
    params = json.loads((out / "params.json").read_text())
    dice = {c: float(m["dice"]["LGE"][c]) for c in CLASSES}
    return {"dice_lge": dice, "dice_lge_mean": mean_dice(dice), "iterations": m["iterations"], "seconds": time.perf_counter() - t,
            "shifts_mm": params.get("slice_shifts_mm", {}), "angles_deg": params.get("slice_rotations_deg", {})}


def stack_inputs(root: Path, case: str, work: Path, motion_of, max_angle_deg, max_shift_mm, seed) -> tuple[dict, dict, np.ndarray]:
    """Write the unmoved and the moved copy of ``case``; returns (overrides per copy, motion, spacing)."""
    copies = {}
    for name in ("orig", "moved"):
        d = work / name / case
        if d.exists():
            shutil.rmtree(d)
        shutil.copytree(root / case, d)
        copies[name] = ["data=myops", f"data.root={work / name}", f"subject={case}", f"atlas.path={work / 'atlas.nii.gz'}",
                        "atlas.auto.sequences=[LGE]"]
    ref = nib.load(root / case / f"{case}_C0.nii.gz")
    spacing = np.array(ref.header.get_zooms()[:2], dtype=np.float64)
    motion = motion_of(ref.shape[2])
    for seq in MOVED:
        img = nib.load(root / case / f"{case}_{seq}.nii.gz")
        a = np.asarray(img.dataobj, dtype=np.float32)
        nib.save(nib.Nifti1Image(move_volume(a, motion[seq], spacing), img.affine, img.header), work / "moved" / case / f"{case}_{seq}.nii.gz")
    return copies, motion, spacing


def slice_inputs(root: Path, case: str, work: Path, atlas2d: np.ndarray, atlas_cases: list[str], motion_of) -> tuple[dict, dict, np.ndarray]:
    """Write the unmoved and the moved mid-slice crop of ``case`` with its atlas; returns
    (overrides per copy, motion, spacing)."""
    crop = mid_slice_crop(root / case)
    spacing = np.array(np.linalg.norm(crop.affine[:3, :2], axis=0), dtype=np.float64)
    motion = motion_of(1)
    copies = {}
    for name in ("orig", "moved"):
        d = work / "slice" / name / case
        if name == "moved":
            for seq in MOVED:
                crop.images[seq] = move_volume(crop.images[seq], motion[seq], spacing)
        paths = write_crop(crop, d)
        atlas_path = write_atlas(atlas2d, crop.affine, d / "atlas.nii.gz", built_from=atlas_cases)
        copies[name] = [o for o in fit_overrides(case, paths, atlas_path, d / "fit") if not o.startswith("paths.output_dir")]
    return copies, motion, spacing


def errors(motion: dict, spacing: np.ndarray, orig: dict, moved: dict) -> list[dict]:
    """Per moved slice: the added motion, the recovered one (the moved fit's pose less the unmoved
    fit's, composed as in the module docstring) and its errors (degrees, mm)."""
    rows = []
    for seq in MOVED:
        for z, (angle, shift) in enumerate(zip(motion[seq]["angle_deg"], motion[seq]["shift_mm"], strict=True)):
            a0, a1 = orig["angles_deg"][seq][z], moved["angles_deg"][seq][z]
            t0, t1 = np.array(orig["shifts_mm"][seq][z]), np.array(moved["shifts_mm"][seq][z])
            expected_t = rotation(np.deg2rad(angle)) @ t0 + shift  # mm; the in-plane spacing is isotropic on MyoPS
            rows.append({
                "sequence": seq, "slice": z, "added_deg": float(angle), "added_mm": shift.tolist(),
                "recovered_deg": a1 - a0, "recovered_mm": (t1 - (expected_t - shift)).tolist(),
                "angle_error_deg": abs(a1 - a0 - angle), "shift_error_mm": float(np.linalg.norm(t1 - expected_t)),
            })
    return rows


def main() -> None:
    ap = argument_parser(__doc__, myops=True, threads=1)
    ap.add_argument("--cases", default="Case3016,Case3017,Case3018,Case3019,Case3020")
    ap.add_argument("--atlas-cases", default="Case3001..Case3015")
    ap.add_argument("--modes", default="stack,slice")
    ap.add_argument("--max-angle-deg", type=float, default=10.0)
    ap.add_argument("--max-shift-mm", type=float, default=6.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/mvmm_real_slice_motion")
    ap.add_argument("--registration", default="slice_shift", help="the registered fits' preset (default %(default)s; e.g. slice_align)")
    ap.add_argument("--collect", action="store_true", help="fit nothing: write the record from OUT/results")
    add_record_option(ap, "real_slice_motion")
    args = parse_args(ap)
    check_convention()
    registered = [*rigid(args.registration), *args.overrides]
    root, work = Path(args.root), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    lo, hi = (int(c.removeprefix("Case")) for c in args.atlas_cases.split(".."))
    atlas_cases = [f"Case{i}" for i in range(lo, hi + 1)]
    modes = args.modes.split(",")
    if "stack" in modes and not args.collect and not (work / "atlas.nii.gz").exists():
        build_atlas(compose_config([f"data.root={root}", f"subjects={args.atlas_cases}", f"output={work / 'atlas.nii.gz'}"], config_name="build_atlas"))
    atlas2d = mid_slice_atlas([mid_slice_crop(root / c) for c in atlas_cases]) if "slice" in modes and not args.collect else None
    common = ["model.sequence_weights={}"]
    cases, all_slices, missing = [], [], []
    (work / "results").mkdir(exist_ok=True)
    for case in args.cases.split(","):
        for mode in modes:
            kept = work / "results" / f"{case}_{mode}.json"
            if kept.exists():
                done = json.loads(kept.read_text())
                cases.append(done["row"])
                all_slices += done["slices"]
                continue
            if args.collect:
                missing.append(f"{case}/{mode}")
                continue
            def motion_of(z, case=case, mode=mode):
                return draw_motion(case, mode, args.seed, z, args.max_angle_deg, args.max_shift_mm)
            if mode == "stack":
                copies, motion, spacing = stack_inputs(root, case, work, motion_of, args.max_angle_deg, args.max_shift_mm, args.seed)
            else:
                copies, motion, spacing = slice_inputs(root, case, work, atlas2d, atlas_cases, motion_of)
            fits = {}
            for data in ("orig", "moved"):
                for reg, extra in (("none", ["registration=none"]), ("rigid", registered)):
                    key = f"{data}_{reg}"
                    fits[key] = run_fit([*copies[data], *common, *extra], work / "fits" / f"{case}_{mode}_{key}")
                    print(f"{case} {mode} {key}: LGE Dice {fits[key]['dice_lge_mean']:.4f}, {fits[key]['iterations']} iterations, "
                          f"{fits[key]['seconds']:.0f} s", flush=True)
            rows = errors(motion, spacing, fits["orig_rigid"], fits["moved_rigid"])
            for r in rows:
                r.update(case=case, mode=mode)
            all_slices += rows
            row = {"case": case, "mode": mode, "slices": len(rows),
                   "angle_error_deg": float(np.mean([r["angle_error_deg"] for r in rows])),
                   "shift_error_mm": float(np.mean([r["shift_error_mm"] for r in rows])),
                   **{f"dice_{k}": fits[k]["dice_lge_mean"] for k in ("moved_rigid", "moved_none", "orig_rigid", "orig_none")},
                   "fits": {k: {kk: v for kk, v in f.items() if kk not in ("shifts_mm", "angles_deg")} for k, f in fits.items()}}
            cases.append(row)
            kept.write_text(json.dumps({"row": row, "slices": rows}, indent=1))
            print(f"{case} {mode}: rotation error {row['angle_error_deg']:.2f} deg, shift error {row['shift_error_mm']:.2f} mm, "
                  f"LGE Dice moved+rigid {row['dice_moved_rigid']:.4f} moved+none {row['dice_moved_none']:.4f} "
                  f"unmoved+rigid {row['dice_orig_rigid']:.4f} unmoved+none {row['dice_orig_none']:.4f}", flush=True)
    columns = ["case", "mode", "rotation error (deg)", "shift error (mm)", "Dice moved+rigid", "moved+none", "unmoved+rigid", "unmoved+none"]
    table = [[c["case"], c["mode"], c["angle_error_deg"], c["shift_error_mm"], c["dice_moved_rigid"], c["dice_moved_none"],
              c["dice_orig_rigid"], c["dice_orig_none"]] for c in cases]
    summary = {}
    for mode in modes:
        sel = [c for c in cases if c["mode"] == mode]
        if not sel:
            continue
        summary[mode] = {k: float(np.mean([c[k] for c in sel])) for k in
                         ("angle_error_deg", "shift_error_mm", "dice_moved_rigid", "dice_moved_none", "dice_orig_rigid", "dice_orig_none")}
        table.append(["mean", mode, *(summary[mode][k] for k in ("angle_error_deg", "shift_error_mm", "dice_moved_rigid",
                                                                  "dice_moved_none", "dice_orig_rigid", "dice_orig_none"))])
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for r in table:
        print("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in r) + " |")
    if args.record:
        figures = {"cases": cases, "slices": all_slices, "summary": summary, "missing": missing, "atlas_cases": args.atlas_cases,
                   "max_angle_deg": args.max_angle_deg, "max_shift_mm": args.max_shift_mm, "seed": args.seed,
                   "registered": registered, "common": common,
                   "worst_dice_loss_vs_none": max(max(c["dice_moved_none"] - c["dice_moved_rigid"], c["dice_orig_none"] - c["dice_orig_rigid"])
                                                  for c in cases)}
        write_record(args.record, figures, table={
            "columns": columns, "rows": table,
            "caption": (f"Known rotations (up to {args.max_angle_deg:g} degrees) and shifts (up to {args.max_shift_mm:g} mm) added to every "
                        "C0 and T2 slice, whole stacks and mid-ventricular 2D crops; mean errors of the recovered motion "
                        f"(registration={args.registration} with slice_motion.rotation=true) and mean LGE Dice (myocardium, LV, RV) "
                        "of the moved and the unmoved data, registered and not."),
        })


if __name__ == "__main__":
    main()
