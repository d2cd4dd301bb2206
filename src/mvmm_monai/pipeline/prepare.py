"""Everything a fit does before its first ICM iteration: load the subject, place the atlas, cut the
region of interest (benchmarks call :func:`prepare_subject` to give peers the same inputs)."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import torch
from omegaconf import DictConfig

from mvmm_monai.atlas.io import read_atlas
from mvmm_monai.atlas.placement import PLACEMENTS, displace_atlas, place_atlas, place_atlas_hypotheses
from mvmm_monai.atlas.roi import atlas_roi, crop_box
from mvmm_monai.config import build
from mvmm_monai.data.checks import mirrored_sequences
from mvmm_monai.mixture.em import ConvergenceWarning

log = logging.getLogger(__name__)


def default_placement(cfg: DictConfig, atlas) -> str:
    """``atlas.placement``, or for null the one the atlas calls for (see :func:`place`)."""
    return cfg.atlas.get("placement") or ("auto" if atlas.canonical else "identity")


def place(cfg: DictConfig, atlas, subject):
    """The atlas in the subject's common space ``[K, *S]`` and the automatic placement (or ``None``).

    ``atlas.placement`` null: ``auto`` for a canonical atlas (from ``mvmm-build-atlas``: it has no
    world position, the heart is found on the full field of view), ``identity`` for an atlas in
    world space (the synthetic cohort's, one made for cropped images).
    """
    placement = default_placement(cfg, atlas)
    if placement not in PLACEMENTS:
        raise ValueError(f"atlas.placement must be one of {PLACEMENTS} or null, got {placement!r}")
    if placement != "auto":
        return place_atlas(atlas, subject.grid, placement), None
    search = build(cfg.atlas.auto, _convert_="all") if cfg.atlas.get("auto") else None
    count = int(cfg.atlas.get("hypotheses") or 1)
    if count < 1:
        raise ValueError(f"atlas.hypotheses must be >= 1, got {count}")
    candidates = place_atlas_hypotheses(atlas, subject, search, count)
    prob, found = candidates[0]
    if len(candidates) > 1:
        prob, found = judge_hypotheses(cfg, subject, candidates)
    elif count > 1:  # every other hypothesis refined to this one: nothing to judge
        found = replace(found, hypotheses=[_hypothesis(found, None)], chosen=0)
    log.info(
        "%s: heart found (template NCC %.2f; rotation %.0f deg, scale %.2f, slices %s from apex 0 to base 1)",
        subject.name, found.score, found.angle_deg, found.scale, [round(float(t), 2) for t in found.levels],
    )
    return prob, found


def _cut(cfg: DictConfig, subject, atlas: torch.Tensor, auto: bool):
    """The region of interest around the placed ``atlas`` and, when it is cut (``atlas.crop``; by
    default with automatic placement), the subject, atlas and region cut to it."""
    roi = atlas_roi(atlas, tuple(subject.grid.spacing.tolist()), cfg.model.roi_margin_mm)
    crop = cfg.atlas.get("crop")
    if (crop if crop is not None else auto) and bool(roi.sum() < roi.numel()):
        x0, x1, y0, y1 = crop_box(roi, int(cfg.atlas.get("crop_margin_voxels", 4)))
        subject, atlas, roi = subject.cropped((x0, x1, y0, y1)), atlas[:, x0:x1, y0:y1], roi[x0:x1, y0:y1]
    return subject, atlas, roi


def _hypothesis(found, qc_score: float | None) -> dict:
    return {"template_score": round(float(found.score), 4), "qc_score": None if qc_score is None else round(qc_score, 4),
            "angle_deg": round(float(found.angle_deg), 2), "scale": round(float(found.scale), 4),
            "centre_mm": [round(float(v), 1) for v in found.centres_mm.mean(0)]}


def judge_hypotheses(cfg: DictConfig, subject, candidates: list) -> tuple[torch.Tensor, object]:
    """The placement hypothesis the model itself prefers: each candidate ``(prob, placement)`` gets a
    short EM fit (``atlas.judge_iterations``, no registration) and its quality-control score
    (:mod:`mvmm_monai.pipeline.qc`); the best template match is kept unless another scores
    ``atlas.judge_margin`` higher. The placement returned records every hypothesis
    (``hypotheses``: template score, QC score, angle, scale) and which was chosen."""
    from mvmm_monai.mixture.em import fit_em
    from mvmm_monai.mixture.prior import log_atlas_from_prob
    from mvmm_monai.pipeline.qc import QualityModel, qc_features
    from mvmm_monai.pipeline.settings import subject_weights, subtype_counts
    from mvmm_monai.registration.composite import Warped

    if not cfg.get("qc"):
        raise ValueError("atlas.hypotheses > 1 needs the qc group (the quality model judges the hypotheses)")
    model: QualityModel = build(cfg.qc, _convert_="all")
    em = build(cfg.model.em)
    counts = subtype_counts(cfg.model, subject.sequences)
    weight = float(cfg.model.get("atlas_weight", 1.0))
    rows = []
    for prob, found in candidates:
        sub, atlas, roi = _cut(cfg, subject, prob, True)
        sub, atlas = sub.with_roi(roi), temper_atlas(atlas, weight)
        images, coverage = sub.images[None].float(), sub.coverage[None].float()
        weights = torch.tensor(subject_weights(cfg.model, sub), dtype=coverage.dtype).reshape(1, -1, *[1] * (coverage.ndim - 2))
        log_atlas = log_atlas_from_prob(atlas[None].float(), cfg.model.atlas_floor)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            fitted = fit_em(images, coverage * weights, log_atlas, counts, em, max_iter=int(cfg.atlas.get("judge_iterations", 15)), tol=0.0)
        posterior = fitted.log_posterior[0].exp()
        result = SimpleNamespace(posterior=posterior, params=fitted.params, warped=Warped(images, coverage, log_atlas))
        features, _ = qc_features(sub, result, posterior, found)
        rows.append(model.score(features))
    best = max(range(len(rows)), key=rows.__getitem__)
    chosen = best if rows[best] >= rows[0] + float(cfg.atlas.get("judge_margin", 0.05)) else 0
    table = [_hypothesis(f, q) for (_, f), q in zip(candidates, rows)]
    log.info("%s: %d placement hypotheses judged by a short fit (QC scores %s); hypothesis %d chosen",
             subject.name, len(rows), [round(q, 3) for q in rows], chosen)
    prob, found = candidates[chosen]
    return prob, replace(found, hypotheses=table, chosen=chosen)


@dataclass(frozen=True)
class Prepared:
    """A subject ready to fit: ``subject`` (cropped to the region of interest when the atlas was
    placed automatically, coverage restricted to it), ``atlas`` ``[K, *S]`` placed probabilities
    in its common space, ``roi`` ``[*S]``, the automatic ``placement`` (or ``None``), and the input
    ``checks`` (``{"mirrored": ...}``, :func:`mvmm_monai.data.checks.mirrored_sequences`)."""

    subject: object
    atlas: torch.Tensor
    roi: torch.Tensor
    placement: object
    checks: dict = field(default_factory=dict)


def prepare_subject(cfg: DictConfig, dataset, name: str) -> Prepared:
    """Load ``name``, place the atlas (``atlas.placement``), cut the region of interest: everything a
    fit does before its first ICM iteration (benchmarks call it to give peers the same inputs)."""
    subject = dataset.load(name)
    checks = {"mirrored": mirrored_sequences(subject)}
    atlas_path = cfg.atlas.path or dataset.default_atlas()
    if atlas_path is None:
        raise ValueError(
            f"atlas.path is required for data={dataset.name} (a 4D NIfTI: background, myocardium, LV, RV; "
            "build one with scripts/build_atlas.py)"
        )
    atlas, placement = place(cfg, read_atlas(atlas_path), subject)
    if cfg.atlas.get("displace"):  # a failure made on purpose (quality-control calibration and tests)
        d = cfg.atlas.displace
        atlas = displace_atlas(atlas, subject.grid.spacing.tolist(), tuple(d.get("shift_mm", (0.0, 0.0))),
                               float(d.get("scale", 1.0)), float(d.get("angle_deg", 0.0)))
        log.warning("%s: the placed atlas was displaced on purpose (atlas.displace=%s)", subject.name, dict(d))
    subject, atlas, roi = _cut(cfg, subject, atlas, placement is not None)
    return Prepared(subject.with_roi(roi), atlas, roi, placement, checks)


def temper_atlas(atlas: torch.Tensor, weight: float) -> torch.Tensor:
    """``A_k^w / sum_j A_j^w`` ``[K, *S]``: ``model.atlas_weight`` w < 1 lets the images speak louder
    than a blurred population atlas near boundaries (ANTs Atropos' prior weighting), w > 1 sharpens
    it; 1 = MvMM as written."""
    if not 0 < weight <= 4:
        raise ValueError(f"model.atlas_weight must be in (0, 4], got {weight}")
    if weight == 1:
        return atlas
    t = atlas.clamp_min(1e-12) ** weight
    return t / t.sum(0, keepdim=True)
