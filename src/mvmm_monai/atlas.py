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

PLACEMENTS = ("identity", "auto")


@dataclass(frozen=True)
class Atlas:
    """A probabilistic atlas: ``prob`` ``[K, X, Y, Z]`` on ``grid``; ``path`` it was read from."""

    prob: Tensor
    grid: Grid
    path: Path | None = None
    sidecar: dict | None = None


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
    return Atlas(prob=prob, grid=grid, path=path, sidecar=_sidecar(path))


def place_atlas(atlas: Atlas, target: Grid, placement: str = "identity") -> Tensor:
    """The atlas in the common space ``[K, *target.shape]`` (probabilities).

    ``placement='identity'`` uses the atlas where its affine puts it in world space; outside its
    field of view everything is background. ``'auto'`` (finding the heart on a full field of view)
    is reserved for real data and not available in this version.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"atlas.placement must be one of {PLACEMENTS}, got {placement!r}")
    if placement == "auto":
        raise ValueError(
            "atlas.placement=auto (automatic heart finding) is not available yet; crop around the heart and use "
            "atlas.placement=identity with an atlas in the same world position"
        )
    prob, cov = resample(atlas.prob, atlas.grid, target, through_plane="linear")
    if cov.sum() == 0:
        raise ValueError(f"{atlas.path}: the atlas does not overlap the images in world space (check its affine)")
    prob = prob * cov
    prob[0] = prob[0] + (1 - cov)
    return prob / prob.sum(0, keepdim=True).clamp_min(1e-8)


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
