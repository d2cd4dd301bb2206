"""The LightningModule of an MvMM fit: one ICM iteration per training step.

An ICM iteration: the schedule says which parts of the registration move (and whether a slice
search is due, whether the exact shift gradient is on), the registration warps (its current atlas
deformation and slice motion), a few EM steps run without gradient, then one optimiser step of the
registration parameters on the log-likelihood minus the regularisers (when anything moves). The EM
state lives in persistent buffers and the registration's parameters in its state dict, so a
Lightning checkpoint resumes a fit where it stopped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from mvmm_monai.classes import CLASS_NAMES
from mvmm_monai.data.common_space import native_segmentation, sampling_map
from mvmm_monai.data.subject import SubjectData
from mvmm_monai.mixture import (
    EMConfig,
    HeldVoxelLogLikelihood,
    MixtureParams,
    e_step,
    em_step,
    initialise_from_atlas,
    log_likelihood,
    posterior_without,
    relative_change,
)
from mvmm_monai.mixture.em import log_prior
from mvmm_monai.mixture.gaussian import Quantised, quantise
from mvmm_monai.mixture.partial_volume import partial_volume_images
from mvmm_monai.pipeline.metrics import dice_per_class
from mvmm_monai.registration import ICMSchedule, Registration, Warped


@dataclass(frozen=True)
class FitResult:
    """The outcome of a fit, in the common space.

    Attributes:
        posterior: ``[K, *S]`` class posteriors.
        params: final :class:`MixtureParams` (batch of one).
        log_likelihood: final per-voxel mean log-likelihood.
        iterations: ICM iterations run.
        warped: the final registration outputs.
    """

    posterior: Tensor
    params: MixtureParams
    log_likelihood: float
    iterations: int
    warped: Warped


class SingleStep(torch.utils.data.Dataset):
    """A one-item dataset: every epoch is one step (one ICM iteration; one cohort shard)."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> int:
        return index


class MvMMFit(pl.LightningModule):
    """Fit the MvMM to one subject.

    Args:
        subject: the loaded subject (common-space images, coverage, labels).
        registration: the :class:`~mvmm_monai.registration.Registration` (neither part for
            ``registration=none``).
        counts: ``[N, K]`` subtype counts.
        em: EM settings.
        em_steps: EM steps per ICM iteration.
        optimizer: ``params -> torch.optim.Optimizer`` (a Hydra partial) for the registration
            parameters; unused when the registration fits nothing.
        scheduler: optional ``optimizer -> LRScheduler`` (a Hydra partial), stepped after every
            registration step: a decaying step size bounds how far the registration can wander
            once the mixture has settled (no drift on long fits).
        tol_window: ``em/relative_change`` is the largest relative change of the log-likelihood
            over this many iterations, so a fit stops only once it has been still for a while;
            ``em/posterior_change``, the largest :attr:`~mvmm_monai.mixture.EStepResult.posterior_change`
            over as many (the callbacks stop a fit on either).
        settle_tol: with ``schedule.settle``, once ``em/relative_change`` falls below this (the
            stopping criterion, met after the schedule's last switch), the registration is settled:
            it takes no further step, and a fit kept running past its stopping point
            (``trainer.min_epochs``) only refines the mixture. ``None`` (or ``schedule.settle``
            false): the registration moves for as long as the fit runs (its step size still decays
            by the scheduler). The iteration is in ``settled_at``.
        settle_posterior_tol: the same with ``em/posterior_change`` (the registration settles on
            either). A fit resumed from the checkpoint of its last iteration, which met either
            tolerance, stops at once instead of running one more iteration.
        sequence_weights: ``[N]`` positive weight of each sequence's log-density in the class
            posterior (``None``: all 1, MvMM as written). A weight w tempers sequence n's
            likelihood to ``p_nk(I_n)^w``: it enters the E-step as a soft coverage, so subtype
            means, variances and weights are still each sequence's own weighted moments.
        schedule: when each part of the registration moves (:class:`ICMSchedule`); required when
            the registration has parameters, ignored otherwise.
        dice_every: the per-iteration Dice against manual labels (``dice/<SEQ>/<class>`` in
            TensorBoard) is computed at the first iteration and every ``dice_every``-th: it resamples
            the posterior onto every labelled grid, which costs a large share of a small fit. The
            final Dice (``metrics.json``) is always computed. The EM lower bound
            (``em/lower_bound``, a diagnostic) follows the same schedule.
    """

    def __init__(
        self,
        subject: SubjectData,
        registration: Registration,
        counts: Tensor,
        em: EMConfig = EMConfig(),
        em_steps: int = 1,
        optimizer: Callable | None = None,
        tol_window: int = 5,
        scheduler: Callable | None = None,
        sequence_weights: Tensor | None = None,
        settle_tol: float | None = None,
        settle_posterior_tol: float | None = None,
        schedule: ICMSchedule | None = None,
        dice_every: int = 1,
        slabs: Tensor | None = None,
    ) -> None:
        super().__init__()
        n = len(subject.sequences)
        weights = torch.ones(n) if sequence_weights is None else torch.as_tensor(sequence_weights, dtype=torch.float32)
        if weights.shape != (n,) or not bool((weights > 0).all()) or not bool(torch.isfinite(weights).all()):
            raise ValueError(f"MvMMFit: sequence_weights must be {n} positive numbers (one per sequence), got {weights.tolist()}")
        if em_steps < 1:
            raise ValueError(f"MvMMFit: em_steps must be >= 1, got {em_steps}")
        if tol_window < 1:
            raise ValueError(f"MvMMFit: tol_window must be >= 1, got {tol_window}")
        if isinstance(dice_every, bool) or not isinstance(dice_every, int) or dice_every < 1:
            raise ValueError(f"model.dice_every_n_iterations must be an integer >= 1, got {dice_every!r}")
        self.dice_every = dice_every
        for name, tol in (("settle_tol", settle_tol), ("settle_posterior_tol", settle_posterior_tol)):
            if tol is not None and not tol >= 0:
                raise ValueError(f"MvMMFit: {name} must be >= 0 or None, got {tol}")
        parts = registration.parts
        if parts.any and schedule is None:
            raise ValueError("MvMMFit: registration.schedule is required when the registration fits parameters")
        schedule = schedule if schedule is not None else ICMSchedule()
        if any(parts.velocity) and len(schedule.scale_start) != len(parts.velocity):
            raise ValueError(
                f"registration.schedule.scale_start must give one start per velocity scale "
                f"({len(parts.velocity)}: registration.model.atlas_deformation.scales), got {list(schedule.scale_start)}"
            )
        self.automatic_optimization = False
        self.subject = subject
        self.schedule = schedule
        # the ICM iteration of the schedule's last switch for the registration's parts that move during the fit
        self.schedule_end = schedule.schedule_end(registration.scheduled_parts(schedule.shift_search_at))
        # the likelihood's per-sequence weights, by name (the marginal correction is weighted alike)
        self._weights_by_name = dict(zip(subject.sequences, weights.tolist()))
        self.registration = registration
        self.em = em
        self.em_steps = em_steps
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.settle_tol = settle_tol
        self.settle_posterior_tol = settle_posterior_tol
        self._quantised: Quantised | None = None  # see _quantise
        # nothing moves during the fit (no registration, or slices posed before it and held there:
        # registration=slice_align): the registration's inputs are computed once, not every iteration
        self._static = not registration.scheduled_parts(schedule.shift_search_at).any
        self._inputs: Warped | None = None
        if slabs is not None and tuple(slabs.shape) != (n, *subject.images.shape[1:]):
            raise ValueError(f"MvMMFit: slabs must be [{n}, *common space] = {[n, *subject.images.shape[1:]]}, got {list(slabs.shape)}")
        self._slabs = None if slabs is None else slabs[None]  # [1, N, *S]: partial volume of thick slabs (see _em_images)
        with torch.no_grad():
            w = registration()
            init = initialise_from_atlas(
                w.images, w.coverage, torch.exp(w.log_atlas), counts, min_variance=em.min_variance
            ).with_beta_start(em)
        for name, value in init.as_dict().items():
            self.register_buffer(name, value.clone())
        self.register_buffer("posterior", torch.exp(w.log_atlas).clone())
        self.register_buffer("sequence_weights", weights.reshape(1, n, *([1] * (w.images.ndim - 2))), persistent=False)
        self.register_buffer("last_log_likelihood", torch.tensor(float("nan"), dtype=torch.float64))
        self.register_buffer("recent_changes", torch.ones(tol_window, dtype=torch.float64))
        self.register_buffer("recent_posterior_changes", torch.ones(tol_window, dtype=torch.float64))
        # ICM iteration after which the registration stopped moving (0: still moving); in checkpoints
        self.register_buffer("settled_at", torch.zeros((), dtype=torch.int64))
        # the per-iteration Dice: every labelled sequence once per distinct manual label (MyoPS has
        # one label file for its three co-registered sequences: score it on the reference only)
        ref_label = subject.files.labels.get(subject.reference)
        self._monitored = [
            s for s in subject.labels if s == subject.reference or ref_label is None or subject.files.labels.get(s) != ref_label
        ]
        # index maps common space -> each monitored labelled sequence
        self._label_maps = {s: sampling_map(subject.grid, subject.grids[s]) for s in self._monitored if s != subject.reference}

    # -- state -----------------------------------------------------------------------------
    @property
    def params(self) -> MixtureParams:
        return MixtureParams(self.log_pi, self.log_tau, self.mean, self.var, getattr(self, "beta", None))

    def _store(self, params: MixtureParams, posterior: Tensor) -> None:
        for name, value in params.as_dict().items():
            getattr(self, name).copy_(value)
        self.posterior.copy_(posterior)

    def _weighted(self, coverage: Tensor) -> Tensor:
        """Coverage ``[B, N, *S]`` times each sequence's weight (see ``sequence_weights``)."""
        return coverage * self.sequence_weights.to(coverage)

    # -- Lightning -------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        return DataLoader(SingleStep(), batch_size=None)

    def configure_optimizers(self):
        groups = self.registration.param_groups()
        if not groups or self.optimizer_factory is None:
            return None
        opt = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "epoch"}}

    def _follow_schedule(self, epoch: int) -> None:
        """Tell the registration what the schedule says for ICM iteration ``epoch`` (from 0)."""
        moving = self.schedule.trains(epoch)
        self.registration.train_parts(moving.affine, moving.velocity, moving.slice_motion)
        if self.registration.slice_motion is not None:
            self.registration.slice_motion.exact_gradient = self.schedule.exact_gradient(epoch)

    #: the per-iteration metrics the callbacks (stopping rules) and the progress bar read
    WATCHED = ("em/log_likelihood", "em/relative_change", "em/posterior_change")

    def _still(self, rel: float, moved: float) -> bool:
        """Whether either stopping measure is below its tolerance (``settle_tol``, ``settle_posterior_tol``)."""
        return (self.settle_tol is not None and rel < self.settle_tol) or (
            self.settle_posterior_tol is not None and moved < self.settle_posterior_tol
        )

    def on_train_start(self) -> None:
        # resumed from the checkpoint of an iteration that met the criterion (the fit had stopped
        # there): the callbacks' stop is not in the checkpoint, so stop again before iterating
        if self.current_epoch > self.schedule_end and self._still(float(self.recent_changes.max()), float(self.recent_posterior_changes.max())):
            self.trainer.should_stop = True

    def training_step(self, batch, batch_idx: int) -> None:
        it = self.current_epoch + 1
        self._follow_schedule(self.current_epoch)
        fitting_registration = (
            self.registration.fits_anything and self.optimizer_factory is not None and int(self.settled_at) == 0
        )
        searched = {}
        if fitting_registration and self.registration.slice_motion is not None and self.schedule.search_due(self.current_epoch):
            searched = self._search_shifts()
        stepping = fitting_registration and self.registration.takes_steps  # else the searches alone move anything
        with torch.set_grad_enabled(stepping):
            warped = self._inputs if self._inputs is not None else self.registration()
        if self._static:
            self._inputs = warped
        if fitting_registration:  # the deformation the last step made, before anything uses it
            self.registration.check_deformation(it, warped)
        fixed = warped.detach()
        params, posterior = self.params, self.posterior if self.current_epoch > 0 else None
        monitor = it == 1 or it % self.dice_every == 0
        images = self._em_images(fixed, params)
        quantised = self._quantise(images, fixed.coverage)
        for _ in range(self.em_steps):
            params, est = em_step(
                images, self._weighted(fixed.coverage), fixed.log_atlas, params, self.em.at_iteration(self.current_epoch), posterior,
                lower_bound=monitor, quantised=quantised,
            )
            posterior = est.posterior
        # the iteration's scalars in one host synchronisation: log-likelihood, posterior change,
        # lower bound, a NaN flag per parameter, the proportions pi, the MRF strength
        named = params.as_dict()
        nan = est.log_likelihood.new_tensor(float("nan"))
        scalars = torch.cat([
            torch.stack([
                est.log_likelihood.mean(),
                nan if est.posterior_change is None else est.posterior_change.mean(),
                nan if est.lower_bound is None else est.lower_bound.mean(),
                *(torch.isnan(v).any().to(nan) for v in named.values()),
            ]),
            torch.exp(params.log_pi[0]).to(nan),
            (nan if params.beta is None else params.beta[0].to(nan)).reshape(1),
        ]).tolist()
        ll, step_moved, lower_bound = scalars[:3]
        bad = [k for k, flag in zip(named, scalars[3:3 + len(named)]) if flag]
        pi, beta = scalars[3 + len(named):-1], scalars[-1]
        if not math.isfinite(ll) or bad:
            raise FloatingPointError(
                f"MvMM fit of {self.subject.name}: non-finite {'log-likelihood' if not bad else bad} at ICM iteration {it}"
            )
        self._store(params, posterior)
        prev = float(self.last_log_likelihood)
        step_change = relative_change(prev, ll) if math.isfinite(prev) else 1.0
        self.last_log_likelihood.fill_(ll)
        self.recent_changes.copy_(torch.cat((self.recent_changes[1:], self.recent_changes.new_tensor([step_change]))))
        step_moved = 1.0 if math.isnan(step_moved) else step_moved
        self.recent_posterior_changes.copy_(torch.cat((self.recent_posterior_changes[1:], self.recent_posterior_changes.new_tensor([step_moved]))))
        rel, moved = float(self.recent_changes.max()), float(self.recent_posterior_changes.max())
        if self.current_epoch <= self.schedule_end:
            rel, moved = max(rel, 1.0), 1.0  # a scheduled registration phase is still to come: not converged

        metrics = {"em/log_likelihood": ll, "em/relative_change": rel, "em/posterior_change": moved}
        if est.lower_bound is not None:
            metrics["em/lower_bound"] = lower_bound
        if stepping:
            opt = self.optimizers()
            opt.zero_grad()
            # the class log-likelihoods from the E-step's look-up tables (the parameters are held)
            objective = log_likelihood(
                warped.images, self._weighted(warped.coverage), warped.log_atlas, self.params, self.em, self._objective_posterior(posterior),
                tabulated=True,
            )
            regs = self.registration.regularisers(warped, self._weights_by_name)
            loss = -objective.mean() + sum(regs.values(), torch.zeros((), device=objective.device))
            self.manual_backward(loss)
            opt.step()
            sched = self.lr_schedulers()
            if sched is not None:
                sched.step()
            metrics["reg/loss"] = float(loss.detach())
            metrics.update({f"reg/{k}": float(v.detach()) for k, v in regs.items()})
        if fitting_registration:
            self.registration.check_parameters(it)  # its deformation: at the next forward (or the result's)
            if self.schedule.settle and self._still(rel, moved):
                self.settled_at.fill_(it)  # this was its last step (a default fit stops here anyway)
        metrics.update({f"reg/search_move_mm/{seq}": mm for seq, mm in searched.items()})
        for k, p in enumerate(pi):
            metrics[f"em/pi/{CLASS_NAMES[k]}"] = p
        if params.beta is not None:
            metrics["em/beta"] = beta
        if self.subject.labels and monitor:  # the final Dice: pipeline.fit.score
            metrics.update(self.monitored_dice(posterior))
        # what the callbacks and the progress bar read goes through Lightning's logging; the rest
        # straight to the logger (Lightning's bookkeeping costs ~2 ms per scalar per iteration)
        watched = {k: metrics.pop(k) for k in self.WATCHED}
        self.log_dict(watched, on_step=False, on_epoch=True, batch_size=1)
        if self.logger is not None and self.trainer.is_global_zero:
            self.logger.log_metrics(metrics, step=self.current_epoch)

    def monitored_dice(self, posterior: Tensor) -> dict[str, float]:
        """``dice/<sequence>/<structure>`` of ``posterior`` (``[1, K, *S]``) against the subject's
        labels on every monitored sequence's own grid, the slices where the registration put them:
        the per-iteration Dice in TensorBoard (every ``dice_every_n_iterations``)."""
        shifts, angles = self.registration.native_shifts_voxels(), self.registration.native_angles()
        out = {}
        for seq in self._monitored:
            label = self.subject.labels[seq]
            pred = native_segmentation(
                posterior[0], self.subject, seq, shifts.get(seq), self._label_maps.get(seq), slice_angles=angles.get(seq)
            ).to(label.device)
            for name, d in dice_per_class(pred, label).items():
                out[f"dice/{seq}/{name}"] = d
        return out

    def _em_images(self, warped: Warped, params: MixtureParams) -> Tensor:
        """The images the EM fits: ``warped``'s, with ``slabs`` each thick slab's intensity turned
        into every voxel's own by the current posterior and parameters
        (:func:`~mvmm_monai.mixture.partial_volume.partial_volume_images`)."""
        if self._slabs is None:
            return warped.images
        return partial_volume_images(warped.images, self._weighted(warped.coverage), self.posterior, params, self._slabs.to(warped.images.device))

    def _quantise(self, images: Tensor, coverage: Tensor) -> Quantised | None:
        """The E-step's quantised images (:func:`~mvmm_monai.mixture.gaussian.quantise`): once per
        fit when the images never change (no slice motion during the fit, no partial volume), else
        every iteration."""
        if not self.em.intensity_levels:
            return None
        if self._quantised is not None:
            return self._quantised
        q = quantise(images, self._weighted(coverage), self.em.intensity_levels)
        if (self.registration.slice_motion is None or self._static) and self._slabs is None:
            self._quantised = q
        return q

    def _objective_posterior(self, posterior: Tensor | None) -> Tensor | None:
        """The class posterior whose MRF enters the registration's objective: ``posterior`` with
        ``registration.model.objective_mrf``, else none (the atlas prior alone)."""
        return posterior if self.registration.objective_mrf else None

    def _search_shifts(self) -> dict[str, float]:
        """The registration's exhaustive slice-shift search with the current mixture and prior; the
        optimiser forgets the moved parameters' momentum (it pointed towards the old optimum)."""
        with torch.no_grad():
            held = self.registration()
        params, posterior, em = self.params, self._objective_posterior(self.posterior), self.em
        coverage = self._weighted(held.coverage)
        if self.registration.search_leave_out:
            score = {
                seq: HeldVoxelLogLikelihood(held.images, coverage, held.log_atlas, params, em,
                                            posterior_without(held.images, coverage, held.log_atlas, params, em, self.posterior, n))
                for seq, n in self.registration.slice_motion.channels.items()
            }
        else:
            score = HeldVoxelLogLikelihood(held.images, coverage, held.log_atlas, params, em, posterior)
        moved = self.registration.search_shifts(score, self._weights_by_name)
        opt = self.optimizers().optimizer
        for p in self.registration.slice_motion.parameters():
            opt.state.pop(p, None)
        return moved

    # -- pictures --------------------------------------------------------------------------
    @torch.no_grad()
    def overlay(self, title: str = "", posterior: Tensor | None = None, labels: Tensor | None = None):
        """Overlay figure of the current state, or of ``posterior`` ``[K, *S]`` (e.g. the
        final one) with the contours of ``labels`` ``[*S]`` (default: its argmax); see
        :func:`mvmm_monai.pipeline.monitoring.overlay_figure`."""
        from mvmm_monai.pipeline.monitoring import overlay_figure

        w = self.registration().detach()
        post = self.posterior[0] if posterior is None else posterior
        return overlay_figure(w.images[0], w.coverage[0], self.subject.sequences, post, torch.exp(w.log_atlas[0]), title=title, labels=labels)

    # -- results ---------------------------------------------------------------------------
    @torch.no_grad()
    def result(self) -> FitResult:
        """Final posterior from one E-step with the fitted parameters and registration."""
        warped = self.registration().detach()
        self.registration.check_deformation(int(self.current_epoch), warped)
        lp = log_prior(warped.log_atlas, self.params, self.posterior if self.current_epoch > 0 else None, self.em)
        images = self._em_images(warped, self.params)
        est = e_step(
            images, self._weighted(warped.coverage), lp, self.params, levels=self.em.intensity_levels,
            chunk_voxels=self.em.chunk_voxels, quantised=self._quantise(images, warped.coverage),
        )
        return FitResult(
            posterior=est.posterior[0],
            params=self.params.detach(),
            log_likelihood=float(est.log_likelihood.mean()),
            iterations=int(self.current_epoch),
            warped=warped,
        )
