"""Result files are written atomically: a crash mid-write leaves neither a truncated file nor a temporary."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mvmm_monai.outputs import save_json, save_nifti


def test_crash_while_writing_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "case_DE_seg.nii.gz"
    save_nifti(target, np.zeros((4, 4, 2), np.int16), np.eye(4))
    before = target.read_bytes()

    def half_written(img, filename):
        Path(filename).write_bytes(b"\x1f\x8b truncated")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", half_written)
    with pytest.raises(OSError, match="disk full"):
        save_nifti(target, np.ones((4, 4, 2), np.int16), np.eye(4))
    assert target.read_bytes() == before  # the old complete file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no temporary left


def test_vector_and_json_outputs(tmp_path):
    field = np.random.default_rng(0).normal(size=(5, 6, 3, 3)).astype(np.float32)
    path = save_nifti(tmp_path / "d.nii.gz", field, np.diag([1.5, 1.5, 10.0, 1.0]), vector=True)
    img = nib.load(path)
    assert img.shape == (5, 6, 3, 1, 3) and img.header.get_intent()[0] == "vector"
    assert np.allclose(np.asarray(img.dataobj)[:, :, :, 0], field)
    save_json(tmp_path / "m.json", {"dice": float("nan"), "x": np.float32(0.5)})
    assert json.loads((tmp_path / "m.json").read_text()) == {"dice": None, "x": 0.5}
