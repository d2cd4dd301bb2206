"""The ICM schedule on its own (which parts train, searches, the exact gradient, the last switch),
and the presets' Hydra configs building the composite and the schedule."""

from __future__ import annotations

import pytest
import torch

from mvmm_monai import compose_config
from mvmm_monai.config import build
from mvmm_monai.registration import ICMSchedule, Parts
from tests.registration.test_registration import registration, tiny_subject


def test_parts_train_after_the_warm_up_each_from_its_start():
    s = ICMSchedule(warmup=3, slice_shift_start=2, scale_start=(0, 5))
    assert s.trains(2) == Parts(affine=False, velocity=(False, False), slice_motion=False)
    assert s.trains(3) == Parts(affine=True, velocity=(True, False), slice_motion=False)
    assert s.trains(5) == Parts(affine=True, velocity=(True, False), slice_motion=True)
    assert s.trains(8) == Parts(affine=True, velocity=(True, True), slice_motion=True)


def test_searches_and_the_exact_gradient_count_shift_iterations():
    s = ICMSchedule(warmup=10, slice_shift_start=2, shift_search_at=[0, 25], shift_gradient_exact_after=32)
    assert s.shift_search_at == (0, 25)  # Hydra's list stored as a tuple: the schedule stays frozen and hashable
    assert [i for i in range(80) if s.search_due(i)] == [12, 37]
    assert not s.exact_gradient(43) and s.exact_gradient(44) and s.exact_gradient(70)
    never = ICMSchedule(warmup=0)
    assert not any(never.search_due(i) or never.exact_gradient(i) for i in range(100))
    with pytest.raises(AttributeError):
        s.warmup = 3  # frozen


def test_schedule_end_is_the_last_switch_of_the_parts_present():
    s = ICMSchedule(warmup=10, scale_start=(0, 15), shift_search_at=(30,), shift_gradient_exact_after=35)
    everything = Parts(affine=True, velocity=(True, True), slice_motion=True)
    assert s.schedule_end(everything) == 45  # the fit may not stop before the exact gradient switches on
    assert s.schedule_end(Parts(affine=True, velocity=(True, True))) == 25  # the fine scale starting
    assert s.schedule_end(Parts(affine=True)) == 10  # the warm-up's end
    assert s.schedule_end(Parts(slice_motion=True)) == 45
    assert s.schedule_end(Parts()) == 0  # registration=none: nothing is scheduled


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"warmup": -1}, "warmup and slice_shift_start must be >= 0"),
        ({"slice_shift_start": -2}, "warmup and slice_shift_start must be >= 0"),
        ({"scale_start": (0, -1)}, "registration.schedule.scale_start must hold iterations >= 0"),
        ({"shift_search_at": (-1,)}, "registration.schedule.shift_search_at must hold iterations >= 0"),
        ({"shift_gradient_exact_after": -1}, "registration.schedule.shift_gradient_exact_after must be >= 0 or null"),
    ],
)
def test_bad_schedules_name_the_config_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ICMSchedule(**kwargs)


@pytest.mark.parametrize(
    ("preset", "parts", "searches"),
    [
        ("none", Parts(), []),
        ("slice_shift", Parts(slice_motion=True), [10, 35, 70]),
        ("full", Parts(affine=True, velocity=(True, True), slice_motion=True), [35]),
        ("atlas_only", Parts(affine=True, velocity=(True, True)), []),
    ],
)
def test_presets_build_the_composite_and_the_schedule(tmp_path, preset, parts, searches):
    """``registration.model`` is a partial taking the subject, the atlas and the floor (what
    ``run_icm`` calls); ``registration.schedule`` an :class:`ICMSchedule`."""
    cfg = compose_config([f"paths.output_dir={tmp_path}", f"registration={preset}"])
    subject, atlas = tiny_subject(dtype=torch.float32)
    reg = build(cfg.registration.model)(subject=subject, atlas=atlas, atlas_floor=cfg.model.atlas_floor)
    assert reg.parts == parts
    if preset == "none":
        assert cfg.registration.get("schedule") is None and cfg.registration.optimizer is None
        return
    schedule = build(cfg.registration.schedule)
    assert isinstance(schedule, ICMSchedule) and schedule.settle
    assert [i for i in range(100) if parts.slice_motion and schedule.search_due(i)] == searches
    assert schedule.schedule_end(reg.parts) == {"slice_shift": 70, "full": 42, "atlas_only": 25}[preset]
    assert {g["name"]: g["lr"] for g in reg.param_groups()} == {
        "slice_shift": {"slice_shift": 0.3},
        "full": {"translation": 0.5, "affine": 0.01, "svf": 0.05, "slice_shift": 0.3},
        "atlas_only": {"translation": 0.5, "affine": 0.01, "svf": 0.05},
    }[preset]


def test_the_fit_module_asks_for_a_schedule_that_matches_the_registration():
    from mvmm_monai.pipeline.module import MvMMFit

    subject, atlas = tiny_subject(dtype=torch.float32)
    counts = torch.ones(2, 4, dtype=torch.long)
    moving = registration(subject, atlas, deformation={"scales": (4, 2)}, motion={})
    with pytest.raises(ValueError, match="registration.schedule is required"):
        MvMMFit(subject, moving, counts)
    with pytest.raises(ValueError, match="registration.schedule.scale_start must give one start per velocity scale"):
        MvMMFit(subject, moving, counts, schedule=ICMSchedule(scale_start=(0,)))
    fit = MvMMFit(subject, moving, counts, schedule=ICMSchedule(warmup=4, scale_start=(0, 3), shift_search_at=(2,)))
    assert fit.schedule_end == 7
    assert MvMMFit(subject, registration(subject, atlas), counts).schedule_end == 0  # registration=none
