#!/usr/bin/env python
"""K-fold cross-validation over the shared MyoPS cases, fully automatic: for each fold the atlas is
built from the other folds' cases only, and each of the fold's cases is fitted from its raw
full-field-of-view files (automatic placement, no label). Settings variants are compared on the
same folds in the same run, and a setting is *chosen* per fold on the other folds' (out-of-fold)
fits only, so the chosen setting's figures on the held-out fold are cross-validated too.

    .venv/bin/python benchmarks/crossval.py [--root DIR] [--folds 5] [--cases Case3001..Case3025] \
        [--variant NAME=OVERRIDE[,OVERRIDE...] ...] [--jobs 2] [--out DIR] [--record NAME] \
        [hydra overrides common to every fit ...]

Folds: the cases in natural order, case ``i`` in fold ``i mod k`` (interleaved, so no fold is one
end of the release). Variants: ``default`` (no override) unless given, e.g.
``--variant beta1=model.em.beta=1.0 --variant beta_auto=model.em.beta=auto``. An override
``build_atlas.KEY=VALUE`` goes to the atlas build instead of the fit (``conf/build_atlas.yaml``,
e.g. ``--variant sigma3=build_atlas.sigma_mm=3``): such a variant gets its own atlas per fold,
built from the same training cases. Choosing among
variants on the other folds' fits is nested as far as the fits go; the atlases of those fits saw
the held-out fold's cases (a full nested run would build k x (k-1) atlases), which is said here
so that nobody reads more into the chosen figure than there is.

Reports, per variant: every case's LGE Dice (myocardium, LV, RV), scar Dice, placement score,
iterations, whether the fit converged, seconds, or its error (a failed case is a row, never left
out); per fold and pooled means; the cases below 0.70. Writes ``benchmarks/results/NAME.json``
(default ``crossval``) with a table rendered into the README and docs/results.md.
"""

from __future__ import annotations

import json
import re
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from common import argument_parser, parse_args
from record import add_record_option, write_record

STRUCTS = ("myocardium", "lv", "rv")
FAILED = 0.70  # a myocardium Dice below this is a failed case


def folds_of(cases: list[str], k: int) -> list[list[str]]:
    """``k`` interleaved folds of ``cases`` (case ``i`` in fold ``i mod k``)."""
    if not 2 <= k <= len(cases):
        raise SystemExit(f"--folds must be between 2 and the number of cases ({len(cases)}), got {k}")
    return [cases[i::k] for i in range(k)]


def parse_variants(given: list[str]) -> dict[str, list[str]]:
    """``NAME=OVERRIDE[,OVERRIDE...]`` -> name: overrides (``default``: none, when none given)."""
    variants = {}
    for v in given or ["default="]:
        name, _, rest = v.partition("=")
        if not name or name in variants:
            raise SystemExit(f"--variant {v!r}: need a new NAME=OVERRIDES")
        variants[name] = [o for o in re.split(r",(?![^\[]*\])", rest) if o]  # commas inside [...] belong to a list value
    return variants


BUILD = "build_atlas."  # a variant's override of the atlas build (conf/build_atlas.yaml), not of the fit


def split_build(overrides: list[str]) -> tuple[list[str], list[str]]:
    """A variant's overrides -> (atlas build overrides without the prefix, fit overrides)."""
    build = [o.removeprefix(BUILD) for o in overrides if o.startswith(BUILD)]
    return build, [o for o in overrides if not o.startswith(BUILD)]


def fit_case(root: Path, atlas: Path, case: str, out: Path, overrides: list[str], threads: int) -> dict:
    """Fit one case in a worker process; a row of figures, or the error."""
    import torch

    torch.set_num_threads(threads)
    from mvmm_monai import compose_config, fit

    row: dict = {"case": case}
    start = time.perf_counter()
    try:
        m = fit(compose_config(["data=myops", f"data.root={root}", f"subject={case}", f"atlas.path={atlas}",
                                f"paths.output_dir={out}", "callbacks.progress.refresh_rate=0", "~logger", *overrides]))
        row.update(
            dice=m["dice"]["LGE"], scar_dice=(m.get("scar") or {}).get("dice"),
            placement_score=(m.get("placement") or {}).get("score"), iterations=m["iterations"], converged=m["converged"],
        )
        params = json.loads((out / "params.json").read_text())
        row["mrf_beta"] = params.get("mrf_beta", {}).get("value")
    except Exception as err:  # a failing case is reported, never dropped
        row["error"] = f"{type(err).__name__}: {err}"
        traceback.print_exc()
    row["seconds"] = time.perf_counter() - start
    return row


def summary(rows: list[dict]) -> dict:
    """Mean and SD per structure (failed fits count as Dice 0), the minimum myocardium Dice, the
    cases below ``FAILED`` and the errors."""
    vals = np.array([[r["dice"][s] if "dice" in r else 0.0 for s in STRUCTS] for r in rows], dtype=float)
    return {
        "n": len(rows),
        "mean": dict(zip(STRUCTS, vals.mean(0).tolist())),
        "sd": dict(zip(STRUCTS, vals.std(0).tolist())),
        "min_myocardium": float(vals[:, 0].min()),
        "below_0.70": [r["case"] for r, v in zip(rows, vals[:, 0]) if v < FAILED],
        "errors": [r["case"] for r in rows if "error" in r],
        "converged": sum(bool(r.get("converged")) for r in rows),
    }


def main() -> None:
    ap = argument_parser(__doc__, myops=True, threads=1)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--cases", default="Case3001..Case3025")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDES")
    ap.add_argument("--jobs", type=int, default=2, help="fits at once (processes; default %(default)s)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/mvmm_crossval"))
    add_record_option(ap, "crossval")
    args = parse_args(ap)

    from mvmm_monai import build_atlas, compose_config
    from mvmm_monai.config import build
    from mvmm_monai.pipeline.build_atlas import select_subjects

    dataset = build(compose_config(["data=myops", f"data.root={args.root}"]).data)
    cases = select_subjects(args.cases, dataset.subjects(), "--cases")
    folds = folds_of(cases, args.folds)
    variants = parse_variants(args.variant)
    # one atlas per fold and atlas build (variants without build overrides share the default's)
    builds = {name: split_build(overrides)[0] for name, overrides in variants.items()}
    atlases: dict[tuple[int, tuple[str, ...]], Path] = {}
    t0 = time.perf_counter()
    for i, fold in enumerate(folds):
        training = [c for c in cases if c not in fold]
        for name, build_overrides in builds.items():
            key = (i, tuple(build_overrides))
            if key in atlases:
                continue
            atlas = args.out / f"fold{i}" / (f"atlas_{name}/atlas.nii.gz" if build_overrides else "atlas.nii.gz")
            build_atlas(compose_config([f"data.root={args.root}", f"subjects=[{','.join(training)}]", f"output={atlas}", *build_overrides],
                                       config_name="build_atlas"))
            atlases[key] = atlas
    atlas_seconds = time.perf_counter() - t0

    jobs = [(name, i, case) for name in variants for i, fold in enumerate(folds) for case in fold]
    rows: dict[str, dict[str, dict]] = {name: {} for name in variants}
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {
            pool.submit(fit_case, args.root, atlases[i, tuple(builds[name])], case, args.out / name / case,
                        [*args.overrides, *split_build(variants[name])[1]], args.threads or 1): (name, i, case)
            for name, i, case in jobs
        }
        for future, (name, i, case) in futures.items():
            row = {**future.result(), "fold": i}
            rows[name][case] = row
            print(name, json.dumps(row), flush=True)

    per_variant = {}
    for name in variants:
        ordered = [rows[name][c] for c in cases]
        per_variant[name] = {
            "pooled": summary(ordered),
            "folds": [summary([rows[name][c] for c in fold]) for fold in folds],
            "cases": ordered,
        }
    chosen = []  # per fold: the variant with the best mean myocardium Dice on the other folds' fits
    for i, fold in enumerate(folds):
        others = [c for c in cases if c not in fold]
        score = {n: np.mean([rows[n][c].get("dice", {}).get("myocardium", 0.0) for c in others]) for n in variants}
        chosen.append(max(score, key=score.get))
    selected = summary([rows[chosen[i]][c] for i, fold in enumerate(folds) for c in fold])
    figures = {
        "folds": folds, "variants": variants, "common_overrides": list(args.overrides),
        "atlas_seconds": atlas_seconds, "results": per_variant,
        "chosen_per_fold": chosen, "chosen": selected,
    }

    def line(label, s, fold_means):
        m = s["mean"]
        return [label, f"{m['myocardium']:.3f} ± {s['sd']['myocardium']:.3f}", f"{m['lv']:.3f}", f"{m['rv']:.3f}",
                f"{s['min_myocardium']:.3f}", len(s["below_0.70"]), f"{s['converged']}/{s['n']}",
                " / ".join(f"{v:.3f}" for v in fold_means)]

    table_rows = [line(n, per_variant[n]["pooled"], [f["mean"]["myocardium"] for f in per_variant[n]["folds"]]) for n in variants]
    if len(variants) > 1:
        fold_means = [summary([rows[chosen[i]][c] for c in fold])["mean"]["myocardium"] for i, fold in enumerate(folds)]
        table_rows.append(line(f"chosen per fold ({', '.join(chosen)})", selected, fold_means))
    print(json.dumps({n: per_variant[n]["pooled"] for n in variants}, indent=1))
    if not args.record:
        return
    write_record(args.record, figures, table={
        "columns": ["setting", "LGE myocardium (pooled, mean ± SD)", "LV", "RV", "worst myocardium", "cases < 0.70",
                    "converged", "myocardium per fold"],
        "rows": table_rows,
        "caption": f"{args.folds}-fold cross-validation over {len(cases)} MyoPS cases ({args.cases}): each fold's atlas from the "
                   "other folds only, fully automatic fits, LGE-grid Dice. 'chosen per fold' picks the setting on the other folds' fits.",
    })


if __name__ == "__main__":
    main()
