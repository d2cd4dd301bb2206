"""Resampling through world coordinates, coverage slabs and per-slice shifts."""

from __future__ import annotations

import pytest
import torch

from mvmm_monai.data.common_space import Grid, resample


def grid(spacing=(1.0, 1.0, 10.0), shape=(20, 20, 5), origin=(0.0, 0.0, 0.0)) -> Grid:
    a = torch.eye(4, dtype=torch.float64)
    a[0, 0], a[1, 1], a[2, 2] = spacing
    a[:3, 3] = torch.tensor(origin, dtype=torch.float64)
    return Grid(a, shape)


def test_identity_and_world_translation():
    g = grid()
    img = torch.rand(1, *g.shape, generator=torch.Generator().manual_seed(0))
    out, cov = resample(img, g, g)
    assert torch.allclose(out, img, atol=1e-5) and cov.min() == 1
    # a source whose origin is 3 mm further along x: target voxel i sees source voxel i - 3
    src = grid(origin=(3.0, 0.0, 0.0))
    out, cov = resample(img, src, g)
    assert torch.allclose(out[0, 3:], img[0, :-3], atol=1e-5)
    assert cov[:3].sum() == 0 and cov[3:].min() == 1


def test_slab_coverage_and_nearest_slice():
    ref = grid(shape=(10, 10, 10))  # slices at z = 0..90
    t2 = grid(shape=(10, 10, 3), origin=(0.0, 0.0, 30.0), spacing=(1.0, 1.0, 12.0))  # z = 30, 42, 54
    img = torch.arange(3, dtype=torch.float32).reshape(1, 1, 1, 3).expand(1, 10, 10, 3).clone()
    out, cov = resample(img, t2, ref)
    covered = cov[0, 0].nonzero().flatten().tolist()
    assert covered == [3, 4, 5, 6]  # z = 30..60 lie in the slabs [24, 60] (edges included), z = 20, 70 do not
    assert out[0, 0, 0, 3:7].tolist() == [0.0, 1.0, 2.0, 2.0]  # nearest slice, no mixing across slices


def test_slice_shifts_undo_known_motion():
    g = grid(shape=(32, 32, 2))
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    blob = torch.exp(-((yy - 16) ** 2 + (xx - 16) ** 2) / 20.0)
    img = torch.stack([blob, blob.roll(shifts=(3, -2), dims=(0, 1))], dim=-1)[None]  # slice 1 moved by (+3, -2)
    shifts = torch.tensor([[0.0, 0.0], [3.0, -2.0]])
    out, _ = resample(img, g, g, slice_shifts=shifts)
    assert torch.allclose(out[0, 8:24, 8:24, 1], blob[8:24, 8:24], atol=1e-5)


@pytest.mark.parametrize("bad", ["shape", "through"])
def test_bad_arguments(bad):
    g = grid()
    with pytest.raises(ValueError, match="resample"):
        if bad == "shape":
            resample(torch.zeros(1, 3, 3, 3), g, g)
        else:
            resample(torch.zeros(1, *g.shape), g, g, through_plane="cubic")


def test_labels_written_back_follow_turned_and_shifted_slices():
    """native_segmentation undoes sample()'s slice motion: labels resampled into the common space with
    a rotation and shift per slice, then written back with the same motion, land where they were."""
    from types import SimpleNamespace

    from mvmm_monai.data.common_space import native_segmentation, sample, sampling_map

    native, common = grid(shape=(48, 40, 2)), grid(shape=(48, 40, 2))
    xx, yy = torch.meshgrid(torch.arange(48.0), torch.arange(40.0), indexing="ij")
    label = torch.zeros(48, 40, 2, dtype=torch.long)
    label[((xx - 30) ** 2 / 64 + (yy - 14) ** 2 / 25 < 1)[..., None].expand(-1, -1, 2)] = 1  # an off-centre ellipse
    label[((xx - 14) ** 2 + (yy - 26) ** 2 < 30)[..., None].expand(-1, -1, 2)] = 2
    onehot = torch.stack([(label == k).float() for k in range(3)])
    shifts, angles = torch.tensor([[0.0, 0.0], [2.0, -3.0]]), torch.deg2rad(torch.tensor([0.0, 10.0]))
    posterior = sample(onehot, sampling_map(native, common), slice_shifts=shifts, slice_angles=angles)
    subject = SimpleNamespace(reference="LGE", grid=common, grids={"LGE": common, "C0": native})
    back = native_segmentation(posterior, subject, "C0", shifts, slice_angles=angles)
    moved = (posterior.argmax(0) != label)[..., 1].float().mean()
    assert moved > 0.05  # the motion does move the labels in the common space
    inner = (slice(6, 42), slice(6, 34))  # away from the border, where turned corners fall outside
    assert (back[inner] == label[inner]).float().mean() > 0.98


def test_per_slice_is_indexing_with_the_same_gradient():
    from mvmm_monai.data.common_space import per_slice

    torch.manual_seed(0)
    shifts = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 4, (6, 5, 3))
    weights = torch.randn(6, 5, 3, 2, dtype=torch.float64)
    picked = per_slice(shifts, index)
    assert torch.equal(picked, shifts[index])
    (grad,) = torch.autograd.grad((picked * weights).sum(), shifts)
    (expected,) = torch.autograd.grad((shifts[index] * weights).sum(), shifts)
    assert torch.allclose(grad, expected)
    angles = torch.randn(4)
    assert torch.equal(per_slice(angles, index), angles[index])


def test_sampling_in_slices_is_sampling_at_whole_slices():
    # the alignment samples every slice at its own in-plane points as a batch of 2D samples: the
    # same values as the 3D sampler at the same points on whole slices, border values outside
    from mvmm_monai.data.common_space import sample_at, sample_in_slices

    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 9, 7, 4, generator=g, dtype=torch.float64)
    xy = torch.rand(4, 3, 5, 2, generator=g, dtype=torch.float64) * torch.tensor([12.0, 10.0]) - 1.5  # some outside
    z = torch.arange(4, dtype=torch.float64).view(4, 1, 1, 1).expand(4, 3, 5, 1)
    full = sample_at(image, torch.cat((xy, z), dim=-1))  # [C, 4, 3, 5]
    torch.testing.assert_close(sample_in_slices(image, xy), full.permute(1, 0, 2, 3))
    rows = torch.tensor([3, 1])
    torch.testing.assert_close(sample_in_slices(image, xy[rows], rows), full.permute(1, 0, 2, 3)[rows])
