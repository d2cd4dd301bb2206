"""Registration inside the Lightning fit: outputs, TensorBoard regularisers, blow-up handling."""

from __future__ import annotations

import re

import json

import nibabel as nib
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mvmm_monai import compose_config, fit
from mvmm_monai.registration import RegistrationError


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def overrides(out, cache_dir, *extra):
    return [f"paths.output_dir={out}", f"paths.cache_dir={cache_dir}", "callbacks.progress.refresh_rate=0",
            "subject=patient1", "data.misalignment=true", "registration=full", *extra]


@pytest.mark.slow
def test_full_registration_fit_writes_shifts_and_displacement(tmp_path, cache_dir):
    out = tmp_path / "fit"
    metrics = fit(compose_config(overrides(out, cache_dir, "trainer.max_epochs=14", "registration.schedule.warmup=8")))
    params = json.loads((out / "params.json").read_text())
    assert [len(params["slice_shifts_mm"][s]) for s in ("C0", "T2")] == [10, 5]
    moved = [abs(v) for row in params["slice_shifts_mm"]["C0"] for v in row]
    assert max(moved) > 0.1  # the shifts were fitted after the warm-up
    disp = nib.load(out / "patient1_displacement_mm.nii.gz")
    assert disp.shape == (112, 112, 10, 1, 3) and disp.header.get_intent()[0] == "vector"
    assert abs(disp.get_fdata()[..., 2]).max() == 0.0  # thick slices: nothing moves through-plane
    ea = EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    assert {"reg/bending", "reg/loss"} <= set(ea.Tags()["scalars"])
    assert metrics["iterations"] == 14
    # the misaligned slices are better registered by the model's own judgement: the guard keeps it
    guard = metrics["registration_guard"]
    assert guard["kept"] == "registered" and guard["qc_linear_score"]["registered"] > guard["qc_linear_score"]["none"]


@pytest.mark.parametrize(("extra", "message"), [
    (["registration.guard=maybe"], "registration.guard must be true or false, got 'maybe'"),
    (["~qc"], "registration.guard=true keeps the registration only where the quality-control score"),
])
def test_a_guard_that_cannot_judge_is_refused_before_any_work(tmp_path, cache_dir, extra, message):
    out = tmp_path / "fit"
    with pytest.raises(ValueError, match=re.escape(message)):
        fit(compose_config(overrides(out, cache_dir, *extra)))
    assert not out.exists() or not any(out.iterdir())


def test_a_blow_up_names_the_iteration_and_writes_nothing(tmp_path, cache_dir):
    out = tmp_path / "fit"
    cfg = compose_config(overrides(out, cache_dir, "trainer.max_epochs=20", "registration.schedule.warmup=3",
                                   "registration.model.slice_motion.max_shift_mm=0.05"))
    with pytest.raises(RegistrationError, match=r"ICM iteration 4: a slice shift of .* exceeds"):
        fit(cfg)
    assert not list(out.glob("*.nii.gz")) and not (out / "metrics.json").exists()
