"""Everything a fit does before its first ICM iteration: load the subject, place the atlas, cut the
region of interest (benchmarks call :func:`prepare_subject` to give peers the same inputs)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig

from mvmm_monai.atlas.io import read_atlas
from mvmm_monai.atlas.placement import PLACEMENTS, displace_atlas, place_atlas, place_atlas_auto
from mvmm_monai.atlas.roi import atlas_roi, crop_box
from mvmm_monai.config import build
from mvmm_monai.data.checks import mirrored_sequences

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
    prob, found = place_atlas_auto(atlas, subject, search)
    log.info(
        "%s: heart found (template NCC %.2f; rotation %.0f deg, scale %.2f, slices %s from apex 0 to base 1)",
        subject.name, found.score, found.angle_deg, found.scale, [round(float(t), 2) for t in found.levels],
    )
    return prob, found


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
    roi = atlas_roi(atlas, tuple(subject.grid.spacing.tolist()), cfg.model.roi_margin_mm)
    crop = cfg.atlas.get("crop")
    if (crop if crop is not None else placement is not None) and bool(roi.sum() < roi.numel()):
        x0, x1, y0, y1 = crop_box(roi, int(cfg.atlas.get("crop_margin_voxels", 4)))
        subject, atlas, roi = subject.cropped((x0, x1, y0, y1)), atlas[:, x0:x1, y0:y1], roi[x0:x1, y0:y1]
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
