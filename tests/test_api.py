"""The Python API and the command line as a user meets them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import mvmm_monai
from mvmm_monai.data.synthetic import SyntheticConfig, ensure_cohort

QUIET = ["callbacks.progress.refresh_rate=0", "~logger"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return ensure_cohort(tmp_path_factory.mktemp("cache"), SyntheticConfig(misalignment=False))


@pytest.mark.slow
def test_segment_in_memory_and_on_disk(cohort, tmp_path):
    images = {s: cohort / f"patient1_{s}.nii.gz" for s in ("DE", "C0", "T2")}
    images["C0"] = nib.load(images["C0"])  # a nibabel image works as well as a path
    seg = mvmm_monai.segment(images, cohort / "atlas.nii.gz", label=cohort / "patient1_DE_manual.nii.gz",
                             overrides=["trainer.max_epochs=25", *QUIET], subject="p1")
    assert seg.output_dir is None
    for s in ("DE", "C0", "T2"):
        src = nib.load(cohort / f"patient1_{s}.nii.gz")
        assert seg.labels[s].shape == src.shape and np.allclose(seg.labels[s].affine, src.affine)
    assert seg.metrics["dice"]["DE"]["lv"] > 0.85 and seg.metrics["postprocess"] == "mscmr"
    post = np.asarray(seg.posterior.dataobj)
    assert post.shape[-1] == 4 and np.allclose(post.sum(-1), 1.0, atol=1e-4)
    assert seg.params["settings"]["postprocess"]["lv_cavity_fill"] == "hull"

    out = tmp_path / "written"
    again = mvmm_monai.segment(images, cohort / "atlas.nii.gz", output_dir=out,
                               overrides=["trainer.max_epochs=25", "postprocess=none", *QUIET], subject="p1")
    assert (out / "metrics.json").is_file() and (out / "p1_DE_seg.nii.gz").is_file() and again.output_dir == out
    # the posterior is the mixture's whatever the labelling conventions: the same fit, the same file
    assert np.array_equal(np.asarray(again.posterior.dataobj), post)
    assert again.params["settings"]["postprocess"]["name"] == "none"


def test_segment_refuses_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="segment: DE: no such file"):
        mvmm_monai.segment({"DE": tmp_path / "missing.nii.gz"}, tmp_path / "atlas.nii.gz")
    with pytest.raises(ValueError, match="images is empty"):
        mvmm_monai.segment({}, tmp_path / "atlas.nii.gz")


def test_command_line_user_error_is_one_line(tmp_path):
    """A user error ends in one ERROR line and exit status 1, not a traceback."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    cmd = [sys.executable, "-m", "mvmm_monai.cli", "subject=../evil", f"paths.output_dir={tmp_path / 'out'}"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    text = run.stdout + run.stderr
    assert run.returncode == 1, text
    assert "cannot name an output" in text and "Traceback" not in text
    assert not (tmp_path / "evil").exists() and not (tmp_path / "outputs").exists()
    assert (tmp_path / "out" / ".hydra").is_dir()  # Hydra's run files go beside the results


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "", "a\\b"])
def test_subject_names_never_leave_the_output_folder(name, tmp_path):
    from mvmm_monai.data.datasets import FilesDataset, check_subject_name

    with pytest.raises(ValueError, match="cannot name an output"):
        check_subject_name(name)
    with pytest.raises(ValueError, match="cannot name an output"):
        FilesDataset(images={"DE": str(tmp_path / "x.nii.gz")}, subject=name)


def test_a_fit_leaves_the_garbage_collector_as_it_found_it():
    # a fit freezes the heap it finds (the imported libraries are never walked by a full
    # collection during it) and gives it back; a caller's own freeze stays
    import gc

    from mvmm_monai.cohort.run import heap_frozen

    if gc.get_freeze_count():
        pytest.skip("something in this process froze the heap already")
    with heap_frozen():
        frozen = gc.get_freeze_count()
        made = [[]]  # a new object: collected as usual, not frozen
        assert frozen > 0 and gc.is_tracked(made)
        with heap_frozen():  # nested, as a cohort's subjects are
            pass
        assert gc.get_freeze_count() >= frozen
    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        kept = gc.get_freeze_count()
        with heap_frozen():
            pass
        assert gc.get_freeze_count() >= kept > 0
    finally:
        gc.unfreeze()
