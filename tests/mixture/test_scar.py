"""The scar rule on hand-made mixtures with an analytic truth."""

from __future__ import annotations

import math

import pytest
import torch

from mvmm_monai.mixture.params import MixtureParams
from mvmm_monai.mixture.scar import scar_segmentation, subtype_contrast

K = 4  # background, myocardium, LV, RV


def _params(myo_means, myo_vars, n_images: int = 2, c: int = 3) -> MixtureParams:
    """One subject; image 0 is the LGE. Myocardium subtypes as given (the rest padded), other
    classes one subtype each (their values do not matter: the posterior is given)."""
    mean = torch.full((1, n_images, K, c), 0.5, dtype=torch.float64)
    var = torch.full((1, n_images, K, c), 0.01, dtype=torch.float64)
    log_tau = torch.full((1, n_images, K, c), -math.inf, dtype=torch.float64)
    log_tau[..., 0] = 0.0
    m = len(myo_means)
    mean[0, 0, 1, :m] = torch.tensor(myo_means, dtype=torch.float64)
    var[0, 0, 1, :m] = torch.tensor(myo_vars, dtype=torch.float64)
    log_tau[0, 0, 1, :m] = math.log(1.0 / m)
    return MixtureParams(log_pi=torch.full((1, K), -math.log(K), dtype=torch.float64), log_tau=log_tau, mean=mean, var=var)


def _scene(spatial, lge: torch.Tensor):
    """All voxels myocardium except the first row (LV); image 1 is a constant second sequence."""
    post = torch.zeros((1, K, *spatial), dtype=torch.float64)
    post[:, 1] = 1.0
    post[:, 1, 0] = 0.0
    post[:, 2, 0] = 1.0
    images = torch.stack((lge, torch.full(spatial, 0.3, dtype=torch.float64)))[None]
    return images, torch.ones_like(images), post


@pytest.mark.parametrize("spatial", [(6, 5), (6, 5, 2)])
def test_bright_voxels_inside_myocardium_are_scar(spatial):
    # normal myocardium 0.1 (sd 0.05), scar 0.8 (sd 0.05): the decision threshold is 0.45
    params = _params([0.8, 0.1], [0.0025, 0.0025])
    lge = torch.full(spatial, 0.1, dtype=torch.float64)
    truth = torch.zeros(spatial, dtype=torch.bool)
    truth[2:4, 1:3] = True
    lge[truth] = 0.8
    lge[0] = 0.9  # bright but LV: never scar
    lge[4, 4] = 0.44  # just below the midpoint: normal
    lge[5, 4] = 0.46  # just above: scar
    truth[5, 4] = True
    images, coverage, post = _scene(spatial, lge)
    res = scar_segmentation(images, coverage, post, params, sequence_index=0, min_contrast=2.0)
    assert res.mask.shape == (1, *spatial) and res.mask.dtype == torch.bool
    assert torch.equal(res.mask[0], truth)
    assert bool(res.enabled[0]) and int(res.bright_subtype[0]) == 0
    assert float(res.contrast[0]) == pytest.approx((0.8 - 0.1) / 0.05)
    assert float(res.blood_fraction[0]) == pytest.approx((0.8 - 0.1) / (0.5 - 0.1))
    # the soft probability is the myocardium posterior times the bright subtype's responsibility
    assert torch.all(res.probability[0][truth] > 0.5) and torch.all(res.probability[0][~truth] < 0.5)
    # voxels the LGE does not cover are never scar
    coverage[:, 0, 2:4, 1:3] = 0
    res = scar_segmentation(images, coverage, post, params, sequence_index=0)
    assert not res.mask[0, 2:4, 1:3].any() and bool(res.mask[0, 5, 4].all())


def test_scar_sequence_index_and_subtype_order():
    # the LGE is image 1 here, and the bright subtype sits in slot 1 of 3 (slot 2 padded)
    spatial = (4, 4)
    params = _params([0.1, 0.8], [0.0025, 0.0025])
    params = MixtureParams(params.log_pi, params.log_tau.flip(1), params.mean.flip(1), params.var.flip(1))
    lge = torch.full(spatial, 0.1, dtype=torch.float64)
    lge[2, 2] = 0.8
    images, coverage, post = _scene(spatial, lge)
    images = images.flip(1)
    res = scar_segmentation(images, coverage, post, params, sequence_index=1)
    assert int(res.bright_subtype[0]) == 1
    assert res.mask[0].nonzero().tolist() == [[2, 2]]


def test_similar_subtypes_give_no_scar():
    # two myocardium subtypes 1.5 SD apart: a normal myocardium split in two, not scar
    spatial = (8, 8)
    params = _params([0.25, 0.1], [0.01, 0.01])
    g = torch.Generator().manual_seed(0)
    lge = 0.15 + 0.1 * torch.randn(spatial, generator=g, dtype=torch.float64)
    images, coverage, post = _scene(spatial, lge)
    res = scar_segmentation(images, coverage, post, params, min_contrast=2.0)
    assert float(res.contrast[0]) == pytest.approx(1.5)
    assert not bool(res.enabled[0])
    assert not res.mask.any() and torch.all(res.probability == 0)
    # the same mixture with the rule relaxed does label the brighter half
    res = scar_segmentation(images, coverage, post, params, min_contrast=1.0, min_blood_fraction=0.0)
    assert res.mask.any()


def test_partial_volume_subtype_far_below_blood_is_not_scar():
    # a narrow bright subtype (0.3, 10 SD above the normal 0.1) but the blood pool at 0.9: the
    # subtype lies a quarter of the way to the blood, partial volume rather than enhancement
    spatial = (6, 6)
    params = _params([0.3, 0.1], [0.0004, 0.0004])
    mean = params.mean.clone()
    mean[0, 0, 2, 0] = 0.9
    params = MixtureParams(params.log_pi, params.log_tau, mean, params.var)
    bright, contrast, fraction = subtype_contrast(params, 0)
    assert float(contrast[0]) == pytest.approx(10.0) and float(fraction[0]) == pytest.approx(0.25)
    lge = torch.full(spatial, 0.1, dtype=torch.float64)
    lge[2:4, 2:4] = 0.3
    images, coverage, post = _scene(spatial, lge)
    assert not scar_segmentation(images, coverage, post, params, min_blood_fraction=0.45).mask.any()
    res = scar_segmentation(images, coverage, post, params, min_blood_fraction=0.2)
    assert res.mask[0].sum() == 4 and bool(res.mask[0, 2:4, 2:4].all())


def test_one_myocardium_subtype_gives_no_scar():
    params = _params([0.1], [0.0025])
    bright, contrast, fraction = subtype_contrast(params, 0)
    assert int(bright[0]) == 0 and contrast[0] == -math.inf and fraction[0] == -math.inf
    lge = torch.full((4, 4), 0.9, dtype=torch.float64)
    res = scar_segmentation(*_scene((4, 4), lge), params, min_contrast=0.0, min_blood_fraction=0.0)
    assert not res.mask.any()


def test_bad_shapes_raise():
    params = _params([0.8, 0.1], [0.0025, 0.0025])
    images, coverage, post = _scene((4, 4), torch.zeros(4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="posterior"):
        scar_segmentation(images, coverage, post[..., :3], params)
    with pytest.raises(ValueError, match="sequence_index"):
        scar_segmentation(images, coverage, post, params, sequence_index=2)
