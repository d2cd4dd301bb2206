"""The region of interest around a placed atlas: where the fit looks, and the box it is cut to."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor


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


def crop_box(roi: Tensor, margin: int = 4) -> tuple[int, int, int, int]:
    """In-plane box ``(x0, x1, y0, y1)`` around the region of interest ``[X, Y, Z]`` plus ``margin`` voxels."""
    nz = torch.nonzero(roi.sum(-1) > 0)
    if len(nz) == 0:
        raise ValueError("crop_box: the region of interest is empty")
    lo, hi = nz.min(0).values - margin, nz.max(0).values + 1 + margin
    X, Y = roi.shape[:2]
    return (max(int(lo[0]), 0), min(int(hi[0]), X), max(int(lo[1]), 0), min(int(hi[1]), Y))
