"""One subject's fit, top to bottom: settings, preparation, the ICM loop, the result, the label
maps derived from it, scores, files; and a cohort's subjects, one after another or several in one
batch of the EM engine (:func:`fit_cohort`, ``cohort.batch_size``).

The mixture's result (:class:`~mvmm_monai.pipeline.module.FitResult`: posterior, parameters) is
written as computed. Label maps are derived from it by the ``postprocess`` stage (the labelling
conventions of a protocol, :class:`~mvmm_monai.conventions.labelling.LabellingConventions`), and
scar from the LGE myocardium's subtypes within the labelled myocardium: separate, named steps.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from mvmm_monai.classes import class_argmax
from mvmm_monai.config import CONFIG_DIR, build
from mvmm_monai.conventions.labelling import LabellingConventions
from mvmm_monai.conventions.scar import SCAR_RULES, write_scar
from mvmm_monai.data.common_space import native_segmentation
from mvmm_monai.data.datasets import check_subject_name
from mvmm_monai.files import save_json
from mvmm_monai.mixture.scar import MYOCARDIUM
from mvmm_monai.pipeline.batch import BatchedMvMMFit
from mvmm_monai.pipeline.metrics import segmentation_metrics
from mvmm_monai.pipeline.module import MvMMFit
from mvmm_monai.pipeline.monitoring import add_png, montage_figure, overlay_figure
from mvmm_monai.pipeline.outputs import ResultFolder, params_record, write_results
from mvmm_monai.pipeline.prepare import prepare_subject, temper_atlas
from mvmm_monai.pipeline.qc import assess_fit, fit_notes
from mvmm_monai.pipeline.progress import lightning_notes_silenced
from mvmm_monai.pipeline.settings import (
    convergence_window,
    final_scalars,
    hparams,
    partial_volume_flag,
    partial_volume_slabs,
    sequence_weights,
    subject_weights,
    subtype_counts,
)
from mvmm_monai.registration import RegistrationError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Labelled:
    """What the ``postprocess`` stage derives from a fit: ``scores`` ``[K, *S]`` (the posterior
    with the conventions' reassignments; its argmax is the common-space label map) and ``classes``
    (sequence -> ``[X_n, Y_n, Z_n]`` class indices on that sequence's native, uncut grid)."""

    scores: torch.Tensor
    classes: dict[str, torch.Tensor]


def resolve_settings(cfg: DictConfig, dataset) -> tuple[DictConfig, LabellingConventions]:
    """``cfg`` and the labelling conventions; every check that can fail on a config value runs here,
    before any work."""
    conventions = build(cfg.postprocess, _convert_="all") if cfg.get("postprocess") else LabellingConventions()
    conventions.check_sequences(dataset.sequences)
    subtype_counts(cfg.model, dataset.sequences)
    sequence_weights(cfg.model, dataset.sequences)
    partial_volume_flag(cfg.model)
    convergence_window(cfg)
    scar = cfg.model.get("scar") or {}
    if scar.get("rule", "subtype_and_fwhm") not in SCAR_RULES:
        raise ValueError(f"model.scar.rule must be one of {SCAR_RULES}, got {scar.get('rule')!r}")
    if not isinstance(scar.get("min_component_ml", 0.0), (int, float)) or scar.get("min_component_ml", 0.0) < 0:
        raise ValueError(f"model.scar.min_component_ml must be a number >= 0 (ml), got {scar.get('min_component_ml')!r}")
    if not isinstance(scar.get("open_mm", 0.0), (int, float)) or not 0 <= scar.get("open_mm", 0.0) <= 20:
        raise ValueError(f"model.scar.open_mm must be a number from 0 to 20 (mm), got {scar.get('open_mm')!r}")
    if not isinstance(scar.get("min_bic_gain", 0.0), (int, float)) or not 0 <= scar.get("min_bic_gain", 0.0) <= 5:
        raise ValueError(f"model.scar.min_bic_gain must be a number from 0 to 5 (per voxel), got {scar.get('min_bic_gain')!r}")
    return cfg, conventions


def effective_settings(cfg: DictConfig, dataset, subject, conventions: LabellingConventions, placement: str) -> dict:
    """Every setting the fit used, resolved (``params.json`` → ``settings``): the model (with the
    ``tuning`` group's values), the labelling conventions, the atlas and its placement, the registration."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model["sequence_weights"] = dict(zip(subject.sequences, subject_weights(cfg.model, subject)))
    return {
        "data": dataset.name,
        "tuning": OmegaConf.to_container(cfg.tuning, resolve=True) if cfg.get("tuning") else None,
        "model": model,
        "postprocess": conventions.as_dict(),
        "atlas": {**OmegaConf.to_container(cfg.atlas, resolve=True), "path": str(cfg.atlas.path or dataset.default_atlas()), "placement": placement},
        "registration": OmegaConf.to_container(cfg.registration, resolve=True),
    }


def build_registration(cfg: DictConfig, prep, align: bool = True):
    """The registration (``registration.model``) of a prepared subject, with its atlas tempered by
    ``model.atlas_weight``; ``registration=none`` moves nothing and gives the fixed inputs.
    ``align=False`` defers the slices' edge alignment (``Registration.align_slices``)."""
    atlas = temper_atlas(prep.atlas, float(cfg.model.get("atlas_weight", 1.0)))
    return build(cfg.registration.model)(subject=prep.subject, atlas=atlas, atlas_floor=cfg.model.atlas_floor, align=align)


def run_icm(cfg: DictConfig, dataset, prep, out: Path, registration=None) -> tuple[MvMMFit, pl.Trainer, object, object]:
    """Build the registration (unless given one already built from ``cfg`` and not yet fitted) and
    the LightningModule and run Lightning's Trainer (one ICM iteration per epoch); returns the
    module, the trainer, the registration and the logger."""
    subject = prep.subject
    if registration is None:
        registration = build_registration(cfg, prep)
    schedule = build(cfg.registration.schedule) if cfg.registration.get("schedule") else None
    optimizer = build(cfg.registration.optimizer) if cfg.registration.get("optimizer") else None
    if getattr(registration, "fits_anything", False) and optimizer is None:
        raise ValueError("registration.optimizer is required when the registration fits parameters")
    module = MvMMFit(
        subject=subject,
        registration=registration,
        counts=subtype_counts(cfg.model, subject.sequences),
        em=build(cfg.model.em),
        em_steps=cfg.model.em_steps,
        optimizer=optimizer,
        scheduler=build(cfg.registration.scheduler) if cfg.registration.get("scheduler") else None,
        tol_window=convergence_window(cfg),
        settle_tol=cfg.model.tol,
        settle_posterior_tol=cfg.model.posterior_tol,
        schedule=schedule,
        sequence_weights=subject_weights(cfg.model, subject),
        dice_every=cfg.model.get("dice_every_n_iterations", 1),
        slabs=partial_volume_slabs(cfg.model, subject),
    )
    callbacks = [build(c) for c in (cfg.get("callbacks") or {}).values()]
    logger = build(cfg.logger) if cfg.get("logger") else False
    with lightning_notes_silenced():
        trainer: pl.Trainer = build(cfg.trainer, logger=logger, callbacks=callbacks)
        trainer.fit(module, ckpt_path=cfg.get("ckpt_path"))
    return module, trainer, registration, logger


def derive_labels(subject, result, conventions: LabellingConventions, shifts: dict, angles: dict | None = None) -> Labelled:
    """The ``postprocess`` stage: label scores in the common space, and class indices on every
    sequence's native grid (the fitted slice shifts ``shifts`` and rotations ``angles`` move the
    labels with the slices)."""
    scores = conventions.apply(
        result.posterior,
        tuple(float(v) for v in subject.grid.spacing[:2]),
        subject.sequences,
        images=result.warped.images[0],
        coverage=result.warped.coverage[0],
    )
    full = subject.parent or subject  # the uncut subject when the common space was cropped
    uncut = subject.uncrop(scores, 0.0, 1.0)
    angles = angles or {}
    return Labelled(scores, {s: native_segmentation(uncut, full, s, shifts.get(s), slice_angles=angles.get(s)) for s in subject.sequences})


def score(subject, labelled: Labelled, result) -> dict:
    """Dice and HD95 (mm) per sequence where manual labels exist, and ``atlas_dice`` (the placed,
    possibly deformed atlas alone: the baseline the mixture must beat) on the reference."""
    full = subject.parent or subject
    scores: dict = {"dice": {}, "hd95_mm": {}}
    done: dict = {}
    for s, label in full.labels.items():
        # the same label file on the same grid with the same segmentation (co-registered sequences): score once
        key = (str(full.files.labels.get(s)), tuple(full.grids[s].shape), full.grids[s].affine.numpy().round(3).tobytes())
        if key in done and torch.equal(labelled.classes[s], labelled.classes[done[key]]):
            scores["dice"][s], scores["hd95_mm"][s] = scores["dice"][done[key]], scores["hd95_mm"][done[key]]
            continue
        done[key] = s
        m = segmentation_metrics(labelled.classes[s], label, tuple(full.grids[s].spacing.tolist()))
        scores["dice"][s], scores["hd95_mm"][s] = m["dice"], m["hd95_mm"]
    if subject.reference in full.labels:
        atlas_seg = class_argmax(subject.uncrop(result.warped.log_atlas[0].float().exp(), 0.0, 1.0))
        spacing = tuple(full.grid.spacing.tolist())
        scores["atlas_dice"] = {subject.reference: segmentation_metrics(atlas_seg, full.labels[subject.reference], spacing)["dice"]}
    return scores


def converged(cfg: DictConfig, module: MvMMFit, trainer: pl.Trainer, name: str) -> bool:
    """Whether the fit met its criterion: it stopped before ``trainer.max_epochs``, or was kept
    running past the point where it met it (``trainer.min_epochs``); a warning says what to try."""
    return criterion_met(cfg, trainer.current_epoch < trainer.max_epochs, float(module.recent_changes.max()),
                         float(module.recent_posterior_changes.max()), trainer.max_epochs, name)


def criterion_met(cfg: DictConfig, stopped_early: bool, last: float, moved: float, max_epochs: int, name: str) -> bool:
    """:func:`converged` from the fit's stopping measures (a batched fit's subjects too)."""
    met = stopped_early or last < cfg.model.tol or moved < cfg.model.posterior_tol
    if not met:
        log.warning(
            "%s: stopped at trainer.max_epochs=%d before the relative log-likelihood change fell below model.tol=%g "
            "(last %.1e) or the posterior change below model.posterior_tol=%g (last %.1e). A fit still rising slowly "
            "and steadily (em/relative_change in TensorBoard) is drifting, and on the shared MyoPS cases running it longer "
            "did not improve it (docs/results.md, 'Stopping rule'): check the montage; raise trainer.max_epochs only if "
            "the curves are still falling fast",
            name, max_epochs, cfg.model.tol, last, cfg.model.posterior_tol, moved,
        )
    return met


def placement_scale_range(cfg: DictConfig) -> tuple[float, float] | None:
    """The smallest and largest stack heart size the automatic placement can reach (``atlas.auto``:
    ``scales`` times ``fine_scales``)."""
    auto = cfg.atlas.get("auto")
    if not auto:
        return None
    lo = min(auto.scales) * min(auto.get("fine_scales") or [1.0])
    hi = max(auto.scales) * max(auto.get("fine_scales") or [1.0])
    return float(lo), float(hi)


def qc_verdict(qc: dict) -> str:
    """Quality control in a few words, for a picture's title."""
    if "score" not in qc:
        return "QC off"
    head = f"QC score {qc['score']:.2f}, " + ("FLAGGED" if qc["flag"] else "ok")
    return head + (f": {qc['reasons'][0]}" if qc["flag"] and qc["reasons"] else "")


def reference_montage(subject, classes: dict, staging: Path, scar: dict, postprocess: str, qc: dict | None = None):
    """Every slice of the reference sequence on its native grid with the final label contours and
    the scar mask just written to ``staging`` (``<subject>_montage.png``, TensorBoard ``montage``);
    the quality-control verdict ``qc`` in its title."""
    full = subject.parent or subject
    ref = full.reference
    image = full.images[full.sequences.index(ref)].float().numpy()
    scar_file = staging / f"{subject.name}_scar.nii.gz"
    mask = np.asarray(nib.load(scar_file).dataobj) > 0 if scar_file.is_file() else None
    title = (f"{subject.name}: {ref}, every slice, {postprocess} labels (myo yellow, LV red, RV blue, scar magenta "
             f"{scar.get('volume_ml', 0):.1f} ml)\n{qc_verdict(qc or {})}")
    return montage_figure(image, classes[ref].cpu().numpy(), mask, title=title, spacing=tuple(float(v) for v in full.grids[ref].spacing[:2]))


def check_mrf_estimate(cfg: DictConfig, result, name: str) -> None:
    """Warn when the estimated MRF strength (``model.em.beta=auto``) ended on its bound
    ``model.em.beta_max``: the label field is smoother than any Potts field of a finite strength
    explains (large homogeneous regions), the estimate has no interior optimum, and the bound,
    not the data, set the smoothing."""
    beta = result.params.beta
    if beta is not None and float(beta[0]) >= float(cfg.model.em.beta_max) * (1 - 1e-6):
        log.warning(
            "%s: the MRF strength estimate reached its bound model.em.beta_max=%g (no finite optimum: the "
            "labels are smoother than a Potts field explains); a fixed model.em.beta may segment thin structures better",
            name, float(cfg.model.em.beta_max),
        )


@dataclass
class Fitted:
    """One run of the ICM loop on a prepared subject, its result, the label maps derived from it
    and its quality control (what :func:`fit_subject` compares and writes)."""

    cfg: DictConfig
    registration: object
    logger: object
    result: object
    labelled: Labelled
    converged: bool
    qc: dict
    settled_at: int | None = None  # the ICM iteration after which the registration stopped moving


def _judge(cfg: DictConfig, prep, result, registration, logger, met: bool, conventions: LabellingConventions, qc_model,
           label: str, settled_at: int | None = None) -> Fitted:
    """A finished ICM loop's result with its derived labels and quality control."""
    check_mrf_estimate(cfg, result, label)
    labelled = derive_labels(prep.subject, result, conventions, registration.native_shifts_voxels(), registration.native_angles())
    notes = fit_notes(met, prep.placement, placement_scale_range(cfg))
    qc = assess_fit(qc_model, prep.subject, result, labelled.scores, prep.placement, prep.checks, notes)
    return Fitted(cfg, registration, logger, result, labelled, met, qc, settled_at)


def _fit_prepared(cfg: DictConfig, dataset, prep, out: Path, conventions: LabellingConventions, qc_model, label: str,
                  registration=None) -> Fitted | None:
    """Run the ICM loop on ``prep`` (with ``registration`` where already built) and derive its
    labels and QC; ``None`` on a rank other than 0."""
    module, trainer, registration, logger = run_icm(cfg, dataset, prep, out, registration)
    if not trainer.is_global_zero:
        return None
    met = converged(cfg, module, trainer, label)
    return _judge(cfg, prep, module.result(), registration, logger, met, conventions, qc_model, label, int(module.settled_at) or None)


def _without_registration(cfg: DictConfig) -> DictConfig:
    """``cfg`` with the packaged ``registration=none`` preset, without checkpoints or one to resume
    from: the registration guard's fit without registration, made first (its TensorBoard is the
    subject's; a registered fit's checkpoints are the ones to resume)."""
    ref = cfg.copy()
    with open_dict(ref):
        ref.registration = OmegaConf.load(Path(CONFIG_DIR) / "registration" / "none.yaml")
        ref.callbacks = {k: v for k, v in (cfg.get("callbacks") or {}).items() if "Checkpoint" not in str(v.get("_target_", ""))}
        ref.ckpt_path = None
        ref.trainer.enable_checkpointing = False  # else Lightning adds its own ModelCheckpoint
    return ref


def _registered_beside(cfg: DictConfig) -> DictConfig:
    """``cfg`` for the registered fit that the guard makes after the fit without registration: its
    TensorBoard scalars and overlays in the logger's ``registered`` sub-folder, beside the first fit's."""
    if not cfg.get("logger"):
        return cfg
    reg = cfg.copy()
    with open_dict(reg):
        reg.logger.sub_dir = "registered"
    return reg


def idle_registration(cfg: DictConfig, registration, iterations: int) -> bool:
    """Whether fitting with ``registration`` (built, not yet fitted) would repeat the fit without
    registration that made ``iterations`` ICM iterations: no part takes gradient steps, no search is
    scheduled, the atlas and every slice are where that fit has them (``registration=slice_align``
    where no slice's edges matched the reference's better by ``align_min_gain``: the common case on
    co-registered stacks, benchmarks/alignment_gain.py), and that fit ran past the registration's
    scheduled phases (before their end a registered fit may not stop)."""
    sched = cfg.registration.get("schedule")
    schedule = build(sched) if sched else None
    if registration.takes_steps or (schedule is not None and schedule.shift_search_at) or not registration.at_acquired_poses:
        return False
    return schedule is None or iterations > schedule.schedule_end(registration.scheduled_parts(schedule.shift_search_at))


def guard_decision(qc_model, registered: dict | None, none: dict, idle: bool = False, failure: str | None = None) -> dict:
    """``registration.guard``'s choice between a registered fit and the same subject fitted without
    registration, from their ``qc`` entries (``registered`` ``None``: not fitted, because quality
    control trusts the fit without registration). The registered result is kept only where quality
    control flags the fit without registration (there is something to repair), does not flag the
    registered one, and scores it higher (the linear score: the calibrated one is a step function
    of it). A fit without registration that quality control trusts is kept as it is, and the
    registration is not run: on co-registered MyoPS stacks (``benchmarks/crossval.py``, record
    ``crossval_slices_guard``) the registered fits scored higher on 22 of 25 cases, moving the
    slices towards agreement between the sequences, which quality control reads as a better fit,
    and lost up to 0.06 of LGE myocardium Dice. A flagged registered result never replaces the
    slices as acquired, even where the fit without registration is flagged too: on real crops
    (``benchmarks/registration_guard.py``) the registered fits kept that way were the ones that
    lost most. ``idle``: the registration moved nothing (:func:`idle_registration`), so its fit
    would be the fit without registration and is not made. ``failure``: the registered fit was
    started and stopped with a :class:`~mvmm_monai.registration.RegistrationError` (a blow-up: a
    slice moved beyond ``max_shift_mm``, a folded deformation, a parameter not finite), whose
    message this is; the fit without registration is kept. Returns the ``metrics.json``
    ``registration_guard`` entry: ``kept`` (``registered`` or ``none``), ``why``, both fits'
    ``qc_score``, ``qc_flag`` and ``qc_linear_score`` (``None`` for a registered fit not made)."""
    linear = {"registered": None if registered is None else qc_model.linear_score(registered["features"]),
              "none": qc_model.linear_score(none["features"])}
    if not none["flag"]:
        kept, why = "none", "quality control trusts the fit without registration: nothing to repair"
    elif idle:
        kept, why = "none", "the registration moves nothing here (every slice stays as acquired): its fit is the fit without registration"
    elif failure is not None:
        kept, why = "none", f"the registered fit failed: {failure}"
    elif registered is None:
        raise ValueError("guard_decision: the fit without registration is flagged; the registered fit is needed")
    elif registered["flag"]:
        kept, why = "none", "the registered fit is flagged by quality control"
    elif linear["registered"] <= linear["none"]:
        kept, why = "none", "the registered fit's QC score is not above the fit's without registration"
    else:
        kept, why = "registered", "the fit without registration is flagged, the registered fit is not and scores higher"
    return {"kept": kept, "why": why,
            "qc_score": {"registered": None if registered is None else registered["score"], "none": none["score"]},
            "qc_flag": {"registered": None if registered is None else registered["flag"], "none": none["flag"]},
            "qc_linear_score": linear}


def check_guard(cfg: DictConfig) -> bool:
    """``registration.guard`` (default false where unset): whether a registered fit is compared with
    the fit without registration; it needs the quality-control model that judges them."""
    guard = cfg.registration.get("guard", False)
    if not isinstance(guard, bool):
        raise ValueError(f"registration.guard must be true or false, got {guard!r}")
    if guard and not cfg.get("qc"):
        raise ValueError(
            "registration.guard=true keeps the registration only where the quality-control score (qc) rises, "
            "and qc is off: set registration.guard=false or keep qc"
        )
    return guard


def fit_subject(cfg: DictConfig, dataset, name: str, out: Path) -> dict:
    """Fit subject ``name`` of ``dataset`` and write its results into ``out``; returns its metrics.

    With ``registration.guard`` and a registration that fits anything, the subject is first fitted
    without registration; only where quality control flags that fit is the registered fit made,
    and it is kept only where quality control trusts it (``qc.flag`` false) and scores it higher
    (the label-free estimate of the LGE myocardium Dice): registration repairs fits the model does
    not trust, and a registered result the model does not trust never replaces the slices as
    acquired (:func:`guard_decision`; ``metrics.json`` ``registration_guard``).
    """
    start = time.perf_counter()
    check_subject_name(name)
    cfg, conventions = resolve_settings(cfg, dataset)
    guard = check_guard(cfg)
    out = Path(out)
    if str(cfg.paths.get("output_dir")) != str(out):  # a cohort member: logs and checkpoints go with it
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.paths.output_dir = str(out)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    with ResultFolder(out, name) as folder:
        prep = prepare_subject(cfg, dataset, name)
        qc_model = build(cfg.qc, _convert_="all") if cfg.get("qc") else None
        guarded = None
        # built once, its edge alignment (not cheap) left until the registered fit is needed
        registration = build_registration(cfg, prep, align=False) if guard else None
        if registration is not None and registration.fits_anything:
            fitted = _fit_prepared(_without_registration(cfg), dataset, prep, out, conventions, qc_model,
                                   f"{name} (without registration, for registration.guard)")
            if fitted is None:
                return {}
            registered, idle, failure = None, False, None
            if fitted.qc["flag"]:  # something to repair: the registered fit, unless it would be this one
                registration.align_slices()
                idle = idle_registration(cfg, registration, fitted.result.iterations)
                if not idle:
                    pl.seed_everything(cfg.seed, workers=True, verbose=False)
                    try:
                        registered = _fit_prepared(_registered_beside(cfg), dataset, prep, out, conventions, qc_model, name,
                                                   registration=registration)
                    except RegistrationError as err:  # a blow-up: the slices as acquired, fitted above, stand
                        failure = str(err)
            guarded = guard_decision(qc_model, None if registered is None else registered.qc, fitted.qc, idle=idle,
                                     failure=failure)
            if guarded["kept"] == "registered":
                fitted = replace(registered, logger=fitted.logger)  # the final pictures with the first fit's
            else:
                (log.info if idle else log.warning)(
                    "%s: %s: kept the fit without registration (registration.guard; metrics.json registration_guard)", name, guarded["why"])
        else:
            fitted = _fit_prepared(cfg, dataset, prep, out, conventions, qc_model, name)
            if fitted is None:
                return {}
        metrics = _write(cfg, dataset, prep, fitted, guarded, conventions, folder, start)
        folder.commit()
    _report(prep.subject, metrics, out)
    return metrics


def _write(cfg: DictConfig, dataset, prep, fitted: Fitted, guarded: dict | None, conventions: LabellingConventions,
           folder: ResultFolder, start: float) -> dict:
    """Score ``fitted``, write its scar, pictures, files and TensorBoard summary into ``folder.staging``;
    returns its metrics (``metrics.json``)."""
    subject, result, registration, labelled, logger = prep.subject, fitted.result, fitted.registration, fitted.labelled, fitted.logger
    shifts = registration.native_shifts_voxels()
    metrics = {
        "subject": subject.name,
        **score(subject, labelled, result),
        "scar": write_scar(subject, labelled.scores, result, shifts, folder.staging, labelled.classes[subject.reference] == MYOCARDIUM,
                           **(cfg.model.get("scar") or {})),
        "log_likelihood": result.log_likelihood,
        "iterations": result.iterations,
        "converged": fitted.converged,
        **({"registration_settled_at": fitted.settled_at} if registration.fits_anything else {}),
        **({"registration_guard": guarded} if guarded is not None else {}),
        **({"placement": prep.placement.as_dict()} if prep.placement is not None else {}),
        "input_checks": prep.checks,
        "postprocess": conventions.name,
        "qc": fitted.qc,
    }
    full = subject.parent or subject
    labels = {s: full.label_map.to_values(c) for s, c in labelled.classes.items()}
    settings = effective_settings(cfg, dataset, subject, conventions, "auto" if prep.placement is not None else "identity")
    w = result.warped
    overlay = overlay_figure(w.images[0], w.coverage[0], subject.sequences, result.posterior, torch.exp(w.log_atlas[0]),
                             title=f"{subject.name}: final segmentation ({conventions.name} labels)", labels=class_argmax(labelled.scores))
    montage = reference_montage(subject, labelled.classes, folder.staging, metrics["scar"], conventions.name, metrics["qc"])
    write_results(folder.staging, subject, result, labels, registration, params_record(subject, result, registration, prep.placement, settings),
                  {"overlay": overlay, "montage": montage})
    metrics["seconds"] = time.perf_counter() - start
    if logger:
        if hasattr(logger.experiment, "add_image"):  # the final pictures, as written (callbacks.overlay draws the ones before)
            for name in ("overlay", "montage"):  # the files just written, not drawn again
                add_png(logger.experiment, name, folder.staging / f"{subject.name}_{name}.png", result.iterations)
        logger.log_hyperparams(hparams(cfg), metrics=final_scalars(metrics))
        logger.finalize("success")
    save_json(folder.staging / "metrics.json", metrics)
    return metrics


def _report(subject, metrics: dict, out: Path) -> None:
    if subject.reference in metrics["dice"]:
        d = metrics["dice"][subject.reference]
        log.info("%s: Dice on %s " + ", ".join(f"{k} %.3f" for k in d), subject.name, subject.reference, *d.values())
    log.info("results written to %s", out)


def cohort_batch_size(cfg: DictConfig) -> int:
    """``cohort.batch_size`` (default 1): how many subjects of a cohort one batch of the EM engine
    fits; refused, before any work, where the subjects cannot share a batch."""
    size = (cfg.get("cohort") or {}).get("batch_size", 1)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"cohort.batch_size must be an integer >= 1, got {size!r}")
    if size > 1:
        model = cfg.registration.get("model") or {}
        if model.get("atlas_deformation") is not None or model.get("slice_motion") is not None:
            raise ValueError(
                f"cohort.batch_size={size} fits subjects together whose registration fits nothing (registration=none); "
                "this registration fits each subject's own deformation or slice motion: set cohort.batch_size=1"
            )
        if partial_volume_flag(cfg.model):
            raise ValueError(f"cohort.batch_size={size} does not fit thick slabs' partial volume (model.partial_volume=true): "
                             "set cohort.batch_size=1")
        if cfg.get("ckpt_path"):
            raise ValueError(f"cohort.batch_size={size} cannot resume from ckpt_path (a checkpoint is one subject's): "
                             "resume a subject alone, with cohort.batch_size=1")
    return size


def fit_cohort(cfg: DictConfig, dataset, names: list[str], out: Path):
    """Fit ``names`` into ``out/<name>/``: one after another, or ``cohort.batch_size`` at a time in
    one batch (:func:`fit_batch`). Yields ``(name, metrics)``, or ``(name, the exception)`` for a
    subject that failed (the others go on)."""
    size = cohort_batch_size(cfg)
    for k in range(0, len(names), size):
        if size == 1:
            yield names[k], _fit_alone(cfg, dataset, names[k], Path(out))
        else:
            yield from fit_batch(cfg, dataset, names[k:k + size], Path(out)).items()


def _fit_alone(cfg: DictConfig, dataset, name: str, out: Path) -> dict | Exception:
    """:func:`fit_subject` into ``out/name``: its metrics, or its exception (the cohort goes on)."""
    try:
        return fit_subject(cfg, dataset, name, out / name)
    except Exception as err:
        return err


def fit_batch(cfg: DictConfig, dataset, names: list[str], out: Path) -> dict[str, dict | Exception]:
    """Fit the subjects ``names`` (``registration=none``) in one batch of the EM engine
    (:class:`~mvmm_monai.pipeline.batch.BatchedMvMMFit`), each into ``out/<name>/`` with the files
    and metrics its fit alone writes (no checkpoints and no per-iteration Dice or overlays: the
    final ones are written). Each subject stops on its own criterion and gets the labels of its fit
    alone, up to the order of floating-point sums. Returns each subject's metrics, or the
    exception of a subject that failed (preparing, fitting or writing; the others go on; the caller
    reports it, as for a subject fitted alone)."""
    cfg, conventions = resolve_settings(cfg, dataset)
    cohort_batch_size(cfg)
    qc_model = build(cfg.qc, _convert_="all") if cfg.get("qc") else None
    outcome: dict[str, dict | Exception] = {}
    members: dict[str, tuple] = {}  # name -> (its cfg, folder, prepared subject, registration, logger, start)
    try:
        for name in names:
            start, folder = time.perf_counter(), None
            try:
                check_subject_name(name)
                member = cfg.copy()
                with open_dict(member):
                    member.paths.output_dir = str(Path(out) / name)
                pl.seed_everything(member.seed, workers=True, verbose=False)
                entered = ResultFolder(Path(out) / name, name)
                entered.__enter__()  # held until the subject is written (a failed entry holds nothing)
                folder = entered
                prep = prepare_subject(member, dataset, name)
                registration = build_registration(member, prep)
                logger = build(member.logger) if member.get("logger") else None
                members[name] = (member, folder, prep, registration, logger, start)
            except Exception as err:
                outcome[name] = err
                if folder is not None:
                    folder.__exit__(type(err), err, err.__traceback__)
        live = list(members)
        if live:
            try:
                with torch.no_grad():
                    warped = [members[n][3]().detach() for n in live]
                module = BatchedMvMMFit(
                    live, warped, subtype_counts(cfg.model, dataset.sequences),
                    [torch.as_tensor(subject_weights(cfg.model, members[n][2].subject)) for n in live],
                    em=build(cfg.model.em), em_steps=cfg.model.em_steps, tol=cfg.model.tol, posterior_tol=cfg.model.posterior_tol,
                    tol_window=convergence_window(cfg), min_epochs=int(cfg.trainer.get("min_epochs") or 1),
                    loggers=[members[n][4] for n in live],
                )
                # the progress bar only: the module stops each subject itself, and a checkpoint is one subject's
                callbacks = [build(c) for c in (cfg.get("callbacks") or {}).values() if "ProgressBar" in str(c.get("_target_", ""))]
                with lightning_notes_silenced():
                    trainer: pl.Trainer = build(cfg.trainer, logger=False, callbacks=callbacks, enable_checkpointing=False)
                    trainer.fit(module)
            except Exception as err:  # e.g. one subject's fit went non-finite: each alone, so only it fails
                log.warning("the batch of %s stopped (%s: %s); fitting its subjects one after another",
                            ", ".join(live), type(err).__name__, err)
                for name in live:
                    members.pop(name)[1].__exit__(type(err), err, err.__traceback__)
                for name in live:
                    outcome[name] = _fit_alone(cfg, dataset, name, Path(out))
                live = []
        for j, name in enumerate(live):
            member, folder, prep, registration, logger, start = members[name]
            try:
                rel, moved = module.criterion(j)
                met = criterion_met(member, module.stopped_on_criterion[j], rel, moved, trainer.max_epochs, name)
                fitted = _judge(member, prep, module.result(j), registration, logger, met, conventions, qc_model, name)
                outcome[name] = _write(member, dataset, prep, fitted, None, conventions, folder, start)
                folder.commit()
                folder.__exit__(None, None, None)
                _report(prep.subject, outcome[name], Path(out) / name)
            except Exception as err:
                outcome[name] = err
                folder.__exit__(type(err), err, err.__traceback__)
            del members[name]
    finally:
        for name, (_, folder, *_rest) in members.items():  # an error that stopped the whole batch
            folder.__exit__(RuntimeError, RuntimeError(f"the batch of {name} stopped"), None)
            outcome.setdefault(name, RuntimeError("the batch stopped before this subject was written"))
    return {n: outcome[n] for n in names}
