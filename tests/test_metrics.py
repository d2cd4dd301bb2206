"""Dice per structure (MONAI's compute_dice on the box around the foreground) against a count by hand."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from mvmm_monai.pipeline.metrics import dice_per_class


def _dice_by_hand(pred: torch.Tensor, truth: torch.Tensor, k: int) -> float:
    a, b = pred == k, truth == k
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.mark.parametrize("shape", [(120, 110, 6), (90, 100)])
def test_dice_on_the_foreground_box_is_the_dice_of_the_whole_map(shape):
    g = torch.Generator().manual_seed(1)
    truth = torch.zeros(shape, dtype=torch.long)
    pred = torch.zeros(shape, dtype=torch.long)
    inner = tuple(slice(20, 60) for _ in shape[:2]) + tuple(slice(1, 5) for _ in shape[2:])
    truth[inner] = torch.randint(0, 4, truth[inner].shape, generator=g)
    moved = tuple(slice(25, 70) for _ in shape[:2]) + tuple(slice(0, 4) for _ in shape[2:])  # reaches the border
    pred[moved] = torch.randint(0, 4, pred[moved].shape, generator=g)
    d = dice_per_class(pred, truth)
    for k, name in enumerate(("myocardium", "lv", "rv"), start=1):
        assert d[name] == pytest.approx(_dice_by_hand(pred, truth, k), abs=1e-6)
    assert dice_per_class(truth, truth) == {"myocardium": 1.0, "lv": 1.0, "rv": 1.0}


def test_dice_of_maps_without_a_structure():
    empty = torch.zeros((30, 30, 3), dtype=torch.long)
    one = empty.clone()
    one[5:10, 5:10, 1] = 2
    # MONAI's convention: a structure absent from the truth has no Dice (NaN), whatever the prediction
    assert all(math.isnan(v) for v in dice_per_class(empty, empty).values())
    assert all(math.isnan(v) for v in dice_per_class(one, empty).values())
    d = dice_per_class(empty, one)  # present in the truth, missed: 0
    assert d["lv"] == 0.0 and math.isnan(d["myocardium"])
    with pytest.raises(ValueError, match="shapes differ"):
        dice_per_class(one, empty[:, :, :2])


def test_hd95_on_the_foreground_box_is_the_hd95_of_the_whole_map():
    from monai.metrics import compute_hausdorff_distance

    from mvmm_monai.pipeline.metrics import _one_hot, segmentation_metrics

    truth = torch.zeros((80, 90, 5), dtype=torch.long)
    pred = torch.zeros_like(truth)
    truth[30:50, 30:52, 1:4], truth[35:45, 36:46, 1:4] = 1, 2  # a ring around a pool
    pred[33:54, 29:50, 0:4], pred[37:48, 35:44, 0:4] = 1, 2  # shifted, one slice longer
    pred[0:6, 0:5, 4] = 3  # a stray region in the corner: the box reaches the map's border
    truth[60:70, 50:60, 2] = 3
    m = segmentation_metrics(pred, truth, (1.25, 1.25, 8.0))
    for k, name in enumerate(("myocardium", "lv", "rv"), start=1):
        with warnings.catch_warnings():  # MONAI's own internal call of a deprecated argument (monai 1.5-1.6)
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
            whole = compute_hausdorff_distance(_one_hot(pred, 4)[:, [0, k]], _one_hot(truth, 4)[:, [0, k]], include_background=False,
                                               percentile=95, spacing=[1.25, 1.25, 8.0])
        assert m["hd95_mm"][name] == pytest.approx(float(whole[0, 0]), abs=1e-5), name
        assert m["dice"][name] == pytest.approx(_dice_by_hand(pred, truth, k), abs=1e-6)
