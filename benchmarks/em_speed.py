#!/usr/bin/env python
"""Time one EM iteration and one whole default fit.

EM iteration: 3 images of 256 x 256 x 16 voxels (1M voxels), 4 classes, subtypes (3, 2, 2, 2),
float32, MRF on (beta 1) and pi updated, on this machine's CPU threads; side by side in the same
run with the same maths written straightforwardly in torch (eager, and ``torch.compile`` of it),
in plain numpy, and, when antspyx is installed, one iteration of ANTs Atropos on the same images
and atlas (its own model). Then the engine again with every CPU kept busy by other processes, on
all threads and on one, the two alternating call by call. Whole fit: ``scripts/fit.py``'s default (synthetic patient1) in-process,
and the README's quick start as a user runs it (``make fit``'s command, ``python scripts/fit.py
subject=patient1 trainer.devices=1``, start-up and exit included; ``--command-repeats`` runs, the
median), with whether it converged before its iteration cap and the WARNING lines it printed.

    python benchmarks/em_speed.py [--repeats 10] [--command-repeats 3] [--skip-fit] [--no-peers] [--record NAME]

Prints the figures and writes them to ``benchmarks/results/em_speed.json`` (``--record``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
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
from mvmm_monai.mixture.gaussian import quantise


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


LOG_2PI = float(np.log(2 * np.pi))


def inplane_neighbour_sum(post, nb):
    """``nb`` (zeros, torch or numpy) plus each voxel's 4 in-plane neighbours of ``post`` ``[K, H, W, D]``."""
    nb[:, 1:] += post[:, :-1]
    nb[:, :-1] += post[:, 1:]
    nb[:, :, 1:] += post[:, :, :-1]
    nb[:, :, :-1] += post[:, :, 1:]
    return nb


def reference_em_step(x, cov, log_atlas, log_pi, log_tau, mean, var, post, beta):
    """One EM iteration written straightforwardly in torch: the atlas prior with the proportions and
    the mean-field MRF of ``post`` (4 in-plane neighbours), every subtype at every voxel, the
    moments, the pi fixed point. x, cov ``[N, V]``; log_atlas, post ``[K, H, W, D]``; parameters
    ``[N, K, C]`` (padded slots: log_tau -inf). The maths of ``mvmm_monai.mixture.em_step``."""
    nb = inplane_neighbour_sum(post, torch.zeros_like(post))
    k = log_atlas.shape[0]
    lp = torch.log_softmax(log_atlas + log_pi[:, None, None, None] + beta * nb, 0).reshape(k, -1)
    d = log_tau[..., None] - 0.5 * (LOG_2PI + torch.log(var)[..., None] + (x[:, None, None] - mean[..., None]) ** 2 / var[..., None])
    log_class = torch.logsumexp(d, 2)
    joint = lp + (log_class * cov[:, None]).sum(0)
    ln = torch.logsumexp(joint, 0)
    p = torch.exp(joint - ln)
    r = torch.exp(d - log_class[:, :, None]) * (p[None] * cov[:, None])[:, :, None]
    mass = r.sum(-1).clamp_min(1e-30)
    mu = (r * x[:, None, None]).sum(-1) / mass
    v = (r * (x[:, None, None] - mu[..., None]) ** 2).sum(-1) / mass
    omega = (cov.amax(0) > 0).float()
    denom = (torch.softmax(log_atlas.reshape(k, -1) + log_pi[:, None], 0) * omega).sum(-1) / torch.exp(log_pi)
    pi = (p * omega).sum(-1) / denom
    return mass, mu, v, torch.log(pi / pi.sum()), (ln * omega).sum() / omega.sum(), p.reshape(post.shape)


def numpy_em_step(x, cov, log_atlas, log_pi, log_tau, mean, var, post, beta):
    """:func:`reference_em_step` in plain numpy (float32, vectorised; padded slots log_tau -1e30)."""
    nb = inplane_neighbour_sum(post, np.zeros_like(post))
    k = log_atlas.shape[0]
    a = log_atlas + log_pi[:, None, None, None] + beta * nb
    a = a - a.max(0, keepdims=True)
    lp = (a - np.log(np.exp(a).sum(0, keepdims=True))).reshape(k, -1)
    d = log_tau[..., None] - 0.5 * (LOG_2PI + np.log(var)[..., None] + (x[:, None, None] - mean[..., None]) ** 2 / var[..., None])
    mx = d.max(axis=2, keepdims=True)
    e = np.exp(d - mx)
    s = e.sum(axis=2)
    log_class = np.log(s) + mx[:, :, 0]
    joint = lp + (log_class * cov[:, None]).sum(0)
    m = joint.max(0, keepdims=True)
    ln = m + np.log(np.exp(joint - m).sum(0, keepdims=True))
    p = np.exp(joint - ln)
    r = e * (p[None] * cov[:, None] / s)[:, :, None]
    mass = np.maximum(r.sum(-1), np.float32(1e-30))
    mu = (r * x[:, None, None]).sum(-1) / mass
    v = (r * (x[:, None, None] - mu[..., None]) ** 2).sum(-1) / mass
    omega = (cov.max(0) > 0).astype(np.float32)
    z = log_atlas.reshape(k, -1) + log_pi[:, None]
    z = np.exp(z - z.max(0, keepdims=True))
    denom = (z / z.sum(0, keepdims=True) * omega).sum(-1) / np.exp(log_pi)
    pi = (p * omega).sum(-1) / denom
    return mass, mu, v, np.log(pi / pi.sum()), float((ln[0] * omega).sum() / omega.sum()), p.reshape(post.shape)


def best_of(fn, repeats):
    """``(median, min)`` seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), float(np.min(times))


def interleaved(fn, threads, repeats):
    """``(median, min)`` seconds of ``fn`` on ``threads`` threads and on one, ``repeats`` calls each
    after a warm-up call each way, the two ways alternating call by call (in turn first) so that both
    meet the same load: timed one block after the other, the first block met the busy processes
    just started, and the ratio of the two moved by 20 % from run to run."""
    times = {threads: [], 1: []}
    try:
        for n in (threads, 1):
            torch.set_num_threads(n)
            fn()
        for i in range(repeats):
            for n in ((threads, 1) if i % 2 == 0 else (1, threads)):
                torch.set_num_threads(n)
                t = time.perf_counter()
                fn()
                times[n].append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    return tuple((float(np.median(times[n])), float(np.min(times[n]))) for n in (threads, 1))


def _spin(stop):
    while not stop.is_set():
        pass


@contextlib.contextmanager
def busy_cpus(n):
    """``n`` processes spinning for the duration: a loaded machine."""
    stop = multiprocessing.Event()
    procs = [multiprocessing.Process(target=_spin, args=(stop,), daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        time.sleep(0.5)
        yield
    finally:
        stop.set()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.terminate()


def atropos_iteration(images, atlas):
    """Seconds per Atropos iteration on the same images and atlas (difference of a 2- and a
    7-iteration run, so start-up and I/O cancel), or None without antspyx."""
    try:
        from atropos_peer import atropos_fit
    except ImportError:
        return None
    try:
        runs = {}
        for iters in (2, 7):
            t = time.perf_counter()
            atropos_fit(list(images), (1.0, 1.0, 1.0), atlas, mask=np.ones(images.shape[1:], bool), iterations=iters,
                        convergence_threshold=0.0, roi_margin_mm=None)
            runs[iters] = time.perf_counter() - t
    except ImportError:
        return None
    return (runs[7] - runs[2]) / 5


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK_START = ["scripts/fit.py", "subject=patient1", "trainer.devices=1"]
QUICK_START_TEXT = "`python " + " ".join(QUICK_START) + "`, `make fit`"


def quick_start(repeats: int) -> dict:
    """``make fit``'s command run ``repeats`` times from the repository root (each writing into a
    temporary folder): wall seconds (median and best), its iterations, whether it converged, and the
    lines of its output that contain ``WARNING`` (the quick start must print none)."""
    seconds, warning_lines = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            out = os.path.join(tmp, f"run{i}")
            t = time.perf_counter()
            done = subprocess.run([sys.executable, *QUICK_START, f"paths.output_dir={out}"], cwd=REPO,
                                  capture_output=True, text=True)
            seconds.append(time.perf_counter() - t)
            if done.returncode != 0:
                raise SystemExit(f"the quick start failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
            warning_lines += [line for line in (done.stdout + done.stderr).splitlines() if "WARNING" in line]
        metrics = json.loads(open(os.path.join(out, "metrics.json")).read())
    print(f"\nThe quick start as a command ({QUICK_START_TEXT}): median {statistics.median(seconds):.1f} s of {repeats}, "
          f"{metrics['iterations']} iterations, converged {metrics['converged']}, {len(warning_lines)} WARNING lines")
    return {"command": " ".join(["python", *QUICK_START]), "repeats": repeats, "median_s": statistics.median(seconds),
            "min_s": min(seconds), "seconds": seconds, "iterations": metrics["iterations"], "converged": metrics["converged"],
            "warning_lines": len(warning_lines), "warnings": sorted(set(warning_lines))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--command-repeats", type=int, default=3, help="runs of the quick-start command (0: not timed)")
    ap.add_argument("--skip-fit", action="store_true")
    ap.add_argument("--no-peers", dest="peers", action="store_false", help="skip ANTs Atropos even when antspyx is installed")
    add_record_option(ap, "em_speed")
    args = ap.parse_args()
    print(f"command: {' '.join(sys.argv)}")
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads")

    images, cov, atlas = make_inputs()
    counts = torch.tensor([[3, 2, 2, 2]] * 3)
    log_atlas = log_atlas_from_prob(atlas, 1e-4)
    cfg = EMConfig(beta=1.0, update_pi=True)  # the real-data defaults: MRF on, pi updated
    params = initialise_from_atlas(images, cov, atlas, counts)
    posterior = None
    for _ in range(3):  # a fit under way: MRF of the previous posterior, lower bound computed
        params, est = em_step(images, cov, log_atlas, params, cfg, posterior)
        posterior = est.posterior
    shape = list(images.shape[1:])
    print(f"\nOne EM iteration, {shape[0]} sequences x {'x'.join(map(str, shape[1:]))} voxels, K=4, subtypes (3,2,2,2), "
          f"float32, MRF beta 1, pi updated:")
    rows, em = [], {}

    def report(key, label, median, best):
        em[key] = {"median_s": median, "min_s": best}
        rows.append([label, median, best])
        print(f"  {label}: median {median:.3f} s, min {best:.3f} s")

    quantised = quantise(images, cov, cfg.intensity_levels)
    report("mvmm_monai", "mvmm_monai em_step as a fit runs it (images quantised once per fit, no lower bound)",
           *best_of(lambda: em_step(images, cov, log_atlas, params, cfg, posterior, lower_bound=False, quantised=quantised), args.repeats))
    report("mvmm_monai_cold", "mvmm_monai em_step, quantising the images and computing the lower bound too",
           *best_of(lambda: em_step(images, cov, log_atlas, params, cfg, posterior), args.repeats))
    exact = dataclasses.replace(cfg, intensity_levels=0)
    report("mvmm_monai_exact", "mvmm_monai em_step, every subtype at every voxel (intensity_levels=0)",
           *best_of(lambda: em_step(images, cov, log_atlas, params, exact, posterior), max(3, args.repeats // 3)))

    # the same maths written straightforwardly, eager and compiled, and in numpy
    x, c = images[0].reshape(3, -1), cov[0].reshape(3, -1)
    ref_args = (x, c, log_atlas[0], params.log_pi[0], params.log_tau[0], params.mean[0], params.var[0], posterior[0], 1.0)
    report("torch_eager", "the same maths, straightforward torch (eager)", *best_of(lambda: reference_em_step(*ref_args), max(3, args.repeats // 3)))
    t = time.perf_counter()
    compiled = torch.compile(reference_em_step)
    ref_out = compiled(*ref_args)
    em["torch_compile_first_call_s"] = time.perf_counter() - t
    print(f"  torch.compile of it: first call (compilation) {em['torch_compile_first_call_s']:.1f} s")
    report("torch_compile", "the same maths, torch.compile of it", *best_of(lambda: compiled(*ref_args), args.repeats))
    lt = params.log_tau[0].numpy().copy()
    lt[~np.isfinite(lt)] = -1e30
    np_args = tuple(a.numpy() if torch.is_tensor(a) else a for a in ref_args[:4]) + (lt,) + tuple(
        a.numpy() for a in ref_args[5:8]) + (1.0,)
    report("numpy", "the same maths, plain numpy", *best_of(lambda: numpy_em_step(*np_args), max(3, args.repeats // 3)))

    # agreement: the new mixture means of the engine against the reference's
    new_params, _ = em_step(images, cov, log_atlas, params, cfg, posterior)
    valid = params.valid[0]
    diff = float((new_params.mean[0] - ref_out[1])[valid].abs().max())
    em["max_abs_mean_difference_vs_reference"] = diff
    print(f"  largest difference of a subtype mean, engine vs reference: {diff:.2e} (intensities in [0, 1])")
    if args.peers:
        atropos = atropos_iteration(images[0].numpy(), atlas[0].numpy())
        if atropos is not None:
            report("atropos", "ANTs Atropos, one iteration (its own model: one Gaussian per class, 3 channels)", atropos, atropos)

    # a loaded machine: as many busy processes as CPUs, engine on all threads against one thread
    threads = torch.get_num_threads()
    fit_step = lambda: em_step(images, cov, log_atlas, params, cfg, posterior, lower_bound=False, quantised=quantised)
    with busy_cpus(os.cpu_count() or 1):
        loaded, loaded_one = interleaved(fit_step, threads, max(20, 2 * args.repeats))
    report("loaded_all_threads", f"machine loaded ({os.cpu_count()} busy processes): engine on {threads} threads", *loaded)
    report("loaded_one_thread", "machine loaded: engine on 1 thread", *loaded_one)
    em["speedup_over_torch_compile"] = em["torch_compile"]["median_s"] / em["mvmm_monai"]["median_s"]
    em["loaded_all_threads_over_one_thread"] = em["loaded_all_threads"]["median_s"] / em["loaded_one_thread"]["median_s"]
    print(f"  engine {em['speedup_over_torch_compile']:.1f}x faster than torch.compile (medians); loaded, all threads take "
          f"{em['loaded_all_threads_over_one_thread']:.2f}x the time of one")
    figures = {"em_iteration": {"shape": shape, "classes": 4, "subtypes": [3, 2, 2, 2], "repeats": args.repeats, **em}}

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
        rows += [["whole default fit, synthetic patient1 (wall, in-process)", total, None],
                 ["per ICM iteration of that fit, I/O included", total / max(m["iterations"], 1), None]]
        if args.command_repeats > 0:
            quick = quick_start(args.command_repeats)
            figures["quick_start_command"] = quick
            rows.append([f"the quick start as a command ({QUICK_START_TEXT}; wall, start-up and exit included; "
                         f"{quick['iterations']} iterations, converged: {'yes' if quick['converged'] else 'no'}, "
                         f"WARNING lines: {quick['warning_lines']})", quick["median_s"], quick["min_s"]])
    if args.record:
        write_record(args.record, figures, table={
            "columns": ["measure", "seconds (median)", "seconds (best)"], "rows": rows,
            "caption": "One EM iteration on 1M voxels x 3 sequences (float32, subtypes 3, 2, 2, 2, MRF on, pi updated), "
                       "side by side in one run, and the default synthetic fit, on this machine's CPU threads."})


if __name__ == "__main__":
    main()
