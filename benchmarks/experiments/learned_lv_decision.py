#!/usr/bin/env python
"""A learned LV/myocardium decision at the endocardium, trained on one fold's fits and applied to the
other's: an experiment, not kept (RESULTS 5j). Needs scikit-learn (``pip install scikit-learn``).

    .venv/bin/python benchmarks/experiments/learned_lv_decision.py --fits OUT/A OUT/B [--root DIR]

``OUT/A`` and ``OUT/B`` are the two 5c fold folders of ``benchmarks/real_myops.py`` fits made with
``model.lv_cavity_fill=false model.min_wall_mm=0 model.endocardium_median_deg=0``. Each fit is first
relabelled as the 5j defaults do (minimum wall 6 mm, cavity fill, endocardium median 32 degrees).
In a band of 5 mm either side of the LV pool's border, every voxel labelled LV or myocardium gets
features that use no label: per sequence (C0, LGE, T2) its intensity as t = (I - median of the
fit's myocardium) / (median of the fit's LV - that), and t's 3x3 mean; the distance to tissue
that is neither (mm); the signed distance to the pool's border (mm); the slice's long-axis level;
the LV and myocardium posteriors. A logistic regression trained on one folder's cases (target:
the manual label, LV or myocardium) relabels the band of the other folder's cases; the fill and
the median run again, and the LV Dice (LGE grid) is printed per case, before and after.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import argument_parser, load_saved_fit, parse_args, saved_fit_dirs  # noqa: E402

from mvmm_monai.postprocess import fill_lv_cavity, follow_labelling_conventions, smooth_endocardium  # noqa: E402

BAND_MM, WALL_MM, MEDIAN_DEG = 5.0, 6.0, 32.0


def relabel(posterior: torch.Tensor, spacing) -> torch.Tensor:
    return follow_labelling_conventions(posterior, spacing, min_wall_mm=WALL_MM, endocardium_median_deg=MEDIAN_DEG)


def case_data(case_dir: Path, root: Path) -> dict:
    case = case_dir.name
    fit = load_saved_fit(case_dir, root)
    posterior, spacing, box = fit.posterior, fit.spacing, fit.box
    post = relabel(posterior, spacing)
    lab = post.argmax(0).numpy()
    features = []
    for seq in ("C0", "LGE", "T2"):
        image = np.asarray(nib.load(root / case / f"{case}_{seq}.nii.gz").dataobj, dtype=float)[box]
        myo, lv = np.median(image[lab == 1]), np.median(image[lab == 2])
        t = (image - myo) / (lv - myo + 1e-6)
        features += [t, ndimage.uniform_filter(t, (3, 3, 1))]
    outside, border = np.zeros(lab.shape), np.zeros(lab.shape)
    for k in range(lab.shape[2]):
        heart, pool = np.isin(lab[..., k], (1, 2)), lab[..., k] == 2
        outside[..., k] = ndimage.distance_transform_edt(heart, sampling=spacing) if not heart.all() else 50.0
        border[..., k] = ndimage.distance_transform_edt(pool, sampling=spacing) - ndimage.distance_transform_edt(~pool, sampling=spacing)
    levels = json.load(open(case_dir / "metrics.json"))["placement"]["levels"]
    level = np.broadcast_to(np.asarray(levels, dtype=float)[None, None, :], lab.shape)
    band = np.isin(lab, (1, 2)) & (np.abs(border) <= BAND_MM)
    stack = [*features, outside, border, level, post[2].numpy(), post[1].numpy()]
    truth = fit.truth_in_box
    return {
        "X": np.stack([f[band] for f in stack], 1), "y": truth[band] == 2, "valid": np.isin(truth[band], (1, 2)),
        "band": band, "lab": lab, "fit": fit,
    }


def main() -> None:
    from sklearn.linear_model import LogisticRegression

    ap = argument_parser(__doc__, myops=True, overrides=False)
    ap.add_argument("--fits", type=Path, nargs=2, required=True, help="the two fold folders of benchmarks/real_myops.py")
    args = parse_args(ap, quiet=True)
    folds = []
    for fits in args.fits:
        folds.append({d.name: case_data(d, args.root) for d in saved_fit_dirs(fits)})
    before, after = [], []
    print("| case | LV Dice, 5j defaults | LV Dice, learned decision |\n|---|---|---|")
    for train, test in ((folds[0], folds[1]), (folds[1], folds[0])):
        X = np.concatenate([d["X"][d["valid"]] for d in train.values()])
        y = np.concatenate([d["y"][d["valid"]] for d in train.values()])
        clf = LogisticRegression(max_iter=2000).fit(X, y)
        for case, d in test.items():
            lab = d["lab"].copy()
            lab[d["band"]] = np.where(clf.predict_proba(d["X"])[:, 1] > 0.5, 2, 1)
            onehot = torch.nn.functional.one_hot(torch.from_numpy(lab), 4).permute(3, 0, 1, 2).double()
            new = smooth_endocardium(fill_lv_cavity(onehot), d["fit"].spacing, MEDIAN_DEG).argmax(0).numpy()
            before.append(d["fit"].dice(d["lab"])[1])
            after.append(d["fit"].dice(new)[1])
            print(f"| {case} | {before[-1]:.3f} | {after[-1]:.3f} |", flush=True)
    print(f"| **mean** | {np.mean(before):.4f} | {np.mean(after):.4f} |")


if __name__ == "__main__":
    main()
