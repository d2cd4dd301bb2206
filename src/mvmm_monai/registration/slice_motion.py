"""Per-slice rigid in-plane motion G_{i,s} of every sequence but the reference.

Its parameters (a translation in mm, optionally a rotation, per slice), the resampling of the
native slices with them into the common space, the smoothed or exact gradient of that resampling,
the marginal correction of the shift objective, and the exhaustive whole-voxel shift search.

Convention: a slice whose content moved by ``+t`` (anatomy at ``p`` appears at ``p + t``) is put
back when resampled with ``t``; ``t`` is along the sequence's first two voxel axes, in mm. With a
rotation, a slice whose content was turned by ``theta`` about the slice centre ``c`` (voxel
``((X - 1) / 2, (Y - 1) / 2)``) and then moved by ``t`` (anatomy at ``p`` appears at
``R(theta) (p - c) + c + t``, ``R`` turning the first voxel axis towards the second) is put back
when resampled with ``(theta, t)``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from mvmm_monai.data.common_space import rotate, sample, sampling_map
from mvmm_monai.data.subject import SubjectData
from mvmm_monai.registration.alignment import align_slices, edge_magnitude, heart_footprint
from mvmm_monai.registration.functional import (
    first_order_resample,
    inplane_gradient,
    kde_table,
    table_lookup,
)

log = logging.getLogger(__name__)


class SliceMotion(nn.Module):
    """In-plane translation (mm) and optional rotation (radians) of every slice of every
    non-reference sequence of a subject, and their application.

    Parameters: ``translation_mm[s]`` ``[Z_s, 2]`` (mm along the sequence's first two voxel axes),
    ``angle[s]`` ``[Z_s]`` (radians about the slice centre; with ``rotation`` only). Everything
    else (native images, their blurred gradients, kernel-density tables, spacings) is derived from
    the subject and registered non-persistent: a checkpoint holds the parameters alone.

    Args:
        subject: the loaded subject; its non-reference sequences move (at least one is needed).
        rotation: also fit a rotation per slice.
        gradient_sigma: in-plane Gaussian sigma (source voxels) of the image whose central
            differences give the gradient of the resampling with respect to the motion (0: the
            exact gradient of bilinear interpolation). The sampled intensities are unchanged; only
            the gradient is smoothed. The exact gradient of a noisy, bilinearly interpolated image
            jumps every time the sample points cross a voxel edge and often points against the
            slope seen over a tenth of a voxel; Adam then walks slices away at a constant rate.
            :attr:`exact_gradient` switches to the exact one (the schedule decides when).
        marginal_correction: :meth:`log_marginal` is the log-density of every moved sequence's own
            intensities (a fixed kernel density of its covered common-space intensities at zero
            shift); the fit subtracts it from the objective of the slice motion. Moving a slice
            changes which data fall in the region of interest, and the log-likelihood rewards
            homogeneous data (lung, air: narrow Gaussians) whatever the alignment; the difference is
            a pointwise mutual information of class and intensity, which only alignment raises.
        marginal_bins: kernel centres of that density.
        search_radius: half-width, in the sequence's voxels, of the square of whole-voxel offsets
            that :meth:`search` tries around each slice's current shift (>= 1).
        search_angle_deg: with ``rotation``, :meth:`search` also tries the angles that are
            multiples of ``search_angle_step_deg`` up to this many degrees either way of zero (the
            range of in-plane motion it looks for: a search does not walk a slice further from
            where it was acquired); 0: the search moves translations only (>= 0).
        search_angle_step_deg: the step of those angles, degrees (> 0).
        max_shift_mm: a slice shift beyond this is a blow-up (:meth:`exceeds`; > 0).
        steps: whether the slices also take gradient steps between the whole-voxel searches
            (false: they move only at the searches, ``registration.schedule.shift_search_at``; the
            resampling then passes no gradient to them).
        joint_search: with ``rotation``, the search tries every angle with the offsets of every
            second voxel (up to ``search_radius``) around the current pose, instead of every angle
            at the best offset of the current angle alone: a slice turned and moved far is found
            where the best offset at the wrong angle is not the right one.
        align: before the fit, put every slice at the pose where its edges correlate best with
            the reference sequence's over the atlas' heart and ``align_margin_mm`` around it
            (:meth:`align`, :func:`~mvmm_monai.registration.alignment.align_slices`): the
            translations within ``search_radius`` voxels and, with ``rotation``, the angles
            within ``search_angle_deg`` (first in steps of ``search_angle_step_deg``), to an
            eighth of a voxel and of a degree. It reads the images alone, not the model.
        align_margin_mm: how far around the atlas' heart the alignment looks (mm, >= 0).
        align_min_gain: a slice moves only where its edges correlate better than as acquired by
            more than this (Pearson correlation, in [0, 1]): single slices of real sequences that
            were acquired in place find poses a few degrees and millimetres off that match their
            edges a little better.
        align_choice: ``gain``: the slices take their aligned poses before the fit (where the gain
            exceeds ``align_min_gain``); ``model``: the slices stay as acquired, and at the
            searches (``registration.schedule.shift_search_at``) each takes its aligned pose only
            where the model scores it higher than its current and its acquired pose (the edges
            propose, the model chooses; :meth:`search` then tries these poses alone).
    """

    def __init__(
        self,
        subject: SubjectData,
        rotation: bool = False,
        gradient_sigma: float = 1.0,
        marginal_correction: bool = True,
        marginal_bins: int = 64,
        search_radius: int = 4,
        search_angle_deg: float = 10.0,
        search_angle_step_deg: float = 2.5,
        max_shift_mm: float = 25.0,
        steps: bool = True,
        joint_search: bool = False,
        align: bool = False,
        align_margin_mm: float = 10.0,
        align_min_gain: float = 0.0,
        align_choice: str = "gain",
    ) -> None:
        super().__init__()
        if gradient_sigma < 0:
            raise ValueError(f"registration.model.slice_motion.gradient_sigma must be >= 0, got {gradient_sigma}")
        if search_radius < 1:
            raise ValueError(f"registration.model.slice_motion.search_radius must be >= 1, got {search_radius}")
        if search_angle_deg < 0 or not search_angle_step_deg > 0:
            raise ValueError(
                "registration.model.slice_motion.search_angle_deg must be >= 0 and search_angle_step_deg > 0, "
                f"got {search_angle_deg} and {search_angle_step_deg}"
            )
        if not max_shift_mm > 0:
            raise ValueError(f"registration.model.slice_motion.max_shift_mm must be > 0, got {max_shift_mm}")
        if align_margin_mm < 0:
            raise ValueError(f"registration.model.slice_motion.align_margin_mm must be >= 0, got {align_margin_mm}")
        if not 0 <= align_min_gain < 1:
            raise ValueError(f"registration.model.slice_motion.align_min_gain must be in [0, 1), got {align_min_gain}")
        if align_choice not in ("gain", "model"):
            raise ValueError(f"registration.model.slice_motion.align_choice must be 'gain' or 'model', got {align_choice!r}")
        # channel of every moved sequence in the common-space images [1, N, *S]
        self.channels = {s: n for n, s in enumerate(subject.sequences) if s != subject.reference}
        if not self.channels:
            raise ValueError(f"SliceMotion: subject {subject.name} has no sequence besides the reference {subject.reference}")
        self.gradient_sigma = float(gradient_sigma)
        self.marginal_correction = bool(marginal_correction)
        self.search_radius = int(search_radius)
        self.search_angle_deg = float(search_angle_deg)
        self.search_angle_step_deg = float(search_angle_step_deg)
        self.max_shift_mm = float(max_shift_mm)
        self.steps = bool(steps)
        self.joint_search = bool(joint_search)
        self.align_first = bool(align)
        self.align_margin_mm = float(align_margin_mm)
        self.align_min_gain = float(align_min_gain)
        self.align_choice = align_choice
        #: with ``align_choice="model"``: sequence -> the aligned poses ``(translation_mm [Z, 2], angle [Z] or None)``
        #: that compete with the current and the acquired ones at the searches
        self.aligned_poses: dict[str, tuple[Tensor, Tensor | None]] = {}
        self.reference_channel = subject.sequences.index(subject.reference)
        self.subject_name, self.reference_name = subject.name, subject.reference
        self._grid_spacing = tuple(float(v) for v in subject.grid.spacing[:2])
        #: sequence -> per-slice correlation gain of :meth:`align` (empty until it ran)
        self.alignment_gain: dict[str, list[float]] = {}
        #: follow the exact gradient of the resampling (set per ICM iteration by the schedule)
        self.exact_gradient = False
        slices = {s: subject.grids[s].shape[2] for s in self.channels}
        self.translation_mm = nn.ParameterDict({s: nn.Parameter(torch.zeros(n, 2)) for s, n in slices.items()})
        self.angle = nn.ParameterDict({s: nn.Parameter(torch.zeros(n)) for s, n in slices.items()}) if rotation else None
        self._maps = {s: sampling_map(subject.grids[s], subject.grid) for s in self.channels}
        for s, n in self.channels.items():
            spacing = tuple(float(v) for v in subject.grids[s].spacing[:2])
            self.register_buffer(f"_spacing_{s}", torch.tensor(spacing, dtype=torch.float32), persistent=False)
            native = subject.native_images[s].float()
            self.register_buffer(f"_native_{s}", native, persistent=False)
            if self.gradient_sigma > 0:
                self.register_buffer(f"_grad_{s}", inplane_gradient(native, self.gradient_sigma), persistent=False)
            if self.marginal_correction:
                table, value_range = kde_table(subject.images[n].float()[subject.coverage[n].float() > 0], marginal_bins)
                self.register_buffer(f"_kde_table_{s}", table, persistent=False)
                self.register_buffer(f"_kde_range_{s}", value_range, persistent=False)

    # -- parameters ------------------------------------------------------------------------
    @property
    def sequences(self) -> list[str]:
        """The moved sequences, in channel order."""
        return list(self.translation_mm.keys())

    def spacing(self, sequence: str) -> Tensor:
        """``[2]`` in-plane voxel size (mm) of ``sequence``."""
        return getattr(self, f"_spacing_{sequence}")

    def voxels(self, sequence: str) -> Tensor:
        """``[Z, 2]`` translation of ``sequence``'s slices in its own voxels."""
        return self.translation_mm[sequence] / self.spacing(sequence)

    def angles(self, sequence: str) -> Tensor | None:
        """``[Z]`` rotation of ``sequence``'s slices in radians, or ``None`` without ``rotation``."""
        return None if self.angle is None else self.angle[sequence]

    def shifts_mm(self) -> dict[str, list[list[float]]]:
        """Sequence -> ``Z`` rows ``[dx, dy]``: every slice's translation in mm (plain lists)."""
        return {s: self.translation_mm[s].detach().cpu().tolist() for s in self.sequences}

    def rotations_deg(self) -> dict[str, list[float]]:
        """Sequence -> ``Z`` angles in degrees about each slice's centre (plain lists); empty
        without ``rotation``."""
        if self.angle is None:
            return {}
        return {s: torch.rad2deg(self.angle[s].detach()).cpu().tolist() for s in self.sequences}

    def shifts_voxels(self) -> dict[str, Tensor]:
        """Sequence -> ``[Z, 2]`` translation in its own voxels (detached, on the CPU)."""
        return {s: self.voxels(s).detach().cpu() for s in self.sequences}

    def max_abs_mm(self) -> float:
        """Length (mm) of the largest slice translation."""
        return max((float(p.detach().norm(dim=-1).max()) for p in self.translation_mm.values()), default=0.0)

    def exceeds(self) -> float | None:
        """The largest translation (mm) if it exceeds ``max_shift_mm``, else ``None``."""
        worst = self.max_abs_mm()
        return worst if worst > self.max_shift_mm else None

    @property
    def trains(self) -> bool:
        """Whether any motion parameter currently moves (``requires_grad``)."""
        return any(p.requires_grad for p in self.parameters())

    # -- application -----------------------------------------------------------------------
    def resample(self, sequence: str) -> Tensor:
        """``sequence`` ``[1, *S]`` in the common space with its slice motion applied (0 outside
        its coverage). With ``gradient_sigma > 0`` and not :attr:`exact_gradient`, the value is
        the same bilinear sample and the gradient that of the blurred image
        (:func:`~mvmm_monai.registration.functional.first_order_resample`)."""
        native, smap = getattr(self, f"_native_{sequence}"), self._maps[sequence]
        shift, angle = self.voxels(sequence), self.angles(sequence)
        if not self.steps:  # the slices move only at the searches
            shift, angle = shift.detach(), None if angle is None else angle.detach()
        if self.gradient_sigma == 0 or self.exact_gradient:
            return sample(native, smap, slice_shifts=shift, slice_angles=angle)
        grad = getattr(self, f"_grad_{sequence}")
        vals = sample(
            torch.cat((native, grad)).to(shift.dtype), smap, slice_shifts=shift.detach(),
            slice_angles=None if angle is None else angle.detach(),
        )
        centre = None
        if angle is not None:
            centre = (torch.tensor(smap.source_shape[:2], dtype=shift.dtype, device=shift.device) - 1) / 2
        return first_order_resample(
            vals[:1], vals[1:], shift, smap.slice_index.to(shift.device), angle, smap.index, centre
        )

    def forward(self, images: Tensor, coverage: Tensor) -> Tensor:
        """The common-space ``images`` ``[1, N, *S]`` with every moved sequence's channel replaced by
        its resampled slices, masked by its ``coverage`` ``[1, N, *S]`` (> 0); ``[1, N, *S]``."""
        if images.shape != coverage.shape or images.shape[0] != 1:
            raise ValueError(f"SliceMotion: images {tuple(images.shape)} and coverage {tuple(coverage.shape)} must be one [1, N, *S]")
        chans = []
        for n in range(images.shape[1]):
            s = next((s for s, c in self.channels.items() if c == n), None)
            chans.append(images[0, n] if s is None else self.resample(s)[0] * (coverage[0, n] > 0))
        return torch.stack(chans)[None]

    # -- the marginal correction -----------------------------------------------------------
    def _log_density(self, sequence: str, values: Tensor) -> Tensor:
        return table_lookup(values, getattr(self, f"_kde_table_{sequence}"), getattr(self, f"_kde_range_{sequence}"))

    def log_marginal(self, images: Tensor, coverage: Tensor, sequence_weights: Mapping[str, float] | None = None) -> Tensor:
        """Per-voxel mean over Omega (voxels any sequence covers) of ``sum_s w_s cov_s log p_s(I_s(x))``
        over the moved sequences ``s``, ``p_s`` their fixed kernel densities, ``w_s`` their
        ``sequence_weights`` (default 1: a tempered sequence's correction is tempered alike, so it
        still cancels the intensity term of its likelihood); a scalar (natural log), differentiable in
        ``images`` ``[1, N, *S]``. ``coverage`` ``[1, N, *S]``; the normalisation of
        :func:`mvmm_monai.mixture.log_likelihood`. Needs ``marginal_correction``."""
        if not self.marginal_correction:
            raise ValueError("SliceMotion: log_marginal needs marginal_correction=True")
        weights = sequence_weights or {}
        cov = coverage[0]
        omega = cov.amax(dim=0) > 0
        total = images.new_zeros(())
        for s, n in self.channels.items():
            mask = cov[n] > 0
            total = total + weights.get(s, 1.0) * self._log_density(s, images[0, n][mask]).sum()
        return total / omega.sum().clamp_min(1)

    # -- the alignment by edges -----------------------------------------------------------
    @torch.no_grad()
    def align(self, images: Tensor, coverage: Tensor, atlas: Tensor) -> dict[str, float]:
        """Put every slice of every moved sequence at its edge-aligned pose (in place; see
        ``align``). ``images`` and ``coverage`` ``[1, N, *S]`` the common-space images before the
        slice motion, ``atlas`` ``[K, *S]`` the placed atlas (where the heart is). Records each
        slice's correlation gain at its best pose (moved or not) in :attr:`alignment_gain`;
        returns sequence -> the largest translation (mm). With ``align_choice="model"`` the poses
        are kept in :attr:`aligned_poses` for the searches instead, and nothing moves."""
        start = time.perf_counter()
        ref = self.reference_channel
        region = heart_footprint(atlas, self._grid_spacing, self.align_margin_mm) & (coverage[0, ref] > 0)
        fixed = edge_magnitude(images[0, ref:ref + 1], self._grid_spacing)[0]
        moved = {}
        for s, n in self.channels.items():
            here = region & (coverage[0, n] > 0)
            smap, spacing = self._maps[s], tuple(float(v) for v in self.spacing(s))
            native = getattr(self, f"_native_{s}")
            points, slices = smap.index.to(native.device)[here], smap.slice_index.to(native.device)[here].long()
            if points.shape[0] == 0:  # no heart in its reach: it stays as acquired (proposed as such)
                if self.align_choice == "model":
                    self.aligned_poses[s] = (torch.zeros_like(self.translation_mm[s].detach()),
                                             None if self.angle is None else torch.zeros_like(self.angle[s].detach()))
                continue
            shifts, angles, gain = align_slices(
                edge_magnitude(native, spacing), points, slices, fixed[here], spacing,
                max_shift_mm=self.search_radius * min(spacing),
                max_angle_deg=self.search_angle_deg if self.angle is not None else 0.0,
                angle_step_deg=self.search_angle_step_deg,
                min_gain=self.align_min_gain if self.align_choice == "gain" else 0.0,
            )
            self.alignment_gain[s] = gain.tolist()
            log.info("%s: %s's slices aligned by their edges to %s (%s); correlation gains %s",
                     self.subject_name, s, self.reference_name,
                     "the model chooses at the searches" if self.align_choice == "model"
                     else f"{int((gain > self.align_min_gain).sum())} of {len(gain)} moved: gain above {self.align_min_gain:g}",
                     [round(g, 3) for g in gain.tolist()])
            pose_mm = shifts.to(self.translation_mm[s]) * self.spacing(s)
            turn = None if self.angle is None else angles.to(self.angle[s])
            if self.align_choice == "model":  # proposed: the searches let the model choose
                self.aligned_poses[s] = (pose_mm, turn)
                continue
            self.translation_mm[s].copy_(pose_mm)
            if turn is not None:
                self.angle[s].copy_(turn)
            moved[s] = float(self.translation_mm[s].norm(dim=-1).max())
        log.info("%s: the edge alignment took %.1f s", self.subject_name, time.perf_counter() - start)
        return moved

    # -- the whole-voxel search ------------------------------------------------------------
    def search_angles(self) -> Tensor:
        """``[A]`` angles (radians) :meth:`search` tries for every slice (besides its current one),
        ``0`` first; ``[0]`` alone without ``rotation`` or with ``search_angle_deg=0``."""
        n = 0 if self.angle is None else math.floor(self.search_angle_deg / self.search_angle_step_deg + 1e-9)
        steps = [0.0] + [sign * k * self.search_angle_step_deg for k in range(1, n + 1) for sign in (1.0, -1.0)]
        return torch.deg2rad(torch.tensor(steps, dtype=torch.float64)).float()

    @torch.no_grad()
    def search(
        self,
        images: Tensor,
        coverage: Tensor,
        voxel_log_likelihood: Callable[[Tensor], Tensor] | Mapping[str, Callable[[Tensor], Tensor]],
        sequence_weights: Mapping[str, float] | None = None,
    ) -> dict[str, float]:
        """Move every slice of every moved sequence to its best whole-voxel offset, and with
        ``rotation`` to its best angle step (in place).

        A candidate pose of a slice is scored by ``voxel_log_likelihood(images [1, N, *S]) -> [1, *S]``
        (the model's per-voxel log-likelihood, mixture, atlas and prior held) summed over the voxels
        the slice covers, minus the marginal correction when it is on (weighted by
        ``sequence_weights``); every slice takes its own best candidate, and the sequences are
        searched one after the other. The candidates: the offsets ``(dx, dy)`` on the square of
        half-width ``search_radius`` voxels around the current shift, at the current angle; then,
        with ``rotation``, every angle of :meth:`search_angles`, turned to about the centroid of the
        voxels the slice covers from the best pose of the first stage (the region of interest,
        where the heart is: a turn about the slice's own centre would also move the heart by its
        distance from there times the angle), and the whole-voxel offsets within 2 voxels (at most
        ``search_radius``) of the best pose so far, at its angle (``M + A + 24`` evaluations, ``M`` the square's offsets and ``A`` the
        angles, instead of the ``M A`` of every angle with every offset: each costs the model's
        likelihood over the whole region); with ``joint_search``, every angle is tried with the
        offsets of every second voxel of the square around the current pose instead (about
        ``M + A M / 4 + 24``); last, the pose as acquired (no motion). The current pose is a candidate and a slice moves only where it strictly
        gains, so no slice gets worse by this objective, and after a search none scores below its
        acquired pose (the gradient steps between searches are local and may have walked it
        into a worse optimum). A sequence with :attr:`aligned_poses` (``align_choice="model"``)
        is searched over three candidates alone: its current, its aligned and its acquired pose.

        Args:
            images: ``[1, N, *S]`` common-space images before the slice motion.
            coverage: ``[1, N, *S]`` coverage masks.
            voxel_log_likelihood: the scoring function, or one per moved sequence (its slices are
                scored by its own: e.g. with a prior that leaves that sequence out).

        Returns:
            Sequence -> the largest translation (mm).
        """
        weights = sequence_weights or {}
        r = self.search_radius
        steps = torch.arange(-r, r + 1, dtype=torch.float32)
        offsets = torch.cartesian_prod(steps, steps)  # [M, 2] voxels; (0, 0) at M // 2
        turns = self.search_angles()  # [A] radians
        moved = {}
        for s, n in self.channels.items():
            param = self.translation_mm[s]
            spacing = self.spacing(s)
            start = param.detach().clone()  # [Z, 2] mm
            start_angle = None if self.angle is None else self.angle[s].detach().clone()  # [Z]
            covered = coverage[0, n] > 0
            smap, native = self._maps[s], getattr(self, f"_native_{s}")
            k = smap.slice_index.to(covered.device)[covered]
            shifted = self(images, coverage)  # the other sequences as they stand; only channel n changes below
            score_voxels = voxel_log_likelihood[s] if isinstance(voxel_log_likelihood, Mapping) else voxel_log_likelihood

            def score(shift_mm: Tensor, angle: Tensor | None, s=s, n=n, smap=smap, native=native, covered=covered, k=k,
                      shifted=shifted, spacing=spacing, score_voxels=score_voxels) -> Tensor:
                """``[Z]`` objective of every slice at pose ``(shift_mm [Z, 2], angle [Z])``."""
                shifted[0, n] = sample(native, smap, slice_shifts=shift_mm / spacing, slice_angles=angle)[0] * covered
                ll = score_voxels(shifted)[0][covered]
                if self.marginal_correction:
                    ll = ll - weights.get(s, 1.0) * self._log_density(s, shifted[0, n][covered])
                return torch.zeros(shift_mm.shape[0], dtype=torch.float64, device=ll.device).index_add_(0, k, ll.double())

            proposed = self.aligned_poses.get(s)  # the edges propose, the model chooses: the current pose first
            poses = [(start, start_angle), proposed] if proposed else [(start + off.to(start) * spacing, start_angle) for off in offsets]
            scores = [score(*pose) for pose in poses]
            if start_angle is not None and len(turns) and not proposed:
                pick = torch.stack(scores).argmax(dim=0).to(start.device)
                rows = torch.arange(len(pick), device=start.device)
                base = torch.stack([pose[0] for pose in poses])[pick, rows]  # [Z, 2] mm
                pivot = self._pivot(smap, covered, k, start.shape[0]).to(start)  # [Z, 2] voxels from the slice centre
                # with joint_search, every angle with the offsets of every second voxel around the current pose
                grid = offsets[(offsets.remainder(2) == 0).all(dim=1)] if self.joint_search else torch.zeros(1, 2)
                grid = grid.to(start)
                centre = start if self.joint_search else base
                for turn in turns.to(start):
                    angle = torch.full_like(start_angle, float(turn))
                    # keep the pivot where it was: t' = t + (R(a) - R(a')) pivot
                    turned = centre + (rotate(pivot, start_angle) - rotate(pivot, angle)) * spacing
                    for off in grid:
                        pose = (turned + off * spacing, angle)
                        poses.append(pose)
                        scores.append(score(*pose))
                # the offsets that go with the chosen angle: the whole voxels within 2 (at most r) around it
                pick = torch.stack(scores).argmax(dim=0).to(start.device)
                base = torch.stack([pose[0] for pose in poses])[pick, rows]
                angle = torch.stack([pose[1] for pose in poses])[pick, rows]
                for off in offsets[(offsets.abs() <= min(2, r)).all(dim=1)].to(start):
                    if off.any():
                        pose = (base + off * spacing, angle)
                        poses.append(pose)
                        scores.append(score(*pose))
            # the pose as acquired competes too: after a search no slice scores below leaving it unmoved
            acquired = (torch.zeros_like(start), None if start_angle is None else torch.zeros_like(start_angle))
            poses.append(acquired)
            scores.append(score(*acquired))
            table = torch.stack(scores)  # [C, Z]
            best_score, pick = table.max(dim=0)
            # the current pose: a slice moves only where it strictly gains
            stay = 0 if proposed else len(offsets) // 2
            pick = torch.where(best_score > table[stay], pick, stay).to(start.device)
            rows = torch.arange(len(pick), device=start.device)
            param.copy_(torch.stack([pose[0] for pose in poses])[pick, rows])
            if start_angle is not None:
                self.angle[s].copy_(torch.stack([pose[1] for pose in poses])[pick, rows])
            moved[s] = float((param.detach() - start).norm(dim=-1).max())
        return moved

    @staticmethod
    def _pivot(smap, covered: Tensor, k: Tensor, slices: int) -> Tensor:
        """``[Z, 2]`` centroid (source voxels, from the slice centre) of the covered voxels of each
        source slice (the centre itself where a slice covers nothing)."""
        idx = smap.index.to(covered.device)[covered][:, :2].double()  # [V, 2]
        centre = (torch.tensor(smap.source_shape[:2], dtype=torch.float64, device=idx.device) - 1) / 2
        total = torch.zeros(slices, 2, dtype=torch.float64, device=idx.device).index_add_(0, k, idx - centre)
        count = torch.zeros(slices, dtype=torch.float64, device=idx.device).index_add_(0, k, torch.ones_like(idx[:, 0]))
        return (total / count.clamp_min(1)[:, None]).float()
