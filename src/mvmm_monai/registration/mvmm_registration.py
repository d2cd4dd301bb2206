"""The registration of the ICM loop: atlas deformation D and slice shifts G_{i,s} together."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mvmm_monai.data.common_space import sample, sampling_map
from mvmm_monai.data.subject import SubjectData
from mvmm_monai.mixture import log_atlas_from_prob
from mvmm_monai.registration.atlas_deformation import AtlasDeformation
from mvmm_monai.registration.base import Warped
from mvmm_monai.registration.slice_shift import SliceShifts


class RegistrationError(RuntimeError):
    """The registration produced NaN, folded the atlas or moved a slice beyond the bound."""


def thick_slices(spacing: tuple[float, float, float], ratio: float = 2.0) -> bool:
    """True when the slice spacing is at least ``ratio`` times the in-plane spacing."""
    return spacing[2] >= ratio * max(spacing[0], spacing[1])


class MvMMRegistration(nn.Module):
    """Atlas deformation and/or per-slice shifts, fitted by gradient ascent of the log-likelihood.

    Args:
        subject: the loaded subject (native images and grids are resampled every iteration).
        atlas: ``[K, *S]`` placed atlas probabilities in the common space.
        atlas_floor: smallest atlas probability.
        atlas_affine, atlas_svf: fit these parts of the atlas deformation.
        slice_shifts: fit a translation for every slice of every non-reference sequence.
        slice_rotation: also fit a rotation per slice.
        inplane: ``"auto"`` (in-plane when slices are >= 2x thicker than the pixels), true or false.
        scales, scale_start, num_steps: see :class:`AtlasDeformation`.
        bending_weight: weight of MONAI's bending energy of the SVF displacement.
        max_shift_mm: a slice shift beyond this stops the fit (:class:`RegistrationError`).
        affine_weight: weight of a Gaussian prior ``log_scale^2 + rotation^2`` on the similarity part
            (0 = off); it counters the likelihood's pull towards a larger heart.
        warmup: EM-only iterations before anything moves (the mixture must describe the images
            before its likelihood can tell where the atlas belongs).
        slice_shift_start: iteration (after warm-up) at which the slice shifts start to move.
        lr: learning rate per parameter group: ``translation`` (atlas, mm), ``affine`` (rotation in
            radians and log-scales), ``svf`` (voxels), ``slice_shift`` (mm, and radians if rotating).
    """

    def __init__(
        self,
        subject: SubjectData,
        atlas: Tensor,
        atlas_floor: float = 1e-4,
        atlas_affine: bool = True,
        atlas_svf: bool = True,
        slice_shifts: bool = True,
        slice_rotation: bool = False,
        inplane: str | bool = "auto",
        scales: tuple[int, ...] = (8, 4),
        scale_start: tuple[int, ...] | None = None,
        num_steps: int = 7,
        bending_weight: float = 1.0,
        max_shift_mm: float = 25.0,
        lr: dict | None = None,
        warmup: int = 10,
        slice_shift_start: int = 0,
        affine_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if bending_weight < 0 or max_shift_mm <= 0:
            raise ValueError(f"registration: need bending_weight >= 0 and max_shift_mm > 0, got {bending_weight}, {max_shift_mm}")
        self.subject = subject
        self.atlas_floor = atlas_floor
        self.bending_weight = bending_weight
        self.affine_weight = affine_weight
        self.max_shift_mm = max_shift_mm
        self.lr = dict(lr or {})
        if warmup < 0 or slice_shift_start < 0:
            raise ValueError(f"registration: warmup and slice_shift_start must be >= 0, got {warmup}, {slice_shift_start}")
        self.warmup, self.slice_shift_start = warmup, slice_shift_start
        shape = tuple(subject.images.shape[1:])
        spacing = tuple(float(s) for s in subject.grid.spacing)
        if inplane == "auto":
            inplane = thick_slices(spacing) or shape[2] < 5
        elif not isinstance(inplane, bool):
            raise ValueError(f"registration.inplane must be auto, true or false, got {inplane!r}")
        self.inplane = bool(inplane)
        self.register_buffer("atlas", atlas[None].float(), persistent=False)
        self.register_buffer("images", subject.images[None].float(), persistent=False)
        self.register_buffer("coverage", subject.coverage[None].float(), persistent=False)
        self.deformation = (
            AtlasDeformation(shape, spacing, self.inplane, atlas_affine, atlas_svf, tuple(scales),
                             tuple(scale_start) if scale_start is not None else None, num_steps)
            if (atlas_affine or atlas_svf)
            else None
        )
        others = [s for s in subject.sequences if s != subject.reference]
        self.shifts = (
            SliceShifts(
                {s: subject.grids[s].shape[2] for s in others},
                {s: tuple(float(v) for v in subject.grids[s].spacing[:2]) for s in others},
                rotation=slice_rotation,
            )
            if slice_shifts and others
            else None
        )
        self._maps = {s: sampling_map(subject.grids[s], subject.grid) for s in others}
        for s in others:
            self.register_buffer(f"_native_{s}", subject.native_images[s].float(), persistent=False)

    @property
    def fits_anything(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def set_iteration(self, iteration: int) -> None:
        """Switch parameter groups on by the schedule (``iteration`` counts from 0)."""
        it = iteration - self.warmup
        for p in self.parameters():
            p.requires_grad_(it >= 0)
        if self.deformation is not None and it >= 0:
            self.deformation.set_iteration(it)
        if self.shifts is not None:
            for p in self.shifts.parameters():
                p.requires_grad_(it >= self.slice_shift_start)

    def param_groups(self) -> list[dict]:
        """Optimiser parameter groups with their configured learning rates."""
        groups = []
        if self.deformation is not None:
            if self.deformation.translation_mm is not None:
                groups.append({"name": "translation", "params": [self.deformation.translation_mm]})
                groups.append({"name": "affine", "params": [self.deformation.rotation, self.deformation.log_scale]})
            if len(self.deformation.velocity):
                groups.append({"name": "svf", "params": list(self.deformation.velocity)})
        if self.shifts is not None:
            groups.append({"name": "slice_shift", "params": list(self.shifts.parameters())})
        for g in groups:
            if g["name"] in self.lr:
                g["lr"] = float(self.lr[g["name"]])
        return groups

    def _images(self) -> Tensor:
        if self.shifts is None:
            return self.images
        subj = self.subject
        chans = [self.images[0, 0]]
        for n, s in enumerate(subj.sequences[1:], start=1):
            if s in self.shifts.sequences:
                img = sample(
                    getattr(self, f"_native_{s}"), self._maps[s],
                    slice_shifts=self.shifts.voxels(s), slice_angles=self.shifts.angles(s),
                )
                chans.append(img[0] * (self.coverage[0, n] > 0))
            else:
                chans.append(self.images[0, n])
        return torch.stack(chans)[None]

    def warped_atlas(self) -> tuple[Tensor, Tensor | None]:
        if self.deformation is None:
            return self.atlas, None
        return self.deformation(self.atlas)

    def forward(self) -> Warped:
        atlas, _ = self.warped_atlas()
        return Warped(self._images(), self.coverage, log_atlas_from_prob(atlas.clamp_min(0), self.atlas_floor))

    def regularisers(self) -> dict[str, Tensor]:
        regs = {}
        d = self.deformation
        if d is not None and len(d.velocity) and self.bending_weight > 0:
            regs["bending"] = self.bending_weight * d.bending()
        if d is not None and d.log_scale is not None and self.affine_weight > 0:
            regs["affine"] = self.affine_weight * (d.log_scale.pow(2).sum() + d.rotation.pow(2).sum())
        return regs

    def check(self, iteration: int) -> None:
        """Raise :class:`RegistrationError` naming ``iteration`` if the registration blew up."""
        for name, p in self.named_parameters():
            if not torch.isfinite(p).all():
                raise RegistrationError(f"registration blew up at ICM iteration {iteration}: {name} is not finite")
        if self.shifts is not None:
            worst = self.shifts.max_abs_mm()
            if worst > self.max_shift_mm:
                raise RegistrationError(
                    f"registration blew up at ICM iteration {iteration}: a slice shift of {worst:.1f} mm exceeds "
                    f"registration.model.max_shift_mm={self.max_shift_mm}"
                )
        if self.deformation is not None:
            with torch.no_grad():
                jmin = self.deformation.min_jacobian(self.atlas)
            if not math.isfinite(jmin) or jmin <= 0:
                raise RegistrationError(
                    f"registration blew up at ICM iteration {iteration}: the atlas deformation folds "
                    f"(min Jacobian determinant {jmin:.3f}); raise registration.model.bending_weight or lower lr.svf"
                )

    def slice_shifts_mm(self) -> dict[str, list[list[float]]]:
        if self.shifts is None:
            return {}
        return {s: self.shifts.translation_mm[s].detach().cpu().tolist() for s in self.shifts.sequences}

    def native_shifts_voxels(self) -> dict[str, Tensor]:
        """Per-slice shifts in each sequence's voxels (to write results back onto moved slices)."""
        if self.shifts is None:
            return {}
        return {s: self.shifts.voxels(s).detach().cpu() for s in self.shifts.sequences}

    def extra_outputs(self) -> dict[str, Tensor]:
        with torch.no_grad():
            atlas, ddf = self.warped_atlas()
        out = {"atlas_warped": atlas[0]}
        if ddf is not None:
            spacing = self.subject.grid.spacing.to(ddf).reshape(3, 1, 1, 1)
            out["displacement_mm"] = ddf[0] * spacing
        return out
