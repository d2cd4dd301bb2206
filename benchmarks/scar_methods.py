#!/usr/bin/env python
"""Scar in LGE: the mixture's enhanced subtype against the clinical threshold methods, on the same
fitted myocardium of the same cases.

    .venv/bin/python benchmarks/scar_methods.py --fits DIR [--root DIR] [--folds 5] [--record NAME]

``--fits``: the folder of one variant of ``benchmarks/crossval.py`` (``DIR/<case>/`` holding
``<case>_LGE_seg.nii.gz``, ``<case>_scar.nii.gz`` and ``metrics.json`` of fully automatic fits, each
with an atlas from the other folds) made with ``model.scar.rule=subtype model.scar.min_component_ml=0``:
their scar is the mixture's own, every piece of it. Within each fit's myocardium (its label plus its scar), on the LGE image:

- ``mixture``: the fit's own scar (the brightest LGE myocardium subtype, ``mixture/scar.py``);
- ``n-SD``: brighter than the remote myocardium's mean by n of its standard deviations, the remote
  taken automatically as the darker half of the myocardium (no hand-drawn region);
- ``FWHM``: at least half the myocardium's maximum (its 99th percentile, robust to single voxels);
- both the mixture's scar and FWHM.

As a ceiling for the threshold rules (not a method: it needs the manual label), n-SD and FWHM are
also applied within the *manual* myocardium (MyoPS 200, 1220 and 2221): what they reach when the
myocardium is drawn perfectly. And where the manual scar lies in each fit's LGE label map
(myocardium, LV, RV, background): manual scar the fit draws as LV pool is scar no rule within the
fitted myocardium can find; and what each sequence shows there (its intensity from the normal
myocardium's median, 0, to the LV blood's, 1).

n is chosen by cross-validation: for each fold, the n of ``--n`` with the best mean scar Dice on
the other folds' cases, applied to the fold; the product's rule (``model.scar.rule``: subtype,
fwhm, subtype_and_fwhm) is chosen per fold the same way, alone and together with
``model.scar.min_component_ml`` (pieces of scar smaller than that many ml dropped; ``--min-components``).
Reported per method: scar Dice against the manual
label (MyoPS 2221), volumes in ml and the mean relative volume error. Writes
``benchmarks/results/NAME.json`` (default ``scar_methods``).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from common import argument_parser, parse_args
from crossval import folds_of
from record import add_record_option, write_record

from mvmm_monai.conventions.scar import drop_small_components

SCAR, MYO = 2221, 200  # MyoPS label values: scar, myocardium (the fit's myocardium label)
MANUAL_MYO = (200, 1220, 2221)  # MyoPS myocardium: normal, oedema, scar
FIT_LABELS = {"myocardium": 200, "lv": 500, "rv": 600, "background": 0}  # the fit's LGE label map (MyoPS values)
RULES = {"subtype": "mixture", "fwhm": "fwhm", "subtype_and_fwhm": "mixture_fwhm"}  # model.scar.rule -> method key


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float(2 * (a & b).sum() / s) if s else 1.0


def threshold_masks(lge: np.ndarray, myo: np.ndarray, ns: list[float]) -> dict[str, np.ndarray]:
    """The clinical threshold masks within ``myo`` on ``lge``: ``nsd_<n>`` for every n, and ``fwhm``."""
    values = lge[myo]
    if values.size < 10:
        return {**{f"nsd_{n:g}": np.zeros_like(myo) for n in ns}, "fwhm": np.zeros_like(myo)}
    remote = values[values <= np.median(values)]
    mu, sd = float(remote.mean()), float(remote.std())
    out = {f"nsd_{n:g}": myo & (lge > mu + n * sd) for n in ns}
    out["fwhm"] = myo & (lge >= 0.5 * float(np.percentile(values, 99)))
    return out


def case_row(fits, root, case: str, ns: list[float], min_components: list[float]) -> dict:
    seg_file, scar_file = fits / case / f"{case}_LGE_seg.nii.gz", fits / case / f"{case}_scar.nii.gz"
    entry = json.loads((fits / case / "metrics.json").read_text()).get("scar", {})
    rule, smallest = entry.get("rule", "subtype"), entry.get("min_component_ml", 0.0)  # fits before min_component_ml kept every piece
    if rule != "subtype" or smallest:
        raise SystemExit(f"{fits / case}: fitted with model.scar.rule={rule} model.scar.min_component_ml={smallest}; fit with "
                         "model.scar.rule=subtype model.scar.min_component_ml=0 (the mixture's own scar, every piece)")
    seg, scar = np.asarray(nib.load(seg_file).dataobj), np.asarray(nib.load(scar_file).dataobj) > 0
    lge_img = nib.load(root / case / f"{case}_LGE.nii.gz")
    lge = np.asarray(lge_img.dataobj, dtype=np.float64)
    gd = np.asarray(nib.load(root / case / f"{case}_gd.nii.gz").dataobj)
    truth = gd == SCAR
    if seg.shape != truth.shape or scar.shape != truth.shape:
        raise SystemExit(f"{case}: the fit's grids {seg.shape} / {scar.shape} are not the label's {truth.shape}")
    ml = float(np.prod(lge_img.header.get_zooms()[:3])) / 1000.0
    myo = (seg == MYO) | scar
    masks = {"mixture": scar, **threshold_masks(lge, myo, ns)}
    masks["mixture_fwhm"] = scar & masks["fwhm"]
    for key in RULES.values():  # the product's rules with their small pieces dropped (model.scar.min_component_ml)
        for m in min_components:
            if m > 0:
                masks[f"{key}_min{m:g}"] = drop_small_components(torch.from_numpy(masks[key]), ml, m).numpy()
    masks.update({f"manual_{k}": m for k, m in threshold_masks(lge, np.isin(gd, MANUAL_MYO), ns).items()})
    lands = {name: int((truth & (seg == value) & ~scar).sum()) for name, value in FIT_LABELS.items()}
    lands["myocardium"] += int((truth & scar).sum())  # the fit's scar is its myocardium too
    # what every sequence shows on the manual scar the fit draws as LV pool: t = 0 like the normal
    # myocardium (MyoPS 200), 1 like the LV blood (500), the medians over the case
    lost = truth & (seg == FIT_LABELS["lv"])
    like_blood = {}
    for seq in ("C0", "LGE", "T2"):
        im = lge if seq == "LGE" else np.asarray(nib.load(root / case / f"{case}_{seq}.nii.gz").dataobj, dtype=np.float64)
        m0, m1 = np.median(im[gd == MYO]), np.median(im[gd == FIT_LABELS["lv"]])
        like_blood[seq] = float(np.median((im[lost] - m0) / (m1 - m0))) if lost.sum() >= 10 else None
    return {"case": case, "true_ml": float(truth.sum() * ml), "manual_scar_in_fit": lands, "lost_scar_like_blood": like_blood,
            "methods": {k: {"dice": dice(m, truth), "ml": float(m.sum() * ml)} for k, m in masks.items()}}


def summary(rows: list[dict], pick: dict[str, str]) -> dict:
    """Per method (``pick``: case -> the method key used for it): mean Dice, mean volume and mean
    relative volume error."""
    d = [r["methods"][pick[r["case"]]]["dice"] for r in rows]
    v = [r["methods"][pick[r["case"]]]["ml"] for r in rows]
    t = [r["true_ml"] for r in rows]
    return {"dice_mean": float(np.mean(d)), "dice_sd": float(np.std(d)), "ml_mean": float(np.mean(v)), "true_ml_mean": float(np.mean(t)),
            "relative_volume_error": float(np.mean([abs(a - b) / b for a, b in zip(v, t)]))}


def main() -> None:
    ap = argument_parser(__doc__, myops=True, overrides=False)
    ap.add_argument("--fits", type=Path, required=True)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--n", type=float, nargs="+", default=[2, 3, 4, 5, 6], help="the n of n-SD tried (default %(default)s)")
    ap.add_argument("--min-components", type=float, nargs="+", default=[0, 0.25, 0.5, 1.0],
                    help="model.scar.min_component_ml values tried with the product's rules, ml (default %(default)s)")
    add_record_option(ap, "scar_methods")
    args = parse_args(ap)
    cases = sorted(p.name for p in args.fits.iterdir() if (p / f"{p.name}_scar.nii.gz").is_file())
    if not cases:
        raise SystemExit(f"{args.fits}: no fits (<case>/<case>_scar.nii.gz) found")
    rows = [case_row(args.fits, args.root, c, args.n, args.min_components) for c in cases]
    by_case = {r["case"]: r for r in rows}
    folds = folds_of(cases, args.folds)
    chosen = []
    for fold in folds:
        others = [by_case[c] for c in cases if c not in fold]
        best = max(args.n, key=lambda n: np.mean([r["methods"][f"nsd_{n:g}"]["dice"] for r in others]))
        chosen.append(best)
    pick_cv = {c: f"nsd_{chosen[i]:g}" for i, fold in enumerate(folds) for c in fold}
    chosen_manual = [max(args.n, key=lambda n: np.mean([by_case[c]["methods"][f"manual_nsd_{n:g}"]["dice"] for c in cases if c not in fold]))
                     for fold in folds]
    pick_manual = {c: f"manual_nsd_{chosen_manual[i]:g}" for i, fold in enumerate(folds) for c in fold}
    # the product's rule (model.scar.rule) chosen per fold the same way, among those it offers
    rules = RULES
    rule_chosen = []
    for fold in folds:
        others = [by_case[c] for c in cases if c not in fold]
        rule_chosen.append(max(rules, key=lambda k: np.mean([r["methods"][rules[k]]["dice"] for r in others])))
    pick_rule = {c: rules[rule_chosen[i]] for i, fold in enumerate(folds) for c in fold}
    # ... and together with model.scar.min_component_ml (its smallest value on a tie)
    def key_of(rule: str, m: float) -> str:
        return rules[rule] if m == 0 else f"{rules[rule]}_min{m:g}"

    pairs = [(rule, m) for rule in rules for m in sorted(args.min_components)]
    pair_chosen = []
    for fold in folds:
        others = [by_case[c] for c in cases if c not in fold]
        pair_chosen.append(max(pairs, key=lambda p: np.mean([r["methods"][key_of(*p)]["dice"] for r in others])))
    pick_pair = {c: key_of(*pair_chosen[i]) for i, fold in enumerate(folds) for c in fold}
    methods = {"mixture (MvMM scar subtype)": {c: "mixture" for c in cases},
               "n-SD, n chosen per fold": pick_cv,
               **{f"n-SD, n = {n:g} (every case)": {c: f"nsd_{n:g}" for c in cases} for n in args.n},
               "FWHM": {c: "fwhm" for c in cases},
               "mixture and FWHM both": {c: "mixture_fwhm" for c in cases},
               "model.scar.rule chosen per fold": pick_rule,
               **{f"mixture and FWHM both, pieces under {m:g} ml dropped": {c: key_of("subtype_and_fwhm", m) for c in cases}
                  for m in sorted(args.min_components) if m > 0},
               "model.scar.rule and min_component_ml chosen per fold": pick_pair,
               "ceiling, not a method: n-SD within the manual myocardium, n chosen per fold": pick_manual,
               "ceiling, not a method: FWHM within the manual myocardium": {c: "manual_fwhm" for c in cases}}
    results = {name: summary(rows, pick) for name, pick in methods.items()}
    total = sum(sum(r["manual_scar_in_fit"].values()) for r in rows)
    lands = {k: sum(r["manual_scar_in_fit"][k] for r in rows) / total for k in FIT_LABELS}
    print(json.dumps(results, indent=1))
    like_blood = {seq: float(np.median([v for r in rows if (v := r["lost_scar_like_blood"][seq]) is not None])) for seq in ("C0", "LGE", "T2")}
    print("manual scar in the fits' label maps: " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in lands.items()))
    print("on the manual scar drawn as LV, median over cases of (I - normal myocardium) / (LV blood - normal myocardium): "
          + ", ".join(f"{k} {v:.2f}" for k, v in like_blood.items()))
    if not args.record:
        return
    write_record(args.record, {"cases": cases, "folds": folds, "n_chosen_per_fold": chosen, "rule_chosen_per_fold": rule_chosen,
                               "rule_and_min_component_ml_chosen_per_fold": [list(p) for p in pair_chosen],
                               "n_chosen_per_fold_manual_myocardium": chosen_manual, "manual_scar_in_fit": lands,
                               "lost_scar_like_blood": like_blood,
                               "results": results, "rows": rows}, table={
        "columns": ["method", "scar Dice (mean ± SD)", "volume (ml, mean)", "manual volume (ml, mean)", "mean relative volume error"],
        "rows": [[name, f"{s['dice_mean']:.3f} ± {s['dice_sd']:.3f}", f"{s['ml_mean']:.1f}", f"{s['true_ml_mean']:.1f}",
                  f"{100 * s['relative_volume_error']:.0f} %"] for name, s in results.items()],
        "caption": f"Scar (MyoPS 2221) on the LGE grids of {len(cases)} MyoPS cases, within each fully automatic cross-validated "
                   f"fit's myocardium: the mixture's scar subtype against n-SD (remote: the darker half of the myocardium) and FWHM; "
                   f"n chosen per fold on the other folds' cases ({', '.join(f'{n:g}' for n in chosen)}), and the rule of model.scar.rule "
                   f"the same way ({', '.join(rule_chosen)}), and with model.scar.min_component_ml "
                   f"({', '.join(f'{r} {m:g} ml' for r, m in pair_chosen)}). Fits: {args.fits.name}. Manual scar voxels in the fits' label maps: "
                   + ", ".join(f"{k} {100 * v:.1f} %" for k, v in lands.items()) + "; on the manual scar drawn as LV, each "
                   "sequence's intensity from normal myocardium (0) to LV blood (1), median over the cases: "
                   + ", ".join(f"{k} {v:.2f}" for k, v in like_blood.items()) + ".",
    })


if __name__ == "__main__":
    main()
