"""What the benchmark scripts share: where the MyoPS data lie, the common part of their command line,
and saved real_myops.py fits read back next to their manual labels.

Every script runs as ``python benchmarks/NAME.py``, so this folder is first on ``sys.path`` and
``from common import ...`` finds this module.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from mvmm_monai.classes import MYOPS_LABELS

MYOPS_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "myops"  # ../shared beside the checkout


def argument_parser(doc: str, *, myops: bool = False, threads: int | None = None, overrides: bool = True) -> argparse.ArgumentParser:
    """A parser with the script's docstring as help, ``--threads`` (torch threads; ``threads`` is the
    default, None: torch's), ``--root`` (the MyoPS folder) when ``myops``, and trailing Hydra
    ``overrides`` of the fit when ``overrides``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if myops:
        ap.add_argument("--root", type=Path, default=MYOPS_ROOT, help="MyoPS folder (CaseN/CaseN_{C0,LGE,T2,gd}.nii.gz)")
    ap.add_argument("--threads", type=int, default=threads, help="torch CPU threads (default %(default)s; None: torch's own); "
                    "1 is steadier on a busy machine")
    if overrides:
        ap.add_argument("overrides", nargs="*", help="Hydra overrides of the fit, e.g. registration=slice_shift")
    return ap


def parse_args(ap: argparse.ArgumentParser, argv=None, *, quiet: bool = False) -> argparse.Namespace:
    """Parse, set the torch threads, and with ``quiet`` silence INFO logs and warnings (tables only)."""
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if quiet:
        logging.disable(logging.INFO)
        warnings.filterwarnings("ignore")
    return args


@dataclass(frozen=True)
class SavedFit:
    """A saved ``benchmarks/real_myops.py`` fit of one MyoPS case, next to its manual label."""

    posterior: torch.Tensor  # [K, X, Y, Z] on the fit's (cropped) LGE grid
    spacing: tuple[float, float]  # in-plane voxel size, mm
    box: tuple[slice, slice, slice]  # where that grid lies in the case's full grid
    truth: np.ndarray  # class indices of CaseN_gd over the whole grid

    @property
    def truth_in_box(self) -> np.ndarray:
        return self.truth[self.box]

    def dice(self, classes: np.ndarray) -> list[float]:
        """Dice of myocardium, LV and RV of the class map ``classes`` (on the fit's grid) against
        the whole label: what the label has outside the grid counts as missed."""
        inside = self.truth_in_box
        return [2 * ((classes == k) & (inside == k)).sum() / max((classes == k).sum() + (self.truth == k).sum(), 1)
                for k in (1, 2, 3)]


def load_saved_fit(case_dir: Path, root: Path) -> SavedFit:
    """``case_dir/CaseN_posterior.nii.gz`` and ``root/CaseN/CaseN_gd.nii.gz`` (MyoPS values mapped to
    classes by the package's label map); a grid that does not fit inside the label's is named."""
    case = case_dir.name
    img = nib.load(case_dir / f"{case}_posterior.nii.gz")
    posterior = torch.from_numpy(np.moveaxis(np.asarray(img.dataobj, dtype=np.float32), -1, 0))
    gd_file = root / case / f"{case}_gd.nii.gz"
    gd_img = nib.load(gd_file)
    truth = MYOPS_LABELS.to_classes(torch.from_numpy(np.asarray(gd_img.dataobj).astype(np.int64)), str(gd_file)).numpy()
    offset = np.round((np.linalg.inv(gd_img.affine) @ img.affine)[:3, 3]).astype(int)
    if (offset < 0).any() or any(o + s > g for o, s, g in zip(offset, posterior.shape[1:], truth.shape)):
        raise ValueError(f"{case_dir}: the posterior's grid does not lie inside {gd_file}'s grid (offset {offset.tolist()})")
    box = tuple(slice(o, o + s) for o, s in zip(offset, posterior.shape[1:]))
    return SavedFit(posterior, tuple(float(v) for v in img.header.get_zooms()[:2]), box, truth)


@dataclass(frozen=True)
class SavedFitImages:
    """A MyoPS case's images on the grid of its saved fit: what a fit with ``registration=none``
    gives its labelling steps."""

    images: torch.Tensor  # [N, X, Y, Z], scaled as a fit scales them
    coverage: torch.Tensor  # [N, X, Y, Z], cut to the fit's region of interest
    sequences: tuple[str, ...]  # the sequence of each channel, the reference first


def myops_dataset(root: Path):
    """The MyoPS cases under ``root`` scaled as ``data=myops`` scales them for a fit (the packaged
    config's percentiles: the dataset class's own defaults are those of other data)."""
    from omegaconf import OmegaConf

    from mvmm_monai.config import CONFIG_DIR
    from mvmm_monai.data.datasets import MyoPSDataset

    conf = OmegaConf.load(Path(CONFIG_DIR) / "data" / "myops.yaml")
    return MyoPSDataset(root, lower_percentile=conf.lower_percentile, upper_percentile=conf.upper_percentile)


def saved_fit_images(case_dir: Path, root: Path, fit: SavedFit, roi_margin_mm: float = 20.0) -> SavedFitImages:
    """The case's images and coverage on the grid of the saved ``fit``, the coverage cut to the
    fit's region of interest (``model.roi_margin_mm`` around ``CaseN_atlas_warped.nii.gz``)."""
    from mvmm_monai.atlas.roi import atlas_roi

    subject = myops_dataset(root).load(case_dir.name)
    images, coverage = subject.images[(slice(None), *fit.box)], subject.coverage[(slice(None), *fit.box)]
    atlas = nib.load(case_dir / f"{case_dir.name}_atlas_warped.nii.gz")
    atlas = torch.from_numpy(np.moveaxis(np.asarray(atlas.dataobj, dtype=np.float32), -1, 0))
    if tuple(atlas.shape[1:]) != tuple(images.shape[1:]):
        raise ValueError(f"{case_dir}: the warped atlas's grid {tuple(atlas.shape[1:])} is not the posterior's {tuple(images.shape[1:])}")
    roi = atlas_roi(atlas, fit.spacing, roi_margin_mm)
    return SavedFitImages(images.float(), coverage.float() * roi[None].float(), subject.sequences)


def saved_fit_dirs(fits: Path) -> list[Path]:
    """The case folders of a ``benchmarks/real_myops.py --out`` folder that hold a posterior."""
    cases = sorted(d for d in fits.iterdir() if d.is_dir() and (d / f"{d.name}_posterior.nii.gz").is_file())
    if not cases:
        raise FileNotFoundError(f"{fits}: no CaseN/CaseN_posterior.nii.gz (a benchmarks/real_myops.py --out folder?)")
    return cases
