"""Rigid slice motion: known in-plane rotations (up to 10 degrees about each slice's centre) and
shifts of C0's slices are recovered by the whole-voxel search over angles and offsets followed by
the gradient steps of the ICM loop (the registration's own parameter groups and learning rates),
on a single slice and on a stack; the fitted angles reach ``params.json``'s record."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
from scipy import ndimage

from mvmm_monai.classes import MSCMR_LABELS
from mvmm_monai.data.common_space import Grid
from mvmm_monai.data.datasets import SubjectFiles
from mvmm_monai.data.subject import SubjectData
from mvmm_monai.mixture import (
    EMConfig,
    initialise_from_atlas,
    log_likelihood,
    voxel_log_likelihood,
)
from mvmm_monai.registration import Registration, SliceMotion

SPACING = 1.5  # mm in-plane
MEANS = ((0.1, 0.5, 0.9, 0.7), (0.6, 0.2, 0.8, 0.4))  # DE, C0 per class


def move_slice(a: np.ndarray, theta: float, shift_vox) -> np.ndarray:
    """``a`` ``[X, Y]`` whose content is turned by ``theta`` (radians, first voxel axis towards the
    second) about the slice centre, then moved by ``shift_vox``: out(q) = a(R^-1 (q - c - t) + c)."""
    c = (np.array(a.shape, dtype=np.float64) - 1) / 2
    inv = np.array([[math.cos(theta), math.sin(theta)], [-math.sin(theta), math.cos(theta)]])
    return ndimage.affine_transform(a, inv, offset=c - inv @ (c + np.asarray(shift_vox)), order=3, mode="nearest")


def rotated_subject(angles_deg, shifts_vox, size: int = 40, seed: int = 0) -> tuple[SubjectData, torch.Tensor]:
    """DE and C0 on one grid (1.5 x 1.5 x 8 mm, ``len(angles_deg)`` slices) drawn from a smooth
    label map without rotational symmetry; C0's slice ``z`` turned by ``angles_deg[z]`` and moved by
    ``shifts_vox[z]``. Returns ``(subject, atlas [4, *S])`` (the atlas: the unmoved classes, blurred)."""
    rng = np.random.default_rng(seed)
    nz = len(angles_deg)
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), 4.0)
    x = np.linspace(-1, 1, size)
    field = field / field.std() + 1.5 * x[:, None] - 0.8 * x[None, :] ** 2  # a gradient breaks any symmetry
    labels2d = np.digitize(field, np.quantile(field, [0.4, 0.6, 0.8]))
    onehot = np.stack([ndimage.gaussian_filter((labels2d == k).astype(np.float64), 1.5) for k in range(4)])
    atlas = torch.from_numpy(onehot / onehot.sum(0)).float()[..., None].expand(4, size, size, nz).clone()
    images = []
    for n in range(2):
        clean = np.asarray(MEANS[n])[labels2d]
        stack = [clean + 0.03 * rng.standard_normal(clean.shape) for _ in range(nz)]
        if n == 1:
            stack = [move_slice(s, math.radians(a), t) for s, a, t in zip(stack, angles_deg, shifts_vox, strict=True)]
        images.append(np.stack(stack, -1))
    images = torch.from_numpy(np.stack(images)).float()
    affine = torch.diag(torch.tensor([SPACING, SPACING, 8.0, 1.0], dtype=torch.float64))
    shape = (size, size, nz)
    subject = SubjectData(
        name="rot", sequences=("DE", "C0"), grids={"DE": Grid(affine, shape), "C0": Grid(affine.clone(), shape)},
        native_images={"DE": images[:1].clone(), "C0": images[1:].clone()},
        images=images, coverage=torch.ones_like(images), labels={}, label_map=MSCMR_LABELS, files=SubjectFiles("rot", {}, {}, MSCMR_LABELS, "DE"),
    )
    return subject, atlas


def fit_motion(subject, atlas, steps: int = 40, **motion) -> Registration:
    """The ICM loop's registration on a held mixture: one whole-voxel search (angles and offsets),
    then Adam on the per-voxel mean log-likelihood minus the marginal correction, with the parameter
    groups and learning rates of ``registration=slice_shift`` (decayed by 0.98 per step), switching
    to the exact gradient halfway as its schedule does."""
    reg = Registration(subject, atlas, slice_motion=partial(SliceMotion, rotation=True, search_radius=3, **motion),
                       lr={"slice_shift": 0.3, "slice_rotation": 0.005})
    params = initialise_from_atlas(subject.images[None], subject.coverage[None], atlas[None], torch.ones(2, 4, dtype=torch.long))
    em = EMConfig()
    log_atlas = reg().log_atlas.detach()
    reg.search_shifts(lambda images: voxel_log_likelihood(images, reg.coverage, log_atlas, params, em))
    opt = torch.optim.Adam(reg.param_groups(), lr=0.01)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.98)
    for step in range(steps):
        reg.slice_motion.exact_gradient = step >= steps // 2
        opt.zero_grad()
        w = reg()
        loss = -log_likelihood(w.images, w.coverage, w.log_atlas, params, em).mean() + sum(reg.regularisers(w).values())
        loss.backward()
        opt.step()
        sched.step()
    return reg


@pytest.mark.parametrize(
    ("angles_deg", "shifts_vox"),
    [
        pytest.param([-8.7], [[2.4, -1.6]], id="single-slice"),
        pytest.param([10.0, -6.3, 3.1], [[-2.7, 1.2], [1.9, 3.4], [0.4, -0.8]], id="stack"),
    ],
)
def test_known_rotations_and_shifts_are_recovered(angles_deg, shifts_vox, one_thread):
    subject, atlas = rotated_subject(angles_deg, shifts_vox)
    reg = fit_motion(subject, atlas)
    angles = torch.rad2deg(reg.slice_motion.angle["C0"].detach())
    shifts = reg.slice_motion.voxels("C0").detach()
    err_deg = (angles - torch.tensor(angles_deg)).abs()
    err_vox = (shifts - torch.tensor(shifts_vox)).norm(dim=-1)
    assert err_deg.max() < 0.5, f"fitted {angles.tolist()} degrees, truth {angles_deg}"
    assert err_vox.max() < 0.2, f"fitted {shifts.tolist()} voxels, truth {shifts_vox}"
    assert reg.slice_rotations_deg()["C0"] == pytest.approx(angles.tolist())


def test_the_search_turns_slices_by_whole_angle_steps_and_keeps_aligned_ones(one_thread):
    """The search alone finds the angle steps of the truth and its offsets to within a voxel (a turn
    is tried about the covered voxels' centroid, so the offsets that go with it are not whole
    voxels); an unmoved slice stays exactly where it is."""
    truth = torch.tensor([[2.0, -1.0], [0.0, 0.0], [-3.0, 0.0]])
    subject, atlas = rotated_subject([7.5, 0.0, -5.0], truth.tolist(), seed=1)
    reg = Registration(subject, atlas, slice_motion=partial(SliceMotion, rotation=True, search_radius=3))
    params = initialise_from_atlas(subject.images[None], subject.coverage[None], atlas[None], torch.ones(2, 4, dtype=torch.long))
    log_atlas = reg().log_atlas.detach()
    moves = reg.search_shifts(lambda images: voxel_log_likelihood(images, reg.coverage, log_atlas, params, EMConfig()))
    assert reg.slice_rotations_deg()["C0"] == pytest.approx([7.5, 0.0, -5.0], abs=1e-4)
    err = (reg.slice_motion.voxels("C0") - truth).norm(dim=-1)
    assert err.max() < 1.0 and err[1] == 0, err.tolist()
    assert moves["C0"] == pytest.approx(float(reg.slice_motion.translation_mm["C0"].detach().norm(dim=-1).max()))


def test_rotation_has_its_own_parameter_group_and_search_angles():
    subject, atlas = rotated_subject([0.0], [[0.0, 0.0]], size=16)
    reg = Registration(subject, atlas, slice_motion=partial(SliceMotion, rotation=True), lr={"slice_shift": 0.3, "slice_rotation": 0.005})
    groups = {g["name"]: g for g in reg.param_groups()}
    assert groups["slice_shift"]["lr"] == 0.3 and groups["slice_rotation"]["lr"] == 0.005
    assert groups["slice_rotation"]["params"] == [reg.slice_motion.angle["C0"]]
    assert groups["slice_shift"]["params"] == [reg.slice_motion.translation_mm["C0"]]
    steps = torch.rad2deg(reg.slice_motion.search_angles())
    assert steps[0] == 0 and sorted(steps.tolist()) == pytest.approx([-10, -7.5, -5, -2.5, 0, 2.5, 5, 7.5, 10])
    shifts_only = Registration(subject, atlas, slice_motion=partial(SliceMotion))
    assert [g["name"] for g in shifts_only.param_groups()] == ["slice_shift"] and shifts_only.slice_rotations_deg() == {}
    assert shifts_only.slice_motion.search_angles().tolist() == [0.0]
    with pytest.raises(ValueError, match="search_angle_step_deg"):
        SliceMotion(subject, rotation=True, search_angle_step_deg=0.0)


def test_the_joint_search_finds_slices_turned_and_moved_far(one_thread):
    """``joint_search``: every angle step with every second offset, then the offsets within two voxels
    of the best: slices turned by up to 10 degrees and moved by up to 5 voxels are found at the
    truth's angle step and within a voxel of its offset by the search alone."""
    truth = torch.tensor([[4.0, -3.0], [-4.0, 3.0]])
    subject, atlas = rotated_subject([10.0, -7.5], truth.tolist(), seed=2)
    reg = Registration(subject, atlas, slice_motion=partial(SliceMotion, rotation=True, search_radius=6, joint_search=True))
    params = initialise_from_atlas(subject.images[None], subject.coverage[None], atlas[None], torch.ones(2, 4, dtype=torch.long))
    log_atlas = reg().log_atlas.detach()
    reg.search_shifts(lambda images: voxel_log_likelihood(images, reg.coverage, log_atlas, params, EMConfig()))
    assert reg.slice_rotations_deg()["C0"] == pytest.approx([10.0, -7.5], abs=1e-4)
    err = (reg.slice_motion.voxels("C0") - truth).norm(dim=-1)
    assert err.max() < 1.0, err.tolist()
