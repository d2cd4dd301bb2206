"""Several subjects' ICM loops in one batch of the EM engine (``cohort.batch_size``).

A cohort fitted with ``registration=none`` runs, per subject, EM on images and an atlas that never
move. :class:`BatchedMvMMFit` runs those loops for B subjects at once: their common spaces are
padded to one box (:func:`~mvmm_monai.mixture.batch.pad_subjects`: uncovered voxels, a uniform
atlas), every EM iteration is one call of the engine on the subjects still running, and each
subject stops on its own criterion, the one :class:`~mvmm_monai.pipeline.module.MvMMFit` applies
(``model.tol`` or ``model.posterior_tol`` over ``model.tol_window`` iterations, not before
``trainer.min_epochs``). A subject that stopped leaves the batch, so the batch costs what its
subjects' iterations cost; on a GPU the remaining subjects share each kernel launch.

The padded voxels' posterior is held at zero, so the MRF sees nothing beyond a subject's border,
as in its fit alone (the mean-field neighbour sum is zero beyond a volume's border): a subject gets
the fit it gets alone, up to the order of floating-point sums.
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from mvmm_monai.classes import CLASS_NAMES
from mvmm_monai.mixture import EMConfig, MixtureParams, e_step, em_step, initialise_from_atlas, relative_change
from mvmm_monai.mixture.batch import pad_subjects
from mvmm_monai.mixture.em import log_prior
from mvmm_monai.mixture.gaussian import quantise
from mvmm_monai.pipeline.module import FitResult, SingleStep
from mvmm_monai.registration import Warped


class BatchedMvMMFit(pl.LightningModule):
    """Fit the MvMM to several subjects whose registration fits nothing, in one batch.

    Args:
        names: the subjects' names (for messages and the progress bar).
        warped: each subject's fixed images, coverage and log atlas (``Registration()`` of
            ``registration=none``: ``[1, N, *S_i]`` and ``[1, K, *S_i]``).
        counts: ``[N, K]`` subtype counts (the same sequences for every subject).
        sequence_weights: each subject's ``[N]`` sequence weights.
        em, em_steps: as :class:`~mvmm_monai.pipeline.module.MvMMFit`.
        tol, posterior_tol, tol_window: each subject's stopping rule (``model.tol``,
            ``model.posterior_tol`` and the window of :func:`~mvmm_monai.pipeline.settings.convergence_window`).
        min_epochs: no subject stops before this many iterations (``trainer.min_epochs``).
        loggers: optional per-subject loggers (e.g. TensorBoard in each subject's folder) that get
            its per-iteration scalars.
    """

    def __init__(
        self,
        names: list[str],
        warped: list[Warped],
        counts: Tensor,
        sequence_weights: list[Tensor],
        em: EMConfig = EMConfig(),
        em_steps: int = 1,
        tol: float = 1e-4,
        posterior_tol: float | None = None,
        tol_window: int = 1,
        min_epochs: int = 1,
        loggers: list | None = None,
    ) -> None:
        super().__init__()
        b = len(names)
        if not b or len(warped) != b or len(sequence_weights) != b or (loggers is not None and len(loggers) != b):
            raise ValueError(f"BatchedMvMMFit: need one warped input, weight vector (and logger) per subject, got "
                             f"{b} names, {len(warped)} inputs, {len(sequence_weights)} weight vectors")
        if em_steps < 1 or tol_window < 1:
            raise ValueError(f"BatchedMvMMFit: em_steps and tol_window must be >= 1, got {em_steps}, {tol_window}")
        self.automatic_optimization = False
        self.names, self.warped, self.em, self.em_steps = list(names), list(warped), em, em_steps
        self.tol, self.posterior_tol, self.min_epochs = tol, posterior_tol, min_epochs
        self.subject_loggers = loggers or [None] * b
        self.weights = [torch.as_tensor(w, dtype=x.images.dtype).reshape(1, -1, *([1] * (x.images.ndim - 2)))
                        for w, x in zip(sequence_weights, warped)]
        with torch.no_grad():
            batch = pad_subjects([x.images[0] for x in warped], [(x.coverage * w)[0] for x, w in zip(warped, self.weights)],
                                 [x.log_atlas[0] for x in warped])
            params = MixtureParams.stack([
                initialise_from_atlas(x.images, x.coverage, torch.exp(x.log_atlas), counts, min_variance=em.min_variance).with_beta_start(em)
                for x in warped
            ])
        # the batch lives in buffers, so Lightning moves it to the device it fits on
        self.shapes = batch.shapes
        for name, value in (("images", batch.images), ("coverage", batch.coverage), ("log_atlas", batch.log_atlas)):
            self.register_buffer(name, value, persistent=False)
        inside = torch.zeros((b, 1, *batch.images.shape[2:]), dtype=batch.images.dtype)
        for i, shape in enumerate(batch.shapes):
            inside[(i, slice(None), *(slice(0, s) for s in shape))] = 1
        self.register_buffer("inside", inside, persistent=False)
        for name, value in params.as_dict().items():
            self.register_buffer(name, value.clone(), persistent=False)
        self.register_buffer("posterior", torch.exp(batch.log_atlas) * inside, persistent=False)
        self.quantised = None  # on the fit's device: on_fit_start
        self.last_log_likelihood = [math.nan] * b
        self.recent = [[1.0] * tol_window for _ in range(b)]
        self.recent_posterior = [[1.0] * tol_window for _ in range(b)]
        self.active = [True] * b
        self.iterations = [0] * b
        self.stopped_on_criterion = [False] * b
        self._sub: tuple | None = None  # (active indices, their inputs): rebuilt when a subject leaves

    # -- Lightning -------------------------------------------------------------------------
    @property
    def progress_name(self) -> str:
        return f"{len(self.names)} subjects"

    def train_dataloader(self) -> DataLoader:
        return DataLoader(SingleStep(), batch_size=None)

    def configure_optimizers(self):
        return None

    @property
    def params(self) -> MixtureParams:
        return MixtureParams(self.log_pi, self.log_tau, self.mean, self.var, getattr(self, "beta", None))

    def on_fit_start(self) -> None:
        if self.em.intensity_levels:
            self.quantised = quantise(self.images, self.coverage, self.em.intensity_levels)

    def _running(self) -> tuple:
        """The running subjects (indices, their index tensor, the box of their largest extent) and
        their inputs cut to that box; rebuilt when a subject leaves the batch."""
        idx = [i for i, a in enumerate(self.active) if a]
        if self._sub is None or self._sub[0] != idx:
            sel = torch.tensor(idx, dtype=torch.int64, device=self.images.device)
            box = (slice(None), slice(None), *(slice(0, max(self.shapes[i][d] for i in idx)) for d in range(len(self.shapes[0]))))

            def cut(t: Tensor) -> Tensor:
                return t.index_select(0, sel)[box].contiguous()

            def cut_flat(t: Tensor) -> Tensor:  # the quantised voxels are flattened: cut them on the spatial grid
                return cut(t.reshape(*t.shape[:2], *self.images.shape[2:])).flatten(2)

            q = self.quantised
            if q is not None:
                q = type(q)(cut_flat(q.index), q.values.index_select(0, sel), q.weight.index_select(0, sel),
                            cut_flat(q.omega[:, None])[:, 0])
            self._sub = (idx, sel, box, cut(self.images), cut(self.coverage), cut(self.log_atlas), cut(self.inside), q)
        return self._sub

    def training_step(self, batch, batch_idx: int) -> None:
        it = self.current_epoch + 1
        idx, sel, box, images, coverage, log_atlas, inside, q = self._running()
        params = self.params.subjects(sel)
        posterior = self.posterior.index_select(0, sel)[box].contiguous() if self.current_epoch > 0 else None
        for _ in range(self.em_steps):
            params, est = em_step(images, coverage, log_atlas, params, self.em.at_iteration(self.current_epoch), posterior,
                                  lower_bound=False, quantised=q)
            posterior = est.posterior.mul_(inside)  # nothing beyond a subject's own border (see the module's note)
        n = len(idx)
        named = params.as_dict()
        nan = est.log_likelihood.new_tensor(float("nan"))
        moved = est.posterior_change if est.posterior_change is not None else nan.expand(n)
        flags = torch.stack([torch.isnan(v.reshape(n, -1)).any(-1) for v in named.values()], 1).any(1).to(nan)
        values = torch.cat([est.log_likelihood.to(nan), moved.to(nan), flags, torch.exp(params.log_pi).to(nan).reshape(-1)]).tolist()
        lls, moves, bad, pis = values[:n], values[n:2 * n], values[2 * n:3 * n], values[3 * n:]
        for j, i in enumerate(idx):
            if not math.isfinite(lls[j]) or bad[j]:
                raise FloatingPointError(f"MvMM fit of {self.names[i]}: non-finite log-likelihood or parameters at ICM iteration {it}")
        for name, value in named.items():
            getattr(self, name).index_copy_(0, sel, value)
        self.posterior[box].index_copy_(0, sel, posterior)
        stopping: list[int] = []
        for j, i in enumerate(idx):
            prev = self.last_log_likelihood[i]
            self.last_log_likelihood[i] = lls[j]
            self.recent[i] = [*self.recent[i][1:], relative_change(prev, lls[j]) if math.isfinite(prev) else 1.0]
            self.recent_posterior[i] = [*self.recent_posterior[i][1:], 1.0 if math.isnan(moves[j]) else moves[j]]
            self.iterations[i] = it
            rel, mv = self.criterion(i)
            if it == 1:  # the first iteration: nothing to compare with yet (MvMMFit: the schedule's end, 0)
                rel, mv = max(rel, 1.0), 1.0
            metrics = {"em/log_likelihood": lls[j], "em/relative_change": rel, "em/posterior_change": mv}
            metrics.update({f"em/pi/{CLASS_NAMES[k]}": pis[j * len(CLASS_NAMES) + k] for k in range(len(CLASS_NAMES))})
            if self.subject_loggers[i] is not None:
                self.subject_loggers[i].log_metrics(metrics, step=self.current_epoch)
            if it >= self.min_epochs and (rel < self.tol or (self.posterior_tol is not None and mv < self.posterior_tol)):
                stopping.append(i)
        for i in stopping:
            self.active[i], self.stopped_on_criterion[i] = False, True
        # the progress bar's figures: the running subjects' mean log-likelihood, their largest changes
        self.log_dict({
            "em/log_likelihood": sum(lls) / n,
            "em/relative_change": max(self.criterion(i)[0] for i in idx),
            "em/posterior_change": max(self.criterion(i)[1] for i in idx),
        }, on_step=False, on_epoch=True, batch_size=1)
        if not any(self.active):
            self.trainer.should_stop = True

    def criterion(self, i: int) -> tuple[float, float]:
        """Subject ``i``'s two stopping measures over the window: the largest relative
        log-likelihood change and the largest posterior change."""
        return max(self.recent[i]), max(self.recent_posterior[i])

    # -- results ---------------------------------------------------------------------------
    @torch.no_grad()
    def result(self, i: int) -> FitResult:
        """Subject ``i``'s final posterior from one E-step with its fitted parameters, on its own grid."""
        w = self.warped[i]
        params = self.params.subjects([i]).to(w.images.device)
        coverage = w.coverage * self.weights[i]
        posterior = self.posterior[(i, slice(None), *(slice(0, s) for s in self.shapes[i]))][None].to(w.images.device)
        lp = log_prior(w.log_atlas, params, posterior if self.iterations[i] > 0 else None, self.em)
        q = quantise(w.images, coverage, self.em.intensity_levels) if self.em.intensity_levels else None
        est = e_step(w.images, coverage, lp, params, levels=self.em.intensity_levels, chunk_voxels=self.em.chunk_voxels, quantised=q)
        return FitResult(posterior=est.posterior[0], params=params.detach(), log_likelihood=float(est.log_likelihood.mean()),
                         iterations=self.iterations[i], warped=w)
