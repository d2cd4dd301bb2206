r"""MyoPS 2020 "2D mid-slice" benchmark: LGE Dice of MvMM on the middle slice of each test case.

Protocol (:mod:`mvmm_monai.atlas.midslice`): the middle slice of C0, LGE, T2 and gd of every case,
cropped 192 x 192 around the label centroid; an atlas from the crops of the atlas cases (mean
one-hot class maps, Gaussian sigma 2 px in-plane), used in voxel correspondence with each test
crop (``atlas.placement=identity``); ``fit`` with ``data=files`` (reference LGE) per test case.

    .venv/bin/python benchmarks/myops_2d_mid.py [--root DIR] [--out DIR] \
        [--atlas-cases Case3001-Case3015] [--test-cases Case3016-Case3025] [--threads N] \
        [--peers atropos [--atropos-weights 0.5,0.25] [--atropos-iterations 25] [--atropos-mrf 0.1]
         [--atropos-sequences C0,LGE,T2] [--no-fit]] [--record NAME] \
        [hydra overrides ...]

Prints a Markdown table (LGE myocardium / LV / RV Dice of the fit, the atlas-alone myocardium
Dice, the scar Dice against label 2221 and the myocardium subtype contrast that gates the scar
output (``model.scar.min_contrast``), and seconds per slice, then mean and std rows) headed by the command line, the machine and
the date, and writes the record ``benchmarks/results/NAME.json`` (``--record``, default ``myops_2d_mid``):
every row, and a table of the mean LGE Dice per method.

``--peers atropos`` (needs the ``bench`` extra: ``pip install -e '.[bench]'``) also runs ANTs
Atropos (:mod:`atropos_peer`) on exactly the same crops with the same 2D atlas as priors (prior
weights ``--atropos-weights``, the first is the headline; MRF ``[s,1x1]``), on the intensities our
fit sees (percentile-clipped to [0, 1] as ``data.lower_percentile``/``upper_percentile``), within
the region our fit uses (``model.roi_margin_mm`` around the atlas heart), and prints two more
tables: LGE myocardium / LV / RV Dice and seconds per case and method (MvMM, each Atropos
setting, the atlas alone = argmax of the atlas), then mean +- std (ddof=1) per method.
``--no-fit`` skips our fits (peers and atlas only).
"""

from __future__ import annotations

import datetime
import logging
import os
import platform
import re
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from common import argument_parser, parse_args
from record import add_record_option, write_record

from mvmm_monai import compose_config, fit
from mvmm_monai.atlas.midslice import (
    MidSliceCrop,
    fit_overrides,
    mid_slice_atlas,
    mid_slice_crop,
    write_atlas,
    write_crop,
)

CLASSES = ("myocardium", "lv", "rv")


def parse_cases(spec: str) -> list[str]:
    """``"Case3001-Case3015"`` or ``"Case3001,Case3004"`` (or a mix) -> case names."""
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        m = re.fullmatch(r"([A-Za-z]*)(\d+)-([A-Za-z]*)(\d+)", part)
        if m:
            prefix, lo, hi = m.group(1) or m.group(3), int(m.group(2)), int(m.group(4))
            if hi < lo:
                raise ValueError(f"bad case range {part!r}")
            names += [f"{prefix}{i}" for i in range(lo, hi + 1)]
        else:
            names.append(part)
    return names


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks (1 when both are empty)."""
    s = pred.sum() + truth.sum()
    return float(2.0 * (pred & truth).sum() / s) if s else 1.0


def atlas_alone_dice(prob: np.ndarray, crop: MidSliceCrop) -> dict[str, float]:
    """Dice per foreground class of the atlas argmax ``[K, X, Y, Z]`` against the crop's label."""
    pred, truth = prob.argmax(0), crop.classes()
    return {c: dice(pred == k, truth == k) for k, c in enumerate(CLASSES, start=1)}


def write_crop_inputs(crop: MidSliceCrop, atlas: np.ndarray, out: Path, atlas_cases: list[str]) -> list[str]:
    """Write ``crop`` and the atlas (on the crop's grid) under ``out``; returns the overrides that
    fit them (``crop_overrides``), without the config's own."""
    case_dir = out / crop.name
    paths = write_crop(crop, case_dir / "input")
    atlas_path = write_atlas(atlas, crop.affine, case_dir / "input" / "atlas.nii.gz", built_from=atlas_cases)
    return [*fit_overrides(crop.name, paths, atlas_path, case_dir / "fit"), "callbacks.progress.refresh_rate=0", "~logger"]


def fit_crop(crop: MidSliceCrop, atlas: np.ndarray, out: Path, overrides: list[str], atlas_cases: list[str]) -> dict:
    """Write ``crop`` and the atlas (on the crop's grid) under ``out`` and fit it; returns metrics."""
    return fit(compose_config([*write_crop_inputs(crop, atlas, out, atlas_cases), *overrides]))


def run(root: Path, out: Path, atlas_cases: list[str], test_cases: list[str], overrides: list[str], size: int = 192,
        sigma_px: float = 2.0) -> list[dict]:
    """One row per test case: Dice of the fit and of the atlas alone, seconds."""
    atlas = mid_slice_atlas([mid_slice_crop(root / c, size) for c in atlas_cases], sigma_px)
    rows = []
    for name in test_cases:
        crop = mid_slice_crop(root / name, size)
        start = time.perf_counter()
        metrics = fit_crop(crop, atlas, out, overrides, atlas_cases)
        seconds = time.perf_counter() - start
        d = metrics["dice"]["LGE"]
        scar = metrics.get("scar") or {}
        rows.append(
            {"case": name, **{c: d[c] for c in CLASSES}, "atlas_myo": atlas_alone_dice(atlas, crop)["myocardium"],
             "scar": scar.get("dice", float("nan")), "scar_contrast": scar.get("contrast") or float("nan"),
             "seconds": seconds, "iterations": metrics["iterations"]}
        )
        print(f"# {name}: myo {d['myocardium']:.3f} lv {d['lv']:.3f} rv {d['rv']:.3f} "
              f"scar {rows[-1]['scar']:.3f} (contrast {rows[-1]['scar_contrast']:.2f}, "
              f"{scar.get('volume_ml', float('nan')):.2f} / {scar.get('true_volume_ml', float('nan')):.2f} ml) "
              f"({seconds:.1f} s, {metrics['iterations']} it)", file=sys.stderr, flush=True)
    return rows


def run_atropos(root: Path, atlas_cases: list[str], test_cases: list[str], overrides: list[str], weights: list[float],
                iterations: int, mrf_smoothing: float, size: int = 192, sigma_px: float = 2.0,
                sequences: tuple[str, ...] = ("C0", "LGE", "T2")) -> list[dict]:
    """Atropos (and atlas-alone) rows ``{case, method, myocardium, lv, rv, seconds}`` on the crops
    and atlas of :func:`run`; the ROI margin and intensity percentiles come from the fit config."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from atropos_peer import atlas_mask, atropos_fit
    from monai.transforms import ScaleIntensityRangePercentiles

    cfg = compose_config(["data=files", "paths.output_dir=/tmp/unused", *overrides])
    scale = ScaleIntensityRangePercentiles(lower=cfg.data.lower_percentile, upper=cfg.data.upper_percentile,
                                           b_min=0.0, b_max=1.0, clip=True)
    atlas = mid_slice_atlas([mid_slice_crop(root / c, size) for c in atlas_cases], sigma_px)
    rows = []
    for name in test_cases:
        crop = mid_slice_crop(root / name, size)
        truth, spacing = crop.classes(), tuple(np.linalg.norm(crop.affine[:3, :3], axis=0))
        rows.append({"case": name, "method": "atlas alone (argmax)", **atlas_alone_dice(atlas, crop), "seconds": 0.0})
        for w in weights:
            start = time.perf_counter()
            images = [np.asarray(scale(crop.images[s]), dtype=np.float32) for s in sequences]
            mask = atlas_mask(atlas, spacing, cfg.model.roi_margin_mm)
            res = atropos_fit(images, spacing, atlas, mask, prior_weight=w, iterations=iterations,
                              mrf_smoothing=mrf_smoothing)
            seconds = time.perf_counter() - start
            d = {c: dice(res.labels == k, truth == k) for k, c in enumerate(CLASSES, start=1)}
            seqs = "" if tuple(sequences) == ("C0", "LGE", "T2") else f" on {'+'.join(sequences)}"
            rows.append({"case": name, "method": f"Atropos w={w:g}, MRF {res.arguments['m']}, c {res.arguments['c']}{seqs}",
                         **d, "seconds": seconds})
            print(f"# {name} Atropos w={w:g}: myo {d['myocardium']:.3f} lv {d['lv']:.3f} rv {d['rv']:.3f} "
                  f"({seconds:.1f} s)", file=sys.stderr, flush=True)
    return rows


def peer_tables(mvmm_rows: list[dict], peer_rows: list[dict]) -> str:
    """Per case and method, then mean +- std (ddof=1) per method, of LGE Dice and seconds per slice."""
    rows = [{**r, "method": "MvMM (ours)"} for r in mvmm_rows] + peer_rows
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cols = ("myocardium", "lv", "rv", "seconds")
    lines = ["| case | method | LGE myocardium Dice | LGE LV Dice | LGE RV Dice | seconds / slice |", "|---|---|---|---|---|---|"]
    for case in dict.fromkeys(r["case"] for r in rows):
        for r in (r for r in rows if r["case"] == case):
            lines.append(f"| {case} | {r['method']} | {r['myocardium']:.3f} | {r['lv']:.3f} | {r['rv']:.3f} | "
                         f"{r['seconds']:.2f} |")
    lines += ["", "| method | LGE myocardium Dice | LGE LV Dice | LGE RV Dice | seconds / slice | cases |",
              "|---|---|---|---|---|---|"]
    for m in methods:
        v = {c: np.array([r[c] for r in rows if r["method"] == m], dtype=float) for c in cols}
        sd = {c: v[c].std(ddof=1) if len(v[c]) > 1 else 0.0 for c in cols}
        lines.append(f"| {m} | " + " | ".join(f"{v[c].mean():.3f} ± {sd[c]:.3f}" for c in cols[:3])
                     + f" | {v['seconds'].mean():.2f} ± {sd['seconds']:.2f} | {len(v['seconds'])} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    """Markdown table of the rows, then mean and std (ddof=1) rows."""
    cols = ("myocardium", "lv", "rv", "atlas_myo", "scar", "scar_contrast", "seconds")

    def fmt(c: str, v: float) -> str:
        return f"{v:.1f}" if c == "seconds" else f"{v:.2f}" if c == "scar_contrast" else f"{v:.3f}"

    lines = [
        "| case | LGE myocardium Dice | LGE LV Dice | LGE RV Dice | atlas-alone myocardium Dice | scar Dice "
        "| scar subtype contrast (SD) | seconds / slice |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['case']} | " + " | ".join(fmt(c, r[c]) for c in cols) + " |" for r in rows]
    vals = {c: np.array([r[c] for r in rows], dtype=float) for c in cols}
    std = {c: vals[c].std(ddof=1) if len(rows) > 1 else 0.0 for c in cols}
    lines.append("| **mean** | " + " | ".join(f"**{fmt(c, vals[c].mean())}**" for c in cols) + " |")
    lines.append("| std | " + " | ".join(fmt(c, std[c]) for c in cols) + " |")
    return "\n".join(lines)


def summary(mvmm_rows: list[dict], peer_rows: list[dict]) -> dict[str, dict]:
    """Per method: mean (and std, ddof=1) LGE Dice per class, mean seconds per slice, cases. Without
    peers the atlas alone is the myocardium Dice of :func:`run`'s rows."""
    by_method: dict[str, list[dict]] = {}
    for r in [{**r, "method": "MvMM (ours)"} for r in mvmm_rows] + peer_rows:
        by_method.setdefault(r["method"], []).append(r)
    if mvmm_rows and not peer_rows:
        by_method["atlas alone (argmax)"] = [{"myocardium": r["atlas_myo"], "seconds": 0.0} for r in mvmm_rows]
    out = {}
    for method, rs in by_method.items():
        stats = {"cases": len(rs)}
        for c in (*CLASSES, "seconds"):
            v = np.array([r[c] for r in rs if c in r], dtype=float)
            stats[c] = {"mean": v.mean(), "std": v.std(ddof=1) if len(v) > 1 else 0.0} if len(v) else None
        out[method] = stats
    return out


def write_mid_record(name: str, argv: list[str], args, rows: list[dict], peer_rows: list[dict]) -> None:
    """The record: the settings, every row, the per-method summary; its table the mean Dice per method."""
    methods = summary(rows, peer_rows)
    figures = {"atlas_cases": args.atlas_cases, "test_cases": args.test_cases, "overrides": list(args.overrides),
               "size": args.size, "sigma_px": args.sigma, "methods": methods, "cases": rows, "peer_cases": peer_rows}
    scar = [r["scar"] for r in rows if np.isfinite(r["scar"])]
    figures["scar_dice_mean"] = float(np.mean(scar)) if scar else None
    table_rows = [[m, *((s[c] or {}).get("mean") for c in (*CLASSES, "seconds")), s["cases"]] for m, s in methods.items()]
    write_record(name, figures, args=argv, table={
        "columns": ["method", "LGE myocardium", "LGE LV", "LGE RV", "seconds / slice", "cases"], "rows": table_rows,
        "caption": f"MyoPS 2D mid-slice protocol: mean LGE Dice on {args.test_cases}, atlas from {args.atlas_cases} "
                   f"(crops {args.size} x {args.size}).",
    })


def header(argv: list[str]) -> str:
    return "\n".join(
        [
            f"Command: `{' '.join(shlex.quote(a) for a in ['python', 'benchmarks/myops_2d_mid.py', *argv])}`",
            "",
            f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"torch {torch.__version__} with {torch.get_num_threads()} threads, "
            f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}",
            "",
            f"Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        ]
    )


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    parser = argument_parser(__doc__, myops=True)
    parser.add_argument("--out", type=Path, default=Path("/tmp/myops_2d_mid"), help="where crops, atlases and fits go")
    parser.add_argument("--atlas-cases", default="Case3001-Case3015")
    parser.add_argument("--test-cases", default="Case3016-Case3025")
    parser.add_argument("--size", type=int, default=192, help="crop size in voxels")
    parser.add_argument("--sigma", type=float, default=2.0, help="atlas smoothing, in-plane voxels")
    parser.add_argument("--peers", default="", help="comma list of peers to run on the same crops: atropos")
    parser.add_argument("--atropos-weights", default="0.5,0.25", help="Atropos prior weights (first = headline)")
    parser.add_argument("--atropos-iterations", type=int, default=25, help="Atropos iterations (-c [n,0])")
    parser.add_argument("--atropos-sequences", default="C0,LGE,T2", help="Atropos input channels")
    parser.add_argument("--no-fit", action="store_true", help="skip our fits (with --peers: peers and atlas only)")
    parser.add_argument("--atropos-mrf", type=float, default=0.1, help="Atropos MRF smoothing factor (-m [s,1x1])")
    add_record_option(parser, "myops_2d_mid")
    args = parse_args(parser, argv)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning_fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*configure_optimizers.*")
    atlas_cases, test_cases = parse_cases(args.atlas_cases), parse_cases(args.test_cases)
    if overlap := sorted(set(atlas_cases) & set(test_cases)):
        raise SystemExit(f"atlas and test cases overlap: {overlap}")
    print(header(argv) + "\n", flush=True)
    rows = [] if args.no_fit else run(args.root, args.out, atlas_cases, test_cases, list(args.overrides), args.size,
                                      args.sigma)
    print(f"Atlas: {args.atlas_cases} ({len(atlas_cases)} cases); test: {args.test_cases}; "
          f"overrides: {' '.join(args.overrides) or 'none'}\n")
    if rows:
        print(table(rows), flush=True)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if unknown := sorted(set(peers) - {"atropos"}):
        raise SystemExit(f"unknown peers {unknown}; known: atropos")
    peer_rows: list[dict] = []
    if "atropos" in peers:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from atropos_peer import ants_version

        weights = [float(w) for w in args.atropos_weights.split(",") if w.strip()]
        peer_rows = run_atropos(args.root, atlas_cases, test_cases, list(args.overrides), weights,
                                args.atropos_iterations, args.atropos_mrf, args.size, args.sigma,
                                tuple(s.strip() for s in args.atropos_sequences.split(",") if s.strip()))
        print(f"\nPeers on the same crops and atlas (antspyx {ants_version()}; Atropos on the fit's percentile-clipped "
              f"intensities, {args.atropos_sequences.replace(',', '+')}, within model.roi_margin_mm of the atlas heart):\n")
        print(peer_tables(rows, peer_rows), flush=True)
    if args.record and (rows or peer_rows):
        write_mid_record(args.record, argv, args, rows, peer_rows)
    return rows


if __name__ == "__main__":
    main()
