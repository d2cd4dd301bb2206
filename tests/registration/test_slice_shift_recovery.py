"""Slice-shift recovery against the synthetic generator's truth (issue #3).

The subject has known per-slice motion of C0 and T2 and the atlas is offset and deformed too
(``SyntheticConfig(misalignment=True)``: the issue's condition). ``registration=full`` with its
defaults fits the atlas deformation and the shifts together; after 25 shift iterations every slice
jumps to its best whole-voxel offset (``registration.schedule.shift_search_at=[25]``: gradient ascent
alone left the basal C0 slice 3.4 voxels off in a local optimum it reached while the atlas was
still misplaced), and from 32 on the exact shift gradient removes the smoothed gradient's sub-voxel
bias (``shift_gradient_exact_after=32``). Only slices with at least ``MIN_HEART_MM2``
of labelled heart are checked: a slice without heart has nothing to align its shift to
(unobservable); the apical C0 slice of patient1 (about 290 mm2 of heart, a thin ring at the
slice's edge) stays several voxels off.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from mvmm_monai import compose_config, fit
from mvmm_monai.data.synthetic import SyntheticConfig, make_cohort

MIN_HEART_MM2 = 500.0


def fitted_shifts(root, out, *registration: str) -> dict:
    """Fit synthetic patient1 of ``root`` into ``out`` with the ``registration`` overrides; per
    sequence ``(fitted shifts, true shifts, heart mask)`` over its slices, shifts in its voxels."""
    fit(compose_config([
        f"paths.output_dir={out}", "callbacks.progress.refresh_rate=0", "~logger", "subject=patient1",
        "data=mscmr", f"data.root={root}", f"atlas.path={root}/atlas.nii.gz", "atlas.placement=identity", *registration,
    ]))
    fitted = json.loads((out / "params.json").read_text())["slice_shifts_mm"]
    truth = json.loads((root / "truth" / "patient1_truth.json").read_text())["slice_shifts_mm"]
    result = {}
    for seq in ("C0", "T2"):
        lab = nib.load(root / f"patient1_{seq}_manual.nii.gz")
        pixel = np.array(lab.header.get_zooms()[:2])
        heart = (np.asarray(lab.dataobj) > 0).sum(axis=(0, 1)) * pixel[0] * pixel[1] >= MIN_HEART_MM2
        result[seq] = (np.array(fitted[seq]) / pixel, np.array(truth[seq]) / pixel, heart)
    return result


@pytest.fixture(scope="module")
def shift_errors(tmp_path_factory):
    """Per sequence: ``(errors in the sequence's voxels, heart mask)`` over its slices."""
    root = make_cohort(tmp_path_factory.mktemp("shifts"), SyntheticConfig(n_subjects=1, misalignment=True))
    shifts = fitted_shifts(root, tmp_path_factory.mktemp("fit"), "registration=full", "trainer.max_epochs=80")
    return {seq: (np.linalg.norm(got - truth, axis=1), heart) for seq, (got, truth, heart) in shifts.items()}


@pytest.mark.slow
def test_slice_shifts_are_recovered_within_one_voxel_on_heart_slices(shift_errors):
    for seq, (err, heart) in shift_errors.items():
        assert heart.sum() >= 3, seq
        assert err[heart].max() < 1.0, f"{seq}: errors (voxels) {np.round(err, 2).tolist()} on heart slices {heart.tolist()}"


@pytest.mark.slow
def test_slices_moved_by_the_leave_out_search_alone_land_on_their_shifts(tmp_path):
    # registration=slice_search on slice shifts only (the atlas sits where the subject is): the slices
    # move at the searches alone (slice_motion.steps=false), each sequence scored with the MRF of the
    # others' posterior
    root = make_cohort(tmp_path / "data", SyntheticConfig(n_subjects=1, misalignment=True, atlas_misalignment=False))
    shifts = fitted_shifts(root, tmp_path / "fit", "registration=slice_search", "registration.guard=false")
    for seq, (got, truth, heart) in shifts.items():
        assert np.allclose(got, np.round(got), atol=1e-4), f"{seq}: a gradient step moved a slice: {got.tolist()}"
        err = np.linalg.norm(got - truth, axis=1)
        assert heart.sum() >= 3, seq
        # whole-voxel poses of a sub-voxel truth (the nearest is up to 0.71 voxels away): on average
        # within 0.8 voxels, and no heart slice more than one voxel step beyond that
        msg = f"{seq}: errors (voxels) {np.round(err, 2).tolist()} on heart slices {heart.tolist()}"
        assert err[heart].mean() < 0.8 and err[heart].max() < 1.5, msg


def test_slices_aligned_by_their_edges_land_on_their_shifts(tmp_path):
    # registration=slice_align: the poses come from the edges alone before the fit and are held
    # (no gradient step, no search); the atlas sits where the subject is
    root = make_cohort(tmp_path / "data", SyntheticConfig(n_subjects=1, misalignment=True, atlas_misalignment=False))
    shifts = fitted_shifts(root, tmp_path / "fit", "registration=slice_align", "registration.guard=false")
    rotations = json.loads((tmp_path / "fit" / "params.json").read_text())["slice_rotations_deg"]
    for seq, (got, truth, heart) in shifts.items():
        err = np.linalg.norm(got - truth, axis=1)
        assert heart.sum() >= 3, seq
        msg = f"{seq}: errors (voxels) {np.round(err, 2).tolist()} on heart slices {heart.tolist()}, rotations {rotations[seq]}"
        assert err[heart].mean() < 0.5 and err[heart].max() < 1.0, msg
        assert np.abs(np.array(rotations[seq])[heart]).max() < 2.0, msg  # the generator turns no slice
