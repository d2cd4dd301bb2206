"""Dice and HD95 per structure with MONAI's metric functions."""

from __future__ import annotations

import warnings

import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from torch import Tensor

from mvmm_monai.classes import CLASS_NAMES


def _one_hot(labels: Tensor, k: int) -> Tensor:
    return torch.nn.functional.one_hot(labels.long(), k).movedim(-1, 0)[None].float()


def dice_per_class(pred: Tensor, truth: Tensor, num_classes: int = len(CLASS_NAMES)) -> dict[str, float]:
    """Dice of every foreground class between two class-index maps of the same shape."""
    if pred.shape != truth.shape:
        raise ValueError(f"dice_per_class: shapes differ, {tuple(pred.shape)} vs {tuple(truth.shape)}")
    d = compute_dice(_one_hot(pred, num_classes), _one_hot(truth, num_classes), include_background=False)[0]
    return {CLASS_NAMES[k + 1]: float(d[k]) for k in range(num_classes - 1)}


def segmentation_metrics(
    pred: Tensor, truth: Tensor, spacing: tuple[float, ...], num_classes: int = len(CLASS_NAMES)
) -> dict[str, dict[str, float]]:
    """``{"dice": {class: value}, "hd95_mm": {class: value}}`` between class-index maps.

    HD95 is in mm using ``spacing``; it is NaN when either map lacks the class.
    """
    p, t = _one_hot(pred, num_classes), _one_hot(truth, num_classes)
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
    return {"dice": dice_per_class(pred, truth, num_classes), "hd95_mm": hd95}
