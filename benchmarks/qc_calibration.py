#!/usr/bin/env python
"""Calibrate and cross-validate quality control (``metrics.json`` ``qc``) on the shared MyoPS cases.

    .venv/bin/python benchmarks/qc_calibration.py [--root DIR] [--folds 5] [--cases Case3001..Case3025] \
        [--failures 2] [--sequence-failures 1] [--jobs 2] [--out DIR] [--reuse-atlases] [--rows FILE] [--write-config] \
        [--record NAME] [hydra overrides common to every fit ...]

For each fold, the atlas is built from the other folds' cases only; every case of the fold is
fitted fully automatically as given, and ``--failures`` more times with a failure made on purpose
(``atlas.displace``: the placed atlas shifted 12-25 mm in a random direction, scaled by 0.6-0.75
or 1.35-1.5, or rotated by 90-180 degrees about the heart's centre; drawn per case from a fixed
seed), and ``--sequence-failures`` more with C0 or T2 moved in-plane by 12-25 mm against the
other sequences (a copy of the case's files, the image rolled, its header kept). Every fit gives
its label-free QC features (``pipeline/qc.py``) and its true LGE myocardium Dice.

The quality model (ridge regression of the Dice on the standardised features, a flag threshold,
the usual range of every feature on good fits) is then *cross-validated*. The regression's target
is the Dice raised to a floor (max(Dice, floor), the floor of ``FLOORS`` that misjudges fewest
fits leaving one case out at a time within the fits the model is made from): without it, the
depth of the worst failures (Dice 0.1-0.5) set the weights, and the fits near the 0.70 and 0.80
lines were told apart less well. Cross-validated: for each fold it is made from the other folds'
fits and judged on the fold's own (failed fits: Dice < 0.70, good: >= 0.80 with no sequence moved,
whose own label map would be out of place whatever the LGE Dice): how many failures it
flags, how many good fits it flags, how close its score is to the Dice, and how many of the moved
sequences it flags with a reason that names the sequence. The flag rule of a sequence that fits
the labelled heart best elsewhere (``sequence_offsets``: at least ``offset_min_mm`` away, with a
gain at least ``offset_gain``) is made from the fits the model is made from
(:func:`choose_offset_rule`): no fit as given there (their sequences are co-registered) is flagged
by it, and as many moved sequences as can be; likewise the rule that names a sequence out of place
against all the others (``sequence_pair_offsets``, :func:`choose_pair_rule`). ``--write-config``
writes the model made from all fits to ``src/mvmm_monai/conf/qc/default.yaml`` (what every fit
then uses). ``--rows FILE`` recalibrates from the fits of an earlier run without fitting again. The record is
``benchmarks/results/NAME.json`` (default ``qc_calibration``).

``--crops 192`` measures quality control on single slices: every fit is of the case's 192 x 192
mid-ventricular crop (one slice, as ``benchmarks/registration_guard.py`` and
``benchmarks/patient_speed.py`` fit them) with each fold's mid-slice atlas made from the other
folds' crops; the table has the models made from crops, cross-validated as above, and the
packaged model (made from stacks) judging every crop. ``--write-config`` is refused with it: the
packaged model judges every fit, and a crop model that misses failures the packaged one flags is
no improvement (the record at the revision that added ``--crops``: the crop models missed 3 of 76
failures and flagged 3 of 19 good crops; the packaged model flagged all 76 and 7 of the 19).
"""

from __future__ import annotations

import json
import math
import shutil
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from common import argument_parser, parse_args
from crossval import folds_of
from record import REPO, add_record_option, write_record
from scipy.optimize import isotonic_regression

from mvmm_monai.pipeline.qc import TWO_SIDED

FAILED, GOOD = 0.70, 0.80
RIDGES = (0.1, 0.3, 1.0, 3.0, 10.0)  # ridge penalties tried (per fit: lambda = RIDGE * number of fits)
# floors tried under the regression's target (max(Dice, floor)): above 0, the depth of a failure
# beyond the floor stops pulling the weights, which then separate failures from good fits instead
FLOORS = (0.0, 0.3, 0.4, 0.5, 0.6)
CONFIG = REPO / "src" / "mvmm_monai" / "conf" / "qc" / "default.yaml"
# the flag rule of sequence_offsets: a sequence that fits the labelled heart best at least min_mm
# away (one of OFFSET_MIN_MM, chosen) with a gain this margin above the largest gain of such a shift
# among the fits as given (the shared sequences are co-registered: their shifts are the measure's noise),
# and never below OFFSET_FLOOR (5 % more of the sequence's variance explained by the labels: set, not tuned)
OFFSET_MIN_MM, OFFSET_MARGIN, OFFSET_FLOOR = (4.0, 5.0, 6.0, 8.0, 10.0), 0.02, 0.05
# how many features outside their usual range together set the flag (None: never), chosen
UNUSUAL_FLAGS = (1, 2, 3, None)


def failures_for(case: str, count: int, seed: int = 0) -> list[dict]:
    """``count`` deliberate misplacements of ``case`` (``atlas.displace`` values), drawn from a seed
    and the case's name so that every run makes the same ones."""
    rng = np.random.default_rng([seed, *case.encode()])
    kinds = rng.permutation(["shift", "scale", "rotate"])
    out = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        if kind == "shift":
            r, a = rng.uniform(12, 25), rng.uniform(0, 2 * math.pi)
            out.append({"shift_mm": [round(r * math.cos(a), 1), round(r * math.sin(a), 1)]})
        elif kind == "scale":
            out.append({"scale": round(float(rng.choice([rng.uniform(0.6, 0.75), rng.uniform(1.35, 1.5)])), 3)})
        else:
            out.append({"angle_deg": round(float(rng.choice([-1, 1]) * rng.uniform(90, 180)), 1)})
    return out


def sequence_failures_for(case: str, count: int, seed: int = 0) -> list[dict]:
    """``count`` deliberate misalignments of one sequence of ``case`` against the others (C0 or T2
    moved in-plane by 12-25 mm: an acquisition or export error, not a misplaced atlas), drawn from
    a seed and the case's name (a stream of their own: the atlas failures stay those of
    :func:`failures_for`)."""
    rng = np.random.default_rng([seed, 1, *case.encode()])
    out = []
    for _ in range(count):
        r, a = rng.uniform(12, 25), rng.uniform(0, 2 * math.pi)
        out.append({"sequence": str(rng.choice(["C0", "T2"])), "shift_mm": [round(r * math.cos(a), 1), round(r * math.sin(a), 1)]})
    return out


def moved_sequence_copy(root: Path, case: str, d: dict, dest: Path) -> Path:
    """A copy of ``case`` under ``dest`` with ``d["sequence"]`` rolled in-plane by ``d["shift_mm"]``
    (whole voxels; its header kept, so it no longer lies where the other sequences say the heart
    is); returns the copy's data root."""
    import nibabel as nib

    target = dest / case
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(root / case, target)
    path = target / f"{case}_{d['sequence']}.nii.gz"
    img = nib.load(path)
    spacing = img.header.get_zooms()[:2]
    voxels = [int(round(mm / sp)) for mm, sp in zip(d["shift_mm"], spacing)]
    nib.save(nib.Nifti1Image(np.roll(np.asarray(img.dataobj), voxels, axis=(0, 1)), img.affine, img.header), path)
    return dest


def fit_one_crop(root: Path, atlas: Path, case: str, out: Path, displace: dict | None, overrides: list[str], threads: int,
                 size: int) -> dict:
    """One fit of ``case``'s ``size`` x ``size`` mid-ventricular crop (:mod:`mvmm_monai.atlas.midslice`,
    as ``benchmarks/registration_guard.py`` fits them) in a worker process, with the fold's mid-slice
    atlas (``atlas``: its ``[K, size, size, 1]`` array, ``.npy``) on the crop's grid; a sequence
    failure rolls that sequence of the crop in-plane. Its QC features and true Dice, or its error."""
    import torch

    torch.set_num_threads(threads)
    from mvmm_monai.atlas.midslice import fit_overrides, mid_slice_crop, write_atlas, write_crop

    def overrides_of(displace: dict | None) -> list[str]:
        crop = mid_slice_crop(root / case, size)
        if displace and "sequence" in displace:
            spacing = np.linalg.norm(crop.affine[:3, :2], axis=0)
            voxels = [int(round(mm / sp)) for mm, sp in zip(displace["shift_mm"], spacing)]
            crop.images[displace["sequence"]] = np.roll(crop.images[displace["sequence"]], voxels, axis=(0, 1))
        paths = write_crop(crop, out.with_name(out.name + "_input"))
        atlas_path = write_atlas(np.load(atlas), crop.affine, out.with_name(out.name + "_input") / "atlas.nii.gz")
        return fit_overrides(case, paths, atlas_path, out)

    return _fit_row(case, displace, overrides_of, overrides)


def _fit_row(case: str, displace: dict | None, inputs, overrides: list[str]) -> dict:
    """Fit ``case`` with the Hydra overrides ``inputs(displace)`` returns (it writes what they
    name), the failure made on purpose and ``overrides``: the row of its QC features, QC offsets and
    true Dice, or its error (a failing fit is reported, never dropped)."""
    from mvmm_monai import compose_config, fit

    row: dict = {"case": case, "displace": displace}
    start = time.perf_counter()
    try:
        m = fit(compose_config([*inputs(displace), "callbacks.progress.refresh_rate=0", "~logger", *displace_override(displace), *overrides]))
        qc = m["qc"]
        row.update(dice=m["dice"]["LGE"], features=qc["features"], agreement=qc["sequence_agreement"], offsets=qc["sequence_offsets"],
                   pairs=qc["sequence_pair_offsets"], converged=m["converged"], iterations=m["iterations"])
    except Exception as err:
        row["error"] = f"{type(err).__name__}: {err}"
        traceback.print_exc()
    row["seconds"] = time.perf_counter() - start
    return row


def displace_override(d: dict | None) -> list[str]:
    if not d or "sequence" in d:
        return []
    body = ",".join(f"{k}:{json.dumps(v).replace(' ', '')}" for k, v in d.items())
    return [f"atlas.displace={{{body}}}"]


def fit_one(root: Path, atlas: Path, case: str, out: Path, displace: dict | None, overrides: list[str], threads: int) -> dict:
    """One fit in a worker process: its QC features and true Dice, or its error."""
    import torch

    torch.set_num_threads(threads)

    def overrides_of(displace: dict | None) -> list[str]:
        data = moved_sequence_copy(root, case, displace, out.with_name(out.name + "_data")) if displace and "sequence" in displace else root
        return ["data=myops", f"data.root={data}", f"subject={case}", f"atlas.path={atlas}", f"paths.output_dir={out}"]

    return _fit_row(case, displace, overrides_of, overrides)


def feature_matrix(rows: list[dict], names: list[str]) -> np.ndarray:
    return np.array([[np.nan if r["features"].get(n) is None else r["features"][n] for n in names] for r in rows], dtype=float)


def _ridge(z: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
    return np.linalg.solve(z.T @ z + ridge * len(y) * np.eye(z.shape[1]), z.T @ (y - y.mean()))


def choose_ridge(z: np.ndarray, y: np.ndarray, cases: list[str]) -> float:
    """The penalty of ``RIDGES`` with the least squared error leaving one case (all its fits) out at
    a time: chosen on the rows given only, so that judging other folds stays cross-validated."""
    groups = sorted(set(cases))
    errors = {}
    for ridge in RIDGES:
        err = 0.0
        for g in groups:
            out = np.array([c == g for c in cases])
            w = _ridge(z[~out], y[~out], ridge)
            err += float(((y[~out].mean() + z[out] @ w - y[out]) ** 2).sum())
        errors[ridge] = err
    return min(errors, key=errors.get)


def choose_floor(rows: list[dict], names: list[str]) -> float:
    """The floor of ``FLOORS`` whose models misjudge fewest fits leaving one case (all its fits) out
    at a time (a failure not flagged, a good fit flagged; ties: the smaller mean |score - Dice|):
    chosen on the rows given only, so that judging other folds stays cross-validated."""
    cases = sorted({r["case"] for r in rows})
    best = None
    for floor in FLOORS:
        wrong, error = 0, 0.0
        for g in cases:
            judged = judge(make_model([r for r in rows if r["case"] != g], names, floor, unusual_flag=None),
                           [r for r in rows if r["case"] == g])
            wrong += misjudged(judged)
            error += sum(abs(j["score"] - j["dice"]) for j in judged)
        if best is None or (wrong, error) < best[:2]:
            best = (wrong, error, floor)
    return best[2]


def misjudged(judged: list[dict]) -> int:
    """Failures not flagged and good fits (not a moved sequence) flagged."""
    return sum((j["dice"] < FAILED and not j["flag"]) or (j["dice"] >= GOOD and not moved_sequence(j) and j["flag"]) for j in judged)


def choose_unusual_flag(rows: list[dict], names: list[str], floor: float) -> int | None:
    """The ``unusual_flag`` of ``UNUSUAL_FLAGS`` whose rule misjudges fewest fits leaving one case
    (all its fits) out at a time, the usual ranges then made without that case (on the fits a model
    was made from, every good fit is inside them); a tie goes to the smaller count, the one that
    flags more (a failure missed costs more than a good fit looked at twice). Chosen on the rows
    given only, so that judging other folds stays cross-validated."""
    wrong = dict.fromkeys(UNUSUAL_FLAGS, 0)
    for g in sorted({r["case"] for r in rows}):
        model = make_model([r for r in rows if r["case"] != g], names, floor, unusual_flag=None)
        for k in UNUSUAL_FLAGS:
            wrong[k] += misjudged(judge({**model, "unusual_flag": k}, [r for r in rows if r["case"] == g]))
    return min(UNUSUAL_FLAGS, key=lambda k: (wrong[k], len(names) + 1 if k is None else k))


def moved_sequence(row: dict) -> bool:
    """Whether ``row`` is a fit with C0 or T2 moved on purpose: whatever its LGE Dice, that
    sequence's own label map is out of place, so it is never counted among the good fits."""
    return bool(row.get("displace")) and "sequence" in row["displace"]


def choose_offset_rule(rows: list[dict]) -> tuple[float, float | None]:
    """``(offset_min_mm, offset_gain)`` of the quality model's moved-sequence rule, from ``rows``
    only: for each minimum shift of ``OFFSET_MIN_MM`` the gain threshold is ``OFFSET_MARGIN`` above
    the largest gain among the fits as given whose sequences fit best at least that far away (so
    none of them is flagged by it; at least ``OFFSET_FLOOR``), and the minimum that then flags most
    of the moved sequences (by their own offsets) is kept, the smaller on a tie. Rows without offsets (a run before
    ``sequence_offsets``): ``(OFFSET_MIN_MM[0], None)``, the rule off."""
    if not any("offsets" in r for r in rows):
        return OFFSET_MIN_MM[0], None
    given = [o for r in rows if not r.get("displace") for o in r.get("offsets", {}).values()]
    moved = [r["offsets"].get(r["displace"]["sequence"]) for r in rows if moved_sequence(r)]
    best = None
    for min_mm in OFFSET_MIN_MM:
        gain = round(max(max([o["gain"] for o in given if o["mm"] >= min_mm], default=0.0) + OFFSET_MARGIN, OFFSET_FLOOR), 4)
        caught = sum(o is not None and o["mm"] >= min_mm and o["gain"] >= gain for o in moved)
        if best is None or caught > best[0]:
            best = (caught, min_mm, gain)
    return best[1], best[2]


def pair_sequences(pairs: dict) -> tuple[str, ...]:
    """The sequences of :func:`~mvmm_monai.pipeline.qc.sequence_pair_offsets`' pairs, in the
    subject's order (the reference first)."""
    return tuple(dict.fromkeys(n for k in pairs for n in k.split("|")))


def choose_pair_rule(rows: list[dict]) -> tuple[float, float | None]:
    """``(pair_offset_min_mm, pair_offset_gain)`` of the quality model's rule that names a sequence
    out of place against all the others (:func:`~mvmm_monai.pipeline.qc.out_of_place`), from
    ``rows`` only, as :func:`choose_offset_rule` chooses its rule: for each minimum shift of
    ``OFFSET_MIN_MM`` the gain threshold is ``OFFSET_MARGIN`` above the largest gain of a sequence
    that the rule would name among the fits as given (at least ``OFFSET_FLOOR``), and the minimum
    that then names most of the moved sequences is kept, the smaller on a tie. Rows without pair
    offsets: the rule off."""
    from mvmm_monai.pipeline.qc import out_of_place

    if not any(r.get("pairs") for r in rows):
        return OFFSET_MIN_MM[0], None
    given = [r for r in rows if not r.get("displace") and r.get("pairs")]
    moved = [r for r in rows if moved_sequence(r) and r.get("pairs")]
    best = None
    for min_mm in OFFSET_MIN_MM:
        named = [o["gain"] for r in given for o in out_of_place(r["pairs"], pair_sequences(r["pairs"]), min_mm, 0.0).values()]
        gain = round(max(max(named, default=0.0) + OFFSET_MARGIN, OFFSET_FLOOR), 4)
        caught = sum(r["displace"]["sequence"] in out_of_place(r["pairs"], pair_sequences(r["pairs"]), min_mm, gain) for r in moved)
        if best is None or caught > best[0]:
            best = (caught, min_mm, gain)
    return best[1], best[2]


def make_model(rows: list[dict], names: list[str], floor: float | None = None, unusual_flag: int | None | str = "choose") -> dict:
    """The quality model from ``rows`` (fits with features and Dice): the fields of
    :class:`mvmm_monai.pipeline.qc.QualityModel`. The regression's target is max(Dice, ``floor``)
    (``None``: chosen by :func:`choose_floor` on ``rows``); the calibration curve and the threshold
    see the Dice itself. ``unusual_flag``: ``"choose"`` (by :func:`choose_unusual_flag` on ``rows``)
    or the value to use."""
    if floor is None:
        floor = choose_floor(rows, names)
    if unusual_flag == "choose":
        unusual_flag = choose_unusual_flag(rows, names, floor)
    x = feature_matrix(rows, names)
    y = np.array([r["dice"]["myocardium"] for r in rows])
    target = np.maximum(y, floor)
    good, failed = y >= GOOD, y < FAILED
    two = np.array([n in TWO_SIDED for n in names])
    centre = np.where(two, np.nanmedian(x[good], 0) if good.any() else np.nanmedian(x, 0), np.nanmean(x, 0))
    spread = np.nanstd(x, 0)
    spread[~(spread > 0)] = 1.0
    u = np.nan_to_num((x - centre) / spread)  # a missing feature counts as its centre
    u[:, two] = np.abs(u[:, two])
    n = len(rows)
    ridge = choose_ridge(u - u.mean(0), target, [r["case"] for r in rows])
    w = _ridge(u - u.mean(0), target, ridge)
    intercept = float(target.mean() - u.mean(0) @ w)
    raw = intercept + u @ w
    # the regression shrinks towards the mean: a monotone curve (isotonic regression of the Dice on
    # the regression's value) maps it back onto the Dice scale; kept at the ends of its steps
    order = np.argsort(raw)
    fitted = isotonic_regression(y[order]).x
    ends = [i for i in range(n) if i in (0, n - 1) or fitted[i] != fitted[i - 1] or fitted[i] != fitted[i + 1]]
    curve = {"raw": np.round(raw[order][ends], 5).tolist(), "dice": np.round(fitted[ends], 5).tolist()}
    score = np.clip(np.interp(raw, curve["raw"], curve["dice"]), 0, 1)
    # the threshold: just above every failure's score, unless that flags more than 10 % of the good fits
    t_fail = float(score[failed].max()) + 0.01 if failed.any() else 0.0
    t_good = float(np.quantile(score[good], 0.10)) if good.any() else 1.0
    threshold = min(t_fail, t_good)
    xg = x[good]
    usual = {}
    for j, name in enumerate(names):
        v = xg[:, j][np.isfinite(xg[:, j])]
        if v.size:
            lo, hi = float(v.min()), float(v.max())
            pad = 0.25 * (hi - lo)
            usual[name] = [round(lo - pad, 4), round(hi + pad, 4)]
    agreements = [a for r in rows if r["dice"]["myocardium"] >= GOOD and not r.get("displace") for a in r["agreement"].values()]
    disagreement = round(max(min(agreements) - 0.1, 0.0), 3) if agreements else 0.5
    offset_min_mm, offset_gain = choose_offset_rule(rows)
    pair_offset_min_mm, pair_offset_gain = choose_pair_rule(rows)
    return {
        "centre": dict(zip(names, np.round(centre, 5).tolist())),
        "spread": dict(zip(names, np.round(spread, 5).tolist())),
        "weights": dict(zip(names, np.round(w, 5).tolist())),
        "intercept": round(intercept, 5),
        "threshold": round(threshold, 4),
        "usual": usual,
        "disagreement": disagreement,
        "offset_min_mm": offset_min_mm,
        "offset_gain": offset_gain,
        "pair_offset_min_mm": pair_offset_min_mm,
        "pair_offset_gain": pair_offset_gain,
        "unusual_flag": unusual_flag,
        "two_sided": [n for n in names if n in TWO_SIDED],
        "curve": curve,
        "calibration": {"ridge": ridge, "floor": floor},
    }


def judge(model: dict, rows: list[dict]) -> list[dict]:
    from mvmm_monai.pipeline.qc import QualityModel

    qm = QualityModel(**model)
    out = []
    for r in rows:
        pairs = r.get("pairs") or {}
        verdict = qm.assess({k: (np.nan if v is None else v) for k, v in r["features"].items()}, r["agreement"],
                            offsets=r.get("offsets"), pairs=pairs, sequences=pair_sequences(pairs))
        out.append({"case": r["case"], "displace": r.get("displace"), "dice": r["dice"]["myocardium"],
                    "score": verdict["score"], "flag": verdict["flag"], "reasons": verdict["reasons"]})
    return out


def verdict_summary(judged: list[dict]) -> dict:
    dice = np.array([j["dice"] for j in judged])
    score = np.array([j["score"] for j in judged])
    flag = np.array([j["flag"] for j in judged])
    failed = dice < FAILED
    good = (dice >= GOOD) & ~np.array([moved_sequence(j) for j in judged], dtype=bool)
    moved = [j for j in judged if moved_sequence(j)]
    given = [j for j in judged if not j["displace"]]
    return {
        # every misplaced sequence should set the flag, with a reason that names it (whatever its Dice)
        "moved_sequences": len(moved), "moved_flagged": sum(j["flag"] for j in moved),
        "moved_named": sum(j["flag"] and any(r.startswith(j["displace"]["sequence"] + " ") for r in j["reasons"]) for j in moved),
        "as_given": len(given), "as_given_flagged": sum(j["flag"] for j in given),
        "fits": len(judged), "failed": int(failed.sum()), "good": int(good.sum()),
        "failed_flagged": int((flag & failed).sum()), "good_flagged": int((flag & good).sum()),
        "good_flagged_fraction": float((flag & good).sum() / max(good.sum(), 1)),
        "failed_unflagged": [f"{j['case']} {j['displace'] or 'as given'} (Dice {j['dice']:.3f}, score {j['score']:.3f})"
                             for j in judged if j["dice"] < FAILED and not j["flag"]],
        "mean_abs_error": float(np.abs(score - dice).mean()),
        "r": float(np.corrcoef(score, dice)[0, 1]) if len(judged) > 2 else None,
    }


def write_config(model: dict, calibration: dict) -> None:
    import yaml

    body = {"_target_": "mvmm_monai.pipeline.qc.QualityModel", **model, "calibration": {**model["calibration"], **calibration}}
    CONFIG.parent.mkdir(parents=True, exist_ok=True)
    CONFIG.write_text(
        "# Quality control of every fit (metrics.json qc): written by benchmarks/qc_calibration.py --write-config\n"
        "# from cross-validated fits of the shared MyoPS cases and failures made on purpose; do not edit by hand.\n"
        "# Remove the group (~qc) to record the features alone.\n" + yaml.safe_dump(body, sort_keys=False)
    )
    print("wrote", CONFIG)


def main() -> None:
    ap = argument_parser(__doc__, myops=True, threads=1)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--cases", default="Case3001..Case3025")
    ap.add_argument("--failures", type=int, default=2, help="failures made on purpose per case (default %(default)s)")
    ap.add_argument("--sequence-failures", type=int, default=1, help="failures per case made by moving C0 or T2 "
                    "against the other sequences (default %(default)s)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/mvmm_qc_calibration"))
    ap.add_argument("--reuse-atlases", action="store_true", help="use the fold atlases already in --out")
    ap.add_argument("--rows", type=Path, help="fits of an earlier run (its --out/rows.json, or its record): calibrate without fitting")
    ap.add_argument("--fits-record", type=Path, help="with --rows FILE: the record of the run that made those fits (its command and "
                    "revision are kept in this record)")
    ap.add_argument("--write-config", action="store_true", help=f"write the model from all fits to {CONFIG.relative_to(REPO)}")
    ap.add_argument("--crops", type=int, default=0, metavar="SIZE",
                    help="fit each case's SIZE x SIZE mid-ventricular crop with the folds' mid-slice atlases instead of the stack, "
                         "and judge them with the packaged model too")
    add_record_option(ap, "qc_calibration")
    args = parse_args(ap)
    if args.crops and args.write_config:
        ap.error("--write-config with --crops: the packaged model is made from stacks (see this script's docstring)")

    from mvmm_monai import build_atlas, compose_config
    from mvmm_monai.config import build
    from mvmm_monai.pipeline.build_atlas import select_subjects
    from mvmm_monai.pipeline.qc import FEATURES

    dataset = build(compose_config(["data=myops", f"data.root={args.root}"]).data)
    cases = select_subjects(args.cases, dataset.subjects(), "--cases")
    folds = folds_of(cases, args.folds)
    fold_of = {c: i for i, f in enumerate(folds) for c in f}
    fits_from = None
    if args.rows:
        rows = json.loads(args.rows.read_text())
        if isinstance(rows, dict):  # a record of this script: its fits and where they came from (that run, or the one it names)
            made = {k: rows[k] for k in ("command", "git_revision", "date")}
            fits_from, rows = rows["figures"].get("fits_from") or made, rows["figures"]["rows"]
        if args.fits_record:
            made = json.loads(args.fits_record.read_text())
            fits_from = {k: made[k] for k in ("command", "git_revision", "date")}
    else:
        atlases = []
        for i, fold in enumerate(folds):
            training = [c for c in cases if c not in fold]
            if args.crops:  # the mid-slice atlas of the training folds' crops (benchmarks/registration_guard.py's protocol)
                from mvmm_monai.atlas.midslice import mid_slice_atlas, mid_slice_crop

                atlas = args.out / f"fold{i}" / "atlas2d.npy"
                atlas.parent.mkdir(parents=True, exist_ok=True)
                np.save(atlas, mid_slice_atlas([mid_slice_crop(args.root / c, args.crops) for c in training]))
            else:
                atlas = args.out / f"fold{i}" / "atlas.nii.gz"
                if not (args.reuse_atlases and atlas.is_file()):
                    build_atlas(compose_config([f"data.root={args.root}", f"subjects=[{','.join(training)}]", f"output={atlas}"],
                                               config_name="build_atlas"))
            atlases.append(atlas)
        jobs = [(c, d) for c in cases for d in [None, *failures_for(c, args.failures), *sequence_failures_for(c, args.sequence_failures)]]
        rows = []
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
            common = (list(args.overrides), args.threads or 1)
            futures = [pool.submit(fit_one_crop, args.root, atlases[fold_of[c]], c, args.out / "fits" / f"{c}_{k}", d, *common, args.crops)
                       if args.crops else
                       pool.submit(fit_one, args.root, atlases[fold_of[c]], c, args.out / "fits" / f"{c}_{k}", d, *common)
                       for k, (c, d) in enumerate(jobs)]
            for fut in futures:
                row = {**fut.result(), "fold": None}
                row["fold"] = fold_of[row["case"]]
                rows.append(row)
                print(json.dumps(row), flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "rows.json").write_text(json.dumps(rows, indent=1))
    ok = [r for r in rows if "error" in r or "features" in r]
    errors = [r for r in ok if "error" in r]
    fitted = [r for r in ok if "features" in r]
    names = list(FEATURES)

    judged = []
    per_fold = []
    for i, fold in enumerate(folds):
        train = [r for r in fitted if r["case"] not in fold]
        test = [r for r in fitted if r["case"] in fold]
        j = judge(make_model(train, names), test)
        judged += j
        per_fold.append(verdict_summary(j))
    pooled = verdict_summary(judged)
    full = make_model(fitted, names)
    packaged = None
    if args.crops:  # the packaged model (made from stacks, other fits than these) judging every crop
        import dataclasses

        from mvmm_monai.config import build as build_model

        qm = build_model(compose_config([]).qc, _convert_="all")
        packaged = verdict_summary(judge({f.name: getattr(qm, f.name) for f in dataclasses.fields(qm)}, fitted))
    # failures per case as the rows have them (with --rows, those of the run that fitted them)
    per_case = {"atlas": sum(bool(r.get("displace")) and "sequence" not in r["displace"] for r in rows) // max(len(cases), 1),
                "sequence": sum(bool(r.get("displace")) and "sequence" in r["displace"] for r in rows) // max(len(cases), 1)}
    figures = {
        "crops": args.crops or None,  # None: whole stacks
        "packaged_model": packaged,  # with --crops: the packaged model's verdicts on every crop
        "folds": folds, "failures_per_case": per_case["atlas"], "sequence_failures_per_case": per_case["sequence"], "features": names, "errors": [f"{r['case']} {r.get('displace')}: {r['error']}" for r in errors],
        "cross_validated": {"pooled": pooled, "folds": per_fold, "fits": judged},
        "model_from_all": full,
        "same_fits": verdict_summary(judge(full, fitted)),
        "fits_from": fits_from,  # None: the fits were made by this run
        "rows": rows,
    }
    print(json.dumps({"pooled": pooled, "model": full}, indent=1))
    if args.record:  # before the config is written: the record names the revision the fits ran at, not a tree it changed
        write_table_record(args, figures, per_fold, pooled, cases)
    if args.write_config:
        write_config(full, {"record": args.record or None, "cases": args.cases, "fits": len(fitted),
                            "failures_per_case": per_case["atlas"], "sequence_failures_per_case": per_case["sequence"],
                            "folds": args.folds})


def times(n: int) -> str:
    return {0: "never", 1: "once", 2: "twice"}.get(n, f"{n} times")


def write_table_record(args, figures: dict, per_fold: list[dict], pooled: dict, cases: list[str]) -> None:
    table_rows = []
    judged_by = [*((f"fold {i}", s) for i, s in enumerate(per_fold)), ("pooled", pooled)]
    if figures.get("packaged_model"):
        judged_by.append(("every crop, by the packaged model (made from stacks)", figures["packaged_model"]))
    for label, s in judged_by:
        table_rows.append([label, s["fits"], f"{s['failed_flagged']}/{s['failed']}", f"{s['good_flagged']}/{s['good']}",
                           f"{s['as_given_flagged']}/{s['as_given']}", f"{s['moved_flagged']}/{s['moved_sequences']}",
                           f"{s['moved_named']}/{s['moved_sequences']}", f"{s['mean_abs_error']:.3f}", "" if s["r"] is None else f"{s['r']:.2f}"])
    write_record(args.record, figures, table={
        "columns": ["held-out fold", "fits", "failures (Dice < 0.70) flagged", "good fits (Dice >= 0.80, no sequence moved) flagged",
                    "fits as given flagged", "moved sequences flagged", "... with a reason naming the sequence",
                    "mean |score - Dice|", "r(score, Dice)"],
        "rows": table_rows,
        "caption": f"Quality control, {args.folds}-fold cross-validated over {len(cases)} MyoPS cases ({args.cases})"
                   + (f" as {args.crops} x {args.crops} mid-ventricular crops (one slice; the folds' mid-slice atlases)" if args.crops else "")
                   + ", each fitted "
                   f"as given, {times(figures['failures_per_case'])} with a misplaced atlas and "
                   f"{times(figures['sequence_failures_per_case'])} with C0 or T2 moved against the other sequences, made on purpose: "
                   "the model judging a fold was made "
                   "from the other folds' fits only; each fold's atlas from the other folds' cases."
                   + (" The last row: the packaged model, made from whole stacks, judging every crop." if args.crops else ""),
    })


if __name__ == "__main__":
    main()
