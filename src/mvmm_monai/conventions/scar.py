"""The scar output of a fit: ``<subject>_scar.nii.gz`` and the ``scar`` entry of ``metrics.json``.

The rule lives in :mod:`mvmm_monai.mixture.scar`; this module applies it to a finished fit, brings
the mask to the reference sequence's native grid the same way the reference segmentation goes
there (:func:`~mvmm_monai.data.common_space.native_segmentation`), writes it and scores it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from mvmm_monai.classes import class_argmax
from mvmm_monai.data.common_space import native_segmentation
from mvmm_monai.files import save_nifti
from mvmm_monai.mixture.scar import MYOCARDIUM, ScarResult, enhanced_subtype_bic_gain, scar_segmentation


def mask_dice(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """Dice of two boolean masks of one shape; 1.0 when both are empty."""
    if pred.shape != truth.shape:
        raise ValueError(f"mask_dice: shapes differ, {tuple(pred.shape)} vs {tuple(truth.shape)}")
    pred, truth = pred.bool(), truth.bool()
    total = int(pred.sum()) + int(truth.sum())
    return 2.0 * int((pred & truth).sum()) / total if total else 1.0


#: the scar rules (``model.scar.rule``)
SCAR_RULES = ("subtype", "fwhm", "subtype_and_fwhm")


def fwhm_mask(image: torch.Tensor, myocardium: torch.Tensor, percentile: float = 99.0) -> torch.Tensor:
    """Full width at half maximum, the clinical rule: myocardium voxels at least half as bright as
    the myocardium's maximum (its ``percentile``, robust to single voxels); empty without myocardium."""
    values = image[myocardium]
    if values.numel() < 10:
        return torch.zeros_like(myocardium)
    return myocardium & (image >= 0.5 * torch.quantile(values.double(), percentile / 100.0).to(image.dtype))


def voxel_ml(grid) -> float:
    """The volume of one voxel of ``grid`` (a :class:`~mvmm_monai.data.common_space.Grid`), ml."""
    return float(torch.prod(grid.spacing.to(torch.float64))) / 1000.0


def drop_small_components(mask: torch.Tensor, ml_per_voxel: float, min_ml: float) -> torch.Tensor:
    """``mask`` ``[X, Y, Z]`` (bool) without its connected pieces (26-connected) smaller than
    ``min_ml`` millilitres (``ml_per_voxel`` the volume of one voxel); ``min_ml`` 0 keeps every piece."""
    if min_ml < 0:
        raise ValueError(f"model.scar.min_component_ml must be >= 0, got {min_ml}")
    if min_ml == 0 or not bool(mask.any()):
        return mask
    from scipy import ndimage

    pieces, _ = ndimage.label(mask.cpu().numpy(), structure=np.ones((3, 3, 3)))
    volume = np.bincount(pieces.ravel()) * ml_per_voxel
    keep = (volume >= min_ml) & (np.arange(volume.size) > 0)
    return torch.from_numpy(keep[pieces]).to(mask.device)


def open_in_plane(mask: torch.Tensor, spacing_mm: tuple[float, float], radius_mm: float) -> torch.Tensor:
    """``mask`` ``[X, Y, Z]`` (bool) opened slice by slice (erosion then dilation) by a disk of
    ``radius_mm`` (an ellipse in voxels where the two in-plane spacings differ): what is thinner
    than the disk anywhere goes (the one- and two-voxel band of blood partial volume along the
    endocardium, single bright voxels), what the disk fits in stays (with its corners rounded to
    the disk); 0 keeps the mask."""
    if radius_mm < 0:
        raise ValueError(f"model.scar.open_mm must be >= 0, got {radius_mm}")
    if radius_mm == 0 or not bool(mask.any()):
        return mask
    from scipy import ndimage

    rx, ry = (radius_mm / float(s) for s in spacing_mm)
    x, y = np.mgrid[-int(rx):int(rx) + 1, -int(ry):int(ry) + 1]
    disk = (x / max(rx, 1e-9)) ** 2 + (y / max(ry, 1e-9)) ** 2 <= 1.0 + 1e-9
    m = mask.cpu().numpy()
    out = np.stack([ndimage.binary_opening(m[..., z], structure=disk) for z in range(m.shape[-1])], axis=-1)
    return torch.from_numpy(out).to(mask.device)


def native_scar(
    subject, scores: torch.Tensor, result, shifts: dict, myocardium: torch.Tensor, min_contrast: float = 2.0,
    min_blood_fraction: float = 0.45, rule: str = "subtype_and_fwhm", min_component_ml: float = 0.0, open_mm: float = 0.0,
    min_bic_gain: float = 0.0,
) -> tuple[torch.Tensor, ScarResult, float | None, int]:
    """Scar mask ``[X, Y, Z]`` (bool) on the reference sequence's native grid, the common-space
    result, the model comparison's gain (:func:`enhanced_subtype_bic_gain` on the reference's
    intensities in its labelled myocardium, as the fit scaled them), and how many voxels of scar
    the comparison cleared (0 where it cleared none).

    ``rule``: ``subtype`` (the LGE myocardium's brightest subtype, :mod:`mvmm_monai.mixture.scar`),
    ``fwhm`` (:func:`fwhm_mask` within the labelled myocardium) or ``subtype_and_fwhm`` (both);
    ``benchmarks/scar_methods.py`` compares them with the clinical n-SD rule. Whatever the rule, no
    scar where the gain is not above ``min_bic_gain`` (or cannot be computed) unless that is 0.

    Args:
        subject: the fitted :class:`~mvmm_monai.data.subject.SubjectData` (reference first); when
            its common space is a crop (``subject.parent``), the mask is put back on the uncut grid.
        scores: ``[K, *S]`` label scores of the ``postprocess`` stage (the posterior itself with
            ``postprocess=none``): scar is looked for in the myocardium they label.
        result: the :class:`~mvmm_monai.pipeline.module.FitResult` of the fit (images, parameters).
        shifts: sequence -> fitted slice shifts in voxels (as for the segmentations).
        myocardium: ``[X, Y, Z]`` bool, the labelled myocardium on the reference's native, uncut
            grid (its label map's), whose intensities the model comparison reads.
        min_contrast, min_blood_fraction: see :func:`~mvmm_monai.mixture.scar.scar_segmentation`.
        min_component_ml: pieces of scar smaller than this (ml, on the native grid) are dropped
            (:func:`drop_small_components`), after the mask is opened in-plane by a disk of
            ``open_mm`` (:func:`open_in_plane`).
    """
    ref = subject.reference
    w = result.warped
    res = scar_segmentation(
        w.images,
        w.coverage,
        scores[None].to(w.images.dtype),
        result.params,
        sequence_index=subject.sequences.index(ref),
        class_index=MYOCARDIUM,
        min_contrast=min_contrast,
        min_blood_fraction=min_blood_fraction,
    )
    if rule not in SCAR_RULES:
        raise ValueError(f"model.scar.rule must be one of {SCAR_RULES}, got {rule!r}")
    mask = res.mask[0]
    if rule != "subtype":
        n = subject.sequences.index(ref)
        myo = (class_argmax(scores) == MYOCARDIUM) & (w.coverage[0, n] > 0)
        fw = fwhm_mask(w.images[0, n], myo)
        mask = fw if rule == "fwhm" else mask & fw
    two_class = torch.stack((~mask, mask)).to(scores.dtype)  # [2, *S]: no scar, scar
    full = getattr(subject, "parent", None) or subject  # the uncut subject when the common space was cropped
    if full is not subject:
        two_class = subject.uncrop(two_class, 0.0, 1.0)
    native = (native_segmentation(two_class, full, ref, shifts.get(ref)) == 1).cpu()
    opened = open_in_plane(native, tuple(float(v) for v in full.grids[ref].spacing[:2]), open_mm)
    mask = drop_small_components(opened, voxel_ml(full.grids[ref]), min_component_ml)
    gain = enhanced_subtype_bic_gain(full.native_images[ref][0][myocardium.cpu()])
    if min_bic_gain > 0 and (gain is None or gain <= min_bic_gain) and bool(mask.any()):
        return torch.zeros_like(mask), res, gain, int(mask.sum())
    return mask, res, gain, 0


def _finite(v: torch.Tensor) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def write_scar(subject, scores: torch.Tensor, result, shifts: dict, out: Path, myocardium: torch.Tensor, min_contrast: float = 2.0,
               min_blood_fraction: float = 0.45, rule: str = "subtype_and_fwhm", min_component_ml: float = 0.0, open_mm: float = 0.0,
               min_bic_gain: float = 0.0) -> dict:
    """Write ``<subject>_scar.nii.gz`` (uint8 0/1, the reference's native grid) into ``out``
    (``myocardium``: see :func:`native_scar`).

    Returns the ``scar`` entry of ``metrics.json``: ``volume_ml``, the two guards of the rule
    (``contrast`` in SDs and ``blood_fraction``, see :func:`~mvmm_monai.mixture.scar.subtype_contrast`;
    null with one myocardium subtype), the model comparison's ``bic_gain``
    (:func:`enhanced_subtype_bic_gain`; null where it cannot be computed) against ``min_bic_gain``
    and the scar it cleared (``cleared_by_bic_ml``: what the rule found in a heart where the
    comparison does not prefer an enhanced subtype by more than ``min_bic_gain``; 0 otherwise), and,
    when the subject has a manual scar label on the reference, ``dice`` (1.0 when both masks are
    empty) and ``true_volume_ml``.
    """
    ref = subject.reference
    mask, res, gain, cleared = native_scar(subject, scores, result, shifts, myocardium, min_contrast, min_blood_fraction, rule,
                                           min_component_ml, open_mm, min_bic_gain)
    full = getattr(subject, "parent", None) or subject
    grid = full.grids[ref]
    save_nifti(Path(out) / f"{subject.name}_scar.nii.gz", mask.numpy().astype(np.uint8), grid.affine.numpy())
    ml = voxel_ml(grid)
    entry: dict = {
        "volume_ml": int(mask.sum()) * ml,
        "rule": rule,
        "min_component_ml": min_component_ml,
        "open_mm": open_mm,
        "contrast": _finite(res.contrast[0]),
        "blood_fraction": _finite(res.blood_fraction[0]),
        "bic_gain": gain,
        "min_bic_gain": min_bic_gain,
        "cleared_by_bic_ml": cleared * ml,
    }
    truth = full.scar_labels.get(ref)
    if truth is not None:
        entry["dice"] = mask_dice(mask, truth.cpu())
        entry["true_volume_ml"] = int(truth.sum()) * ml
    return entry
