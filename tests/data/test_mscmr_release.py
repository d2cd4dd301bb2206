"""``data=mscmr`` on files laid out and named as the MS-CMRSeg 2019 release.

The release (``conf/data/mscmr.yaml`` says where this comes from)::

    MS-CMRSeg2019/
      C0LET2_nii45_for_challenge19/
        c0t2lge/   patientN_C0.nii.gz  patientN_LGE.nii.gz  patientN_T2.nii.gz   (N = 1..45)
        c0gt/      patientN_C0_manual.nii.gz                                     (N = 1..35)
        t2gt/      patientN_T2_manual.nii.gz                                     (N = 1..35)
        lgegt/     patientN_LGE_manual.nii.gz                                    (N = 1..5)
      C0LET2_gt_for_challenge19/
        C0_manual_10/            patientN_C0_manual.nii.gz                       (N = 36..45)
        T2_manual_10/            patientN_T2_manual.nii.gz                       (N = 36..45)
        LGE_manual_35_TestData/  patientN_LGE_manual.nii.gz                      (N = 6..45)

Label values 200 myocardium, 500 LV, 600 RV. The tiny files written here have MS-CMRSeg's
hetero-coverage: LGE 4 slices of 10 mm (centres z = 0..30 mm), C0 8 thinner slices of 5 mm at
other positions (centres -6.5..28.5 mm, slab [-9, 31] mm: covers every LGE slice), T2 3 thick
slices of 12 mm (centres 10, 22, 34 mm, slab [4, 40] mm: misses LGE slice 0), each with its own
in-plane grid. Every label is a known pattern of the four values.
"""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from mvmm_monai import compose_config
from mvmm_monai.config import build
from mvmm_monai.data import MSCMRDataset

IMAGES = "C0LET2_nii45_for_challenge19/c0t2lge"
LABEL_DIRS = {  # where the release keeps each sequence's labels: patients 1..35 (LGE 1..5), the rest
    "C0": ("C0LET2_nii45_for_challenge19/c0gt", "C0LET2_gt_for_challenge19/C0_manual_10"),
    "T2": ("C0LET2_nii45_for_challenge19/t2gt", "C0LET2_gt_for_challenge19/T2_manual_10"),
    "LGE": ("C0LET2_nii45_for_challenge19/lgegt", "C0LET2_gt_for_challenge19/LGE_manual_35_TestData"),
}
#: sequence -> (shape, in-plane spacing mm, slice spacing = thickness mm, world origin mm)
GEOMETRY = {
    "LGE": ((12, 10, 4), 2.0, 10.0, (0.0, 0.0, 0.0)),
    "C0": ((16, 14, 8), 1.5, 5.0, (-1.0, -1.0, -6.5)),
    "T2": ((8, 8, 3), 3.0, 12.0, (1.0, 0.5, 10.0)),
}
VALUES = np.array([0, 200, 500, 600])  # background, myocardium, LV, RV in the release's labels
SUBJECTS = ("patient1", "patient6", "patient36")  # one from each of the release's label folders


def affine(seq: str) -> np.ndarray:
    _, inplane, thick, origin = GEOMETRY[seq]
    a = np.diag([inplane, inplane, thick, 1.0])
    a[:3, 3] = origin
    return a


def pattern(seq: str, subject_index: int) -> np.ndarray:
    """Known class indices ``[X, Y, Z]`` of a sequence's label (different per sequence and subject)."""
    i, j, k = np.indices(GEOMETRY[seq][0])
    step = {"LGE": (1, 1, 1), "C0": (2, 1, 3), "T2": (1, 3, 2)}[seq]
    return (step[0] * i + step[1] * j + step[2] * k + subject_index) % 4


def label_dir(seq: str, patient: int) -> str:
    training = patient <= (5 if seq == "LGE" else 35)
    return LABEL_DIRS[seq][0 if training else 1]


def save(path, data, aff) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    nib.save(img, path)


@pytest.fixture
def release(tmp_path):
    """The release's tree with three subjects, every sequence labelled; returns its top folder."""
    root = tmp_path / "MS-CMRSeg2019"
    rng = np.random.default_rng(0)
    for n, subject in enumerate(SUBJECTS):
        patient = int(subject.removeprefix("patient"))
        for seq in GEOMETRY:
            shape = GEOMETRY[seq][0]
            save(root / IMAGES / f"{subject}_{seq}.nii.gz", rng.uniform(0, 1000, shape).astype(np.float32), affine(seq))
            label = VALUES[pattern(seq, n)].astype(np.int16)
            save(root / label_dir(seq, patient) / f"{subject}_{seq}_manual.nii.gz", label, affine(seq))
    return root


def dataset(root, *overrides) -> MSCMRDataset:
    return build(compose_config(["data=mscmr", f"data.root={root}", *overrides]).data)


def test_release_tree_finds_subjects_and_files(release):
    ds = dataset(release)
    assert ds.subjects() == list(SUBJECTS)
    for subject in SUBJECTS:
        f = ds.files(subject)
        # the package's DE is the release's LGE
        assert {s: p.name for s, p in f.images.items()} == {
            "DE": f"{subject}_LGE.nii.gz", "C0": f"{subject}_C0.nii.gz", "T2": f"{subject}_T2.nii.gz"}
        assert all(p.parent == release / IMAGES for p in f.images.values())
        patient = int(subject.removeprefix("patient"))
        for seq, name in (("DE", "LGE"), ("C0", "C0"), ("T2", "T2")):
            assert f.labels[seq] == release / label_dir(name, patient) / f"{subject}_{name}_manual.nii.gz"
    # any folder of the release is a root too: the images folder alone has the subjects, no labels
    alone = dataset(release / IMAGES)
    assert alone.subjects() == list(SUBJECTS) and alone.files("patient1").labels == {}


def test_every_sequence_on_its_own_grid_with_its_labels(release):
    ds = dataset(release)
    subject = ds.load("patient6")
    assert subject.sequences == ("DE", "C0", "T2")
    for seq, name in (("DE", "LGE"), ("C0", "C0"), ("T2", "T2")):
        grid = subject.grids[seq]
        assert grid.shape == GEOMETRY[name][0]
        assert np.allclose(grid.affine.numpy(), affine(name), atol=1e-4)
        assert tuple(subject.native_images[seq].shape) == (1, *GEOMETRY[name][0])
        expected = torch.from_numpy(pattern(name, SUBJECTS.index("patient6")))
        assert torch.equal(subject.labels[seq].long(), expected), f"{seq}: labels are not the values written"
    # the common space is the LGE grid; slab coverage from the geometry in the module docstring
    assert tuple(subject.images.shape) == (3, *GEOMETRY["LGE"][0])
    covered = subject.coverage.amax(dim=(1, 2))  # [N, Z]: does sequence n cover LGE slice z anywhere
    assert covered.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]]


def test_release_names_as_sequences(release):
    """``data.sequences=[LGE,C0,T2] data.reference=LGE``: the release's own sequence names."""
    ds = dataset(release, "data.sequences=[LGE,C0,T2]", "data.reference=LGE")
    f = ds.files("patient36")
    assert f.images["LGE"].name == "patient36_LGE.nii.gz" and set(f.labels) == {"LGE", "C0", "T2"}


def test_missing_image_is_named(release):
    (release / IMAGES / "patient36_T2.nii.gz").unlink()
    ds = dataset(release)
    with pytest.raises(FileNotFoundError, match=r"subject patient36: missing T2 image patient36_T2\.nii\.gz"):
        ds.files("patient36")
    assert ds.files("patient1").images["T2"].name == "patient1_T2.nii.gz"  # the others are untouched


def test_missing_label_is_no_label(release):
    (release / label_dir("LGE", 1) / "patient1_LGE_manual.nii.gz").unlink()
    assert set(dataset(release).files("patient1").labels) == {"C0", "T2"}


def test_a_file_in_two_folders_is_named(release):
    src = release / IMAGES / "patient1_C0.nii.gz"
    shutil.copy(src, release / "patient1_C0.nii.gz")
    with pytest.raises(ValueError, match=r"patient1_C0\.nii\.gz is in 2 folders"):
        dataset(release).files("patient1")
