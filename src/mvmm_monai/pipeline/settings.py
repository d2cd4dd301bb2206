"""Settings of a fit, checked before any work: subtype counts, convergence window, sequence
weights, and the flat settings of TensorBoard's HParams dashboard."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from mvmm_monai.classes import CLASS_NAMES
from mvmm_monai.data.common_space import slab_ids


def hparams(cfg: DictConfig) -> dict:
    """Flat settings for TensorBoard's HParams dashboard: subtype counts, MRF, registration weights."""
    flat = {f"subtypes/{k}": int(v) for k, v in cfg.model.subtypes.items()}
    for seq, row in (cfg.model.get("subtype_overrides") or {}).items():
        flat.update({f"subtypes/{seq}/{k}": int(v) for k, v in row.items()})
    flat.update(
        {
            "mrf_beta": -1.0 if cfg.model.em.beta == "auto" else float(cfg.model.em.beta),  # -1: estimated
            "update_pi": bool(cfg.model.em.update_pi),
            "roi_margin_mm": -1.0 if cfg.model.roi_margin_mm is None else float(cfg.model.roi_margin_mm),
            "atlas_weight": float(cfg.model.get("atlas_weight", 1.0)),
        }
    )
    reg = cfg.registration.model
    deformation, motion = reg.get("atlas_deformation"), reg.get("slice_motion")
    atlas = deformation is not None and bool(deformation.affine or deformation.svf)
    flat["registration"] = "+".join(n for n, on in (("atlas", atlas), ("slices", motion is not None)) if on) or "none"
    if deformation is not None:
        flat["bending_weight"] = float(deformation.bending_weight)
    if atlas or motion is not None:
        flat.update({f"lr/{k}": float(v) for k, v in (reg.get("lr") or {}).items()})
    return flat


def final_scalars(metrics: dict) -> dict:
    """``final/...`` scalars of a finished fit (Dice per structure and sequence, log-likelihood)."""
    out = {"final/log_likelihood": metrics["log_likelihood"]}
    for seq, d in metrics.get("dice", {}).items():
        out.update({f"final/dice/{seq}/{k}": v for k, v in d.items() if v == v})
    return out


def subtype_counts(model_cfg: DictConfig, sequences: tuple[str, ...]) -> torch.Tensor:
    """``[N, K]`` subtype counts from ``model.subtypes`` and ``model.subtype_overrides``."""
    base = dict(model_cfg.subtypes)
    overrides = dict(model_cfg.get("subtype_overrides") or {})
    unknown_cls = set(base) - set(CLASS_NAMES)
    if unknown_cls or set(CLASS_NAMES) - set(base):
        raise ValueError(f"model.subtypes must name exactly the classes {list(CLASS_NAMES)}, got {sorted(base)}")
    unknown_seq = set(overrides) - set(sequences)
    if unknown_seq:
        raise ValueError(f"model.subtype_overrides names unknown sequences {sorted(unknown_seq)}; sequences: {list(sequences)}")
    counts = []
    for s in sequences:
        row = dict(base) | dict(overrides.get(s) or {})
        bad = {k: v for k, v in row.items() if k not in CLASS_NAMES or not isinstance(v, int) or not 1 <= v <= 10}
        if bad:
            raise ValueError(f"model.subtypes for {s}: counts must be integers in 1..10 per class {list(CLASS_NAMES)}, got {bad}")
        counts.append([row[c] for c in CLASS_NAMES])
    return torch.tensor(counts, dtype=torch.long)


def convergence_window(cfg: DictConfig) -> int:
    """ICM iterations in a row the log-likelihood (or the posterior) must be still for before a fit
    stops: ``model.tol_window``, or the registration preset's ``min_tol_window`` if that is larger.
    Checks the tolerances ``model.tol`` and ``model.posterior_tol`` too."""
    window, least = cfg.model.tol_window, cfg.registration.get("min_tol_window")
    for key, value in (("model.tol_window", window), ("registration.min_tol_window", least)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    for key in ("tol", "posterior_tol"):
        value = cfg.model.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"model.{key} must be a number >= 0, got {value!r}")
    return max(window, least or 1)


def subject_weights(model_cfg: DictConfig, subject) -> list[float]:
    """The likelihood weight of each of ``subject``'s sequences: :func:`sequence_weights`, and with
    ``model.thickness_weights`` each times ``min(1, reference slice thickness / its own)``: a slab
    thicker than the reference's slices mixes the anatomy of several of them, so its evidence at each
    reference voxel it covers counts for less (``benchmarks/hetero_coverage_real.py``)."""
    weights = sequence_weights(model_cfg, subject.sequences)
    if not model_cfg.get("thickness_weights", False):
        return weights
    ref = float(subject.grids[subject.reference].spacing[2])
    return [w * min(1.0, ref / float(subject.grids[s].spacing[2])) for w, s in zip(weights, subject.sequences)]


def sequence_weights(model_cfg: DictConfig, sequences) -> list[float]:
    """``model.sequence_weights`` (sequence -> positive weight, the others 1; null: all 1) as one
    weight per sequence of ``sequences``. Set explicitly, every name must be one of ``sequences``;
    taken from the ``tuning`` group (the default), names the subject lacks are left out."""
    given = model_cfg.get("sequence_weights")
    if given is None:
        return [1.0] * len(sequences)
    if not isinstance(given, (dict, DictConfig)):
        raise ValueError(f"model.sequence_weights must be a mapping sequence -> number (e.g. {{C0: 0.5}}), {{}} or null, got {given!r}")
    given = dict(given)
    if OmegaConf.is_interpolation(model_cfg, "sequence_weights"):  # the tuning's: for the sequences there are
        given = {k: v for k, v in given.items() if k in sequences}
    unknown = sorted(set(given) - set(sequences))
    if unknown:
        raise ValueError(f"model.sequence_weights: {unknown} not among the subject's sequences {list(sequences)}")
    bad = {k: v for k, v in given.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0}
    if bad:
        raise ValueError(f"model.sequence_weights must be positive numbers, got {bad}")
    return [float(given.get(s, 1.0)) for s in sequences]


def partial_volume_flag(model_cfg: DictConfig) -> bool:
    """``model.partial_volume`` (default false), refused unless true or false."""
    flag = model_cfg.get("partial_volume", False)
    if not isinstance(flag, bool):
        raise ValueError(f"model.partial_volume must be true or false, got {flag!r}")
    return flag


def partial_volume_slabs(model_cfg: DictConfig, subject) -> torch.Tensor | None:
    """With ``model.partial_volume``, ``[N, *common space]`` long: the thick slab of every voxel for
    each sequence (:func:`~mvmm_monai.data.common_space.slab_ids`; the reference's -1); None without
    it, or where no sequence has a slab spanning two reference slices (co-registered stacks)."""
    if not partial_volume_flag(model_cfg):
        return None
    grid = subject.grid
    slabs = torch.stack([
        torch.full(grid.shape, -1, dtype=torch.long) if s == subject.reference else slab_ids(subject.grids[s], grid)
        for s in subject.sequences
    ])
    return slabs if bool((slabs >= 0).any()) else None  # no slab spans two reference slices: nothing to do
