"""Rigid slice poses read from the images (``slice_motion.align``, ``registration=slice_align``):
known in-plane rotations and shifts of C0's slices are found by the edge alignment to the
reference before any fit, a threshold on the correlation gain holds slices where they were
acquired, and the preset fits end to end with its poses in ``params.json``."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch

from mvmm_monai.registration import Registration, SliceMotion
from tests.registration.test_slice_rotation import rotated_subject

ALIGN = dict(rotation=True, align=True, search_radius=5, search_angle_deg=12.0, search_angle_step_deg=2.0, align_margin_mm=0.0)


@pytest.mark.parametrize(
    ("angles_deg", "shifts_vox"),
    [
        pytest.param([-8.7], [[2.4, -1.6]], id="single-slice"),
        pytest.param([10.0, -6.3, 3.1], [[-2.7, 1.2], [1.9, 3.4], [0.4, -0.8]], id="stack"),
    ],
)
def test_known_rotations_and_shifts_are_found_by_the_edges(angles_deg, shifts_vox, one_thread):
    subject, atlas = rotated_subject(angles_deg, shifts_vox, size=60)
    motion = Registration(subject, atlas, slice_motion=partial(SliceMotion, **ALIGN)).slice_motion
    angles = torch.tensor(motion.rotations_deg()["C0"])
    shifts = motion.voxels("C0").detach()
    assert (angles - torch.tensor(angles_deg)).abs().max() < 0.5, f"found {angles.tolist()} degrees, truth {angles_deg}"
    assert (shifts - torch.tensor(shifts_vox)).norm(dim=-1).max() < 0.25, f"found {shifts.tolist()} voxels, truth {shifts_vox}"
    assert min(motion.alignment_gain["C0"]) > 0.1  # moved slices match far better where they belong


def test_the_fft_table_is_the_correlation_at_every_pose_it_stands_for(one_thread, monkeypatch):
    # the exhaustive stage scores all whole-voxel offsets of each turned frame at once by FFT; each
    # entry must be the correlation that the exact point sampler gives at the pose it stands for
    from mvmm_monai.data.common_space import rotate
    from mvmm_monai.registration.alignment import _exhaustive, _SliceCorrelation

    g = torch.Generator().manual_seed(0)
    nz, r = 3, 3
    moving = torch.rand(1, 40, 36, nz, generator=g)
    xs, ys = torch.meshgrid(torch.arange(10, 30), torch.arange(8, 28), indexing="ij")
    points, slices = [], []
    for z in range(nz):
        keep = torch.rand(xs.shape, generator=g) < 0.7  # a ragged region, different on every slice
        points.append(torch.stack([xs[keep], ys[keep], torch.full_like(xs[keep], z)], -1).float())
        slices.append(torch.full((int(keep.sum()),), z))
    points, slices = torch.cat(points), torch.cat(slices)
    score = _SliceCorrelation(moving, points, slices, torch.rand(len(points), generator=g), nz)
    pivot = torch.zeros(nz, 2, dtype=torch.float64).index_add_(0, slices, score.offset.double()) / score.n[:, None]
    turns = torch.deg2rad(torch.tensor([[-6.0, 1.0, 4.0], [3.0, 0.0, -9.5]], dtype=torch.float64))  # [A, Z]
    table = _exhaustive(score, pivot, turns, r)
    from mvmm_monai.registration import alignment

    monkeypatch.setattr(alignment, "_CHUNK_SAMPLES", 1)  # one turn per pass: the same table
    torch.testing.assert_close(_exhaustive(score, pivot, turns, r), table, atol=1e-12, rtol=0)
    for a in range(turns.shape[0]):
        for i in range(2 * r + 1):
            for j in range(2 * r + 1):
                u = rotate(torch.tensor([i - r, j - r], dtype=torch.float64).expand(nz, 2), turns[a])
                shift = u + pivot - rotate(pivot, turns[a])  # the turn about each slice's pivot, then u
                exact = score(shift[None], turns[a][None])[0]
                torch.testing.assert_close(table[a, :, i, j].float(), exact.float(), atol=1e-5, rtol=0)


def test_the_alignment_can_wait_until_a_fit_needs_it(one_thread):
    # registration.guard builds the registration before the fit without registration, and aligns
    # only if that fit is not trusted: a deferred alignment is the same alignment, made once
    subject, atlas = rotated_subject([6.0], [[2.0, -1.0]], size=60)
    eager = Registration(subject, atlas, slice_motion=partial(SliceMotion, **ALIGN)).slice_motion
    reg = Registration(subject, atlas, slice_motion=partial(SliceMotion, **ALIGN), align=False)
    assert reg.slice_motion.alignment_gain == {} and reg.at_acquired_poses
    reg.align_slices()
    assert reg.slice_motion.alignment_gain == eager.alignment_gain and not reg.at_acquired_poses
    torch.testing.assert_close(reg.slice_motion.voxels("C0"), eager.voxels("C0"))
    reg.slice_motion.translation_mm["C0"].data.zero_()
    reg.align_slices()  # once only: a second call moves nothing
    assert reg.slice_motion.translation_mm["C0"].detach().abs().max() == 0


def test_slices_in_place_stay_and_a_threshold_holds_moved_ones(one_thread):
    subject, atlas = rotated_subject([0.0, 6.0], [[0.0, 0.0], [2.0, -1.0]], size=60)
    motion = Registration(subject, atlas, slice_motion=partial(SliceMotion, **ALIGN)).slice_motion
    assert motion.rotations_deg()["C0"][0] == pytest.approx(0.0, abs=0.5)
    assert motion.voxels("C0")[0].detach().norm() < 0.35  # the edges of two contrasts agree to a third of a voxel
    gain = motion.alignment_gain["C0"][1]
    held = Registration(subject, atlas, slice_motion=partial(SliceMotion, **ALIGN, align_min_gain=gain + 0.01)).slice_motion
    assert held.rotations_deg()["C0"][1] == 0.0 and held.voxels("C0")[1].detach().abs().max() == 0.0
    assert held.alignment_gain["C0"][1] == pytest.approx(gain)  # the gain is reported whether the slice moved or not
    with pytest.raises(ValueError, match="align_min_gain"):
        SliceMotion(subject, align=True, align_min_gain=1.5)
    with pytest.raises(ValueError, match="align_margin_mm"):
        SliceMotion(subject, align=True, align_margin_mm=-1.0)


def test_with_the_model_choosing_the_aligned_poses_compete_at_the_search(one_thread):
    from mvmm_monai.mixture import EMConfig, initialise_from_atlas, voxel_log_likelihood

    subject, atlas = rotated_subject([0.0, 8.0], [[0.0, 0.0], [2.0, -1.5]], size=60)
    reg = Registration(subject, atlas, slice_motion=partial(SliceMotion, **ALIGN, align_choice="model"))
    motion = reg.slice_motion
    assert motion.rotations_deg()["C0"] == [0.0, 0.0] and not motion.voxels("C0").detach().any()  # proposed, not taken
    proposed_mm, proposed_angle = motion.aligned_poses["C0"]
    params = initialise_from_atlas(subject.images[None], subject.coverage[None], atlas[None], torch.ones(2, 4, dtype=torch.long))
    log_atlas = reg().log_atlas.detach()
    reg.search_shifts(lambda images: voxel_log_likelihood(images, reg.coverage, log_atlas, params, EMConfig()))
    # the moved slice takes its aligned pose: the model scores it above the acquired one
    assert motion.rotations_deg()["C0"][1] == pytest.approx(float(torch.rad2deg(proposed_angle[1])), abs=1e-4)
    assert motion.translation_mm["C0"][1].detach() == pytest.approx(proposed_mm[1], abs=1e-5)
    assert (motion.voxels("C0")[1].detach() - torch.tensor([2.0, -1.5])).norm() < 0.25
    assert abs(motion.rotations_deg()["C0"][0]) < 0.5 and motion.voxels("C0")[0].detach().norm() < 0.35
    with pytest.raises(ValueError, match="align_choice"):
        SliceMotion(subject, align=True, align_choice="vote")
