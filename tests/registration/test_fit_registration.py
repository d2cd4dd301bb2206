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
    # guard off: the files hold the registered fit (quality control, calibrated on real MyoPS, flags
    # a short synthetic fit either way, and the guard would keep the fit without registration)
    metrics = fit(compose_config(overrides(out, cache_dir, "trainer.max_epochs=14", "registration.schedule.warmup=8",
                                           "registration.guard=false")))
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
    assert "registration_guard" not in metrics


def _qc(score: float, flag: bool, linear: float) -> dict:
    return {"score": score, "flag": flag, "features": {"linear": linear}}


@pytest.mark.parametrize(
    "registered, none, kept, why",
    [
        (_qc(0.85, False, 0.80), _qc(0.60, True, 0.55), "registered", "the registered fit is not and scores higher"),
        (_qc(0.85, False, 0.80), _qc(0.80, False, 0.75), "none", "nothing to repair"),  # higher, but none is trusted
        (_qc(0.80, False, 0.75), _qc(0.65, True, 0.80), "none", "not above"),
        (_qc(0.74, True, 0.70), _qc(0.49, True, 0.45), "none", "flagged by quality control"),  # both flagged: as acquired
        (_qc(0.70, True, 0.65), _qc(0.85, False, 0.80), "none", "nothing to repair"),
        (None, _qc(0.85, False, 0.80), "none", "nothing to repair"),  # trusted: the registered fit is not made
    ],
)
def test_the_guard_keeps_a_registered_fit_only_where_it_repairs_a_fit_quality_control_does_not_trust(registered, none, kept, why):
    from types import SimpleNamespace

    from mvmm_monai.pipeline.fit import guard_decision

    model = SimpleNamespace(linear_score=lambda features: features["linear"])
    d = guard_decision(model, registered, none)
    assert d["kept"] == kept and why in d["why"]
    assert d["qc_flag"] == {"registered": registered and registered["flag"], "none": none["flag"]}
    assert d["qc_linear_score"] == {"registered": registered and registered["features"]["linear"], "none": none["features"]["linear"]}


def test_the_guard_needs_the_registered_fit_where_the_fit_without_registration_is_flagged():
    from types import SimpleNamespace

    from mvmm_monai.pipeline.fit import guard_decision

    model = SimpleNamespace(linear_score=lambda features: features["linear"])
    with pytest.raises(ValueError, match="the registered fit is needed"):
        guard_decision(model, None, _qc(0.6, True, 0.55))


@pytest.mark.slow
def test_a_registration_that_moves_nothing_is_not_fitted_a_second_time(tmp_path, cache_dir):
    # slices as acquired: registration=slice_align's edges find nothing to gain, so its fit is the fit
    # without registration, and the guard (which flags these short synthetic fits) does not repeat it
    common = [f"paths.cache_dir={cache_dir}", "callbacks.progress.refresh_rate=0", "subject=patient1", "~logger"]
    none = fit(compose_config([*common, f"paths.output_dir={tmp_path / 'none'}", "registration=none"]))
    held = fit(compose_config([*common, f"paths.output_dir={tmp_path / 'held'}", "registration=slice_align",
                               "registration.guard=false"]))
    guarded = fit(compose_config([*common, f"paths.output_dir={tmp_path / 'guarded'}", "registration=slice_align"]))
    gains = json.loads((tmp_path / "held" / "params.json").read_text())["slice_alignment_gain"]
    assert max(g for seq in gains.values() for g in seq) < 0.15  # no slice moved
    assert held["iterations"] == none["iterations"] and held["dice"] == none["dice"]  # not held open for phases that never come
    entry = guarded["registration_guard"]
    assert entry["kept"] == "none" and "moves nothing" in entry["why"] and entry["qc_score"]["registered"] is None
    assert guarded["dice"] == none["dice"]


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
                                   "registration.model.slice_motion.max_shift_mm=0.05", "registration.guard=false"))
    with pytest.raises(RegistrationError, match=r"ICM iteration 4: a slice shift of .* exceeds"):
        fit(cfg)
    assert not list(out.glob("*.nii.gz")) and not (out / "metrics.json").exists()


def test_a_guarded_blow_up_keeps_the_fit_without_registration_and_says_why(tmp_path, cache_dir, caplog):
    # the same blow-up with the guard (the presets' default): quality control flags the synthetic fit
    # without registration, so the registered fit is made; it blows up, and the slices as acquired stand
    out = tmp_path / "fit"
    common = ["trainer.max_epochs=20", "registration.schedule.warmup=3", "~logger"]
    none = fit(compose_config([*overrides(tmp_path / "none", cache_dir, "trainer.max_epochs=20", "~logger"), "registration=none"]))
    with caplog.at_level("WARNING"):
        metrics = fit(compose_config(overrides(out, cache_dir, *common, "registration.model.slice_motion.max_shift_mm=0.05")))
    entry = metrics["registration_guard"]
    assert entry["kept"] == "none" and entry["qc_flag"] == {"registered": None, "none": True}
    assert re.search(r"the registered fit failed: registration blew up at ICM iteration 4: a slice shift", entry["why"])
    assert any("the registered fit failed" in r.getMessage() for r in caplog.records)
    assert metrics["dice"] == none["dice"]  # the files hold the fit without registration
    assert (out / "metrics.json").exists() and (out / "patient1_DE_seg.nii.gz").exists()
    assert json.loads((out / "metrics.json").read_text())["registration_guard"]["kept"] == "none"
