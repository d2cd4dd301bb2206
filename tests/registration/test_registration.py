"""Registration: identity at zero, exact gradients, parts switched by the schedule, in-plane choice,
blow-up detection, the regularisers, the smoothed gradient and the whole-voxel search."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch.func import functional_call

from mvmm_monai.classes import MSCMR_LABELS
from mvmm_monai.data.common_space import Grid
from mvmm_monai.data.datasets import SubjectFiles
from mvmm_monai.data.subject import SubjectData
from mvmm_monai.mixture import EMConfig, initialise_from_atlas, log_likelihood
from mvmm_monai.registration import (
    AtlasDeformation,
    ICMSchedule,
    Registration,
    RegistrationError,
    SliceMotion,
    thick_slices,
)
from mvmm_monai.registration._monai import bending_energy
from mvmm_monai.registration.atlas_deformation import min_jacobian
from tests.conftest import smooth_atlas


def tiny_subject(shape=(12, 12, 3), dtype=torch.float64, seed=0) -> tuple[SubjectData, torch.Tensor]:
    """Two sequences (DE, C0) on one thick-slice grid (1.5 x 1.5 x 8 mm) drawn from a smooth atlas
    ``[4, *shape]``; returns ``(subject, atlas)``."""
    g = torch.Generator().manual_seed(seed)
    atlas = smooth_atlas(shape[:2], 4, g, dtype=dtype)[0, ..., None].expand(4, *shape).clone()
    labels = atlas.argmax(0)
    means = torch.tensor([[0.1, 0.5, 0.9, 0.7], [0.6, 0.2, 0.8, 0.4]], dtype=dtype)
    images = torch.stack([means[n][labels] + 0.05 * torch.randn(shape, generator=g, dtype=dtype) for n in range(2)])
    affine = torch.diag(torch.tensor([1.5, 1.5, 8.0, 1.0], dtype=torch.float64))
    grids = {"DE": Grid(affine, shape), "C0": Grid(affine.clone(), shape)}
    files = SubjectFiles("tiny", {}, {}, MSCMR_LABELS, "DE")
    subject = SubjectData(
        name="tiny", sequences=("DE", "C0"), grids=grids,
        native_images={"DE": images[:1], "C0": images[1:]},
        images=images, coverage=torch.ones_like(images), labels={}, label_map=MSCMR_LABELS, files=files,
    )
    return subject, atlas


def registration(subject, atlas, deformation: dict | None = None, motion: dict | None = None, **kwargs) -> Registration:
    """The composite as ``registration.model`` builds it: ``deformation`` / ``motion`` are the
    parts' settings (``None``: the part is absent)."""
    return Registration(
        subject, atlas,
        atlas_deformation=None if deformation is None else partial(AtlasDeformation, **deformation),
        slice_motion=None if motion is None else partial(SliceMotion, **motion),
        **kwargs,
    )


def train_at(reg: Registration, schedule: ICMSchedule, iteration: int) -> None:
    """What the fit does at the start of an ICM iteration: ask the schedule, tell the registration."""
    moving = schedule.trains(iteration)
    reg.train_parts(moving.affine, moving.velocity, moving.slice_motion)
    if reg.slice_motion is not None:
        reg.slice_motion.exact_gradient = schedule.exact_gradient(iteration)


BOTH = {"deformation": {"scales": (4, 2)}, "motion": {}}


def test_zero_parameters_are_the_identity():
    subject, atlas = tiny_subject(dtype=torch.float32)
    reg = registration(subject, atlas, **BOTH)
    w = reg()
    assert torch.allclose(w.images[0], subject.images, atol=1e-5)
    assert torch.allclose(torch.exp(w.log_atlas[0]), atlas.clamp_min(1e-4) / atlas.clamp_min(1e-4).sum(0), atol=1e-5)
    assert torch.allclose(reg.extra_outputs()["displacement_mm"], torch.zeros(3, *atlas.shape[1:]), atol=1e-6)


def test_none_is_the_composite_with_neither_part():
    """``registration=none``: nothing to fit, the images as resampled, the atlas as the mixture uses it."""
    subject, atlas = tiny_subject(dtype=torch.float32)
    reg = registration(subject, atlas)
    assert not reg.parts.any and not reg.fits_anything and reg.param_groups() == []
    w = reg()
    assert torch.equal(w.images[0], subject.images) and w.svf_displacement is None
    assert reg.regularisers(w) == {} and reg.slice_shifts_mm() == {} and reg.native_shifts_voxels() == {}
    assert reg.search_shifts(lambda images: images[:, 0]) == {}
    reg.train_parts(True, (True,), True)  # absent parts are ignored
    reg.check_parameters(1)
    reg.check_deformation(1, w)
    assert set(reg.extra_outputs()) == {"atlas_warped"}
    assert torch.allclose(reg.extra_outputs()["atlas_warped"], torch.exp(w.log_atlas[0]))
    # a deformation that fits nothing (registration=slice_shift's) is left out: the atlas is not resampled
    off = registration(subject, atlas, deformation={"affine": False, "svf": False}, motion={})
    assert off.atlas_deformation is None and off.parts.slice_motion
    assert torch.equal(off().log_atlas, w.log_atlas)
    with pytest.raises(ValueError, match="atlas spatial shape"):
        registration(subject, atlas[:, :6])


def test_a_checkpoint_holds_the_parameters_alone():
    """Derived buffers (images, atlas, native slices, gradients, density tables) are not persistent:
    the state dict is the parameters, so a checkpoint resumes exactly what moved."""
    subject, atlas = tiny_subject(dtype=torch.float32)
    reg = registration(subject, atlas, deformation={"scales": (4, 2)}, motion={"rotation": True})
    assert set(reg.state_dict()) == {name for name, _ in reg.named_parameters()} == {
        "atlas_deformation.rotation", "atlas_deformation.translation_mm", "atlas_deformation.log_scale",
        "atlas_deformation.velocity.0", "atlas_deformation.velocity.1", "slice_motion.translation_mm.C0",
        "slice_motion.angle.C0",
    }
    with torch.no_grad():
        reg.slice_motion.translation_mm["C0"].fill_(0.7)
        reg.atlas_deformation.velocity[0].fill_(0.1)
    again = registration(subject, atlas, deformation={"scales": (4, 2)}, motion={"rotation": True})
    again.load_state_dict(reg.state_dict())
    assert torch.equal(again().images, reg().images) and torch.equal(again().log_atlas, reg().log_atlas)


def test_gradcheck_of_the_log_likelihood_wrt_velocity_and_slice_shifts():
    subject, atlas = tiny_subject()
    # the exact gradient (the smoothed slice-shift gradient is checked on its own below)
    reg = registration(subject, atlas, deformation={"scales": (4,), "affine": True}, motion={"gradient_sigma": 0.0}).double()
    counts = torch.tensor([[2, 1, 1, 1], [1, 1, 2, 1]])
    params = initialise_from_atlas(subject.images[None], subject.coverage[None], atlas[None], counts)
    g = torch.Generator().manual_seed(1)
    names = ["atlas_deformation.velocity.0", "slice_motion.translation_mm.C0", "atlas_deformation.rotation",
             "atlas_deformation.translation_mm"]
    start = {
        "atlas_deformation.velocity.0": 0.3 * torch.randn(reg.atlas_deformation.velocity[0].shape, generator=g, dtype=torch.float64),
        "slice_motion.translation_mm.C0": torch.tensor([[0.37, -0.21], [0.13, 0.29], [-0.33, 0.41]], dtype=torch.float64),
        "atlas_deformation.rotation": torch.tensor([0.05], dtype=torch.float64),
        "atlas_deformation.translation_mm": torch.tensor([0.31, -0.17], dtype=torch.float64),
    }
    inputs = tuple(start[n].requires_grad_() for n in names)

    def objective(*tensors):
        w = functional_call(reg, dict(zip(names, tensors)), ())
        return log_likelihood(w.images, w.coverage, w.log_atlas, params, EMConfig())

    assert torch.autograd.gradcheck(objective, inputs, eps=1e-6, atol=1e-5, rtol=1e-3)


def test_inplane_is_chosen_from_geometry_and_parts_follow_the_schedule():
    assert thick_slices((1.5, 1.5, 10.0)) and not thick_slices((1.0, 1.0, 1.2))
    subject, atlas = tiny_subject(shape=(16, 16, 6), dtype=torch.float32)
    reg = registration(subject, atlas, **BOTH)
    schedule = ICMSchedule(warmup=3, slice_shift_start=2, scale_start=(0, 5))
    assert reg.atlas_deformation.inplane  # 8 mm slices, 1.5 mm pixels
    train_at(reg, schedule, 2)  # warm-up: EM only
    assert not reg.fits_anything
    train_at(reg, schedule, 3)
    assert [p.requires_grad for p in reg.atlas_deformation.velocity] == [True, False]
    assert reg.atlas_deformation.translation_mm.requires_grad and not reg.slice_motion.translation_mm["C0"].requires_grad
    train_at(reg, schedule, 8)
    assert [p.requires_grad for p in reg.atlas_deformation.velocity] == [True, True]
    assert reg.slice_motion.translation_mm["C0"].requires_grad
    with pytest.raises(ValueError, match="one start per velocity scale"):
        train_at(reg, ICMSchedule(scale_start=(0,)), 20)
    full = registration(subject, atlas, deformation={"scales": (4,), "inplane": False})
    assert not full.atlas_deformation.inplane and full.atlas_deformation.velocity[0].shape[1] == 3
    with pytest.raises(ValueError, match="registration.model.atlas_deformation.inplane must be auto, true or false"):
        registration(subject, atlas, deformation={"inplane": "yes"})


def test_blow_ups_raise_with_the_iteration():
    subject, atlas = tiny_subject(dtype=torch.float32)
    reg = registration(subject, atlas, deformation={"scales": (4,)}, motion={"max_shift_mm": 2.0})
    with torch.no_grad():
        reg.slice_motion.translation_mm["C0"][1, 0] = 5.0
    with pytest.raises(RegistrationError, match="iteration 7: a slice shift of 5.0 mm exceeds registration.model.slice_motion.max_shift_mm=2.0"):
        reg.check_parameters(7)
    with torch.no_grad():
        reg.slice_motion.translation_mm["C0"].zero_()
        reg.atlas_deformation.velocity[0][:, 0] = torch.linspace(-40, 40, reg.atlas_deformation.velocity[0].shape[2])[None, :, None]
    # the fit checks the deformation its forward made (no second integration): the same determinant
    # as the displacement in the deformation's own (batched) layout
    with torch.no_grad():
        warped = reg()
        batched = reg.atlas_deformation.displacement(reg.atlas)
    assert min_jacobian(warped.ddf) == pytest.approx(min_jacobian(batched), abs=1e-6) and min_jacobian(batched) <= 0
    with pytest.raises(RegistrationError, match="iteration 3: the atlas deformation folds"):
        reg.check_deformation(3, warped)
    reg.check_parameters(5)  # finite parameters, no slice beyond its limit: the fold is not its business
    with torch.no_grad():
        reg.atlas_deformation.velocity[0].fill_(float("nan"))
    with pytest.raises(RegistrationError, match="iteration 4: atlas_deformation.velocity.0 is not finite"):
        reg.check_parameters(4)
    with pytest.raises(ValueError, match="registration.model.slice_motion.max_shift_mm must be > 0"):
        registration(subject, atlas, motion={"max_shift_mm": 0.0})
    with pytest.raises(ValueError, match=r"registration.model.lr names unknown parameter groups \['slice'\]"):
        registration(subject, atlas, motion={}, lr={"slice": 0.1})


def test_affine_prior_and_bending_regularise_the_deformation():
    subject, atlas = tiny_subject(dtype=torch.float32)
    reg = registration(subject, atlas, deformation={"scales": (4,), "affine_weight": 2.0, "bending_weight": 0.0})
    assert float(reg.regularisers(reg())["affine"].detach()) == 0.0
    with torch.no_grad():
        reg.atlas_deformation.log_scale.fill_(0.1)
        reg.atlas_deformation.rotation.fill_(-0.2)
    assert float(reg.regularisers(reg())["affine"].detach()) == pytest.approx(2.0 * (0.01 + 0.04))
    assert "bending" not in reg.regularisers(reg())
    bent = registration(subject, atlas, deformation={"scales": (4,), "bending_weight": 3.0})
    with torch.no_grad():
        bent.atlas_deformation.velocity[0].normal_(generator=torch.Generator().manual_seed(0))
    w = bent()
    regs = bent.regularisers(w)
    assert list(regs) == ["bending"]  # affine_weight 0: no prior
    energy = float(bending_energy(w.svf_displacement).detach())  # MONAI's, of this forward's SVF displacement
    assert float(regs["bending"].detach()) == pytest.approx(3.0 * energy) and energy > 0


def test_smoothed_shift_gradient_keeps_values_and_follows_the_slope():
    """``gradient_sigma > 0`` leaves the sampled intensities unchanged; its gradient is that of
    the blurred image, so on a smooth ramp it matches the exact gradient (and ``exact_gradient``
    switches to the exact one)."""
    subject, atlas = tiny_subject(dtype=torch.float32)
    ramp = torch.linspace(0, 1, 12)[:, None, None].expand(12, 12, 3)[None].clone()
    subject.native_images["C0"] = ramp
    exact = registration(subject, atlas, motion={"gradient_sigma": 0.0, "marginal_correction": False})
    smooth = registration(subject, atlas, motion={"gradient_sigma": 1.0, "marginal_correction": False})
    switched = registration(subject, atlas, motion={"gradient_sigma": 1.0, "marginal_correction": False})
    switched.slice_motion.exact_gradient = True
    grads = []
    for reg in (exact, smooth, switched):
        with torch.no_grad():
            reg.slice_motion.translation_mm["C0"].copy_(torch.tensor([[0.4, -0.3], [0.2, 0.1], [-0.5, 0.6]]))
        w = reg()
        w.images[0, 1, 3:9, 3:9].sum().backward()
        grads.append(reg.slice_motion.translation_mm["C0"].grad.clone())
    assert torch.allclose(exact().images, smooth().images, atol=1e-6)
    assert torch.allclose(grads[0], grads[1], rtol=1e-2, atol=1e-4)  # blur padding at the edges
    assert grads[1][:, 0].abs().min() > 0 and grads[1][:, 1].abs().max() < 1e-4
    assert torch.equal(grads[2], grads[0]) and not torch.equal(grads[1], grads[0])


def test_marginal_correction_is_the_intensity_log_density_of_the_shifted_sequences():
    from mvmm_monai.registration.functional import kernel_density, kernel_log_density

    subject, atlas = tiny_subject(dtype=torch.float32)
    reg = registration(subject, atlas, deformation={"scales": (4,), "bending_weight": 0.0}, motion={})
    values = subject.images[1].flatten()
    centres, log_w, bw = kernel_density(values, 64)
    grid = torch.linspace(-1, 2, 3001)
    density = kernel_log_density(grid, centres, log_w, bw).exp()
    assert float(density.sum() * (grid[1] - grid[0])) == pytest.approx(1.0, abs=1e-3)
    train_at(reg, ICMSchedule(warmup=0, scale_start=(0,)), 0)
    regs = reg.regularisers(reg())
    expected = kernel_log_density(values, centres, log_w, bw).mean()
    assert float(regs["intensity_marginal"].detach()) == pytest.approx(float(expected), rel=1e-3)  # a fine lookup table
    regs["intensity_marginal"].backward()
    assert reg.slice_motion.translation_mm["C0"].grad.abs().sum() > 0
    tempered = reg.regularisers(reg(), {"DE": 1.0, "C0": 0.5})  # a tempered sequence: its correction tempered alike
    assert float(tempered["intensity_marginal"].detach()) == pytest.approx(0.5 * float(expected), rel=1e-3)
    reg.train_parts(True, (True,), False)  # the slices hold: no correction
    assert "intensity_marginal" not in reg.regularisers(reg())
    off = registration(subject, atlas, deformation={"scales": (4,)}, motion={"marginal_correction": False})
    train_at(off, ICMSchedule(warmup=0, scale_start=(0,)), 0)
    assert "intensity_marginal" not in off.regularisers(off())


def test_shift_search_finds_whole_voxel_offsets_and_keeps_aligned_slices():
    """Slices of C0 moved by known whole voxels: the search puts each back exactly, by the model's
    own per-voxel log-likelihood; an aligned slice stays at zero."""
    from mvmm_monai.mixture import voxel_log_likelihood

    subject, atlas = tiny_subject(shape=(20, 20, 3), dtype=torch.float32)
    truth = torch.tensor([[2, -1], [0, 3], [0, 0]])
    counts = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1]])
    params = initialise_from_atlas(subject.images[None], subject.coverage[None], atlas[None], counts)
    moved = subject.native_images["C0"].clone()
    for z, (dx, dy) in enumerate(truth.tolist()):  # content at p now at p + t
        moved[0, :, :, z] = torch.roll(moved[0, :, :, z], shifts=(dx, dy), dims=(0, 1))
    subject.native_images["C0"] = moved
    subject.images[1] = moved[0]
    reg = registration(subject, atlas, motion={"search_radius": 3})
    log_atlas = reg().log_atlas
    moves = reg.search_shifts(lambda images: voxel_log_likelihood(images, reg.coverage, log_atlas, params, EMConfig()))
    assert torch.equal(reg.slice_motion.voxels("C0").round().long(), truth)
    assert moves["C0"] == pytest.approx(3 * 1.5)
    with pytest.raises(ValueError, match="search_radius"):
        registration(subject, atlas, motion={"search_radius": 0})


def test_the_mrf_of_the_current_posterior_holds_slices_so_the_objective_leaves_it_out():
    """With a noisy reference, the class posterior follows C0 where its slices stand; the MRF of that
    posterior then votes for the current position and the search stops short of the true offsets.
    The registration's default objective (``objective_mrf=False``: atlas times pi) finds them."""
    from mvmm_monai.mixture import em_step, voxel_log_likelihood

    subject, atlas = tiny_subject(shape=(20, 20, 3), dtype=torch.float32)
    truth = torch.tensor([[2, -1], [0, 3], [0, 0]])
    moved = subject.native_images["C0"].clone()
    for z, (dx, dy) in enumerate(truth.tolist()):
        moved[0, :, :, z] = torch.roll(moved[0, :, :, z], shifts=(dx, dy), dims=(0, 1))
    subject.native_images["C0"] = moved
    subject.images[1] = moved[0]
    noisy = subject.images[0] + 0.4 * torch.randn(subject.images[0].shape, generator=torch.Generator().manual_seed(5))
    subject.images[0] = noisy
    subject.native_images["DE"] = noisy[None].clone()
    params = initialise_from_atlas(subject.images[None], subject.coverage[None], atlas[None], torch.ones(2, 4, dtype=torch.long))
    em = EMConfig(beta=1.0)
    found = {}
    for use_mrf in (True, False):
        reg = registration(subject, atlas, motion={"search_radius": 3}, objective_mrf=use_mrf)
        w, post, p = reg(), None, params
        for _ in range(5):  # the mixture and posterior settle with the slices where they stand
            p, est = em_step(w.images, w.coverage, w.log_atlas, p, em, post)
            post = est.posterior
        held = post if reg.objective_mrf else None  # what the fit module's search and gradient use
        reg.search_shifts(lambda images: voxel_log_likelihood(images, reg.coverage, w.log_atlas, p, em, held))
        found[use_mrf] = reg.slice_motion.voxels("C0").round().long()
    assert torch.equal(found[False], truth)
    assert not torch.equal(found[True], truth)
    assert registration(subject, atlas, motion={}).objective_mrf is False
