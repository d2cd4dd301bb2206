"""TensorBoard content, overlay picture, sweeps with one summary, cohorts that survive a bad subject, resume."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from matplotlib.image import imread
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mvmm_monai import compose_config, fit
from mvmm_monai.data.synthetic import SyntheticConfig, ensure_cohort

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["callbacks.progress.refresh_rate=0"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def run(out: Path, cache_dir: Path, *overrides: str) -> dict:
    return fit(compose_config([f"paths.output_dir={out}", f"paths.cache_dir={cache_dir}", *QUIET, *overrides]))


def overlay_fit(out: Path, cache_dir: Path, every: int, fraction: str) -> tuple[dict, EventAccumulator]:
    """A 12-iteration fit of patient2 with the overlay every ``every`` iterations within the time
    budget ``fraction``; its metrics and its TensorBoard events (every image kept)."""
    metrics = run(out, cache_dir, "subject=patient2", "trainer.max_epochs=12", f"callbacks.overlay.every_n_iterations={every}",
                  "model.dice_every_n_iterations=5",
                  f"callbacks.overlay.max_time_fraction={fraction}")
    ea = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    ea.Reload()
    return metrics, ea


def test_tensorboard_scalars_images_hparams_and_overlay_png(tmp_path, cache_dir):
    out = tmp_path / "fit"
    metrics, ea = overlay_fit(out, cache_dir, 5, "null")
    tags = ea.Tags()
    for tag in ("em/log_likelihood", "em/lower_bound", "em/relative_change", "em/pi/myocardium", "dice/DE/myocardium", "dice/C0/lv", "dice/T2/rv"):
        assert tag in tags["scalars"], tag
    # the per-iteration Dice on its schedule: the first iteration and every 5th (its steps count from 0)
    assert [e.step for e in ea.Scalars("dice/DE/myocardium")] == [0, 4, 9]
    assert len(ea.Scalars("em/log_likelihood")) == 12
    assert "overlay" in tags["images"]
    steps = [e.step for e in ea.Images("overlay")]
    assert steps == [5, 10, 12]  # every 5th iteration, whatever it costs (no time budget), and the end
    assert "_hparams_/session_start_info" in tags["tensors"] or ea.PluginTagToContent("hparams")
    png = imread(out / "patient2_overlay.png")
    assert png.shape[:2] == (360, 1600)  # 5 panels of 3.2 x 3.6 inches at 100 dpi
    assert png[..., :3].std() > 0.05, "overlay is blank"
    assert metrics["iterations"] == 12
    # the montage: every slice of the reference with the label contours (and scar, patient2 has some)
    assert [e.step for e in ea.Images("montage")] == [12]
    # TensorBoard holds the final pictures as written, byte for byte
    assert ea.Images("montage")[0].encoded_image_string == (out / "patient2_montage.png").read_bytes()
    assert ea.Images("overlay")[-1].encoded_image_string == (out / "patient2_overlay.png").read_bytes()
    montage = imread(out / "patient2_montage.png")[..., :3]
    slices = nib.load(out / "patient2_DE_seg.nii.gz").shape[2]
    rows = -(-slices // 6)
    assert montage.shape[0] == int(round(100 * (2.4 * rows + 0.75)))  # and a two-line title: what, and the QC verdict
    assert metrics["qc"]["score"] >= 0 and isinstance(metrics["qc"]["flag"], bool)
    r, g, b = (montage[..., i].astype(float) for i in range(3))
    yellow = (r > 0.8) & (g > 0.8) & (b < 0.3)
    magenta = (r > 0.8) & (g < 0.3) & (b > 0.8)
    assert yellow.sum() > 100, "no myocardium contour in the montage"
    assert (magenta.sum() > 10) == (metrics["scar"]["volume_ml"] > 0)


def test_overlay_time_budget_keeps_pictures_off_a_short_fit(tmp_path, cache_dir):
    # a budget no overlay fits in: only the final overlay is drawn, the fit and its outputs unchanged
    out = tmp_path / "fit"
    metrics, ea = overlay_fit(out, cache_dir, 2, "0.001")
    assert [e.step for e in ea.Images("overlay")] == [12]
    assert metrics["iterations"] == 12 and (out / "patient2_overlay.png").is_file()


def test_sweep_of_three_subtype_settings_writes_one_summary(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "MVMM_CACHE_DIR": str(cache_dir)}
    cmd = [sys.executable, str(ROOT / "scripts" / "fit.py"), "-m", "model.subtypes.myocardium=1,2,3",
           "trainer.max_epochs=4", f"hydra.sweep.dir={sweep}", "callbacks.progress.refresh_rate=0"]
    subprocess.run(cmd, check=True, cwd=tmp_path, env=env, capture_output=True, timeout=600)
    rows = list(csv.DictReader((sweep / "summary.csv").read_text().splitlines()))
    assert [r["model.subtypes.myocardium"] for r in rows] == ["1", "2", "3"]
    assert all(r["status"] == "ok" and float(r["dice/DE/lv"]) > 0.8 for r in rows)
    assert (sweep / "summary.md").read_text().count("\n") == 2 + 3
    for job in ("0", "1", "2"):
        assert (sweep / job / "patient1_DE_seg.nii.gz").is_file()


@pytest.mark.parametrize("batch_size", [1, 3])  # one after another; in one batch (tests/test_cohort_batch.py)
def test_cohort_finishes_the_others_and_reports_the_bad_subject(tmp_path, cache_dir, batch_size):
    data = tmp_path / "data"
    shutil.copytree(ensure_cohort(cache_dir, SyntheticConfig(misalignment=False)), data)
    bad = data / "patient2_T2.nii.gz"
    img = nib.load(bad)
    nib.save(nib.Nifti1Image(np.full(img.shape, np.nan, dtype=np.float32), img.affine), bad)
    out = tmp_path / "cohort"
    summary = run(out, cache_dir, "data=mscmr", f"data.root={data}", f"atlas.path={data / 'atlas.nii.gz'}", "atlas.placement=identity",
                  "subject=[patient1,patient2,patient3]", "trainer.max_epochs=5", "~logger", f"cohort.batch_size={batch_size}")
    assert summary["subjects"] == ["patient1", "patient3"]
    assert "patient2_T2.nii.gz" in summary["failed"]["patient2"] and "NaN" in summary["failed"]["patient2"]
    rows = list(csv.DictReader((out / "cohort_summary.csv").read_text().splitlines()))
    assert rows[0]["subject"] == "patient2" and rows[0]["status"] == "failed"  # failed first, then flagged, then the rest
    assert sorted(r["subject"] for r in rows[1:3]) == ["patient1", "patient3"] and [r["subject"] for r in rows[3:]] == ["mean", "std"]
    mean = float(rows[3]["dice/DE/lv"])
    assert mean == pytest.approx(np.mean([float(rows[1]["dice/DE/lv"]), float(rows[2]["dice/DE/lv"])]))
    assert (out / "patient1" / "metrics.json").is_file() and not (out / "patient2" / "metrics.json").exists()
    assert not any(p.name.startswith(".") and p.is_dir() for p in (out / "patient2").iterdir())  # no staging left


def test_resumed_fit_matches_the_uninterrupted_one(tmp_path, cache_dir):
    common = ["subject=patient3", "model.tol=0", "~logger"]
    whole = run(tmp_path / "whole", cache_dir, *common, "trainer.max_epochs=12")
    run(tmp_path / "part", cache_dir, *common, "trainer.max_epochs=5")  # "killed" after 5 iterations
    assert (tmp_path / "part" / "checkpoints" / "last.ckpt").is_file()
    resumed = run(tmp_path / "part", cache_dir, *common, "trainer.max_epochs=12", "ckpt_path=last")
    assert resumed["iterations"] == whole["iterations"] == 12
    assert resumed["log_likelihood"] == pytest.approx(whole["log_likelihood"], abs=1e-6)
    for seq in ("DE", "C0", "T2"):
        for k, v in whole["dice"][seq].items():
            assert resumed["dice"][seq][k] == pytest.approx(v, abs=1e-6)
    a = json.loads((tmp_path / "whole" / "params.json").read_text())["subtypes"]
    b = json.loads((tmp_path / "part" / "params.json").read_text())["subtypes"]
    assert np.allclose(a["DE"]["myocardium"]["mu"], b["DE"]["myocardium"]["mu"], atol=1e-6)


def test_resumed_registration_fit_matches_the_uninterrupted_one(tmp_path, cache_dir, one_thread):
    """registration=full: the atlas deformation, the slice shifts, Adam's moments and the step-size
    schedule are in the checkpoint; a fit resumed before the slice-shift search (iteration 8, on a
    schedule shortened for the test) ends where the uninterrupted one does. On one thread: the
    registration's backward pass on two threads sums in an order that varies from run to run
    (measured on two threads: the resumed and the uninterrupted slice shifts 3e-5 mm apart in some
    runs, also before the EM's thread changes)."""
    # guard off: quality control (calibrated on real MyoPS) flags these short synthetic fits, and the
    # guard would keep the fit without registration
    common = ["subject=patient3", "data.misalignment=true", "registration=full", "registration.guard=false", "model.tol=0", "~logger",
              "callbacks.progress.refresh_rate=0", "registration.schedule.warmup=3", "registration.schedule.scale_start=[0,3]",
              "registration.schedule.shift_search_at=[5]", "registration.schedule.shift_gradient_exact_after=8"]
    whole = run(tmp_path / "whole", cache_dir, *common, "trainer.max_epochs=16")
    run(tmp_path / "part", cache_dir, *common, "trainer.max_epochs=5")
    resumed = run(tmp_path / "part", cache_dir, *common, "trainer.max_epochs=16", "ckpt_path=last")
    assert resumed["iterations"] == whole["iterations"] == 16
    assert resumed["log_likelihood"] == pytest.approx(whole["log_likelihood"], abs=1e-6)
    assert resumed["dice"]["DE"] == pytest.approx(whole["dice"]["DE"], abs=1e-6)
    a = json.loads((tmp_path / "whole" / "params.json").read_text())["slice_shifts_mm"]
    b = json.loads((tmp_path / "part" / "params.json").read_text())["slice_shifts_mm"]
    assert a.keys() == b.keys() == {"C0", "T2"}
    for seq in a:
        assert np.allclose(a[seq], b[seq], atol=1e-5)
        assert np.abs(np.asarray(a[seq])).max() > 1.0  # the shifts did move


def test_shards_partition_the_cohort():
    from mvmm_monai.cohort.distributed import CohortShards

    names = [f"s{i}" for i in range(7)]
    mod = CohortShards(None, names, Path("."), fit_cohort=None)
    for world in (1, 2, 3):
        shards = [mod.shard(r, world) for r in range(world)]
        assert sorted(sum(shards, [])) == sorted(names)  # every subject exactly once


@pytest.mark.slow
def test_two_cpu_processes_give_the_one_process_result(tmp_path, cache_dir, capfd):
    common = ["subject=[patient1,patient2]", "trainer.max_epochs=6", "trainer.accelerator=cpu"]
    one = run(tmp_path / "one", cache_dir, *common, "trainer.devices=1")
    capfd.readouterr()
    two = run(tmp_path / "two", cache_dir, *common, "trainer.devices=2")
    err = capfd.readouterr().err
    assert "configure_optimizers" not in err and "LeafSpec" not in err  # the spawned shards keep Lightning's notes quiet too
    assert two["subjects"] == one["subjects"] == ["patient1", "patient2"] and not two["failed"]
    for key, value in one["mean"].items():
        if key.startswith("dice/"):
            assert two["mean"][key] == pytest.approx(value, abs=1e-4), key
    for name in ("patient1", "patient2"):
        a = json.loads((tmp_path / "one" / name / "metrics.json").read_text())
        b = json.loads((tmp_path / "two" / name / "metrics.json").read_text())
        assert b["dice"]["DE"]["myocardium"] == pytest.approx(a["dice"]["DE"]["myocardium"], abs=1e-4)
        assert (tmp_path / "two" / name / "tensorboard").is_dir()
        assert (tmp_path / "two" / name / "checkpoints" / "last.ckpt").is_file()
    # the summary is written once, by the launching process
    assert len(list((tmp_path / "two").glob("cohort_summary.*"))) == 3


@pytest.mark.slow
def test_a_killed_fit_resumes_to_the_uninterrupted_result(tmp_path, cache_dir):
    import signal
    import time

    common = ["subject=patient4", "model.tol=0", "model.posterior_tol=0", "trainer.max_epochs=60", "~logger",
              "callbacks.progress.refresh_rate=0"]
    out = tmp_path / "killed"
    # the killed process computes with as many threads as the in-process fits: float sums over 1 and
    # 2 threads differ in the last bits, and the comparison below is to 1e-6
    import torch

    env = {**os.environ, "MVMM_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    ensure_cohort(cache_dir, SyntheticConfig(misalignment=False))  # generated before the clock starts
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "fit.py"), f"paths.output_dir={out}", *common],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not ckpt.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert ckpt.is_file() and not (out / "metrics.json").exists(), "the fit was not killed mid-way"
    assert not list(out.glob("*.nii.gz")), "a killed fit left result files"
    resumed = run(out, cache_dir, *common, "ckpt_path=last")
    whole = run(tmp_path / "whole", cache_dir, *common)
    assert resumed["iterations"] == whole["iterations"] == 60
    assert resumed["log_likelihood"] == pytest.approx(whole["log_likelihood"], abs=1e-6)
    assert resumed["dice"]["DE"] == pytest.approx(whole["dice"]["DE"], abs=1e-6)


def test_resuming_a_fit_that_had_stopped_on_its_criterion_adds_no_iteration(tmp_path, cache_dir):
    """The checkpoint of a fit's last iteration does not hold the callbacks' decision to stop:
    resumed from it (say the process died while writing the results), the fit stops again at once."""
    common = ["subject=patient4", "~logger", "callbacks.progress.refresh_rate=0"]
    first = run(tmp_path / "fit", cache_dir, *common)
    assert first["converged"] and first["iterations"] < 100
    again = run(tmp_path / "fit", cache_dir, *common, "ckpt_path=last")
    assert again["iterations"] == first["iterations"]
    assert again["dice"]["DE"] == pytest.approx(first["dice"]["DE"], abs=1e-6)
