#!/usr/bin/env python
"""Registration on the synthetic cohort: misaligned data with and without registration, and aligned data.

For each subject: myocardium/LV/RV Dice on DE, and for the slice shifts the error against the
generator's truth on the slices that contain heart (> 50 labelled voxels). Prints a Markdown table.

    python benchmarks/registration_synthetic.py [--subjects patient1,patient2,patient3] [overrides...]
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import tempfile
import time

import nibabel as nib
import numpy as np
import torch
from common import argument_parser, parse_args

SETTINGS_ALL = {  # label -> overrides
    "misaligned, registration=none": ["data.misalignment=true", "registration=none"],
    "misaligned, registration=full": ["data.misalignment=true", "registration=full"],
    "misaligned, registration=slice_shift": ["data.misalignment=true", "registration=slice_shift"],
    "aligned, registration=none": ["data.misalignment=false", "registration=none"],
    "aligned, registration=full": ["data.misalignment=false", "registration=full"],
}


def shift_errors(params_file, files) -> str:
    p = json.loads(params_file.read_text())
    if not p.get("slice_shifts_mm") or files.truth is None:
        return ""
    truth = json.loads(files.truth.read_text())
    parts = []
    for seq, fitted in p["slice_shifts_mm"].items():
        lab = np.asarray(nib.load(files.labels[seq]).dataobj)
        heart = (lab > 0).reshape(-1, lab.shape[2]).sum(0) > 50
        err = np.linalg.norm(np.array(fitted) - np.array(truth["slice_shifts_mm"][seq]), axis=1)[heart]
        parts.append(f"{seq} {err.mean():.1f}/{err.max():.1f}")
    return ", ".join(parts)


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("--subjects", default="patient1,patient2,patient3")
    ap.add_argument("--settings", default=";".join(SETTINGS_ALL), help="semicolon-separated subset of the settings")
    args = parse_args(ap, quiet=True)
    from mvmm_monai import compose_config, fit
    from mvmm_monai.config import build as _build

    print(f"Command: `python {' '.join(sys.argv)}`\n")
    print(f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads\n")
    print(f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}\n")
    print("| setting | subject | myocardium | LV | RV | iterations | seconds | shift error mean/max mm (heart slices) |")
    print("|---|---|---|---|---|---|---|---|")
    settings = {k: SETTINGS_ALL[k] for k in args.settings.split(";")}
    for label, overrides in settings.items():
        dices = []
        for subject in args.subjects.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                cfg = compose_config([f"paths.output_dir={tmp}", "callbacks.progress.refresh_rate=0", "~logger",
                                      f"subject={subject}", *overrides, *args.overrides])
                t = time.perf_counter()
                m = fit(cfg)
                secs = time.perf_counter() - t
                err = shift_errors(__import__("pathlib").Path(tmp) / "params.json", _build(cfg.data).files(subject))
            d = m["dice"]["DE"]
            dices.append(d["myocardium"])
            print(f"| {label} | {subject} | {d['myocardium']:.3f} | {d['lv']:.3f} | {d['rv']:.3f} | "
                  f"{m['iterations']} | {secs:.1f} | {err} |", flush=True)
        print(f"| {label} | **mean** | **{np.mean(dices):.3f}** | | | | | |", flush=True)


if __name__ == "__main__":
    main()
