#!/usr/bin/env python
"""Real MyoPS cases end to end, fully automatic: atlas from the atlas cases, fit of each test case
from its raw full-field-of-view files (automatic placement, no label, no manual crop).

    .venv/bin/python benchmarks/real_myops.py [--root DIR] [--out DIR] \
        [--atlas-cases Case3001..Case3015] [--test-cases Case3016..Case3025] [--threads N] \
        [--peers atropos [--atropos-weight 0.5]] [--atlas-option levels=7 ...] [--record NAME] \
        [hydra overrides of the fit ...]

For every test case it reports LGE-grid Dice (myocardium, LV, RV) of
- MvMM: ``scripts/fit.py data=myops`` with the built atlas (``atlas.placement`` defaults to auto),
- atlas only: the argmax of the placed (and, with registration, deformed) atlas, the fit's own
  ``atlas_dice``,
- ANTs Atropos (``--peers atropos``, needs ``pip install -e '.[bench]'``): given the same placed
  atlas as priors, on the same region of interest and images (``benchmarks/atropos_peer.py``),
plus the scar Dice, the placement's template score and seconds per case. A case whose fit fails
is a row with its error, never left out. Prints a Markdown block (also ``OUT/real_myops.md``) and
writes the record ``benchmarks/results/NAME.json`` (``--record``, default ``real_myops``: the
headline run; name any other run, such as a held-out atlas fold, differently): mean Dice per
structure of MvMM, the atlas alone and each peer, and every case's row.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from common import argument_parser, parse_args
from record import add_record_option, write_record

from mvmm_monai import compose_config, fit
from mvmm_monai.config import build as _build
from mvmm_monai.pipeline.build_atlas import select_subjects
from mvmm_monai.pipeline.metrics import dice_per_class
from mvmm_monai.pipeline.prepare import prepare_subject

STRUCTS = ("myocardium", "lv", "rv")


def _row_mean(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    vals = np.array([[r[key][s] if r.get(key) else np.nan for s in STRUCTS] for r in rows], dtype=float)
    return np.nanmean(vals, 0).tolist(), np.nanstd(vals, 0).tolist()


def main() -> None:
    ap = argument_parser(__doc__, myops=True)
    ap.add_argument("--out", default="/tmp/mvmm_real_myops")
    ap.add_argument("--atlas-cases", default="Case3001..Case3015")
    ap.add_argument("--test-cases", default="Case3016..Case3025")
    ap.add_argument("--peers", default="", help="comma-separated peers to run as well: atropos")
    ap.add_argument("--atropos-weight", type=float, default=0.5)
    ap.add_argument("--atlas-option", action="append", default=[], metavar="KEY=VALUE",
                    help="an override of conf/build_atlas.yaml for the atlas (repeatable), e.g. levels=7")
    add_record_option(ap, "real_myops")
    args = parse_args(ap)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    peers = [p for p in args.peers.split(",") if p]

    from mvmm_monai import build_atlas

    atlas_path = out / "atlas" / "myops_atlas.nii.gz"
    t0 = time.perf_counter()
    build_cfg = compose_config(
        [f"data.root={args.root}", f"subjects={args.atlas_cases}", f"output={atlas_path}", *args.atlas_option],
        config_name="build_atlas",
    )
    build_atlas(build_cfg)
    atlas_seconds = time.perf_counter() - t0

    base = ["data=myops", f"data.root={args.root}", f"atlas.path={atlas_path}", *args.overrides]
    dataset = _build(compose_config([*base, f"paths.output_dir={out}"]).data)
    names = select_subjects(args.test_cases, dataset.subjects(), "--test-cases")
    rows = []
    for name in names:
        case_out = out / name
        cfg = compose_config([*base, f"subject={name}", f"paths.output_dir={case_out}"])
        row: dict = {"case": name}
        start = time.perf_counter()
        try:
            m = fit(cfg)
            row.update(
                mvmm=m["dice"]["LGE"],
                atlas=m.get("atlas_dice", {}).get("LGE"),
                scar=(m.get("scar") or {}).get("dice"),
                ncc=(m.get("placement") or {}).get("score"),
                iterations=m["iterations"],
            )
        except Exception as err:  # a failing case is reported, never dropped
            row["error"] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        row["seconds"] = time.perf_counter() - start
        if "atropos" in peers and "error" not in row:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from atropos_peer import atropos_fit

            prep = prepare_subject(cfg, dataset, name)
            subj = prep.subject
            t = time.perf_counter()
            res = atropos_fit(
                [subj.images[n].numpy() for n in range(subj.images.shape[0])],
                tuple(subj.grid.spacing.tolist()),
                prep.atlas.numpy(),
                mask=prep.roi.numpy(),
                prior_weight=args.atropos_weight,
            )
            seg = subj.uncrop(torch.from_numpy(res.labels)[None].float(), 0.0)[0].long()
            full = subj.parent or subj
            row["atropos"] = dice_per_class(seg, full.labels[full.reference])
            row["atropos_seconds"] = time.perf_counter() - t
        rows.append(row)
        print(json.dumps(row), flush=True)

    cmd = "python benchmarks/real_myops.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        f"Command: `{cmd}`",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), no GPU; date {datetime.date.today().isoformat()}",
        f"Atlas from {args.atlas_cases} built in {atlas_seconds:.1f} s (loading included).",
        "",
        "| case | MvMM myo | MvMM LV | MvMM RV | atlas myo | atlas LV | atlas RV |"
        + (" Atropos myo | Atropos LV | Atropos RV |" if "atropos" in peers else "")
        + " scar Dice | placement NCC | iterations | s/case |",
        "|---" * (11 + (3 if "atropos" in peers else 0)) + "|",
    ]

    def cells(d):
        return [f"{d[s]:.3f}" if d else "-" for s in STRUCTS] if d else ["-"] * 3

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | FAILED: {r['error'][:120]} |" + " |" * (10 + (3 if "atropos" in peers else 0)))
            continue
        c = cells(r["mvmm"]) + cells(r.get("atlas")) + (cells(r.get("atropos")) if "atropos" in peers else [])
        scar = f"{r['scar']:.3f}" if r.get("scar") is not None else "-"
        ncc = f"{r['ncc']:.2f}" if r.get("ncc") is not None else "-"
        lines.append(f"| {r['case']} | " + " | ".join(c) + f" | {scar} | {ncc} | {r['iterations']} | {r['seconds']:.0f} |")
    ok = [r for r in rows if "error" not in r]
    for label, fn in (("mean", 0), ("std", 1)):
        parts = []
        for key in ("mvmm", "atlas", *(["atropos"] if "atropos" in peers else [])):
            vals = _row_mean(ok, key)[fn] if ok else [np.nan] * 3
            parts += [f"{v:.3f}" for v in vals]
        scar = [r["scar"] for r in ok if r.get("scar") is not None]
        sv = (np.mean(scar) if fn == 0 else np.std(scar)) if scar else np.nan
        secs = [r["seconds"] for r in ok]
        tv = (np.mean(secs) if fn == 0 else np.std(secs)) if secs else np.nan
        lines.append(f"| **{label}** | " + " | ".join(parts) + f" | {sv:.3f} | | | {tv:.0f} |")
    failed = [r["case"] for r in rows if "error" in r]
    lines.append("")
    lines.append(f"{len(ok)} of {len(rows)} cases fitted" + (f"; failed: {', '.join(failed)}" if failed else "") + ".")
    if "atropos" in peers:
        from atropos_peer import ants_version

        lines.append(f"Atropos: antspyx {ants_version()}, prior weight {args.atropos_weight}, same placed atlas and ROI.")
    text = "\n".join(lines)
    print("\n" + text)
    (out / "real_myops.md").write_text(text + "\n")
    (out / "real_myops.json").write_text(json.dumps(rows, indent=1))
    if args.record:
        write_real_myops_record(args, peers, rows, atlas_seconds)


METHODS = {"mvmm": "MvMM (ours)", "atlas": "atlas alone (placed)", "atropos": "ANTs Atropos, same atlas"}


def write_real_myops_record(args, peers: list[str], rows: list[dict], atlas_seconds: float) -> None:
    """The record: mean and std Dice per structure and method, scar Dice, seconds, every case's row;
    its table is the mean LGE Dice per method."""
    ok = [r for r in rows if "error" not in r]
    dice = {}
    for key in ("mvmm", "atlas", *(["atropos"] if "atropos" in peers else [])):
        mean, std = _row_mean(ok, key) if ok else ([None] * 3, [None] * 3)
        dice[key] = {"mean": dict(zip(STRUCTS, mean, strict=True)), "std": dict(zip(STRUCTS, std, strict=True))}
    scar = [r["scar"] for r in ok if r.get("scar") is not None]
    secs = [r["seconds"] for r in ok]
    figures = {
        "atlas_cases": args.atlas_cases, "test_cases": args.test_cases, "overrides": list(args.overrides),
        "peers": peers, "atropos_weight": args.atropos_weight if "atropos" in peers else None,
        "atlas_seconds": atlas_seconds, "dice_lge": dice,
        "scar_dice": {"mean": np.mean(scar), "std": np.std(scar)} if scar else None,
        "seconds_per_case": {"mean": np.mean(secs), "std": np.std(secs)} if secs else None,
        "fitted": len(ok), "failed": [r["case"] for r in rows if "error" in r], "cases": rows,
    }
    failed = f"; failed: {', '.join(figures['failed'])}" if figures["failed"] else ""
    caption = (f"LGE Dice on {args.test_cases} (mean over the {len(ok)} of {len(rows)} cases fitted{failed}), "
               f"atlas from {args.atlas_cases}" + (f", {np.mean(secs):.0f} s a case" if secs else "")
               + "; per-case rows and standard deviations in the record.")
    write_record(args.record, figures, table={
        "columns": ["method", "myocardium", "LV", "RV"],
        "rows": [[METHODS[k], *(d["mean"][s] for s in STRUCTS)] for k, d in dice.items()],
        "caption": caption,
    })


if __name__ == "__main__":
    main()
