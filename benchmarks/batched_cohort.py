#!/usr/bin/env python
r"""Seconds per subject when B subjects are fitted at once (issue "Fast", item 5).

The engine (default): B synthetic subjects (3 sequences of 128 x 128 x 8 voxels each, about a MyoPS
region of interest, subtypes 3/2/2/2, MRF on) are fitted together by ``mixture.fit_em`` for a fixed
number of iterations, for B = 1, 4 and 16, on CUDA when there is a GPU, else on this machine's CPU
threads; each subject's labels are compared with its fit alone (Dice per structure).

The pipeline (``--root``, the shared MyoPS cases): an atlas built from ``--atlas-cases``, then the
cohort ``--cohort`` (16 cases) fitted by one in-process call of ``fit`` (what ``scripts/fit.py
subject=[...]`` runs: automatic placement, default settings, every file written) with
``cohort.batch_size`` = each of ``--sizes``; seconds per subject, and each subject's LGE label map
against its B = 1 fit (identical maps, worst Dice per structure, iterations) and against the manual
labels. Record ``batched_cohort_pipeline``.

    python benchmarks/batched_cohort.py [--sizes 1,4,16] [--iterations 30] [--record NAME]
    python benchmarks/batched_cohort.py --root ../shared/data/myops [--sizes 1,4,16]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from em_speed import make_inputs
from record import add_record_option, write_record

from mvmm_monai.mixture import EMConfig, fit_em, log_atlas_from_prob

COUNTS = torch.tensor([[3, 2, 2, 2]] * 3)


def subjects(seeds, device: torch.device):
    parts = [make_inputs(shape=(128, 128, 8), seed=s) for s in seeds]
    images = torch.cat([p[0] for p in parts]).to(device)
    atlas = torch.cat([p[2] for p in parts]).to(device)
    return images, torch.ones_like(images), log_atlas_from_prob(atlas, 1e-4)


def fit(images, coverage, log_atlas, iterations):
    return fit_em(images, coverage, log_atlas, COUNTS.to(images.device), EMConfig(beta=1.0), max_iter=iterations, tol=0.0)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def label_dice(a: np.ndarray, b: np.ndarray) -> float:
    """The worst Dice over the structures (label values other than 0) of two label maps."""
    worst = 1.0
    for v in np.union1d(np.unique(a), np.unique(b)):
        if v == 0:
            continue
        x, y = a == v, b == v
        worst = min(worst, 2 * float((x & y).sum()) / max(float(x.sum() + y.sum()), 1.0))
    return worst


def pipeline(args) -> None:
    """The cohort through the pipeline for every batch size (see the module docstring)."""
    import logging
    import warnings

    import nibabel as nib

    from mvmm_monai import build_atlas, compose_config
    from mvmm_monai import fit as fit_cohort
    from mvmm_monai.pipeline.build_atlas import select_subjects

    if not args.root.is_dir():
        raise SystemExit(f"--root {args.root}: no such folder (the shared MyoPS cases)")
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    names = [p.name for p in sorted(args.root.iterdir()) if p.is_dir()]
    cohort = select_subjects(args.cohort, names, "--cohort")
    atlas = args.out / "atlas" / "atlas.nii.gz"
    build_atlas(compose_config([f"data.root={args.root}", f"subjects={args.atlas_cases}", f"output={atlas}"], config_name="build_atlas"))
    base = ["data=myops", f"data.root={args.root}", f"atlas.path={atlas}", "callbacks.progress.refresh_rate=0"]
    fit_cohort(compose_config([*base, f"subject={cohort[0]}", f"paths.output_dir={args.out / 'warm'}"]))  # warm-up
    sizes = [int(s) for s in args.sizes.split(",")]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    figures: dict = {"device": device, "cohort": cohort, "atlas_cases": args.atlas_cases, "torch_threads": torch.get_num_threads(),
                     "batches": {}}
    rows, first = [], None
    for b in sizes:
        out = args.out / f"b{b}"
        t = time.perf_counter()
        summary = fit_cohort(compose_config([*base, f"subject=[{','.join(cohort)}]", f"cohort.batch_size={b}", f"paths.output_dir={out}"]))
        seconds = time.perf_counter() - t
        metrics = {n: json.loads((out / n / "metrics.json").read_text()) for n in summary["subjects"]}
        labels = {n: np.asarray(nib.load(out / n / f"{n}_LGE_seg.nii.gz").dataobj) for n in metrics}
        entry = {"seconds": seconds, "seconds_per_subject": seconds / len(cohort), "failed": summary["failed"],
                 "converged": sum(bool(m["converged"]) for m in metrics.values()),
                 "mean_dice_LGE": {k: float(np.mean([m["dice"]["LGE"][k] for m in metrics.values()])) for k in ("myocardium", "lv", "rv")}}
        if first is None:
            first = (metrics, labels)
        else:
            entry["identical_label_maps"] = sum(bool(np.array_equal(labels[n], first[1][n])) for n in labels)
            entry["worst_dice_vs_batch_1"] = min(label_dice(labels[n], first[1][n]) for n in labels)
            entry["same_iterations"] = sum(metrics[n]["iterations"] == first[0][n]["iterations"] for n in metrics)
        figures["batches"][str(b)] = entry
        rows.append([b, seconds, seconds / len(cohort), entry.get("identical_label_maps", len(cohort)),
                     entry.get("worst_dice_vs_batch_1", 1.0), entry["mean_dice_LGE"]["myocardium"]])
        print(f"cohort.batch_size={b}: {seconds:.1f} s, {seconds / len(cohort):.2f} s per subject; "
              f"{json.dumps({k: v for k, v in entry.items() if k not in ('seconds', 'failed')})}", flush=True)
    if args.record:
        write_record(args.record, figures, table={
            "columns": ["cohort.batch_size", "seconds", "seconds per subject", "label maps identical to B = 1",
                        "worst Dice vs B = 1", "mean LGE myocardium Dice"], "rows": rows,
            "caption": f"The pipeline on the {len(cohort)} MyoPS cases {args.cohort} (atlas from {args.atlas_cases}), "
                       f"one in-process fit call each, automatic placement, default settings, on {device}."})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4,16")
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--root", type=Path, help="the shared MyoPS cases: measure the pipeline instead of the engine")
    ap.add_argument("--atlas-cases", default="Case3001..Case3009")
    ap.add_argument("--cohort", default="Case3010..Case3025")
    ap.add_argument("--out", type=Path, default=Path("/tmp/mvmm_batched_cohort"))
    add_record_option(ap, "batched_cohort")
    args = ap.parse_args()
    if args.root is not None:
        if args.record == "batched_cohort":
            args.record = "batched_cohort_pipeline"
        return pipeline(args)
    import warnings

    warnings.filterwarnings("ignore", message="EM did not converge")  # a fixed number of iterations on purpose
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} CPU threads'}), "
          f"{args.iterations} EM iterations, 3 x 128x128x8 voxels per subject")
    fit(*subjects([0], device), 2)  # warm-up
    alone = {}
    rows, figures = [], {"device": str(device), "iterations": args.iterations, "voxels_per_subject": 128 * 128 * 8, "batches": {}}
    for b in sizes:
        data = subjects(range(b), device)
        sync(device)
        t = time.perf_counter()
        result = fit(*data, args.iterations)
        sync(device)
        seconds = time.perf_counter() - t
        labels = result.log_posterior.argmax(1).cpu()
        worst = 1.0
        for i in range(b):
            if i not in alone:  # subject i fitted alone
                alone[i] = fit(*subjects([i], device), args.iterations).log_posterior[0].argmax(0).cpu()
            for k in range(1, 4):
                a, s = labels[i] == k, alone[i] == k
                worst = min(worst, float(2 * (a & s).sum() / (a.sum() + s.sum()).clamp_min(1)))
        figures["batches"][str(b)] = {"seconds": seconds, "seconds_per_subject": seconds / b, "worst_dice_vs_alone": worst}
        rows.append([b, seconds, seconds / b, worst])
        print(f"B = {b:2d}: {seconds:.2f} s, {seconds / b:.3f} s per subject; worst Dice against the subject alone {worst:.4f}", flush=True)
    if args.record:
        write_record(args.record, figures, table={
            "columns": ["subjects at once (B)", "seconds", "seconds per subject", "worst Dice vs alone"], "rows": rows,
            "caption": f"mixture.fit_em, {args.iterations} iterations, 3 x 128x128x8 voxels per subject, on {device}."})


if __name__ == "__main__":
    main()
