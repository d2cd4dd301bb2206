#!/usr/bin/env python
"""Hearts smaller and larger than the shared ones: does the automatic placement still find them?

Issue "Automatic results that hold" found the placement's heart size at the lower edge of its
search range on 6 of 8 patients of another MyoPS release. The shared cases' hearts all lie well
inside it (sizes 0.79 to 1.15 of the atlas' mean heart), so that edge cannot be seen on them as
they are. This script makes hearts of other sizes from them, exactly: each case's files are
written again with the voxel size multiplied by ``FACTOR`` (the same voxels, labels included, on a
grid ``FACTOR`` times as fine or as coarse in mm: a heart ``FACTOR`` times as large in every
direction, the field of view with it), and every version is fitted fully automatically as
``benchmarks/crossval.py`` does (each fold's atlas built from the other folds' original cases), once
per search range (``--variant``). The Dice is computed on the case's own voxels, so a version's
Dice is directly comparable with the original's.

    .venv/bin/python benchmarks/heart_size.py [--root DIR] [--factors 0.75 1.0 1.35] \
        [--variant NAME=OVERRIDE[,OVERRIDE...] ...] [--atlases DIR] [--cases Case3001..Case3025] \
        [--folds 5] [--jobs 2] [--out DIR] [--record NAME] [hydra overrides common to every fit ...]

``--atlases DIR``: the fold atlases of an earlier ``crossval.py --out DIR`` run with the same cases
and folds (``DIR/fold<i>/atlas.nii.gz``), instead of building them again.

Reports per case, factor and variant: LGE Dice (myocardium, LV, RV), the heart size the placement
chose and whether it lies on the edge of the search range, the quality-control score and flag,
seconds; per factor and variant: the means, the cases on the edge, below 0.70 and flagged. Writes
``benchmarks/results/NAME.json`` (default ``heart_size``).
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
from crossval import FAILED, STRUCTS, fit_case, folds_of, parse_variants, summary
from qc_calibration import GOOD
from record import add_record_option, write_record

from mvmm_monai.files import save_nifti


def resized_case(src: Path, dst: Path, factor: float) -> None:
    """Write every NIfTI file of case folder ``src`` into ``dst`` with its voxel size (the affine's
    linear part) multiplied by ``factor``; the voxels and the origin as they are."""
    dst.mkdir(parents=True, exist_ok=True)
    files = sorted(src.glob("*.nii.gz"))
    if not files:
        raise SystemExit(f"{src}: no NIfTI files")
    for path in files:
        img = nib.load(path)
        affine = img.affine.copy()
        affine[:3, :3] *= factor
        save_nifti(dst / path.name, np.asanyarray(img.dataobj), affine)


def search_range(overrides: list[str]) -> tuple[float, float]:
    """The smallest and largest heart size the placement can reach with ``overrides``."""
    from mvmm_monai import compose_config
    from mvmm_monai.pipeline.fit import placement_scale_range

    return placement_scale_range(compose_config(["data=myops", "paths.output_dir=/tmp/unused", *overrides]))


def add_options(ap, record: str) -> None:
    """The options this script shares with ``benchmarks/resolution.py``."""
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDES")
    ap.add_argument("--atlases", type=Path, default=None, help="fold atlases of an earlier crossval.py run (DIR/fold<i>/atlas.nii.gz)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--cases", default="Case3001..Case3025")
    ap.add_argument("--jobs", type=int, default=2, help="fits at once (processes; default %(default)s)")
    ap.add_argument("--out", type=Path, default=Path(f"/tmp/mvmm_{record}"))
    add_record_option(ap, record)


def setup(args) -> tuple[list[str], list[list[str]], dict[int, Path]]:
    """The cases, their folds, and each fold's atlas (built from the other folds' original cases,
    or ``--atlases``)."""
    from mvmm_monai import build_atlas, compose_config
    from mvmm_monai.config import build
    from mvmm_monai.pipeline.build_atlas import select_subjects

    dataset = build(compose_config(["data=myops", f"data.root={args.root}"]).data)
    cases = select_subjects(args.cases, dataset.subjects(), "--cases")
    folds = folds_of(cases, args.folds)
    atlases = {}
    for i, fold in enumerate(folds):
        if args.atlases is not None:
            atlases[i] = args.atlases / f"fold{i}" / "atlas.nii.gz"
            if not atlases[i].is_file():
                raise SystemExit(f"--atlases: {atlases[i]} is missing")
            continue
        atlases[i] = args.out / f"fold{i}" / "atlas.nii.gz"
        training = [c for c in cases if c not in fold]
        build_atlas(compose_config([f"data.root={args.root}", f"subjects=[{','.join(training)}]", f"output={atlases[i]}"],
                                   config_name="build_atlas"))
    return cases, folds, atlases


def fit_versions(args, versions: dict[str, Path], cases: list[str], folds: list[list[str]], atlases: dict[int, Path]) -> dict:
    """Fit every case of every version (name -> MyoPS root) with every ``--variant``, as
    ``crossval.py`` does; returns the figures: per ``version/variant`` the cases' rows (Dice, the
    placement's heart size and whether it is on the search's edge, the QC score and flag, seconds)
    and their summary."""
    variants = parse_variants(args.variant)
    ranges = {name: search_range([*args.overrides, *ov]) for name, ov in variants.items()}
    t0 = time.perf_counter()
    jobs = [(v, name, i, case) for v in versions for name in variants for i, fold in enumerate(folds) for case in fold]
    rows: dict[tuple[str, str], dict[str, dict]] = {(v, n): {} for v in versions for n in variants}
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {
            pool.submit(fit_case, versions[v], atlases[i], case, args.out / v / name / case,
                        [*args.overrides, *variants[name]], args.threads or 1): (v, name, i, case)
            for v, name, i, case in jobs
        }
        for future, (v, name, i, case) in futures.items():
            row = {**future.result(), "fold": i, "version": v, "variant": name}
            metrics = args.out / v / name / case / "metrics.json"
            if "error" not in row and metrics.is_file():
                m = json.loads(metrics.read_text())
                lo, hi = ranges[name]
                scale = float(m["placement"]["scale"])
                row.update(scale=scale, on_edge=bool(scale <= lo * 1.001 or scale >= hi * 0.999),
                           qc_score=m["qc"].get("score"), qc_flag=m["qc"].get("flag"), qc_reasons=m["qc"].get("reasons"))
            rows[v, name][case] = row
            print(json.dumps(row), flush=True)
    results = {}
    for (v, name), by_case in rows.items():
        ordered = [by_case[c] for c in cases]
        s = summary(ordered)
        s.update(on_edge=[r["case"] for r in ordered if r.get("on_edge")], flagged=[r["case"] for r in ordered if r.get("qc_flag")],
                 good_flagged=[r["case"] for r in ordered if r.get("qc_flag") and "dice" in r and r["dice"]["myocardium"] >= GOOD],
                 seconds=float(np.mean([r["seconds"] for r in ordered])), search_range=list(ranges[name]),
                 unflagged_below_0_70=[r["case"] for r in ordered if "dice" in r and r["dice"]["myocardium"] < FAILED and not r.get("qc_flag")])
        results[f"{v}/{name}"] = {"summary": s, "cases": ordered}
        print(f"{v} {name}: " + json.dumps({k: s[k] for k in ("mean", "on_edge", "below_0.70", "flagged", "errors", "seconds")}), flush=True)
    return {"variants": variants, "search_ranges": ranges, "folds": folds, "common_overrides": list(args.overrides),
            "fit_seconds": time.perf_counter() - t0, "results": results}


def main() -> None:
    ap = argument_parser(__doc__, myops=True, threads=1)
    ap.add_argument("--factors", type=float, nargs="+", default=[0.75, 1.0, 1.35], help="voxel size multipliers (heart sizes)")
    add_options(ap, "heart_size")
    args = parse_args(ap)
    if any(f <= 0 for f in args.factors):
        raise SystemExit(f"--factors must be > 0, got {args.factors}")
    cases, folds, atlases = setup(args)
    versions = {}
    for f in args.factors:
        versions[f"x{f:g}"] = args.root if f == 1.0 else args.out / f"data_x{f:g}"
        if f != 1.0:
            for c in cases:
                resized_case(args.root / c, versions[f"x{f:g}"] / c, f)
    figures = {"factors": args.factors, **fit_versions(args, versions, cases, folds, atlases)}
    if not args.record:
        return
    results, ranges = figures["results"], figures["search_ranges"]
    table_rows = []
    for f in args.factors:
        for name in figures["variants"]:
            s = results[f"x{f:g}/{name}"]["summary"]
            lo, hi = ranges[name]
            table_rows.append([f"{f:g}", f"{name} ({lo:.3g}-{hi:.3g})", *(f"{s['mean'][k]:.3f}" for k in STRUCTS),
                               f"{s['min_myocardium']:.3f}", len(s["on_edge"]), len(s["below_0.70"]),
                               f"{len(s['flagged'])} ({len(s['unflagged_below_0_70'])})", f"{s['seconds']:.1f}"])
    write_record(args.record, figures, table={
        "columns": ["voxel size x", "placement search (heart sizes)", "LGE myocardium", "LV", "RV", "worst myocardium",
                    "heart size on the search's edge", "cases < 0.70", "qc flagged (of them < 0.70 unflagged)", "s per fit"],
        "rows": table_rows,
        "caption": f"The {len(cases)} shared MyoPS cases ({args.cases}) written with their voxel size multiplied by each factor "
                   f"(hearts that many times as large), {args.folds}-fold cross-validated (each fold's atlas from the other folds' "
                   "original cases), fully automatic; mean LGE Dice on each case's own voxels.",
    })


if __name__ == "__main__":
    main()
