#!/usr/bin/env python
r"""Seconds per subject when the EM engine fits B subjects at once (issue "Fast", item 5).

B synthetic subjects (3 sequences of 128 x 128 x 8 voxels each, about a MyoPS region of interest,
subtypes 3/2/2/2, MRF on) are fitted together by ``mixture.fit_em`` for a fixed number of
iterations, for B = 1, 4 and 16, on CUDA when there is a GPU, else on this machine's CPU threads;
each subject's labels are compared with its fit alone (Dice per structure).

This measures the engine: the pipeline (``scripts/fit.py subject=all``) still fits a cohort's
subjects one after another, each with its own placement and registration.

    python benchmarks/batched_cohort.py [--sizes 1,4,16] [--iterations 30] [--record NAME]
"""

from __future__ import annotations

import argparse
import time

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4,16")
    ap.add_argument("--iterations", type=int, default=30)
    add_record_option(ap, "batched_cohort")
    args = ap.parse_args()
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
