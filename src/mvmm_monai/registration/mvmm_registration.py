"""The registration of the ICM loop: atlas deformation D and slice shifts G_{i,s} together."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mvmm_monai.data.common_space import sample, sampling_map
from mvmm_monai.data.subject import SubjectData
from mvmm_monai.mixture import log_atlas_from_prob
from mvmm_monai.registration.atlas_deformation import AtlasDeformation
from mvmm_monai.registration.base import Warped
from mvmm_monai.registration.slice_shift import SliceShifts


def inplane_gradient(image: Tensor, sigma: float) -> Tensor:
    """Central-difference gradient ``[2, X, Y, Z]`` (intensity per voxel along X and Y) of ``image``
    ``[1, X, Y, Z]`` after an in-plane Gaussian blur of ``sigma`` voxels, slice by slice."""
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"inplane_gradient: image must be [1, X, Y, Z], got {tuple(image.shape)}")
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    sl = image[0].permute(2, 0, 1)[:, None]  # [Z, 1, X, Y]
    sl = F.conv2d(F.pad(sl, (0, 0, radius, radius), mode="replicate"), kernel.reshape(1, 1, -1, 1))
    sl = F.conv2d(F.pad(sl, (radius, radius, 0, 0), mode="replicate"), kernel.reshape(1, 1, 1, -1))
    gx, gy = torch.gradient(sl[:, 0], dim=(1, 2))
    return torch.stack((gx, gy)).permute(0, 2, 3, 1).contiguous()


def kernel_density(values: Tensor, bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Binned Gaussian kernel density of 1D ``values``: ``(centres [bins], log weights [bins],
    bandwidth [])``; the bandwidth is Silverman's rule, at least one bin wide."""
    if values.numel() < 2 or bins < 2:
        raise ValueError(f"kernel_density: need >= 2 values and bins, got {values.numel()} values, {bins} bins")
    v = values.detach().float()
    lo, hi = float(v.min()), float(v.max())
    width = max(hi - lo, 1e-6) / bins
    centres = lo + width * (torch.arange(bins, dtype=v.dtype, device=v.device) + 0.5)
    idx = ((v - lo) / width).floor().clamp(0, bins - 1).long()
    counts = torch.bincount(idx, minlength=bins).to(v.dtype)
    bw = max(1.06 * float(v.std()) * v.numel() ** -0.2, width)
    return centres, torch.log(counts / counts.sum() + 1e-12), torch.tensor(bw, dtype=v.dtype, device=v.device)


def kernel_log_density(x: Tensor, centres: Tensor, log_w: Tensor, bw: Tensor) -> Tensor:
    """Log of the density of :func:`kernel_density` at ``x`` (any shape, same shape out)."""
    z = (x[..., None] - centres) / bw
    return torch.logsumexp(log_w - 0.5 * z * z, dim=-1) - torch.log(bw) - 0.5 * math.log(2 * math.pi)


def table_lookup(x: Tensor, table: Tensor, value_range: Tensor) -> Tensor:
    """Piecewise-linear interpolation of ``table`` (values on an even grid over ``value_range``
    ``[lo, hi]``) at ``x`` (clamped to the range); differentiable in ``x``."""
    lo, hi = value_range.to(x)
    pos = ((x - lo) / (hi - lo) * (table.numel() - 1)).clamp(0, table.numel() - 1 - 1e-4)
    i0 = pos.detach().floor().long()
    frac = pos - i0.to(pos.dtype)
    t = table.to(x)
    return t[i0] * (1 - frac) + t[i0 + 1] * frac


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
        shift_gradient_sigma: in-plane Gaussian sigma (source voxels) of the image whose central
            differences give the slice-shift gradient (0: the exact gradient of bilinear
            interpolation). The sampled intensities are unchanged; only the gradient is smoothed. The
            exact gradient of a noisy, bilinearly interpolated image jumps every time the sample
            points cross a voxel edge and often points against the slope seen over a tenth of a
            voxel; Adam then walks slices away at a constant rate.
        shift_gradient_exact_after: ICM iterations of slice-shift fitting after which the exact
            gradient (sigma 0) takes over (``None``: never). Coarse to fine: the smoothed gradient
            brings the slices near the optimum from far, the exact one removes the sub-voxel bias
            the smoothing leaves (on the synthetic cohort C0 shifts stayed ~1 voxel off along one
            axis with sigma 1 throughout), once the step size has decayed so it cannot walk away.
        shift_search_at: slice-shift iterations (counted like ``shift_gradient_exact_after``) at
            which every slice of every shifted sequence is moved to the best whole-voxel offset
            within ``shift_search_radius`` voxels of where it is, by the same objective the gradient
            ascends (the log-likelihood minus the marginal correction), summed over the voxels of
            that slice with everything else held. Gradient ascent is local: a slice that started
            several voxels off while the atlas was still misplaced can stay in a wrong optimum
            (the synthetic basal C0 slice at 3.4 voxels); the search looks past it. Empty: never.
        shift_search_radius: half-width of the search square, in the sequence's voxels.
        marginal_correction: subtract, for every shifted sequence, the log-density of its own
            intensities (a fixed kernel density of its covered intensities at zero shift) from the
            objective of the slice shifts. Moving a slice changes which data fall in the region of
            interest, and the log-likelihood rewards homogeneous data (lung, air: narrow Gaussians)
            whatever the alignment; the difference is a pointwise mutual information of class and
            intensity, which only alignment raises. It does not depend on the atlas deformation.
        marginal_bins: kernel centres of that density.
        objective_mrf: whether the registration's objective (the gradient and the shift search)
            includes the mean-field MRF of the current class posterior in the prior. ``False`` (the
            default, and ``registration=slice_shift``'s): the prior is the (warped) atlas times the
            class proportions, MvMM as written (``full`` sets ``True``: with the atlas deformation
            fitted too, the synthetic RV drifted more without the MRF).
            The posterior was computed with every slice where it stands, so its MRF votes for the
            current position and holds a slice there: on real Case3023, at the end of a fit, every
            slice sat at its own best whole-voxel offset under the MRF, in the fit of the original
            and of the shifted images alike; under the atlas prior alone the optima moved with the
            added shifts (RESULTS 4i; ``tests/registration`` reproduces the hold on a tiny subject).
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
        shift_gradient_sigma: float = 1.0,
        shift_gradient_exact_after: int | None = None,
        marginal_correction: bool = True,
        marginal_bins: int = 64,
        shift_search_at: tuple[int, ...] = (),
        shift_search_radius: int = 4,
        objective_mrf: bool = False,
    ) -> None:
        super().__init__()
        self.objective_mrf = bool(objective_mrf)
        self.shift_search_at = tuple(int(i) for i in (shift_search_at or ()))
        if any(i < 0 for i in self.shift_search_at) or shift_search_radius < 1:
            raise ValueError(
                f"registration: shift_search_at must hold iterations >= 0 and shift_search_radius must be >= 1, "
                f"got {list(self.shift_search_at)}, {shift_search_radius}"
            )
        self.shift_search_radius = int(shift_search_radius)
        self.sequence_weights: dict[str, float] = {}  # see use_sequence_weights
        if shift_gradient_sigma < 0:
            raise ValueError(f"registration: shift_gradient_sigma must be >= 0, got {shift_gradient_sigma}")
        self.shift_gradient_sigma = float(shift_gradient_sigma)
        if shift_gradient_exact_after is not None and shift_gradient_exact_after < 0:
            raise ValueError(f"registration: shift_gradient_exact_after must be >= 0 or null, got {shift_gradient_exact_after}")
        self.shift_gradient_exact_after = shift_gradient_exact_after
        self._exact_gradient = False
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
        self.marginal_correction = bool(marginal_correction) and self.shifts is not None
        if self.marginal_correction:
            for n, s in enumerate(subject.sequences):
                if s in self.shifts.sequences:
                    values = self.images[0, n][self.coverage[0, n] > 0]
                    centres, log_w, bw = kernel_density(values, marginal_bins)
                    lo, hi = float(centres[0] - 4 * bw), float(centres[-1] + 4 * bw)
                    table_x = torch.linspace(lo, hi, 2048, dtype=centres.dtype, device=centres.device)
                    self.register_buffer(f"_kde_table_{s}", kernel_log_density(table_x, centres, log_w, bw), persistent=False)
                    self.register_buffer(f"_kde_range_{s}", torch.tensor([lo, hi]), persistent=False)
        self._last_images: Tensor | None = None
        for s in others:
            native = subject.native_images[s].float()
            self.register_buffer(f"_native_{s}", native, persistent=False)
            if self.shifts is not None and self.shift_gradient_sigma > 0:
                self.register_buffer(f"_grad_{s}", inplane_gradient(native, self.shift_gradient_sigma), persistent=False)

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
            after = self.shift_gradient_exact_after
            self._exact_gradient = after is not None and it - self.slice_shift_start >= after

    def schedule_end(self) -> int:
        """ICM iteration (from 0) of the last scheduled switch (warm-up end, a velocity scale or the
        slice shifts starting, a shift search, the exact shift gradient): the fit is not converged
        before it, however still the log-likelihood is (the next phase may move it)."""
        ends = [self.warmup]
        d = self.deformation
        if d is not None and len(d.velocity):
            ends.append(self.warmup + max(d.scale_start))
        if self.shifts is not None:
            start = self.warmup + self.slice_shift_start
            ends.append(start + max((*self.shift_search_at, 0)))
            if self.shift_gradient_exact_after is not None:
                ends.append(start + self.shift_gradient_exact_after)
        return max(ends)

    def objective_posterior(self, posterior: Tensor | None) -> Tensor | None:
        """The class posterior whose MRF enters the registration's objective: ``posterior`` with
        ``objective_mrf``, else none (the atlas prior alone; see the class docstring)."""
        return posterior if self.objective_mrf else None

    def search_due(self, iteration: int) -> bool:
        """Whether ICM ``iteration`` (from 0) is one of ``shift_search_at`` (see the class docstring)."""
        if self.shifts is None or not self.shift_search_at:
            return False
        return iteration - self.warmup - self.slice_shift_start in self.shift_search_at

    @torch.no_grad()
    def search_shifts(self, voxel_log_likelihood: Callable[[Tensor], Tensor]) -> dict[str, float]:
        """Move every slice of every shifted sequence to its best whole-voxel offset (in place).

        ``voxel_log_likelihood(images [1, N, *S]) -> [1, *S]`` is the model's per-voxel
        log-likelihood with the mixture, atlas and prior held. Offsets ``(dx, dy)`` on the square of
        half-width ``shift_search_radius`` voxels around each slice's current shift are scored by
        that sum over the voxels the slice covers, minus the marginal correction when it is on; the
        sequences are searched one after the other. The current position is a candidate, so no slice
        gets worse. Returns, per sequence, the largest move in mm.
        """
        r = self.shift_search_radius
        steps = torch.arange(-r, r + 1, dtype=torch.float32)
        offsets = torch.cartesian_prod(steps, steps)  # [M, 2] voxels
        moved = {}
        for n, s in enumerate(self.subject.sequences):
            if s not in self.shifts.sequences:
                continue
            param = self.shifts.translation_mm[s]
            spacing = getattr(self.shifts, f"_spacing_{s}")
            start = param.detach().clone()
            covered = self.coverage[0, n] > 0
            smap, native, angle = self._maps[s], getattr(self, f"_native_{s}"), self.shifts.angles(s)
            k = smap.slice_index.to(covered.device)[covered]
            images = self._images()  # the other sequences as they stand; only channel n changes below
            scores = torch.empty(len(offsets), start.shape[0], dtype=torch.float64, device=covered.device)
            for m, off in enumerate(offsets):
                shift_mm = start + off.to(start) * spacing
                images[0, n] = sample(native, smap, slice_shifts=shift_mm / spacing, slice_angles=angle)[0] * covered
                ll = voxel_log_likelihood(images)[0][covered]
                if self.marginal_correction:
                    ll = ll - self.sequence_weights.get(s, 1.0) * table_lookup(
                        images[0, n][covered], getattr(self, f"_kde_table_{s}"), getattr(self, f"_kde_range_{s}")
                    )
                scores[m] = scores.new_zeros(start.shape[0]).index_add_(0, k, ll.double())
            score, pick = scores.max(dim=0)
            stay = len(offsets) // 2  # offset (0, 0): a slice moves only where it strictly gains
            pick = torch.where(score > scores[stay], pick, stay)
            best = offsets.to(start)[pick.to(start.device)] * spacing  # [Z, 2] mm
            param.copy_(start + best)
            moved[s] = float(best.norm(dim=-1).max())
        return moved

    def shift_parameters(self) -> list[Tensor]:
        """The slice-shift parameters (the fit resets their optimiser state after a search)."""
        return [] if self.shifts is None else list(self.shifts.parameters())

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

    def _shifted(self, s: str) -> Tensor:
        """Sequence ``s`` ``[1, *S]`` in the common space with its slice shifts applied.

        With ``shift_gradient_sigma > 0`` the value is the bilinear sample of the native image and
        the gradient with respect to the shifts (and angles) is that of a first-order expansion
        around the current position using the smoothed image gradient (see the class docstring).
        """
        native, smap = getattr(self, f"_native_{s}"), self._maps[s]
        shift, angle = self.shifts.voxels(s), self.shifts.angles(s)
        if self.shift_gradient_sigma == 0 or self._exact_gradient:
            return sample(native, smap, slice_shifts=shift, slice_angles=angle)
        grad = getattr(self, f"_grad_{s}")
        vals = sample(
            torch.cat((native, grad)).to(shift.dtype), smap, slice_shifts=shift.detach(),
            slice_angles=None if angle is None else angle.detach(),
        )
        k = smap.slice_index.to(shift.device)
        move = (shift - shift.detach())[k].movedim(-1, 0)  # [2, *S] source voxels
        if angle is not None:
            centre = (torch.tensor(smap.source_shape[:2], dtype=shift.dtype, device=shift.device) - 1) / 2
            d = smap.index[..., :2].to(shift) - centre
            a = angle.detach()[k]
            cos, sin = torch.cos(a), torch.sin(a)
            da = (angle - angle.detach())[k]
            move = move + torch.stack((-sin * d[..., 0] - cos * d[..., 1], cos * d[..., 0] - sin * d[..., 1])) * da
        return vals[:1] + (move * vals[1:]).sum(0, keepdim=True)

    def _images(self) -> Tensor:
        if self.shifts is None:
            return self.images
        subj = self.subject
        chans = [self.images[0, 0]]
        for n, s in enumerate(subj.sequences[1:], start=1):
            if s in self.shifts.sequences:
                img = self._shifted(s)
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
        images = self._images()
        self._last_images = images if self.marginal_correction else None
        return Warped(images, self.coverage, log_atlas_from_prob(atlas.clamp_min(0), self.atlas_floor))

    def marginal_log_density(self) -> Tensor:
        """Per-voxel mean over Omega of ``sum_s cov_s log p_s(I_s(x))`` for the shifted sequences ``s``,
        ``p_s`` their fixed kernel densities, on the images of the last forward (differentiable in
        the slice shifts); the same normalisation as :func:`mvmm_monai.mixture.log_likelihood`."""
        images = self._last_images if self._last_images is not None else self._images()
        cov = self.coverage[0]
        omega = cov.amax(dim=0) > 0
        total = images.new_zeros(())
        for n, s in enumerate(self.subject.sequences):
            if s not in self.shifts.sequences:
                continue
            mask = cov[n] > 0
            total = total + self.sequence_weights.get(s, 1.0) * table_lookup(
                images[0, n][mask], getattr(self, f"_kde_table_{s}"), getattr(self, f"_kde_range_{s}")
            ).sum()
        return total / omega.sum().clamp_min(1)

    def use_sequence_weights(self, weights: dict[str, float]) -> None:
        """The fit's ``sequence_weights`` (a sequence's log-density counts ``w`` times in the
        likelihood): its marginal correction is weighted alike, so it still cancels the intensity
        term of that sequence's likelihood."""
        self.sequence_weights = {s: float(w) for s, w in weights.items()}

    def regularisers(self) -> dict[str, Tensor]:
        regs = {}
        d = self.deformation
        if d is not None and len(d.velocity) and self.bending_weight > 0:
            regs["bending"] = self.bending_weight * d.bending()
        if self.marginal_correction and any(p.requires_grad for p in self.shifts.parameters()):
            regs["intensity_marginal"] = self.marginal_log_density()
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
