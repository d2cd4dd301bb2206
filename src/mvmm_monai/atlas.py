"""Probabilistic atlases: reading, checking, placing into the common space, building from labels.

An atlas is a 4D NIfTI ``[X, Y, Z, K]`` (one channel per class in :data:`CLASS_NAMES` order,
probabilities summing to one) with an optional JSON sidecar (``atlas.json`` beside it or
``<name>.json``) naming the classes and label values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from mvmm_monai import CLASS_NAMES
from mvmm_monai.data.common_space import Grid, resample
from mvmm_monai.registration.placement import Placement, PlacementConfig, find_heart, place_canonical

PLACEMENTS = ("identity", "auto")


@dataclass(frozen=True)
class Atlas:
    """A probabilistic atlas: ``prob`` ``[K, X, Y, Z]`` on ``grid``; ``path`` it was read from."""

    prob: Tensor
    grid: Grid
    path: Path | None = None
    sidecar: dict | None = None
    template: Tensor | None = None

    @property
    def canonical(self) -> bool:
        """Built by ``scripts/build_atlas.py`` in the heart-centred frame (placed with ``auto``)."""
        return bool(self.sidecar) and self.sidecar.get("frame") == "canonical"


def _sidecar(path: Path) -> dict | None:
    for cand in (path.with_name(path.name.replace(".nii.gz", ".json").replace(".nii", ".json")), path.with_name("atlas.json")):
        if cand.is_file():
            return json.loads(cand.read_text())
    return None


def read_atlas(path: str | Path) -> Atlas:
    """Read and check a 4D atlas NIfTI (classes in the last dimension; 2D atlases ``[X, Y, 1, K]``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: wrong dimensionality or number of classes, NaN, negative values or voxels
            whose probabilities do not sum to ~1 (the file is named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"atlas file not found: {path}")
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj).astype(np.float32)
    if data.ndim == 3 and data.shape[-1] == len(CLASS_NAMES):  # a 2D atlas [X, Y, K]
        data = data[:, :, None, :]
    if data.ndim != 4:
        raise ValueError(f"{path}: atlas must be 4D [X, Y, Z, K], got shape {data.shape}")
    if data.shape[-1] != len(CLASS_NAMES):
        raise ValueError(
            f"{path}: atlas has {data.shape[-1]} classes, expected {len(CLASS_NAMES)} {list(CLASS_NAMES)}"
        )
    if not np.isfinite(data).all():
        raise ValueError(f"{path}: atlas contains NaN/Inf")
    if data.min() < -1e-4:
        raise ValueError(f"{path}: atlas has negative probabilities (min {data.min():.3g})")
    total = data.sum(-1)
    if np.abs(total - 1).max() > 1e-2:
        raise ValueError(f"{path}: atlas probabilities must sum to 1 over classes (found {total.min():.3g}..{total.max():.3g})")
    prob = torch.from_numpy(np.moveaxis(np.clip(data, 0, None) / total[..., None], -1, 0).copy())
    grid = Grid(torch.as_tensor(img.affine, dtype=torch.float64), tuple(prob.shape[1:]))
    sidecar = _sidecar(path)
    template = None
    if sidecar and sidecar.get("frame") == "canonical":
        for key in ("pixel_mm", "radius_mm", "template", "template_sequences"):
            if key not in sidecar:
                raise ValueError(f"{path}: the sidecar of a canonical atlas lacks {key!r} (rebuild it with scripts/build_atlas.py)")
        tpath = path.with_name(sidecar["template"])
        if not tpath.is_file():
            raise FileNotFoundError(f"{path}: its intensity template {tpath} is missing (rebuild with scripts/build_atlas.py)")
        tdata = np.asanyarray(nib.load(str(tpath)).dataobj).astype(np.float32)
        if tdata.ndim != 4 or tdata.shape[:3] != data.shape[:3] or tdata.shape[3] != len(sidecar["template_sequences"]):
            raise ValueError(
                f"{tpath}: template shape {tdata.shape} does not match the atlas {data.shape[:3]} "
                f"with {len(sidecar['template_sequences'])} sequences"
            )
        if not np.isfinite(tdata).all():
            raise ValueError(f"{tpath}: template contains NaN/Inf")
        template = torch.from_numpy(np.moveaxis(tdata, -1, 0).copy())
    return Atlas(prob=prob, grid=grid, path=path, sidecar=sidecar, template=template)


def place_atlas(atlas: Atlas, target: Grid, placement: str = "identity") -> Tensor:
    """The atlas in the common space ``[K, *target.shape]`` (probabilities).

    ``placement='identity'`` uses the atlas where its affine puts it in world space; outside its
    field of view everything is background. ``'auto'`` (finding the heart on a full field of view)
    is reserved for real data and not available in this version.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"atlas.placement must be one of {PLACEMENTS}, got {placement!r}")
    if placement == "auto":
        raise ValueError("place_atlas: placement='auto' needs the subject's images; use place_atlas_auto")
    if atlas.canonical:
        raise ValueError(
            f"{atlas.path}: a canonical atlas (from scripts/build_atlas.py) has no world position; "
            "use atlas.placement=auto"
        )
    prob, cov = resample(atlas.prob, atlas.grid, target, through_plane="linear")
    if cov.sum() == 0:
        raise ValueError(f"{atlas.path}: the atlas does not overlap the images in world space (check its affine)")
    prob = prob * cov
    prob[0] = prob[0] + (1 - cov)
    return prob / prob.sum(0, keepdim=True).clamp_min(1e-8)


def place_atlas_auto(atlas: Atlas, subject, config: PlacementConfig | None = None) -> tuple[Tensor, Placement]:
    """Find the heart on ``subject``'s full field of view and place the canonical ``atlas`` there.

    Returns the atlas in the common space ``[K, *subject.grid.shape]`` (probabilities) and the
    :class:`~mvmm_monai.registration.placement.Placement` (per-slice centres, angle, scale,
    long-axis levels, template score). Only the images are used, never labels.
    """
    if not atlas.canonical or atlas.template is None:
        raise ValueError(
            f"{atlas.path}: atlas.placement=auto needs an atlas built by scripts/build_atlas.py (a canonical frame and "
            "an intensity template in its sidecar); this atlas has none. Use atlas.placement=identity or rebuild it."
        )
    side = atlas.sidecar
    tseq = list(side["template_sequences"])
    chosen = None if config is None or config.sequences is None else list(config.sequences)
    if chosen is not None and (missing := [s for s in chosen if s not in subject.sequences]):
        raise ValueError(f"atlas.auto.sequences: {missing} not among subject {subject.name}'s sequences {list(subject.sequences)}")
    channels = [tseq.index(s) if s in tseq and (chosen is None or s in chosen) else None for s in subject.sequences]
    if all(c is None for c in channels):
        raise ValueError(
            f"{atlas.path}: its template covers sequences {tseq}, none of the subject's {chosen or list(subject.sequences)}"
        )
    spacing = tuple(subject.grid.spacing[:2].tolist())
    found = find_heart(
        subject.images.numpy(),
        subject.coverage.numpy(),
        spacing,
        atlas.template.numpy(),
        channels,
        float(side["pixel_mm"]),
        float(side["radius_mm"]),
        config,
    )
    prob = place_canonical(atlas.prob.numpy(), float(side["pixel_mm"]), subject.grid.shape, spacing, found)
    return torch.from_numpy(prob), found


def crop_box(roi: Tensor, margin: int = 4) -> tuple[int, int, int, int]:
    """In-plane box ``(x0, x1, y0, y1)`` around the region of interest ``[X, Y, Z]`` plus ``margin`` voxels."""
    nz = torch.nonzero(roi.sum(-1) > 0)
    if len(nz) == 0:
        raise ValueError("crop_box: the region of interest is empty")
    lo, hi = nz.min(0).values - margin, nz.max(0).values + 1 + margin
    X, Y = roi.shape[:2]
    return (max(int(lo[0]), 0), min(int(hi[0]), X), max(int(lo[1]), 0), min(int(hi[1]), Y))


def atlas_from_labels(labels: list[np.ndarray], num_classes: int = len(CLASS_NAMES), sigma: float | tuple = 2.0) -> np.ndarray:
    """Mean of the one-hot label maps (class indices, all the same shape), Gaussian-smoothed per class
    with ``sigma`` voxels, renormalised. Returns ``[K, *shape]`` float32 probabilities."""
    if not labels:
        raise ValueError("atlas_from_labels: no label maps given")
    shape = labels[0].shape
    acc = np.zeros((num_classes, *shape), dtype=np.float64)
    for lab in labels:
        if lab.shape != shape:
            raise ValueError(f"atlas_from_labels: label shapes differ ({lab.shape} vs {shape})")
        for k in range(num_classes):
            acc[k] += lab == k
    acc /= len(labels)
    smooth = np.stack([ndimage.gaussian_filter(a, sigma, mode="nearest") for a in acc])
    smooth = np.clip(smooth, 0, None)
    return (smooth / smooth.sum(0, keepdims=True)).astype(np.float32)


def atlas_roi(prob: Tensor, spacing: tuple[float, ...], margin_mm: float | None, threshold: float = 0.01) -> Tensor:
    """Region of interest ``[*S]`` (0/1): voxels within ``margin_mm`` in-plane of the atlas heart.

    The heart is where the atlas foreground ``1 - A_background`` exceeds ``threshold``; the margin
    is measured in each slice (Euclidean, in mm). ``margin_mm=None`` returns the whole grid. Only
    the ROI enters the likelihood: far from the heart the background holds more tissues than a few
    Gaussians describe, and the heart classes would otherwise absorb some of them.
    """
    if margin_mm is None:
        return torch.ones(prob.shape[1:], dtype=prob.dtype)
    if margin_mm < 0:
        raise ValueError(f"model.roi_margin_mm must be >= 0 or null, got {margin_mm}")
    fg = (1.0 - prob[0]).numpy() > threshold
    if not fg.any():
        raise ValueError("the placed atlas has no heart in the image (foreground probability below threshold everywhere)")
    roi = np.zeros(fg.shape, dtype=bool)
    for z in range(fg.shape[2]):
        if fg[..., z].any():
            dist = ndimage.distance_transform_edt(~fg[..., z], sampling=spacing[:2])
            roi[..., z] = dist <= margin_mm
    return torch.from_numpy(roi).to(prob.dtype)
