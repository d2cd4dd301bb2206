"""What the ICM step moves: an optional atlas deformation and an optional slice motion.

``registration=none`` is this composite with neither part: the atlas as placed, the slices as
acquired, nothing to fit. When each part moves is not the composite's business
(:class:`~mvmm_monai.registration.schedule.ICMSchedule` answers that; the fit tells the composite
through :meth:`Registration.train_parts` and ``slice_motion.exact_gradient``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from mvmm_monai.data.subject import SubjectData
from mvmm_monai.mixture import log_atlas_from_prob
from mvmm_monai.registration.atlas_deformation import AtlasDeformation, min_jacobian
from mvmm_monai.registration.schedule import Parts
from mvmm_monai.registration.slice_motion import SliceMotion

#: optimiser parameter groups of a registration, in order (``registration.model.lr`` keys)
PARAM_GROUPS = ("translation", "affine", "svf", "slice_shift", "slice_rotation")


class RegistrationError(RuntimeError):
    """The registration produced NaN, folded the atlas or moved a slice beyond the bound."""


@dataclass(frozen=True)
class Warped:
    """Inputs of the mixture after the current registration.

    Attributes:
        images: ``[1, N, *S]`` sequences in the common space (slice motion applied).
        coverage: ``[1, N, *S]`` coverage masks.
        log_atlas: ``[1, K, *S]`` log atlas probabilities, deformed, floored and renormalised.
        svf_displacement: the atlas deformation's SVF displacement of this forward (voxels, batched
            layout, see :class:`~mvmm_monai.registration.atlas_deformation.DeformedAtlas`), what
            :meth:`Registration.regularisers` bends; ``None`` without an SVF.
        ddf: the atlas deformation's whole displacement of this forward (``[1, 3, *S]``, voxels),
            what :meth:`Registration.check_deformation` checks for folds; ``None`` without one.
    """

    images: Tensor
    coverage: Tensor
    log_atlas: Tensor
    svf_displacement: Tensor | None = None
    ddf: Tensor | None = None

    def detach(self) -> Warped:
        """The same tensors, detached from the autograd graph."""
        svf = None if self.svf_displacement is None else self.svf_displacement.detach()
        ddf = None if self.ddf is None else self.ddf.detach()
        return Warped(self.images.detach(), self.coverage.detach(), self.log_atlas.detach(), svf, ddf)


class Registration(nn.Module):
    """The registration of the ICM loop: atlas deformation D and slice motion G_{i,s}, either optional.

    Built by ``registration.model`` (a Hydra partial) with the subject, the placed atlas and the
    atlas floor; the parts come as factories (Hydra partials) that it calls with what only it
    knows: ``atlas_deformation(shape=, spacing=)`` (the common space) and ``slice_motion(subject=)``.

    Args:
        subject: the loaded subject (its common-space images and coverage are held, non-persistent).
        atlas: ``[K, *S]`` placed atlas probabilities in the common space.
        atlas_floor: smallest atlas probability (see :func:`~mvmm_monai.mixture.log_atlas_from_prob`).
        atlas_deformation: factory of the :class:`AtlasDeformation`, or ``None``. A deformation that
            fits nothing (neither ``affine`` nor ``svf``, as ``registration=slice_shift`` configures
            it) is left out: the atlas stays exactly as placed, not resampled through the identity.
        slice_motion: factory of the :class:`SliceMotion`, or ``None`` (also left out when the
            subject has no sequence besides the reference).
        objective_mrf: whether the registration's objective (its gradient and the shift search)
            includes the mean-field MRF of the current class posterior in the prior (``False``: the
            (warped) atlas times the class proportions, MvMM as written). The posterior was computed
            with every slice where it stands, so its MRF votes for the current position and holds a
            slice there (``benchmarks/real_slice_shifts.py``); with the atlas deformation fitted
            too, the synthetic RV drifted more without it (``benchmarks/drift.py``).
        search_leave_out: the slice search scores the poses of a sequence's slices with the MRF of
            the class posterior of the other sequences (that sequence left out of the E-step),
            instead of the posterior of all sequences (with ``objective_mrf``) or none: the
            posterior carries the slice's own current position, which then does not vote for
            itself.
        align: whether to align the slices by their edges now (:meth:`align_slices`; only with
            ``slice_motion.align``); ``False`` leaves it to a later call.
        lr: learning rate per optimiser parameter group (:data:`PARAM_GROUPS`): ``translation``
            (atlas, mm), ``affine`` (rotation in radians and log-scale), ``svf`` (voxels),
            ``slice_shift`` (slice translations, mm), ``slice_rotation`` (slice angles, radians; only
            with ``slice_motion.rotation``); a group not named takes the optimiser's.
    """

    def __init__(
        self,
        subject: SubjectData,
        atlas: Tensor,
        atlas_floor: float = 1e-4,
        atlas_deformation: Callable[..., AtlasDeformation] | None = None,
        slice_motion: Callable[..., SliceMotion] | None = None,
        objective_mrf: bool = False,
        lr: Mapping[str, float] | None = None,
        search_leave_out: bool = False,
        align: bool = True,
    ) -> None:
        super().__init__()
        shape = tuple(subject.images.shape[1:])
        if tuple(atlas.shape[1:]) != shape:
            raise ValueError(f"Registration: atlas spatial shape {tuple(atlas.shape[1:])} != common space {shape}")
        unknown = sorted(set(lr or {}) - set(PARAM_GROUPS))
        if unknown:
            raise ValueError(f"registration.model.lr names unknown parameter groups {unknown}; known: {list(PARAM_GROUPS)}")
        self.atlas_floor = float(atlas_floor)
        self.objective_mrf = bool(objective_mrf)
        self.search_leave_out = bool(search_leave_out)
        self.lr = {k: float(v) for k, v in (lr or {}).items()}
        self.register_buffer("atlas", atlas[None].float(), persistent=False)
        self.register_buffer("images", subject.images[None].float(), persistent=False)
        self.register_buffer("coverage", subject.coverage[None].float(), persistent=False)
        self.atlas_deformation: AtlasDeformation | None = None
        if atlas_deformation is not None:
            deformation = atlas_deformation(shape=shape, spacing=tuple(float(s) for s in subject.grid.spacing))
            self.atlas_deformation = deformation if any(True for _ in deformation.parameters()) else None
        # an atlas that does not move: its floored log probabilities once, not at every forward
        static = None if self.atlas_deformation is not None else log_atlas_from_prob(self.atlas.clamp_min(0), self.atlas_floor)
        self.register_buffer("static_log_atlas", static, persistent=False)
        moved = any(s != subject.reference for s in subject.sequences)
        self.slice_motion: SliceMotion | None = slice_motion(subject=subject) if slice_motion is not None and moved else None
        self._aligned = False
        if align:
            self.align_slices()

    def align_slices(self) -> None:
        """Put the slices at their edge-aligned poses (``slice_motion.align``; nothing without it),
        once: at construction, unless it was built with ``align=False`` to defer the work until a
        fit needs it (``registration.guard``, where the fit without registration may be trusted)."""
        if not self._aligned and self.slice_motion is not None and self.slice_motion.align_first:
            self.slice_motion.align(self.images, self.coverage, self.atlas[0])
        self._aligned = True

    # -- what moves ------------------------------------------------------------------------
    @property
    def parts(self) -> Parts:
        """The parts this registration has (``velocity``: one ``True`` per velocity scale)."""
        d = self.atlas_deformation
        return Parts(
            affine=d is not None and d.rotation is not None,
            velocity=(True,) * (0 if d is None else len(d.velocity)),
            slice_motion=self.slice_motion is not None,
        )

    def scheduled_parts(self, shift_search_at) -> Parts:
        """:attr:`parts` that move during the fit, whose phases the schedule holds it open for: the
        slice motion only where it takes gradient steps or searches (``shift_search_at``, the
        schedule's); slices posed before the fit and held there (``registration=slice_align``) have
        no phase to wait for."""
        parts = self.parts
        m = self.slice_motion
        if m is not None and not m.steps and not tuple(shift_search_at or ()):
            parts = replace(parts, slice_motion=False)
        return parts

    def train_parts(self, affine: bool, velocity: Sequence[bool], slice_motion: bool) -> None:
        """Let each part move or hold (``requires_grad``): the similarity part, each velocity scale
        (one flag per scale, coarse to fine), the slice motion; absent parts are ignored."""
        if self.atlas_deformation is not None:
            self.atlas_deformation.train_parts(affine, velocity)
        if self.slice_motion is not None:
            self.slice_motion.requires_grad_(slice_motion)

    @property
    def fits_anything(self) -> bool:
        """Whether any parameter currently moves (``requires_grad``); false without parameters."""
        return any(p.requires_grad for p in self.parameters())

    @property
    def at_acquired_poses(self) -> bool:
        """Whether the atlas is as placed (no atlas deformation) and every slice where it was
        acquired (every slice translation and angle zero): the inputs of a fit without registration."""
        if self.atlas_deformation is not None:
            return False
        m = self.slice_motion
        if m is None:
            return True
        poses = [*m.translation_mm.values(), *(() if m.angle is None else m.angle.values())]
        return not any(bool(p.detach().any()) for p in poses)

    @property
    def takes_steps(self) -> bool:
        """Whether a moving parameter takes gradient steps: the atlas deformation's, or the slice
        motion's unless it moves at the searches only (``slice_motion.steps=false``)."""
        d, m = self.atlas_deformation, self.slice_motion
        return (d is not None and any(p.requires_grad for p in d.parameters())) or (m is not None and m.steps and m.trains)

    def param_groups(self) -> list[dict]:
        """Optimiser parameter groups (``name``, ``params``, and ``lr`` where configured), in the
        order of :data:`PARAM_GROUPS`; empty without parameters."""
        groups = []
        d = self.atlas_deformation
        if d is not None:
            if d.translation_mm is not None:
                groups.append({"name": "translation", "params": [d.translation_mm]})
                groups.append({"name": "affine", "params": [d.rotation, d.log_scale]})
            if len(d.velocity):
                groups.append({"name": "svf", "params": list(d.velocity)})
        m = self.slice_motion
        if m is not None:
            groups.append({"name": "slice_shift", "params": list(m.translation_mm.values())})
            if m.angle is not None:
                groups.append({"name": "slice_rotation", "params": list(m.angle.values())})
        for g in groups:
            if g["name"] in self.lr:
                g["lr"] = self.lr[g["name"]]
        return groups

    # -- application -----------------------------------------------------------------------
    def forward(self) -> Warped:
        """The mixture's inputs with the current parameters (see :class:`Warped`)."""
        log_atlas, svf, ddf = self.static_log_atlas, None, None
        if self.atlas_deformation is not None:
            deformed = self.atlas_deformation(self.atlas)
            log_atlas, svf, ddf = log_atlas_from_prob(deformed.atlas.clamp_min(0), self.atlas_floor), deformed.svf_displacement, deformed.ddf
        images = self.images if self.slice_motion is None else self.slice_motion(self.images, self.coverage)
        return Warped(images, self.coverage, log_atlas, svf, ddf)

    def regularisers(self, warped: Warped, sequence_weights: Mapping[str, float] | None = None) -> dict[str, Tensor]:
        """Named scalar penalties added to the negative per-voxel log-likelihood, computed on
        ``warped`` (this module's forward, with its graph): ``bending`` (weighted bending energy of
        the SVF), ``intensity_marginal`` (the slice motion's marginal correction, while it moves;
        ``sequence_weights`` as in the likelihood), ``affine`` (the similarity prior); each only
        where configured. Empty for ``registration=none``."""
        regs = {}
        d, m = self.atlas_deformation, self.slice_motion
        if d is not None and warped.svf_displacement is not None and d.bending_weight > 0:
            regs["bending"] = d.bending(warped.svf_displacement)
        if m is not None and m.marginal_correction and m.trains:
            regs["intensity_marginal"] = m.log_marginal(warped.images, warped.coverage, sequence_weights)
        if d is not None and d.log_scale is not None and d.affine_weight > 0:
            regs["affine"] = d.similarity_prior()
        return regs

    def search_shifts(
        self, voxel_log_likelihood: Callable[[Tensor], Tensor] | Mapping[str, Callable[[Tensor], Tensor]],
        sequence_weights: Mapping[str, float] | None = None,
    ) -> dict[str, float]:
        """The slice motion's exhaustive whole-voxel search (:meth:`SliceMotion.search`) on this
        registration's images; sequence -> largest move (mm). Empty without a slice motion."""
        if self.slice_motion is None:
            return {}
        return self.slice_motion.search(self.images, self.coverage, voxel_log_likelihood, sequence_weights)

    def check_deformation(self, iteration: int, warped: Warped) -> None:
        """Raise :class:`RegistrationError` naming ICM ``iteration`` if the atlas deformation that
        made ``warped`` (this module's forward) folds: the fit checks every deformation it is about
        to use, on the displacement its forward made (the velocity is not integrated again)."""
        if warped.ddf is None:
            return
        jmin = min_jacobian(warped.ddf)
        if not math.isfinite(jmin) or jmin <= 0:
            raise RegistrationError(
                f"registration blew up at ICM iteration {iteration}: the atlas deformation folds "
                f"(min Jacobian determinant {jmin:.3f}); raise registration.model.atlas_deformation.bending_weight "
                "or lower registration.model.lr.svf"
            )

    def check_parameters(self, iteration: int) -> None:
        """Raise :class:`RegistrationError` naming ICM ``iteration`` if a parameter is not finite or
        a slice moved beyond ``max_shift_mm``."""
        for name, p in self.named_parameters():
            if not torch.isfinite(p).all():
                raise RegistrationError(f"registration blew up at ICM iteration {iteration}: {name} is not finite")
        if self.slice_motion is not None:
            worst = self.slice_motion.exceeds()
            if worst is not None:
                raise RegistrationError(
                    f"registration blew up at ICM iteration {iteration}: a slice shift of {worst:.1f} mm exceeds "
                    f"registration.model.slice_motion.max_shift_mm={self.slice_motion.max_shift_mm}"
                )

    # -- results ---------------------------------------------------------------------------
    def slice_shifts_mm(self) -> dict[str, list[list[float]]]:
        """Sequence -> per-slice ``[dx, dy]`` translation in mm (empty without a slice motion)."""
        return {} if self.slice_motion is None else self.slice_motion.shifts_mm()

    def slice_rotations_deg(self) -> dict[str, list[float]]:
        """Sequence -> per-slice rotation in degrees about the slice centre (empty without a
        rotating slice motion)."""
        return {} if self.slice_motion is None else self.slice_motion.rotations_deg()

    def slice_alignment_gain(self) -> dict[str, list[float]]:
        """Sequence -> per-slice gain in edge correlation of its best aligned pose over its acquired
        one (``slice_motion.align``; empty without it), whether the slice moved or not."""
        return {} if self.slice_motion is None else dict(self.slice_motion.alignment_gain)

    def native_shifts_voxels(self) -> dict[str, Tensor]:
        """Sequence -> ``[Z, 2]`` per-slice translation in its own voxels (to write results back
        onto moved slices); empty without a slice motion."""
        return {} if self.slice_motion is None else self.slice_motion.shifts_voxels()

    def native_angles(self) -> dict[str, Tensor]:
        """Sequence -> ``[Z]`` per-slice rotation in radians about its slice centre (to write results
        back onto turned slices); empty without a rotating slice motion."""
        m = self.slice_motion
        if m is None or m.angle is None:
            return {}
        return {s: m.angle[s].detach().cpu() for s in m.sequences}

    @torch.no_grad()
    def extra_outputs(self) -> dict[str, Tensor]:
        """Common-space volumes to write: ``atlas_warped`` ``[K, *S]`` (probabilities) and, with an
        atlas deformation, ``displacement_mm`` ``[3, *S]`` (mm along the grid axes).

        ``atlas_warped`` is the atlas as the mixture uses it (floored, renormalised) when nothing
        is registered, and the warped atlas probabilities otherwise (as written before the
        registration was split in parts)."""
        if not self.parts.any:
            return {"atlas_warped": torch.exp(log_atlas_from_prob(self.atlas, self.atlas_floor)[0])}
        if self.atlas_deformation is None:
            return {"atlas_warped": self.atlas[0]}
        deformed = self.atlas_deformation(self.atlas)
        spacing = self.atlas_deformation.spacing.to(deformed.ddf).reshape(3, 1, 1, 1)
        return {"atlas_warped": deformed.atlas[0], "displacement_mm": deformed.ddf[0] * spacing}
