#!/usr/bin/env python
"""Time one EM iteration and one whole default fit.

EM iteration: 3 images of 256 x 256 x 16 voxels, 4 classes, subtypes (3, 2, 2, 2), float32, on
this machine's CPU threads; compared with a plain numpy implementation of the same E and M steps
on the same inputs. Whole fit: ``scripts/fit.py``'s default (synthetic patient1) in-process.

    python benchmarks/em_speed.py [--repeats 10] [--skip-fit] [--record NAME]

Prints the figures and writes them to ``benchmarks/results/em_speed.json`` (``--record``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch
from record import add_record_option, write_record

from mvmm_monai.mixture import (
    EMConfig,
    em_step,
    initialise_from_atlas,
    log_atlas_from_prob,
)


def make_inputs(shape=(256, 256, 16), n=3, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    axes = [torch.linspace(-1, 1, s) for s in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    r = grid[:2].pow(2).sum(0).sqrt()
    centres = torch.linspace(0.1, 0.9, k).reshape(k, 1, 1, 1)
    atlas = torch.softmax(-((r[None] - centres) ** 2) / 0.02, dim=0)[None]
    labels = atlas[0].argmax(0)
    means = torch.rand(n, k, generator=g)
    images = means[:, labels] + 0.05 * torch.randn(n, *shape, generator=g)
    return images[None], torch.ones(1, n, *shape), atlas


def numpy_em_step(x, cov, log_prior, log_tau, mean, var):
    """The same E and M steps in plain numpy (float32, vectorised, no chunking)."""
    d = -0.5 * (np.log(2 * np.pi * var)[..., None] + (x[:, None, None] - mean[..., None]) ** 2 / var[..., None])
    d += log_tau[..., None]
    mx = d.max(axis=2, keepdims=True)
    e = np.exp(d - mx)
    s = e.sum(axis=2)
    log_class = np.log(s) + mx[:, :, 0]
    joint = log_prior + (log_class * cov[:, None]).sum(0)
    m = joint.max(0, keepdims=True)
    norm = m + np.log(np.exp(joint - m).sum(0, keepdims=True))
    post = np.exp(joint - norm)
    resp = e * (post[None] * cov[:, None] / s)[:, :, None]
    mass = resp.sum(-1)
    mass = np.maximum(mass, np.finfo(np.float32).tiny)  # padded slots have no mass
    mu = (resp * x[:, None, None]).sum(-1) / mass
    v = (resp * (x[:, None, None] - mu[..., None]) ** 2).sum(-1) / mass
    return mass, mu, v, float(norm.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--skip-fit", action="store_true")
    add_record_option(ap, "em_speed")
    args = ap.parse_args()
    print(f"command: {' '.join(sys.argv)}")
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads")

    images, cov, atlas = make_inputs()
    counts = torch.tensor([[3, 2, 2, 2]] * 3)
    log_atlas = log_atlas_from_prob(atlas, 1e-4)
    cfg = EMConfig()
    params = initialise_from_atlas(images, cov, atlas, counts)
    params, _ = em_step(images, cov, log_atlas, params, cfg)  # warm-up
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        params, est = em_step(images, cov, log_atlas, params, cfg)
        times.append(time.perf_counter() - t)
    print("\nEM iteration, 3 x 256x256x16, K=4, subtypes (3,2,2,2), float32:")
    print(f"  mvmm_monai (torch, chunked): median {np.median(times):.3f} s, min {np.min(times):.3f} s over {args.repeats}")

    # numpy reference on the same inputs (padded to 3 subtypes, padded slots weight 0)
    x = images[0].reshape(3, -1).numpy()
    c = cov[0].reshape(3, -1).numpy()
    lp = torch.log_softmax(log_atlas[0].reshape(4, -1), 0).numpy()
    lt = params.log_tau[0].numpy().copy()
    lt[~np.isfinite(lt)] = -1e30
    mu, var = params.mean[0].numpy(), params.var[0].numpy()
    numpy_em_step(x, c, lp, lt, mu, var)
    nt = []
    for _ in range(max(3, args.repeats // 3)):
        t = time.perf_counter()
        numpy_em_step(x, c, lp, lt, mu, var)
        nt.append(time.perf_counter() - t)
    print(f"  plain numpy (same maths, vectorised): median {np.median(nt):.3f} s")
    figures = {
        "em_iteration": {"shape": [3, 256, 256, 16], "classes": 4, "subtypes": [3, 2, 2, 2], "repeats": args.repeats,
                         "median_s": float(np.median(times)), "min_s": float(np.min(times)),
                         "numpy_median_s": float(np.median(nt))},
    }
    rows = [["one EM iteration, 3 x 256x256x16, K=4 (median)", float(np.median(times))],
            ["the same maths in plain numpy (median)", float(np.median(nt))]]

    if not args.skip_fit:
        import logging
        import warnings

        logging.disable(logging.INFO)
        warnings.filterwarnings("ignore")
        from mvmm_monai import compose_config, fit

        with tempfile.TemporaryDirectory() as tmp:
            cfg = compose_config([f"paths.output_dir={tmp}/out", "callbacks.progress.refresh_rate=0", "subject=patient1"])
            fit(cfg)  # first call may generate the synthetic cohort; time the second
            t = time.perf_counter()
            m = fit(cfg)
            total = time.perf_counter() - t
        print("\nWhole default fit (synthetic patient1, registration=none, 3 sequences, DE grid 112x112x10):")
        print(f"  {total:.1f} s wall, {m['iterations']} ICM iterations, {total / max(m['iterations'], 1):.3f} s/iteration incl. I/O")
        print("  Dice DE: " + ", ".join(f"{k} {v:.3f}" for k, v in m["dice"]["DE"].items()))
        figures["default_fit"] = {"seconds": total, "iterations": m["iterations"],
                                  "seconds_per_iteration": total / max(m["iterations"], 1), "dice_DE": m["dice"]["DE"]}
        rows += [["whole default fit, synthetic patient1 (wall, in-process)", total],
                 ["per ICM iteration of that fit, I/O included", total / max(m["iterations"], 1)]]
    if args.record:
        write_record(args.record, figures, table={
            "columns": ["measure", "seconds"], "rows": rows,
            "caption": "EM speed (float32, subtypes 3, 2, 2, 2) and the default synthetic fit on this machine's CPU threads."})


if __name__ == "__main__":
    main()
