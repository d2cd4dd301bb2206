"""Partial volume of thick slabs (mixture/partial_volume.py, data/common_space.slab_ids): a slab's
mean intensity is turned back into each voxel's own, against hand-computed truth."""

from __future__ import annotations

import math

import pytest
import torch

from mvmm_monai.data.common_space import Grid, slab_ids
from mvmm_monai.mixture.params import MixtureParams
from mvmm_monai.mixture.partial_volume import class_means, partial_volume_images


def _params(means: list[float]) -> MixtureParams:
    """One subject, one sequence, one subtype per class with these means (a padded second slot)."""
    k = len(means)
    mean = torch.tensor(means).reshape(1, 1, k, 1)
    return MixtureParams(
        log_pi=torch.zeros(1, k),
        log_tau=torch.cat((torch.zeros(1, 1, k, 1), torch.full((1, 1, k, 1), -math.inf)), dim=-1),
        mean=torch.cat((mean, torch.full_like(mean, 7.0)), dim=-1),  # the padded slot's mean must not count
        var=torch.full((1, 1, k, 2), 0.01),
    )


def test_class_means_weight_the_subtypes_by_tau():
    p = MixtureParams(
        log_pi=torch.zeros(1, 2),
        log_tau=torch.log(torch.tensor([[[[0.25, 0.75], [1.0, 0.0]]]])),
        mean=torch.tensor([[[[0.2, 0.6], [0.9, 5.0]]]]),
        var=torch.full((1, 1, 2, 2), 0.01),
    )
    assert class_means(p)[0, 0].tolist() == pytest.approx([0.25 * 0.2 + 0.75 * 0.6, 0.9])


def test_a_slab_over_two_tissues_gives_each_voxel_its_own_intensity():
    # four voxels along z: (0, 1) share a slab over myocardium (0.2) and blood (1.0), mean 0.6;
    # voxel 2 is alone in its slab; voxel 3 is not covered
    images = torch.tensor([0.6, 0.6, 0.3, 0.0]).reshape(1, 1, 1, 1, 4)
    coverage = torch.tensor([1.0, 1.0, 1.0, 0.0]).reshape(1, 1, 1, 1, 4)
    posterior = torch.tensor([[1.0, 0.0, 1.0, 0.5], [0.0, 1.0, 0.0, 0.5]]).reshape(1, 2, 1, 1, 4)
    slabs = torch.tensor([0, 0, -1, -1]).reshape(1, 1, 1, 1, 4)
    # widen the covered range so the clamp does not act: another covered voxel at 0 and one at 1
    images = torch.cat((images, torch.tensor([0.0, 1.0, 0.5, 0.5]).reshape(1, 1, 1, 1, 4)), dim=-1)
    coverage = torch.cat((coverage, torch.ones(1, 1, 1, 1, 4)), dim=-1)
    posterior = torch.cat((posterior, torch.full((1, 2, 1, 1, 4), 0.5)), dim=-1)
    slabs = torch.cat((slabs, torch.full((1, 1, 1, 1, 4), -1)), dim=-1)
    out = partial_volume_images(images, coverage, posterior, _params([0.2, 1.0]), slabs)
    # voxel 0: 2 * 0.6 - E[x_1] = 1.2 - 1.0; voxel 1: 1.2 - 0.2; the others as they were
    assert out[0, 0, 0, 0].tolist() == pytest.approx([0.2, 1.0, 0.3, 0.0, 0.0, 1.0, 0.5, 0.5])
    assert torch.equal(images[0, 0, 0, 0, 2:], out[0, 0, 0, 0, 2:])


def test_uncertain_partners_and_the_clamp():
    # a three-voxel slab; the partners' expected intensities are posterior-weighted class means
    images = torch.tensor([0.5, 0.5, 0.5, 0.1, 0.9]).reshape(1, 1, 1, 1, 5)
    coverage = torch.ones(1, 1, 1, 1, 5)
    q = torch.tensor([[1.0, 0.5, 0.0, 1.0, 0.0], [0.0, 0.5, 1.0, 0.0, 1.0]]).reshape(1, 2, 1, 1, 5)
    slabs = torch.tensor([3, 3, 3, -1, -1]).reshape(1, 1, 1, 1, 5)
    out = partial_volume_images(images, coverage, q, _params([0.2, 1.0]), slabs)[0, 0, 0, 0]
    expected = torch.tensor([0.2, 0.6, 1.0])  # E[x] of the three
    own = 3 * 0.5 - (expected.sum() - expected)  # -0.1, 0.3, 0.7 before the clamp
    assert out[:3].tolist() == pytest.approx(own.clamp(0.1, 0.9).tolist())
    # a slab whose partners explain more than it holds is clamped to the covered range
    loud = partial_volume_images(torch.tensor([0.1, 0.1, 0.1, 0.1, 0.9]).reshape(1, 1, 1, 1, 5), coverage, q, _params([0.2, 1.0]), slabs)
    assert float(loud.min()) >= 0.1 - 1e-7 and float(loud.max()) <= 0.9 + 1e-7


def test_images_without_shared_slabs_are_unchanged_and_shapes_are_checked():
    images = torch.rand(1, 2, 3, 3, 2)
    out = partial_volume_images(images, torch.ones_like(images), torch.full((1, 2, 3, 3, 2), 0.5), _params([0.2, 1.0]),
                                torch.full(images.shape, -1))
    assert torch.equal(out, images)
    with pytest.raises(ValueError, match="slabs must be shaped"):
        partial_volume_images(images, torch.ones_like(images), torch.full((1, 2, 3, 3, 2), 0.5), _params([0.2, 1.0]),
                              torch.full((1, 2, 3, 3), -1))


def _stack(slices: int, thickness: float, first: float) -> Grid:
    affine = torch.eye(4, dtype=torch.float64)
    affine[2, 2], affine[2, 3] = thickness, first
    return Grid(affine, (2, 2, slices))


def test_slab_ids_group_the_reference_slices_a_thick_slab_spans():
    ref = _stack(5, 10.0, 0.0)  # slice centres 0, 10, 20, 30, 40 mm
    thick = _stack(2, 20.0, 5.0)  # slabs [-5, 15] and [15, 35] mm: (0, 10) and (20, 30); 40 outside
    ids = slab_ids(thick, ref)
    assert ids.shape == (2, 2, 5)
    col = ids[0, 0].tolist()
    assert col[0] == col[1] and col[2] == col[3] and col[0] != col[2] and col[4] == -1
    assert len(set(ids[..., :4].flatten().tolist())) == 8  # one slab per in-plane position and slab
    assert bool((slab_ids(ref, ref) == -1).all())  # the reference's own slices: every voxel alone
