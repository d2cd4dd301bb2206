"""Outcome tests of the synthetic multi-sequence cardiac MR cohort."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mvmm_monai.data.synthetic import (
    SequenceGeometry,
    SyntheticConfig,
    default_geometries,
    ensure_cohort,
    make_cohort,
    subject_names,
)

SEQS = ("C0", "DE", "T2")
LABELS = {0, 200, 500, 600}
# A coarse, quick cohort for the determinism and caching tests.
SMALL = {
    "C0": SequenceGeometry((40, 40), (4.0, 4.0), 4, 20.0, -30.0),
    "DE": SequenceGeometry((36, 36), (4.5, 4.5), 4, 20.0, -30.0),
    "T2": SequenceGeometry((30, 30), (5.0, 5.0), 2, 20.0, -10.0),
}


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


@pytest.fixture(scope="module")
def cohort_on(tmp_path_factory) -> Path:
    return make_cohort(tmp_path_factory.mktemp("on"), SyntheticConfig(n_subjects=2, misalignment=True))


@pytest.fixture(scope="module")
def cohort_off(tmp_path_factory) -> Path:
    return make_cohort(tmp_path_factory.mktemp("off"), SyntheticConfig(n_subjects=2, misalignment=False))


def _truth(root: Path, subject: str) -> dict:
    return json.loads((root / "truth" / f"{subject}_truth.json").read_text())


def test_files_labels_and_grids(cohort_on):
    geos = default_geometries()
    cohort = json.loads((cohort_on / "cohort.json").read_text())
    assert cohort["subjects"] == subject_names(SyntheticConfig(n_subjects=2)) == ["patient1", "patient2"]
    for subject in cohort["subjects"]:
        for seq in SEQS:
            img, aff = _load(cohort_on / f"{subject}_{seq}.nii.gz")
            lab, lab_aff = _load(cohort_on / f"{subject}_{seq}_manual.nii.gz")
            assert img.dtype == np.float32 and lab.dtype == np.int16
            assert img.shape == lab.shape == (*geos[seq].shape, geos[seq].n_slices)
            np.testing.assert_allclose(lab_aff, aff)
            np.testing.assert_allclose(aff, geos[seq].affine())
            assert set(np.unique(lab).tolist()) == LABELS
            assert img.min() > 0 and 300 < np.percentile(img, 99) < 2000
        scar, scar_aff = _load(cohort_on / "truth" / f"{subject}_DE_scar.nii.gz")
        assert scar.dtype == np.uint8 and scar.shape == (112, 112, 10)
        truth = _truth(cohort_on, subject)
        assert {"slice_shifts_mm", "atlas_offset", "has_scar", "scar", "geometry"} <= set(truth)
    atlas_meta = json.loads((cohort_on / "atlas.json").read_text())
    assert atlas_meta["classes"] == ["background", "myocardium", "lv", "rv"]
    assert atlas_meta["label_values"] == {"background": [0], "myocardium": [200], "lv": [500], "rv": [600]}
    assert atlas_meta["frame"] == "world" and atlas_meta["format"] == "mvmm-monai atlas 2"


def test_geometry_of_sequences(cohort_on):
    hdr = {s: nib.load(str(cohort_on / f"patient1_{s}.nii.gz")).header for s in SEQS}
    assert hdr["T2"].get_data_shape()[2] < hdr["DE"].get_data_shape()[2]
    assert hdr["T2"].get_zooms()[:2] != hdr["DE"].get_zooms()[:2]
    assert hdr["C0"].get_zooms()[:2] != hdr["DE"].get_zooms()[:2]
    for h in hdr.values():
        assert h.get_xyzt_units()[0] == "mm" and int(h["qform_code"]) > 0 and int(h["sform_code"]) > 0
        np.testing.assert_allclose(h.get_qform(), h.get_sform())


def test_atlas_is_a_probability_map_matching_the_subjects(cohort_off):
    atlas, a_aff = _load(cohort_off / "atlas.nii.gz")
    assert atlas.ndim == 4 and atlas.shape[3] == 4 and atlas.dtype == np.float32
    assert atlas.min() >= 0
    np.testing.assert_allclose(atlas.sum(axis=3), 1.0, atol=1e-5)
    assert atlas[..., 2].max() > 0.99  # LV centre is certain
    assert ((atlas[..., 1:] > 0.05) & (atlas[..., 1:] < 0.95)).any()  # blurry edges
    for subject in ("patient1", "patient2"):
        lab, d_aff = _load(cohort_off / f"{subject}_DE_manual.nii.gz")
        # DE voxel -> world -> nearest atlas voxel
        ijk = np.stack(np.meshgrid(*[np.arange(n) for n in lab.shape], indexing="ij"), -1).reshape(-1, 3)
        world = ijk @ d_aff[:3, :3].T + d_aff[:3, 3]
        a_idx = np.rint((world - a_aff[:3, 3]) @ np.linalg.inv(a_aff[:3, :3]).T).astype(int)
        a_idx = np.clip(a_idx, 0, np.array(atlas.shape[:3]) - 1)
        prob = atlas[a_idx[:, 0], a_idx[:, 1], a_idx[:, 2]]
        flat = lab.reshape(-1)
        assert prob[flat == 500, 2].mean() > 0.5
        assert prob[flat == 200, 1].mean() > 0.3
        assert prob[flat == 600, 3].mean() > 0.3
        assert prob[flat == 0, 0].mean() > 0.9


def test_tissue_contrast(cohort_on):
    for subject in ("patient1", "patient2"):
        means = {}
        for seq in SEQS:
            img, _ = _load(cohort_on / f"{subject}_{seq}.nii.gz")
            lab, _ = _load(cohort_on / f"{subject}_{seq}_manual.nii.gz")
            means[seq] = {v: float(img[lab == v].mean()) for v in (200, 500, 600)}
        assert means["DE"][200] < 0.6 * means["DE"][500]  # nulled myocardium, bright blood
        assert means["C0"][500] > 2 * means["C0"][200]  # bSSFP bright blood
        assert means["C0"][600] > 2 * means["C0"][200]
        assert means["T2"][500] / means["T2"][200] < 0.5 * means["C0"][500] / means["C0"][200]


def test_no_misalignment_means_zero_shifts_and_identity_pose(cohort_off):
    geos = default_geometries()
    for subject in ("patient1", "patient2"):
        truth = _truth(cohort_off, subject)
        for seq in SEQS:
            shifts = np.asarray(truth["slice_shifts_mm"][seq])
            assert shifts.shape == (geos[seq].n_slices, 2) and not shifts.any()
        off = truth["atlas_offset"]
        assert off["translation_mm"] == [0.0, 0.0] and off["rotation_deg"] == 0.0 and off["scale"] == 1.0


def test_misalignment_shifts_are_recorded_and_real(cohort_on, cohort_off):
    truth = _truth(cohort_on, "patient1")
    assert not np.asarray(truth["slice_shifts_mm"]["DE"]).any()
    for seq in ("C0", "T2"):
        shifts = np.asarray(truth["slice_shifts_mm"][seq])
        assert np.abs(shifts).max() <= 6.0
        assert (np.abs(shifts).max(axis=1) > default_geometries()[seq].spacing[0]).any()  # > 1 voxel
    off = truth["atlas_offset"]
    assert 5 < np.hypot(*off["translation_mm"]) < 9 and 7 < abs(off["rotation_deg"]) < 13
    assert 0.85 < off["scale"] < 1.15 and off["scale"] != 1.0
    # Convention: slice content moved by +shift. C0 and DE share slice positions and DE is
    # unshifted, so the C0 LV centroid minus the DE LV centroid is the recorded C0 shift.
    centroids = {}
    for seq in ("C0", "DE"):
        lab, aff = _load(cohort_on / f"patient1_{seq}_manual.nii.gz")
        ii, jj = np.meshgrid(np.arange(lab.shape[0]), np.arange(lab.shape[1]), indexing="ij")
        x, y = aff[0, 3] + aff[0, 0] * ii, aff[1, 3] + aff[1, 1] * jj
        centroids[seq] = [(x[lab[..., k] == 500].mean(), y[lab[..., k] == 500].mean()) for k in range(3, 8)]
    moved = np.asarray(centroids["C0"]) - np.asarray(centroids["DE"])
    np.testing.assert_allclose(moved, np.asarray(truth["slice_shifts_mm"]["C0"])[3:8], atol=1.0)
    # Same anatomy without misalignment: the LV centroid maps by the recorded similarity
    # p = c + t + s R (q - c) (DE is not slice-shifted).
    lv = {}
    for name, root in (("on", cohort_on), ("off", cohort_off)):
        lab, aff = _load(root / "patient1_DE_manual.nii.gz")
        i, j = np.nonzero(lab[..., 5] == 500)
        lv[name] = np.array([aff[0, 3] + aff[0, 0] * i.mean(), aff[1, 3] + aff[1, 1] * j.mean()])
    c, t, s = np.asarray(off["center_mm"]), np.asarray(off["translation_mm"]), off["scale"]
    th = np.deg2rad(off["rotation_deg"])
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    np.testing.assert_allclose(lv["on"], c + t + s * rot @ (lv["off"] - c), atol=1.0)


def test_scar_in_recorded_subjects_inside_myocardium(cohort_on):
    cohort = json.loads((cohort_on / "cohort.json").read_text())
    assert cohort["scar_subjects"] == ["patient2"]
    for subject in ("patient1", "patient2"):
        truth = _truth(cohort_on, subject)
        scar, _ = _load(cohort_on / "truth" / f"{subject}_DE_scar.nii.gz")
        lab, _ = _load(cohort_on / f"{subject}_DE_manual.nii.gz")
        assert truth["has_scar"] == (subject in cohort["scar_subjects"]) == bool(scar.any())
        assert np.all(lab[scar > 0] == 200)
        if scar.any():
            img, _ = _load(cohort_on / f"{subject}_DE.nii.gz")
            healthy = (lab == 200) & (scar == 0)
            assert scar.sum() > 30
            assert img[scar > 0].mean() > 3 * img[healthy].mean()


def test_determinism_and_seed(tmp_path):
    config = SyntheticConfig(n_subjects=1, geometries=SMALL)
    a = make_cohort(tmp_path / "a", config)
    b = make_cohort(tmp_path / "b", config)
    c = make_cohort(tmp_path / "c", SyntheticConfig(n_subjects=1, seed=1, geometries=SMALL))
    for name in ("patient1_C0", "patient1_DE_manual", "patient1_T2", "atlas"):
        arr_a, _ = _load(a / f"{name}.nii.gz")
        np.testing.assert_array_equal(arr_a, _load(b / f"{name}.nii.gz")[0])
        assert not np.array_equal(arr_a, _load(c / f"{name}.nii.gz")[0])
    assert _truth(a, "patient1") == _truth(b, "patient1") != _truth(c, "patient1")


def test_ensure_cohort_caches_atomically(tmp_path):
    config = SyntheticConfig(n_subjects=1, geometries=SMALL)
    root = ensure_cohort(tmp_path, config)
    assert root.parent == tmp_path and root.name.startswith("synthetic-") and len(root.name) == 20
    assert (root / "cohort.json").is_file() and (root / "patient1_DE.nii.gz").is_file()
    stamp = (root / "cohort.json").stat().st_mtime_ns, (root / "patient1_DE.nii.gz").stat().st_mtime_ns
    assert ensure_cohort(tmp_path, config) == root
    assert ((root / "cohort.json").stat().st_mtime_ns, (root / "patient1_DE.nii.gz").stat().st_mtime_ns) == stamp
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no temporary directories left
    other = ensure_cohort(tmp_path, SyntheticConfig(n_subjects=1, seed=3, geometries=SMALL))
    assert other != root and sorted(p.name for p in tmp_path.iterdir()) == sorted([root.name, other.name])


def test_default_geometries_key_is_stable(tmp_path):
    from mvmm_monai.data.synthetic import config_key

    assert config_key(SyntheticConfig()) == config_key(SyntheticConfig(geometries=default_geometries()))
    assert config_key(SyntheticConfig()) != config_key(SyntheticConfig(misalignment=False))
