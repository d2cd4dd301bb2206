#!/usr/bin/env python
"""Drift: Dice when a fit stops on its criterion and when it is forced to run four times longer.

    .venv/bin/python benchmarks/drift.py [--root DIR] [--threads 1] [--case Case3018] [--subjects patient2,patient3] [--skip-real] \
        [--real-registrations none,slice_shift,full] [hydra overrides...]

Rows: synthetic patient2 (known misalignment) with registration=full; a real MyoPS case (atlas
from Case3001..Case3015, automatic placement) with registration=none (the real-data default),
registration=slice_shift and registration=full. Prints a Markdown table.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from common import argument_parser, parse_args

from mvmm_monai import build_atlas, compose_config, fit

QUIET = ["callbacks.progress.refresh_rate=0", "~logger"]


def pair(base: list[str], work: Path, tag: str) -> tuple[dict, dict]:
    first = fit(compose_config([*base, *QUIET, f"paths.output_dir={work / (tag + '_default')}"]))
    n = first["iterations"]
    longer = fit(compose_config([*base, *QUIET, f"paths.output_dir={work / (tag + '_4x')}",
                                 f"trainer.min_epochs={4 * n}", f"trainer.max_epochs={4 * n}"]))
    return first, longer


def main() -> None:
    ap = argument_parser(__doc__, myops=True, threads=1)
    ap.add_argument("--case", default="Case3018")
    ap.add_argument("--subjects", default="patient2", help="synthetic subjects, comma-separated (\"\": none)")
    ap.add_argument("--skip-real", action="store_true", help="synthetic rows only")
    ap.add_argument("--real-registrations", default="none,slice_shift,full", help="registration presets of the real rows")
    args = parse_args(ap)
    work = Path(tempfile.mkdtemp(prefix="mvmm_drift_"))
    rows = []
    for subject in [s for s in args.subjects.split(",") if s]:
        syn = [f"subject={subject}", "data.misalignment=true", "registration=full", f"paths.cache_dir={work / 'cache'}", *args.overrides]
        rows.append((f"synthetic {subject}, registration=full", "DE", *pair(syn, work, f"syn_{subject}")))
    real_regs = () if args.skip_real else tuple(r for r in args.real_registrations.split(",") if r)
    atlas = work / "atlas.nii.gz"
    if real_regs:
        build_atlas(compose_config([f"data.root={args.root}", "subjects=Case3001..Case3015", f"output={atlas}"], config_name="build_atlas"))
    for reg in real_regs:
        real = ["data=myops", f"data.root={args.root}", f"subject={args.case}", f"atlas.path={atlas}", f"registration={reg}", *args.overrides]
        rows.append((f"{args.case}, registration={reg}", "LGE", *pair(real, work, f"real_{reg}")))
    print("\noverrides:", " ".join(args.overrides) or "(none)")
    print("\n| fit | iterations | myocardium | LV | RV | 4x iterations | myocardium | LV | RV | change myo / LV / RV |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, seq, a, b in rows:
        da, db = a["dice"][seq], b["dice"][seq]
        ch = " / ".join(f"{db[k] - da[k]:+.3f}" for k in ("myocardium", "lv", "rv"))
        print(f"| {name} | {a['iterations']} | " + " | ".join(f"{da[k]:.3f}" for k in ("myocardium", "lv", "rv"))
              + f" | {b['iterations']} | " + " | ".join(f"{db[k]:.3f}" for k in ("myocardium", "lv", "rv")) + f" | {ch} |")


if __name__ == "__main__":
    main()
