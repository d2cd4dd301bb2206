"""Result files are written atomically and as a whole: a crash mid-write leaves neither a truncated file
nor a temporary, a result folder is complete or holds nothing that looks complete, and is never shared."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from mvmm_monai.files import save_json, save_nifti
from mvmm_monai.pipeline.checkpoint import ICMCheckpoint
from mvmm_monai.pipeline.outputs import ResultFolder


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


def test_files_get_the_permissions_of_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_json(tmp_path / "m.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # group and others can read, as for any new file


def test_result_folder_commits_whole_results_metrics_last(tmp_path):
    out = tmp_path / "fit"
    with ResultFolder(out, "case1") as folder:
        save_json(folder.staging / "params.json", {"p": 1})
        save_json(folder.staging / "metrics.json", {"subject": "case1"})
        assert not (out / "params.json").exists()  # nothing visible before the commit
        folder.commit()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["metrics.json", "params.json"]
    assert not (out / ".staging").exists()


def test_result_folder_failure_keeps_the_previous_result(tmp_path):
    out = tmp_path / "fit"
    with ResultFolder(out, "case1") as folder:
        save_json(folder.staging / "metrics.json", {"subject": "case1", "run": 1})
        folder.commit()
    with pytest.raises(KeyError):
        with ResultFolder(out, "case1") as folder:
            save_json(folder.staging / "metrics.json", {"subject": "case1", "run": 2})
            raise KeyError("killed")
    assert json.loads((out / "metrics.json").read_text())["run"] == 1
    assert not (out / ".staging").exists()


def test_result_folder_cleans_leftovers_of_a_killed_fit(tmp_path):
    out = tmp_path / "fit"
    (out / ".staging").mkdir(parents=True)
    (out / ".staging" / "case1_LGE_seg.nii.gz").write_bytes(b"half")
    (out / ".case1_scar.nii.gz.abc.tmp.nii.gz").write_bytes(b"")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / ".last.ckpt.tmp").write_bytes(b"trunc")
    (out / "data").mkdir()
    (out / "data" / ".notes.tmp.txt").write_text("the user's own file")
    with ResultFolder(out, "case1"):
        assert not list(out.glob(".*.tmp*")) and not list((out / "checkpoints").glob(".*.tmp*"))
        assert not list((out / ".staging").iterdir())
        assert (out / "data" / ".notes.tmp.txt").is_file()  # what the fit never writes is left alone


def test_two_fits_cannot_share_a_folder(tmp_path):
    out = tmp_path / "fit"
    with ResultFolder(out, "case1"):
        with pytest.raises(FileExistsError, match="another fit is writing into this folder"):
            with ResultFolder(out, "case2"):
                pass
    with ResultFolder(out, "case1") as folder:
        save_json(folder.staging / "metrics.json", {"subject": "case1"})
        folder.commit()
    with pytest.raises(FileExistsError, match="holds the results of subject 'case1'"):
        with ResultFolder(out, "case2"):
            pass


def test_checkpoint_is_never_truncated(tmp_path):
    """A disk that fills up while a checkpoint is written leaves the previous one whole."""
    last = tmp_path / "last.ckpt"
    last.write_bytes(b"complete checkpoint")

    def full_disk(path, weights_only=False):
        Path(path).write_bytes(b"trunc")
        raise OSError("No space left on device")

    trainer = SimpleNamespace(save_checkpoint=full_disk, global_step=0, is_global_zero=True, loggers=[], current_epoch=4)
    with pytest.raises(OSError, match="No space left"):
        ICMCheckpoint(dirpath=tmp_path)._save_checkpoint(trainer, str(last))
    assert last.read_bytes() == b"complete checkpoint" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]

    def fine(path, weights_only=False):
        Path(path).write_bytes(b"new checkpoint")

    ICMCheckpoint(dirpath=tmp_path)._save_checkpoint(SimpleNamespace(**{**vars(trainer), "save_checkpoint": fine}), str(last))
    assert last.read_bytes() == b"new checkpoint" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_checkpoints_follow_every_n_epochs_and_the_last_iteration(tmp_path, monkeypatch):
    """A 12-iteration fit with ``every_n_epochs=5`` writes at iterations 5, 10 and 12 (its last), not 12 times."""
    from mvmm_monai import compose_config, fit

    saved = []
    write = ICMCheckpoint._save_checkpoint
    monkeypatch.setattr(ICMCheckpoint, "_save_checkpoint", lambda self, trainer, path: (saved.append(trainer.current_epoch), write(self, trainer, path)))
    out = tmp_path / "out"
    fit(compose_config([f"paths.output_dir={out}", f"paths.cache_dir={tmp_path / 'cache'}", "subject=patient1", "trainer.max_epochs=12",
                        "model.tol=1e-12", "callbacks.progress.refresh_rate=0", "~logger", "~callbacks.overlay",
                        "callbacks.checkpoint.every_n_epochs=5"]))
    assert saved == [4, 9, 11]
    assert (out / "checkpoints" / "last.ckpt").is_file()
