"""Dice and HD95 per structure with MONAI's metric functions."""

from __future__ import annotations

import warnings

import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from torch import Tensor

from mvmm_monai.classes import CLASS_NAMES


def _one_hot(labels: Tensor, k: int) -> Tensor:
    return torch.nn.functional.one_hot(labels.long(), k).movedim(-1, 0)[None].float()


def _foreground_box(pred: Tensor, truth: Tensor) -> tuple[slice, ...]:
    """The smallest box holding every foreground voxel of either map and one voxel more on every
    side, within the map (the whole map when neither has any): voxels that are background in both
    change no foreground class's Dice, and the margin keeps every surface voxel's neighbourhood, so
    the Hausdorff distance is unchanged too."""
    fg = (pred > 0) | (truth > 0)
    if not bool(fg.any()):
        return tuple(slice(None) for _ in pred.shape)
    box = []
    for d in range(fg.ndim):
        idx = torch.nonzero(fg.any(dim=tuple(a for a in range(fg.ndim) if a != d)) if fg.ndim > 1 else fg).flatten()
        box.append(slice(max(int(idx[0]) - 1, 0), min(int(idx[-1]) + 2, fg.shape[d])))
    return tuple(box)


def dice_per_class(pred: Tensor, truth: Tensor, num_classes: int = len(CLASS_NAMES)) -> dict[str, float]:
    """Dice of every foreground class between two class-index maps of the same shape (computed on
    the box around their foreground: a full field of view one-hot encoded costs a fit's share)."""
    if pred.shape != truth.shape:
        raise ValueError(f"dice_per_class: shapes differ, {tuple(pred.shape)} vs {tuple(truth.shape)}")
    box = _foreground_box(pred, truth)
    return _dice(_one_hot(pred[box], num_classes), _one_hot(truth[box], num_classes))


def _dice(p: Tensor, t: Tensor) -> dict[str, float]:
    """MONAI's Dice of every foreground class of the one-hot maps ``p``, ``t`` ``[1, K, *S]``."""
    d = compute_dice(p, t, include_background=False)[0]
    return {CLASS_NAMES[k + 1]: float(d[k]) for k in range(p.shape[1] - 1)}


def segmentation_metrics(
    pred: Tensor, truth: Tensor, spacing: tuple[float, ...], num_classes: int = len(CLASS_NAMES)
) -> dict[str, dict[str, float]]:
    """``{"dice": {class: value}, "hd95_mm": {class: value}}`` between class-index maps.

    HD95 is in mm using ``spacing``; it is NaN when either map lacks the class. Both are computed on
    the box around the maps' foreground.
    """
    if pred.shape != truth.shape:
        raise ValueError(f"segmentation_metrics: shapes differ, {tuple(pred.shape)} vs {tuple(truth.shape)}")
    box = _foreground_box(pred, truth)
    p, t = _one_hot(pred[box], num_classes), _one_hot(truth[box], num_classes)
    hd95 = {}
    for k in range(1, num_classes):
        if p[:, k].sum() == 0 or t[:, k].sum() == 0:
            hd95[CLASS_NAMES[k]] = float("nan")
            continue
        with warnings.catch_warnings():
            # MONAI's own internal call of a deprecated argument (monai 1.5-1.6)
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
            hd = compute_hausdorff_distance(p[:, [0, k]], t[:, [0, k]], include_background=False, percentile=95, spacing=list(spacing))
        hd95[CLASS_NAMES[k]] = float(hd[0, 0])
    return {"dice": _dice(p, t), "hd95_mm": hd95}
