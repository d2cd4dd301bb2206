#!/usr/bin/env python
r"""Whole fits as a user runs them (issue "Fast"): one MyoPS patient, a cohort in one command, one
slice with registration.

- **Patient**: the test case (default Case3021) with an atlas built from other cases (default
  Case3001..Case3020), default settings (automatic placement): the fit timed in-process after a
  warm-up fit of another case (imports and first-call costs excluded: the "fitting" time), and
  ``scripts/fit.py`` timed as a command (interpreter start-up, imports and exit included).
- **Monitoring**: the same patient in-process without the per-iteration monitoring (no Dice during
  the fit, no checkpoints, overlays or TensorBoard; the final files are written as always): the
  default fit's extra seconds are what the monitoring costs (issue "Fast": under 5 % of a fit).
  That difference of two runs scatters with the machine's load by more than the monitoring costs,
  so the monitoring is also timed inside the default fits themselves (:class:`MonitoringClock`: the
  seconds in the per-iteration Dice, the checkpoint and overlay callbacks and the TensorBoard
  writes, over the fit's seconds).
- **Cohort**: ``scripts/fit.py subject=[...]`` on 5 patients (default Case3021..Case3025) in one
  command: wall-clock per patient, start-up included; once one subject after another, once with
  ``cohort.batch_size=5`` (the five in one batch of the EM engine).
- **Slice**: the 192 x 192 mid-ventricular crop of the slice case (``atlas.midslice``, as
  ``benchmarks/myops_2d_mid.py``) with ``registration=full`` and with ``registration=slice_align``
  (their guard included: the fit without registration they compare with), timed in-process after
  a warm-up (composing the configuration and fitting, as for the patient; the crop's files are
  written beforehand); and the same crop with ``registration=none``.

Every fit's LGE Dice against the manual labels is recorded beside its time, so a speed-up that
changes the result shows; and the seconds of a fixed workload that runs no project code
(``reference_seconds``), so records made when the shared machine was slower can be read against it.

    .venv/bin/python benchmarks/patient_speed.py [--root DIR] [--out DIR] [--repeats 3] [--record NAME]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from myops_2d_mid import fit_crop, write_crop_inputs
from record import add_record_option, write_record

from mvmm_monai import build_atlas, compose_config, fit
from mvmm_monai.atlas.midslice import mid_slice_atlas, mid_slice_crop
from mvmm_monai.pipeline.build_atlas import select_subjects

REPO = Path(__file__).resolve().parents[1]
QUIET = ["callbacks.progress.refresh_rate=0"]
# a fit without the per-iteration monitoring: no Dice during the fit, no checkpoints, overlays or TensorBoard
BARE = ["model.dice_every_n_iterations=1000000", "~callbacks.checkpoint", "~callbacks.overlay", "~logger"]


class MonitoringClock:
    """Seconds spent, while in use, in what a fit does only to be watched: the per-iteration Dice
    (``MvMMFit.monitored_dice``), the checkpoint and overlay callbacks' per-iteration hook, the
    TensorBoard logger's writes (scalars, the writer's creation at the first of them, the
    hyper-parameters and its closing) and the final pictures' copy into TensorBoard
    (``pipeline.fit.add_png``; the pictures themselves are drawn and written as files whatever the
    monitoring). Each is wrapped by a timer for the time of the ``with`` block. Not counted: the
    EM lower bound that the monitored iterations compute inside the E-step (one extra sum per
    voxel), and building the logger object."""

    def __init__(self) -> None:
        from pytorch_lightning.loggers import TensorBoardLogger

        from mvmm_monai.pipeline import fit as pipeline_fit
        from mvmm_monai.pipeline.checkpoint import ICMCheckpoint
        from mvmm_monai.pipeline.module import MvMMFit
        from mvmm_monai.pipeline.monitoring import OverlayLogger

        self.targets = [(MvMMFit, "monitored_dice"), (ICMCheckpoint, "on_train_epoch_end"),
                        (OverlayLogger, "on_train_epoch_end"), (TensorBoardLogger, "log_metrics"),
                        (TensorBoardLogger, "log_hyperparams"), (TensorBoardLogger, "finalize"), (pipeline_fit, "add_png")]
        self.seconds = {f"{cls.__name__.rsplit('.', 1)[-1]}.{name}": 0.0 for cls, name in self.targets}

    def __enter__(self) -> MonitoringClock:
        self._saved = []
        for cls, name in self.targets:
            original, key = getattr(cls, name), f"{cls.__name__.rsplit('.', 1)[-1]}.{name}"

            def timed(*a, _f=original, _k=key, **kw):
                t = time.perf_counter()
                try:
                    return _f(*a, **kw)
                finally:
                    self.seconds[_k] += time.perf_counter() - t

            self._saved.append((cls, name, cls.__dict__.get(name)))  # None: inherited
            setattr(cls, name, timed)
        return self

    def __exit__(self, *exc) -> None:
        for cls, name, own in self._saved:
            if own is None:
                delattr(cls, name)
            else:
                setattr(cls, name, own)

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def reference_seconds(repeats: int = 5) -> float:
    """Seconds (median of ``repeats``) of a fixed workload that no code of this project runs: torch
    element-wise maths and reductions on 1M float32 values on this process's threads, and a Python
    loop. Records made on a busier or slower machine show it, so their fits' seconds can be read
    against it (the same code scatters by 10 to 25 % between records on this shared machine)."""
    x = torch.linspace(0.0, 1.0, 1_000_000)
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(100):
            y = torch.exp(-x * 3.0) + torch.log1p(x)
            float(torch.logsumexp(y.view(1000, 1000), dim=0).sum())
        total = 0
        for i in range(1_000_000):
            total += i % 7
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def command(args: list[str]) -> float:
    """Wall-clock seconds of ``python scripts/fit.py ARGS`` (it must succeed)."""
    t = time.perf_counter()
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "fit.py"), *args], capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if run.returncode != 0:
        raise SystemExit(f"scripts/fit.py {' '.join(args)} failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=REPO.parent / "shared" / "data" / "myops")
    ap.add_argument("--out", type=Path, default=Path("/tmp/mvmm_patient_speed"))
    ap.add_argument("--atlas-cases", default="Case3001..Case3020")
    ap.add_argument("--case", default="Case3021")
    ap.add_argument("--cohort", default="Case3021..Case3025")
    ap.add_argument("--repeats", type=int, default=3, help="in-process fits of the patient and the slice (the median is reported; "
                    "this shared machine's timings vary from run to run)")
    add_record_option(ap, "patient_speed")
    args = ap.parse_args()
    if not args.root.is_dir():
        raise SystemExit(f"--root {args.root}: no such folder (the shared MyoPS cases)")
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    out = args.out
    atlas_path = out / "atlas" / "myops_atlas.nii.gz"
    build_atlas(compose_config([f"data.root={args.root}", f"subjects={args.atlas_cases}", f"output={atlas_path}"],
                               config_name="build_atlas"))
    base = ["data=myops", f"data.root={args.root}", f"atlas.path={atlas_path}", *QUIET]
    names = [p.name for p in sorted(args.root.iterdir()) if p.is_dir()]
    cohort = select_subjects(args.cohort, names, "--cohort")
    atlas_cases = select_subjects(args.atlas_cases, names, "--atlas-cases")
    warm = next(n for n in cohort if n != args.case)
    figures: dict = {"case": args.case, "atlas_cases": args.atlas_cases, "cohort": cohort,
                     "torch_threads": torch.get_num_threads(), "reference_s": reference_seconds()}
    print(f"reference workload (the machine's speed, no project code): {figures['reference_s']:.3f} s", flush=True)

    # one patient, in-process after a warm-up fit (the fitting alone); --repeats times, the median
    fit(compose_config([*base, f"subject={warm}", f"paths.output_dir={out / 'warm'}"]))
    # ... and, run for run in turn (the machine's load drifts), without the per-iteration monitoring
    runs, bare = [], []
    timed = []  # per default run: the seconds inside the monitoring (MonitoringClock), by part
    for _ in range(args.repeats):
        with MonitoringClock() as clock:
            t = time.perf_counter()
            m = fit(compose_config([*base, f"subject={args.case}", f"paths.output_dir={out / 'patient'}"]))
            runs.append(time.perf_counter() - t)
        timed.append(clock.seconds)
        t = time.perf_counter()
        mb = fit(compose_config([*base, f"subject={args.case}", f"paths.output_dir={out / 'patient_bare'}", *BARE]))
        bare.append(time.perf_counter() - t)
    figures["patient"] = {"fitting_s": statistics.median(runs), "fitting_runs_s": runs, "iterations": m["iterations"],
                          "converged": m["converged"], "dice_LGE": m["dice"]["LGE"]}
    print(f"patient {args.case}: {figures['patient']['fitting_s']:.1f} s fitting, {m['iterations']} iterations, "
          f"converged {m['converged']}, LGE Dice {json.dumps({k: round(v, 4) for k, v in m['dice']['LGE'].items()})}", flush=True)

    p = figures["patient"]
    p["without_monitoring_s"], p["without_monitoring_runs_s"] = statistics.median(bare), bare
    # the median of the paired differences (each default run and the bare run after it)
    p["monitoring_share"] = statistics.median(r - b for r, b in zip(runs, bare)) / p["fitting_s"]
    # ... and timed inside each default run: the median over runs of its monitoring seconds over its own seconds
    p["monitoring_timed_share"] = statistics.median(sum(s.values()) / r for s, r in zip(timed, runs))
    p["monitoring_timed_s"] = {k: statistics.median(s[k] for s in timed) for k in timed[0]}
    p["without_monitoring_iterations"], p["without_monitoring_dice_LGE"] = mb["iterations"], mb["dice"]["LGE"]
    print(f"the same without per-iteration monitoring: {p['without_monitoring_s']:.2f} s; monitoring "
          f"{100 * p['monitoring_share']:.1f} % of the fit by the difference, {100 * p['monitoring_timed_share']:.1f} % timed inside "
          f"the fit ({json.dumps({k: round(v, 3) for k, v in p['monitoring_timed_s'].items()})})", flush=True)

    # the same as a command, start-up included; then the cohort in one command
    figures["patient"]["command_s"] = command([*base, f"subject={args.case}", f"paths.output_dir={out / 'cli'}"])
    print(f"patient {args.case} as a command: {figures['patient']['command_s']:.1f} s wall", flush=True)
    seconds = command([*base, f"subject=[{','.join(cohort)}]", f"paths.output_dir={out / 'cohort'}"])
    summary = {n: json.loads((out / "cohort" / n / "metrics.json").read_text()) for n in cohort}
    figures["cohort"] = {"subjects": len(cohort), "command_s": seconds, "per_patient_s": seconds / len(cohort),
                         "converged": sum(bool(s["converged"]) for s in summary.values()),
                         "dice_LGE": {n: s["dice"]["LGE"] for n, s in summary.items()}}
    print(f"cohort of {len(cohort)} in one command: {seconds:.1f} s wall, {seconds / len(cohort):.1f} s per patient, "
          f"{figures['cohort']['converged']} converged", flush=True)
    seconds = command([*base, f"subject=[{','.join(cohort)}]", f"cohort.batch_size={len(cohort)}", f"paths.output_dir={out / 'cohort_batch'}"])
    batched = {n: json.loads((out / "cohort_batch" / n / "metrics.json").read_text()) for n in cohort}
    figures["cohort_batch"] = {"subjects": len(cohort), "batch_size": len(cohort), "command_s": seconds, "per_patient_s": seconds / len(cohort),
                               "converged": sum(bool(s["converged"]) for s in batched.values()),
                               "dice_LGE": {n: s["dice"]["LGE"] for n, s in batched.items()}}
    print(f"the same cohort with cohort.batch_size={len(cohort)}: {seconds:.1f} s wall, {seconds / len(cohort):.1f} s per patient", flush=True)

    # one mid-ventricular slice with registration=full and with registration=slice_align (the guard included)
    atlas2d = mid_slice_atlas([mid_slice_crop(args.root / c, 192) for c in atlas_cases], 2.0)
    crop = mid_slice_crop(args.root / args.case, 192)
    for key, preset in (("slice", "full"), ("slice_align", "slice_align")):
        fit_crop(mid_slice_crop(args.root / warm, 192), atlas2d, out / f"{key}_warm", [f"registration={preset}"], atlas_cases)
        runs = []
        inputs = write_crop_inputs(crop, atlas2d, out / key, atlas_cases)  # the crop's files, as a user's exist already
        for _ in range(args.repeats):
            t = time.perf_counter()  # composing the configuration and fitting, as for the patient
            m = fit(compose_config([*inputs, f"registration={preset}"]))
            runs.append(time.perf_counter() - t)
        figures[key] = {"size": [192, 192], "registration": preset, "fitting_s": statistics.median(runs), "fitting_runs_s": runs,
                        "iterations": m["iterations"], "converged": m["converged"], "dice_LGE": m["dice"]["LGE"],
                        "registration_guard": m.get("registration_guard")}
        print(f"slice {args.case} 192 x 192, registration={preset}: {figures[key]['fitting_s']:.2f} s fitting, "
              f"{m['iterations']} iterations", flush=True)
    inputs = write_crop_inputs(crop, atlas2d, out / "slice_none", atlas_cases)
    t = time.perf_counter()
    m = fit(compose_config([*inputs, "registration=none"]))
    figures["slice_none"] = {"fitting_s": time.perf_counter() - t, "iterations": m["iterations"], "converged": m["converged"],
                             "dice_LGE": m["dice"]["LGE"]}

    if args.record:
        p, c, cb, s, n = figures["patient"], figures["cohort"], figures["cohort_batch"], figures["slice"], figures["slice_none"]
        a = figures["slice_align"]
        kept, kept_a = ((f.get("registration_guard") or {}).get("kept", "registered") for f in (s, a))
        write_record(args.record, figures, table={
            "columns": ["fit", "seconds", "iterations", "LGE myocardium Dice"],
            "rows": [
                [f"one patient ({args.case}), default settings, fitting in-process", p["fitting_s"], p["iterations"],
                 p["dice_LGE"]["myocardium"]],
                [f"the same without per-iteration monitoring (Dice, checkpoints, overlays, TensorBoard): the monitoring is "
                 f"{100 * p['monitoring_share']:.1f} % of the fit by the difference of the two, "
                 f"{100 * p['monitoring_timed_share']:.1f} % timed inside the default fits", p["without_monitoring_s"], p["without_monitoring_iterations"],
                 p["without_monitoring_dice_LGE"]["myocardium"]],
                ["the same as a command (start-up included)", p["command_s"], p["iterations"], p["dice_LGE"]["myocardium"]],
                [f"cohort of {c['subjects']} in one command, per patient (start-up included)", c["per_patient_s"], None,
                 sum(d["myocardium"] for d in c["dice_LGE"].values()) / c["subjects"]],
                [f"the same cohort with cohort.batch_size={cb['batch_size']}, per patient (start-up included)", cb["per_patient_s"], None,
                 sum(d["myocardium"] for d in cb["dice_LGE"].values()) / cb["subjects"]],
                [f"one 192 x 192 mid-ventricular slice, registration=full (the guard kept the {kept} fit), fitting in-process",
                 s["fitting_s"], s["iterations"], s["dice_LGE"]["myocardium"]],
                [f"the same slice, registration=slice_align (the guard kept the {kept_a} fit)", a["fitting_s"], a["iterations"],
                 a["dice_LGE"]["myocardium"]],
                ["the same slice, registration=none", n["fitting_s"], n["iterations"], n["dice_LGE"]["myocardium"]],
            ],
            "caption": f"Whole fits on this machine's CPU threads; atlas from {args.atlas_cases}; in-process fits: the median of {args.repeats} runs; "
                       f"the machine's reference workload (no project code, see reference_seconds) took {figures['reference_s']:.3f} s."})


if __name__ == "__main__":
    main()
