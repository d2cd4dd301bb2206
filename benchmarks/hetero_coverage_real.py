#!/usr/bin/env python
"""Hetero-coverage on real data: shared MyoPS cases made into MS-CMRSeg-like acquisitions.

    .venv/bin/python benchmarks/hetero_coverage_real.py [--root DIR] [--out DIR] \
        [--atlas-cases Case3001..Case3015] [--test-cases Case3016..Case3025] [--threads 1] \
        [--record NAME] [hydra overrides of both fits ...]

The MyoPS sequences are co-registered stacks on one grid; MS-CMRSeg's are not (bSSFP covering the
ventricles, LGE and T2 with other slice positions, counts and thicknesses). Every test case is
written twice, both laid out and named as the MS-CMRSeg 2019 release (``c0t2lge/patientN_*.nii.gz``,
labels ``c0gt/``, ``lgegt/``, ``t2gt/patientN_<SEQ>_manual.nii.gz``; ``CaseN`` becomes ``patientN``)
with the manual label carried onto every sequence's own grid as MS-CMRSeg values (200 myocardium
with MyoPS' oedema 1220 and scar 2221, 500 LV, 600 RV):

- ``full``: the case as it is (every sequence on the LGE grid);
- ``mscmr_like``: LGE kept; C0 slices twice as thick, the mean of slice pairs (0, 1), (2, 3), ...
  (an odd last slice is dropped: C0 then misses it), so the new slices lie half an original slice
  further along the stack (a new affine, qform and sform); its label the pair's per-class mean,
  argmax, a tie (the two slices disagree) going to the heart class in the order myocardium, LV,
  RV; T2 cut to three mid-ventricular slices (the middle three of the slices that show LV, the
  later ones when the count is even; a new origin).

Both are fitted in the same run with the same settings, ``data=mscmr`` with the release's sequence
names (``data.sequences=[LGE,C0,T2] data.reference=LGE``) and MyoPS' tuning and labelling
conventions (``tuning=myops postprocess=myops``, as ``data=myops`` fits), the atlas built from the
atlas cases; every sequence's written label map (``patientN_<SEQ>_seg.nii.gz``, on that sequence's
own grid) is scored against that sequence's carried label.

Sequence weights (``--thickness-weights``, the default: the fit's ``model.thickness_weights=true``):
each sequence's weight (the tuning's, LGE 0.5, T2 0.5, C0 1) times min(1, reference slice thickness /
its slice thickness), so a slab twice as thick as the LGE's, whose intensity mixes two slices'
anatomy, counts half at every LGE voxel it covers (C0 1 -> 0.5 in the MS-CMRSeg-like version; the
full-coverage weights are unchanged). ``--no-thickness-weights`` fits with the tuning's
weights as they are (C0 at full weight: measured on Case3016..3018, LGE myocardium Dice +0.014,
-0.053, -0.031 against full coverage, the blurred C0 pulling the LGE slices it covers). The
partial-volume model of the thick C0 slabs is a fit setting: ``--no-thickness-weights
model.partial_volume=true --record hetero_coverage_real_pv`` (each slab's intensity turned into
each LGE slice's own; no effect on the full-coverage fits). Prints a table per case and the mean
Dice per version, sequence and structure, and writes the record ``benchmarks/results/NAME.json``
(``--record``, default ``hetero_coverage_real``) with every case's Dice and the LGE myocardium Dice
difference (MS-CMRSeg-like minus full coverage).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import traceback
from pathlib import Path

import nibabel as nib
import numpy as np
from common import argument_parser, parse_args
from record import add_record_option, write_record

from mvmm_monai import build_atlas, compose_config, fit
from mvmm_monai.pipeline.build_atlas import select_subjects

SEQS = ("LGE", "C0", "T2")
STRUCTS = {"myocardium": 200, "lv": 500, "rv": 600}
TO_MSCMR = {0: 0, 200: 200, 1220: 200, 2221: 200, 500: 500, 600: 600}  # MyoPS value -> MS-CMRSeg value
IMAGES = "C0LET2_nii45_for_challenge19/c0t2lge"
LABELS = {"LGE": "C0LET2_nii45_for_challenge19/lgegt", "C0": "C0LET2_nii45_for_challenge19/c0gt",
          "T2": "C0LET2_nii45_for_challenge19/t2gt"}
VERSIONS = ("full", "mscmr_like")
T2_SLICES = 3


def to_mscmr(gd: np.ndarray, source: str) -> np.ndarray:
    """MyoPS label values -> MS-CMRSeg's (myocardium = 200 + oedema 1220 + scar 2221)."""
    unknown = sorted(set(np.unique(gd).tolist()) - set(TO_MSCMR))
    if unknown:
        raise ValueError(f"{source}: label values {unknown} are not MyoPS'")
    out = np.zeros(gd.shape, np.int16)
    for v, w in TO_MSCMR.items():
        out[gd == v] = w
    return out


def thick_pairs(image: np.ndarray, label: np.ndarray, affine: np.ndarray):
    """C0 as slices twice as thick: slice j the mean of slices 2j and 2j + 1, its centre half an
    original slice further along the stack. Returns (image, label, affine)."""
    n = image.shape[2] // 2
    if n < 1:
        raise ValueError(f"a stack of {image.shape[2]} slice(s) has no pair to average")
    img = image[..., : 2 * n].astype(np.float32).reshape(*image.shape[:2], n, 2).mean(-1)
    values = np.array(list(STRUCTS.values()))
    onehot = np.stack([label[..., : 2 * n] == v for v in (0, *values)]).astype(np.float32)
    score = onehot.reshape(*onehot.shape[:3], n, 2).mean(-1)
    score += np.array([0.0, 3e-3, 2e-3, 1e-3], np.float32)[:, None, None, None]  # ties -> myo, LV, RV
    lab = np.array([0, *values], np.int16)[score.argmax(0)]
    aff = affine.copy()
    aff[:3, 3] = affine[:3, 3] + 0.5 * affine[:3, 2]
    aff[:3, 2] = 2.0 * affine[:3, 2]
    return img, lab, aff


def mid_slices(label: np.ndarray, count: int = T2_SLICES) -> slice:
    """The middle ``count`` slices of those that show LV (the later ones when that is ambiguous)."""
    lv = np.flatnonzero((label == STRUCTS["lv"]).any(axis=(0, 1)))
    if lv.size == 0:
        raise ValueError("no slice shows LV")
    if lv.size <= count:
        return slice(int(lv[0]), int(lv[-1]) + 1)
    start = int(lv[0]) + (lv.size - count + 1) // 2
    return slice(start, start + count)


def save(path: Path, data: np.ndarray, affine: np.ndarray, like: nib.Nifti1Image) -> None:
    """A NIfTI with ``affine`` as both qform and sform (code of ``like``'s qform, or scanner)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = like.header.copy()
    header.set_data_dtype(data.dtype)
    img = nib.Nifti1Image(data, affine, header)
    code = int(like.header["qform_code"]) or 1
    img.set_qform(affine, code=code)
    img.set_sform(affine, code=code)
    nib.save(img, path)


def write_case(root: Path, case: str, out: Path) -> dict:
    """Both versions of ``case`` under ``out/<version>/`` in the release's layout; their geometry."""
    patient = "patient" + case.removeprefix("Case")
    gd_img = nib.load(root / case / f"{case}_gd.nii.gz")
    label = to_mscmr(np.asarray(gd_img.dataobj).round().astype(np.int64), str(root / case / f"{case}_gd.nii.gz"))
    geometry = {}
    for version in VERSIONS:
        top = out / version
        if top.exists():
            shutil.rmtree(top)
        for seq in SEQS:
            img = nib.load(root / case / f"{case}_{seq}.nii.gz")
            data, lab, aff = np.asarray(img.dataobj), label, img.affine
            if version == "mscmr_like" and seq == "C0":
                data, lab, aff = thick_pairs(data, lab, aff)
            elif version == "mscmr_like" and seq == "T2":
                keep = mid_slices(lab)
                data, lab = data[..., keep], lab[..., keep]
                aff = aff.copy()
                aff[:3, 3] = img.affine[:3, :3] @ np.array([0.0, 0.0, keep.start]) + img.affine[:3, 3]
            save(top / IMAGES / f"{patient}_{seq}.nii.gz", np.ascontiguousarray(data), aff, img)
            save(top / LABELS[seq] / f"{patient}_{seq}_manual.nii.gz", np.ascontiguousarray(lab), aff, img)
            if version == "mscmr_like":
                geometry[seq] = {"slices": int(data.shape[2]), "thickness_mm": float(np.linalg.norm(aff[:3, 2])),
                                 "first_centre_mm": aff[:3, 3].round(2).tolist()}
    return {"patient": patient, "geometry": geometry}


def dice(seg: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    return {k: float(2 * ((seg == v) & (truth == v)).sum() / max((seg == v).sum() + (truth == v).sum(), 1))
            for k, v in STRUCTS.items()}


def score(top: Path, out: Path, patient: str) -> dict[str, dict[str, float]]:
    """Dice of every sequence's written label map against its carried label, on its own grid."""
    result = {}
    for seq in SEQS:
        truth_img = nib.load(top / LABELS[seq] / f"{patient}_{seq}_manual.nii.gz")
        seg_img = nib.load(out / f"{patient}_{seq}_seg.nii.gz")
        if seg_img.shape != truth_img.shape or not np.allclose(seg_img.affine, truth_img.affine, atol=1e-3):
            raise ValueError(f"{out / f'{patient}_{seq}_seg.nii.gz'}: not on {seq}'s own grid {truth_img.shape}")
        result[seq] = dice(np.asarray(seg_img.dataobj), np.asarray(truth_img.dataobj))
    return result


def mean_table(rows: list[dict]) -> dict:
    """Mean Dice per version, sequence and structure over the fitted cases."""
    ok = [r for r in rows if "error" not in r]
    return {v: {s: {k: float(np.mean([r[v][s][k] for r in ok])) if ok else None for k in STRUCTS} for s in SEQS}
            for v in VERSIONS}


def main() -> None:
    ap = argument_parser(__doc__, myops=True, threads=1)
    ap.add_argument("--out", default="/tmp/mvmm_hetero_coverage_real")
    ap.add_argument("--atlas-cases", default="Case3001..Case3015")
    ap.add_argument("--test-cases", default="Case3016..Case3025")
    ap.add_argument("--thickness-weights", action=argparse.BooleanOptionalAction, default=True,
                    help="scale each sequence's weight by min(1, LGE slice thickness / its own) (default on)")
    add_record_option(ap, "hetero_coverage_real")
    args = parse_args(ap)
    root, work = Path(args.root), Path(args.out)
    atlas = work / "atlas.nii.gz"
    t0 = time.perf_counter()
    build_atlas(compose_config([f"data.root={root}", f"subjects={args.atlas_cases}", f"output={atlas}"],
                               config_name="build_atlas"))
    atlas_seconds = time.perf_counter() - t0
    cases = select_subjects(args.test_cases, sorted(p.name for p in root.iterdir() if (p / f"{p.name}_gd.nii.gz").exists()),
                            "--test-cases")
    settings = ["data=mscmr", "data.sequences=[LGE,C0,T2]", "data.reference=LGE", "tuning=myops", "postprocess=myops",
                f"atlas.path={atlas}", "callbacks.progress.refresh_rate=0", "~logger",
                f"model.thickness_weights={str(args.thickness_weights).lower()}", *args.overrides]
    rows = []
    for case in cases:
        row: dict = {"case": case}
        try:
            row |= write_case(root, case, work / case)
            for version in VERSIONS:
                top, out = work / case / version, work / case / f"fit_{version}"
                t = time.perf_counter()
                m = fit(compose_config([*settings, f"data.root={top}", f"subject={row['patient']}", f"paths.output_dir={out}"]))
                row[f"{version}_weights"] = json.loads((out / "params.json").read_text())["settings"]["model"]["sequence_weights"]
                row[version] = score(top, out, row["patient"])
                row[f"{version}_fit"] = {"iterations": m["iterations"], "seconds": time.perf_counter() - t,
                                         "metrics_dice": m["dice"]}
            row["lge_myocardium_delta"] = row["mscmr_like"]["LGE"]["myocardium"] - row["full"]["LGE"]["myocardium"]
        except Exception as err:  # noqa: BLE001 - a failing case is reported, never dropped
            row["error"] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_fit")}), flush=True)

    print("\n| case | version | " + " | ".join(f"{s} {k}" for s in SEQS for k in ("myo", "LV", "RV")) + " |")
    print("|---" * (2 + 3 * len(SEQS)) + "|")
    for r in rows:
        if "error" in r:
            print(f"| {r['case']} | FAILED: {r['error'][:160]} |")
            continue
        for v in VERSIONS:
            print(f"| {r['case']} | {v} | " + " | ".join(f"{r[v][s][k]:.3f}" for s in SEQS for k in STRUCTS) + " |")
    means = mean_table(rows)
    ok = [r for r in rows if "error" not in r]
    deltas = [r["lge_myocardium_delta"] for r in ok]
    for v in VERSIONS:
        print(f"| **mean** | {v} | " + " | ".join(f"{means[v][s][k]:.3f}" if ok else "-" for s in SEQS for k in STRUCTS) + " |")
    mean_delta = float(np.mean(deltas)) if deltas else None
    print(f"\nLGE myocardium Dice, MS-CMRSeg-like minus full coverage: mean {mean_delta}, per case "
          + ", ".join(f"{r['case']} {r['lge_myocardium_delta']:+.3f}" for r in ok))
    if args.record:
        failed = [r["case"] for r in rows if "error" in r]
        figures = {
            "atlas_cases": args.atlas_cases, "test_cases": args.test_cases, "overrides": list(args.overrides),
            "settings": [o for o in settings if not o.startswith("atlas.path=")],
            "thickness_weights": args.thickness_weights, "atlas_seconds": atlas_seconds, "dice_mean": means,
            "lge_myocardium_delta": {"mean": mean_delta, "min": min(deltas, default=None), "max": max(deltas, default=None)},
            "within_0.02": None if mean_delta is None else abs(mean_delta) <= 0.02,
            "seconds_per_fit": float(np.mean([r[f"{v}_fit"]["seconds"] for r in ok for v in VERSIONS])) if ok else None,
            "fitted": len(ok), "failed": failed, "cases": rows,
        }
        names = {"full": "full coverage", "mscmr_like": "MS-CMRSeg-like"}
        table_rows = [[f"{names[v]}, {s}", *(means[v][s][k] for k in STRUCTS)] for v in VERSIONS for s in SEQS]
        write_record(args.record, figures, table={
            "columns": ["version, sequence (own grid)", "myocardium", "LV", "RV"],
            "rows": table_rows,
            "caption": (f"Mean Dice of every sequence's label map on its own grid, {args.test_cases} "
                        f"({len(ok)} of {len(rows)} fitted{'; failed: ' + ', '.join(failed) if failed else ''}), "
                        f"atlas from {args.atlas_cases}. MS-CMRSeg-like: LGE kept, C0 slice pairs averaged "
                        "(twice as thick, half a slice along), T2 cut to three mid-ventricular slices"
                        + ("; sequence weights scaled by LGE / own slice thickness (C0 1 -> 0.5). " if args.thickness_weights
                           else "; the tuning's sequence weights. ")
                        + (f"Both fits with {' '.join(args.overrides)}. " if args.overrides else "")
                        + (f"LGE myocardium Dice, MS-CMRSeg-like minus full coverage: {mean_delta:+.3f} on average "
                           f"({min(deltas):+.3f} to {max(deltas):+.3f}); per case in the record." if deltas else "")),
        })


if __name__ == "__main__":
    main()
