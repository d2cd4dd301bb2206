#!/usr/bin/env python
"""Scar in LGE: the mixture's enhanced subtype against the clinical threshold methods, on the same
fitted myocardium of the same cases.

    .venv/bin/python benchmarks/scar_methods.py --fits DIR [--root DIR] [--free-fits DIR --free-root DIR] [--folds 5] [--record NAME]

``--fits``: the folder of one variant of ``benchmarks/crossval.py`` (``DIR/<case>/`` holding
``<case>_LGE_seg.nii.gz``, ``<case>_scar.nii.gz`` and ``metrics.json`` of fully automatic fits, each
with an atlas from the other folds) made with ``model.scar.rule=subtype model.scar.min_component_ml=0 model.scar.min_bic_gain=0``:
their scar is the mixture's own, every piece of it. Within each fit's myocardium (its label plus its scar), on the LGE image:

- ``mixture``: the fit's own scar (the brightest LGE myocardium subtype, ``mixture/scar.py``);
- ``n-SD``: brighter than the remote myocardium's mean by n of its standard deviations, the remote
  taken automatically as the darker half of the myocardium (no hand-drawn region);
- ``FWHM``: at least half the myocardium's maximum (its 99th percentile, robust to single voxels);
- both the mixture's scar and FWHM;
- the default rule (both, pieces under 1 ml dropped) kept only where a model comparison prefers an
  enhanced myocardium subtype: the BIC of two Gaussians fitted to the myocardium's LGE intensities
  (scaled as the fits scaled them) against one, by more than a margin per voxel (``BIC_GAINS``; 0:
  the comparison alone), the margin also chosen per fold: ``model.scar.min_bic_gain``, computed by
  the package's own :func:`~mvmm_monai.mixture.scar.enhanced_subtype_bic_gain`. The fits must
  have been made with ``model.scar.min_bic_gain=0`` (their scar not yet cleared by it).

As a ceiling for the threshold rules (not a method: it needs the manual label), n-SD and FWHM are
also applied within the *manual* myocardium (MyoPS 200, 1220 and 2221): what they reach when the
myocardium is drawn perfectly. And where the manual scar lies in each fit's LGE label map
(myocardium, LV, RV, background): manual scar the fit draws as LV pool is scar no rule within the
fitted myocardium can find; and what each sequence shows there (its intensity from the normal
myocardium's median, 0, to the LV blood's, 1).

n is chosen by cross-validation: for each fold, the n of ``--n`` with the best mean scar Dice on
the other folds' cases, applied to the fold; the product's rule (``model.scar.rule``: subtype,
fwhm, subtype_and_fwhm) is chosen per fold the same way, alone and together with
``model.scar.open_mm`` (the mask opened in-plane by a disk of that radius: thin bands go;
``--open-mm``) and ``model.scar.min_component_ml`` (pieces of scar smaller than that many ml
dropped; ``--min-components``). With ``--free-fits`` (``benchmarks/scar_free.py``: the same cases,
their scar filled from the normal wall, fitted the same way) every method's volume on those
scar-free hearts is reported too, and the settings are also chosen per fold among those that keep
at least ``FREE_SHARE`` of the other folds' scar-free hearts under ``LIMIT_ML``.
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
from common import argument_parser, myops_dataset, parse_args
from crossval import folds_of
from record import add_record_option, write_record

from mvmm_monai.conventions.scar import drop_small_components, open_in_plane
from mvmm_monai.mixture.scar import enhanced_subtype_bic_gain

SCAR, MYO = 2221, 200  # MyoPS label values: scar, myocardium (the fit's myocardium label)
MANUAL_MYO = (200, 1220, 2221)  # MyoPS myocardium: normal, oedema, scar
FIT_LABELS = {"myocardium": 200, "lv": 500, "rv": 600, "background": 0}  # the fit's LGE label map (MyoPS values)
RULES = {"subtype": "mixture", "fwhm": "fwhm", "subtype_and_fwhm": "mixture_fwhm"}  # model.scar.rule -> method key
LIMIT_ML = 2.0  # issue "Automatic results that hold": under 2 ml on hearts without scar
BLOOD_FRACTIONS = (0.5, 0.55, 0.6)  # stricter model.scar.min_blood_fraction tried with the default rule (packaged: 0.45)
FREE_SHARE = 0.9  # the share of scar-free hearts a setting must keep under LIMIT_ML to be chosen with --free-fits
BIC_GAINS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)  # per voxel: model.scar.min_bic_gain's margins tried (0: BIC alone)



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


def product_key(rule: str, open_mm: float, min_ml: float) -> str:
    """The mask key of the product's rule ``rule`` (a ``model.scar.rule``) with ``model.scar.open_mm``
    and ``model.scar.min_component_ml``."""
    key = RULES[rule]
    if open_mm:
        key += f"_open{open_mm:g}"
    return key if min_ml == 0 else f"{key}_min{min_ml:g}"


def case_row(fits, root, case: str, ns: list[float], min_components: list[float], opens: list[float] = (0.0,)) -> dict:
    seg_file, scar_file = fits / case / f"{case}_LGE_seg.nii.gz", fits / case / f"{case}_scar.nii.gz"
    entry = json.loads((fits / case / "metrics.json").read_text()).get("scar", {})
    # fits before min_component_ml kept every piece, and before min_bic_gain every heart's scar
    rule, smallest, margin = entry.get("rule", "subtype"), entry.get("min_component_ml", 0.0), entry.get("min_bic_gain", 0.0)
    if rule != "subtype" or smallest or margin:
        raise SystemExit(f"{fits / case}: fitted with model.scar.rule={rule} model.scar.min_component_ml={smallest} "
                         f"model.scar.min_bic_gain={margin}; fit with model.scar.rule=subtype model.scar.min_component_ml=0 "
                         "model.scar.min_bic_gain=0 (the mixture's own scar, every piece, in every heart)")
    seg, scar = np.asarray(nib.load(seg_file).dataobj), np.asarray(nib.load(scar_file).dataobj) > 0
    lge_img = nib.load(root / case / f"{case}_LGE.nii.gz")
    lge = np.asarray(lge_img.dataobj, dtype=np.float64)
    gd = np.asarray(nib.load(root / case / f"{case}_gd.nii.gz").dataobj)
    truth = gd == SCAR
    if seg.shape != truth.shape or scar.shape != truth.shape:
        raise SystemExit(f"{case}: the fit's grids {seg.shape} / {scar.shape} are not the label's {truth.shape}")
    ml = float(np.prod(lge_img.header.get_zooms()[:3])) / 1000.0
    myo = (seg == MYO) | scar
    # the model comparison on the LGE image as the fits scaled it (data=myops's percentiles)
    scaled = myops_dataset(root).load(case).native_images["LGE"][0].numpy()
    bic_gain = enhanced_subtype_bic_gain(scaled[myo])
    masks = {"mixture": scar, **threshold_masks(lge, myo, ns)}
    masks["mixture_fwhm"] = scar & masks["fwhm"]
    spacing = tuple(float(v) for v in lge_img.header.get_zooms()[:2])
    for rule, key in RULES.items():  # the product's rules opened (model.scar.open_mm), small pieces dropped (min_component_ml)
        for o in opens:
            opened = open_in_plane(torch.from_numpy(masks[key]), spacing, o)
            for m in min_components:
                if o or m:
                    masks[product_key(rule, o, m)] = drop_small_components(opened, ml, m).numpy()
    # the default rule with a stricter guard on the subtype (model.scar.min_blood_fraction): a heart
    # whose enhanced subtype lies less far towards the blood gets no scar at all
    default = masks.get(product_key("subtype_and_fwhm", 0, 1.0))
    if default is not None:
        bf = entry.get("blood_fraction")
        for t in BLOOD_FRACTIONS:
            masks[f"default_bf{t:g}"] = default if bf is not None and bf >= t else np.zeros_like(default)
        # ... and only where a model comparison prefers an enhanced subtype (BIC, by a margin per voxel)
        for t in BIC_GAINS:
            masks[f"default_bic{t:g}"] = default if bic_gain is not None and bic_gain > t else np.zeros_like(default)
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
    return {"case": case, "true_ml": float(truth.sum() * ml), "bic_gain_per_voxel": bic_gain,
            "manual_scar_in_fit": lands, "lost_scar_like_blood": like_blood,
            "methods": {k: {"dice": dice(m, truth), "ml": float(m.sum() * ml)} for k, m in masks.items()}}


def summary(rows: list[dict], pick: dict[str, str], free_rows: list[dict] = ()) -> dict:
    """Per method (``pick``: case -> the method key used for it): mean Dice, mean volume and mean
    relative volume error; with ``free_rows`` (the same cases made scar-free) the mean volume found
    on them and how many stay under ``LIMIT_ML``."""
    d = [r["methods"][pick[r["case"]]]["dice"] for r in rows]
    v = [r["methods"][pick[r["case"]]]["ml"] for r in rows]
    t = [r["true_ml"] for r in rows]
    out = {"dice_mean": float(np.mean(d)), "dice_sd": float(np.std(d)), "ml_mean": float(np.mean(v)), "true_ml_mean": float(np.mean(t)),
           "relative_volume_error": float(np.mean([abs(a - b) / b for a, b in zip(v, t)]))}
    if free_rows:
        f = [r["methods"][pick[r["case"]]]["ml"] for r in free_rows]
        out.update(free_ml_mean=float(np.mean(f)), free_under=int(sum(x < LIMIT_ML for x in f)), free_n=len(f))
    return out


def main() -> None:
    ap = argument_parser(__doc__, myops=True, overrides=False)
    ap.add_argument("--fits", type=Path, required=True)
    ap.add_argument("--free-fits", type=Path, help="the fits of benchmarks/scar_free.py (its --out/fits), made with "
                    "model.scar.rule=subtype model.scar.min_component_ml=0 model.scar.min_bic_gain=0: every method's volume on scar-free hearts")
    ap.add_argument("--free-root", type=Path, help="the scar-free cases those fits were made from (scar_free.py's --out/data)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--n", type=float, nargs="+", default=[2, 3, 4, 5, 6], help="the n of n-SD tried (default %(default)s)")
    ap.add_argument("--min-components", type=float, nargs="+", default=[0, 0.25, 0.5, 1.0],
                    help="model.scar.min_component_ml values tried with the product's rules, ml (default %(default)s)")
    ap.add_argument("--open-mm", type=float, nargs="+", default=[0, 1, 1.5, 2, 3],
                    help="model.scar.open_mm values tried with the product's rules, mm (default %(default)s)")
    add_record_option(ap, "scar_methods")
    args = parse_args(ap)
    if (args.free_fits is None) != (args.free_root is None):
        raise SystemExit("--free-fits and --free-root go together")
    cases = sorted(p.name for p in args.fits.iterdir() if (p / f"{p.name}_scar.nii.gz").is_file())
    if not cases:
        raise SystemExit(f"{args.fits}: no fits (<case>/<case>_scar.nii.gz) found")
    opens, mins = sorted(args.open_mm), sorted(args.min_components)
    rows = [case_row(args.fits, args.root, c, args.n, mins, opens) for c in cases]
    free_rows = []
    if args.free_fits:
        missing = [c for c in cases if not (args.free_fits / c / f"{c}_scar.nii.gz").is_file()]
        if missing:
            raise SystemExit(f"{args.free_fits}: no scar-free fit of {', '.join(missing)}")
        free_rows = [case_row(args.free_fits, args.free_root, c, args.n, mins, opens) for c in cases]
    by_case = {r["case"]: r for r in rows}
    free_by_case = {r["case"]: r for r in free_rows}
    folds = folds_of(cases, args.folds)

    def others_of(fold):
        return [by_case[c] for c in cases if c not in fold]

    chosen = [max(args.n, key=lambda n: np.mean([r["methods"][f"nsd_{n:g}"]["dice"] for r in others_of(fold)])) for fold in folds]
    pick_cv = {c: f"nsd_{chosen[i]:g}" for i, fold in enumerate(folds) for c in fold}
    chosen_manual = [max(args.n, key=lambda n: np.mean([by_case[c]["methods"][f"manual_nsd_{n:g}"]["dice"] for c in cases if c not in fold]))
                     for fold in folds]
    pick_manual = {c: f"manual_nsd_{chosen_manual[i]:g}" for i, fold in enumerate(folds) for c in fold}
    # the product's rule (model.scar.rule) chosen per fold the same way, among those it offers
    rule_chosen = [max(RULES, key=lambda k: np.mean([r["methods"][RULES[k]]["dice"] for r in others_of(fold)])) for fold in folds]
    pick_rule = {c: RULES[rule_chosen[i]] for i, fold in enumerate(folds) for c in fold}
    # ... and together with model.scar.open_mm and model.scar.min_component_ml (the first, smallest, on a tie)
    settings = [(rule, o, m) for rule in RULES for o in opens for m in mins]

    def held_in_dice(key, fold):
        """The mean scar Dice of method ``key`` on the other folds' hearts."""
        return np.mean([r["methods"][key]["dice"] for r in others_of(fold)])

    def free_share(key, fold):
        """The share of the other folds' scar-free hearts on which method ``key`` finds under LIMIT_ML."""
        return np.mean([free_by_case[c]["methods"][key]["ml"] < LIMIT_ML for c in cases if c not in fold])

    def choose_keeping_free(options, key_of, fold):
        """Among ``options`` that keep at least FREE_SHARE of the other folds' scar-free hearts under
        LIMIT_ML, the one of the best scar Dice (none: the one that keeps most)."""
        ok = [o for o in options if free_share(key_of(o), fold) >= FREE_SHARE]
        if ok:
            return max(ok, key=lambda o: held_in_dice(key_of(o), fold))
        return max(options, key=lambda o: free_share(key_of(o), fold))

    def per_fold(chosen_per_fold, key_of):
        return {c: key_of(chosen_per_fold[i]) for i, fold in enumerate(folds) for c in fold}

    set_chosen = [max(settings, key=lambda st: held_in_dice(product_key(*st), fold)) for fold in folds]
    methods = {"mixture (MvMM scar subtype)": {c: "mixture" for c in cases},
               "n-SD, n chosen per fold": pick_cv,
               **{f"n-SD, n = {n:g} (every case)": {c: f"nsd_{n:g}" for c in cases} for n in args.n},
               "FWHM": {c: "fwhm" for c in cases},
               "mixture and FWHM both": {c: "mixture_fwhm" for c in cases},
               "model.scar.rule chosen per fold": pick_rule,
               **{f"mixture and FWHM both, pieces under {m:g} ml dropped": {c: product_key("subtype_and_fwhm", 0, m) for c in cases}
                  for m in mins if m > 0},
               **{f"mixture and FWHM both, opened by {o:g} mm, pieces under {max(mins):g} ml dropped":
                  {c: product_key("subtype_and_fwhm", o, max(mins)) for c in cases} for o in opens if o > 0},
               "model.scar.rule, open_mm and min_component_ml chosen per fold": per_fold(set_chosen, lambda st: product_key(*st))}
    bic_chosen, bic_tie_chosen, bic_free_chosen = [], [], []
    if 1.0 in mins:
        methods.update({f"the default rule (mixture and FWHM, pieces under 1 ml dropped), no scar below blood fraction {t:g}":
                        {c: f"default_bf{t:g}" for c in cases} for t in BLOOD_FRACTIONS})

        def bic_key(t):
            return f"default_bic{t:g}"

        methods.update({f"the default rule where BIC prefers two LGE myocardium subtypes to one by more than {t:g} per voxel":
                        {c: bic_key(t) for c in cases} for t in BIC_GAINS})
        bic_chosen = [max(BIC_GAINS, key=lambda t: held_in_dice(bic_key(t), fold)) for fold in folds]  # the smallest on a tie
        methods["the same, the margin chosen per fold"] = per_fold(bic_chosen, bic_key)
        if free_rows:
            # by the scar Dice, and among margins of the same Dice the one keeping most scar-free hearts under LIMIT_ML
            bic_tie_chosen = [max(BIC_GAINS, key=lambda t: (round(held_in_dice(bic_key(t), fold), 6), free_share(bic_key(t), fold)))
                              for fold in folds]
            methods[f"the same, the margin chosen per fold, a tie in scar Dice going to the most scar-free hearts under {LIMIT_ML:g} ml"] = (
                per_fold(bic_tie_chosen, bic_key))
            bic_free_chosen = [choose_keeping_free(BIC_GAINS, bic_key, fold) for fold in folds]
            methods[f"the same, the margin chosen per fold among those keeping {100 * FREE_SHARE:.0f} % of scar-free hearts "
                    f"under {LIMIT_ML:g} ml"] = per_fold(bic_free_chosen, bic_key)
    set_free_chosen = []
    if free_rows:  # the product's settings again, among those keeping the other folds' scar-free hearts under LIMIT_ML
        set_free_chosen = [choose_keeping_free(settings, lambda st: product_key(*st), fold) for fold in folds]
        methods[f"the same, among settings keeping {100 * FREE_SHARE:.0f} % of scar-free hearts under {LIMIT_ML:g} ml"] = (
            per_fold(set_free_chosen, lambda st: product_key(*st)))
    methods.update({"ceiling, not a method: n-SD within the manual myocardium, n chosen per fold": pick_manual,
                    "ceiling, not a method: FWHM within the manual myocardium": {c: "manual_fwhm" for c in cases}})
    results = {name: summary(rows, pick, free_rows if not name.startswith("ceiling") else ()) for name, pick in methods.items()}
    total = sum(sum(r["manual_scar_in_fit"].values()) for r in rows)
    lands = {k: sum(r["manual_scar_in_fit"][k] for r in rows) / total for k in FIT_LABELS}
    print(json.dumps(results, indent=1))
    like_blood = {seq: float(np.median([v for r in rows if (v := r["lost_scar_like_blood"][seq]) is not None])) for seq in ("C0", "LGE", "T2")}
    print("manual scar in the fits' label maps: " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in lands.items()))
    print("on the manual scar drawn as LV, median over cases of (I - normal myocardium) / (LV blood - normal myocardium): "
          + ", ".join(f"{k} {v:.2f}" for k, v in like_blood.items()))
    if not args.record:
        return

    def setting_text(st):
        return f"{st[0]} {st[1]:g} mm {st[2]:g} ml"

    columns = ["method", "scar Dice (mean ± SD)", "volume (ml, mean)", "manual volume (ml, mean)", "mean relative volume error"]
    if free_rows:
        columns += ["scar-free hearts: volume (ml, mean)", f"scar-free hearts under {LIMIT_ML:g} ml"]

    def line(name, r):
        out = [name, f"{r['dice_mean']:.3f} ± {r['dice_sd']:.3f}", f"{r['ml_mean']:.1f}", f"{r['true_ml_mean']:.1f}",
               f"{100 * r['relative_volume_error']:.0f} %"]
        if free_rows:
            out += [f"{r['free_ml_mean']:.1f}", f"{r['free_under']}/{r['free_n']}"] if "free_n" in r else ["–", "–"]
        return out

    write_record(args.record, {"cases": cases, "folds": folds, "n_chosen_per_fold": chosen, "rule_chosen_per_fold": rule_chosen,
                               "settings_chosen_per_fold": [list(p) for p in set_chosen],
                               "settings_chosen_per_fold_scar_free": [list(p) for p in set_free_chosen],
                               "bic_margin_chosen_per_fold": bic_chosen, "bic_margin_chosen_per_fold_tie_to_scar_free": bic_tie_chosen,
                               "bic_margin_chosen_per_fold_scar_free": bic_free_chosen,
                               "n_chosen_per_fold_manual_myocardium": chosen_manual, "manual_scar_in_fit": lands,
                               "lost_scar_like_blood": like_blood, "free_fits": None if args.free_fits is None else str(args.free_fits),
                               "results": results, "rows": rows, "free_rows": free_rows}, table={
        "columns": columns,
        "rows": [line(name, r) for name, r in results.items()],
        "caption": f"Scar (MyoPS 2221) on the LGE grids of {len(cases)} MyoPS cases, within each fully automatic cross-validated "
                   f"fit's myocardium: the mixture's scar subtype against n-SD (remote: the darker half of the myocardium) and FWHM; "
                   f"n chosen per fold on the other folds' cases ({', '.join(f'{n:g}' for n in chosen)}), and the rule of model.scar.rule "
                   f"the same way ({', '.join(rule_chosen)}), and with model.scar.open_mm and min_component_ml "
                   f"({', '.join(setting_text(st) for st in set_chosen)})"
                   + (f"; keeping {100 * FREE_SHARE:.0f} % of the other folds' scar-free hearts under {LIMIT_ML:g} ml "
                      f"({', '.join(setting_text(st) for st in set_free_chosen)}); scar-free hearts: the same cases with their "
                      f"scar filled from the normal wall (benchmarks/scar_free.py, {args.free_fits})" if free_rows else "")
                   + f". Fits: {args.fits.name}. Manual scar voxels in the fits' label maps: "
                   + ", ".join(f"{k} {100 * v:.1f} %" for k, v in lands.items()) + "; on the manual scar drawn as LV, each "
                   "sequence's intensity from normal myocardium (0) to LV blood (1), median over the cases: "
                   + ", ".join(f"{k} {v:.2f}" for k, v in like_blood.items()) + ".",
    })


if __name__ == "__main__":
    main()
