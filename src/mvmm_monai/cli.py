"""Hydra entry points: ``scripts/fit.py`` calls :func:`fit_main`, tests call :func:`fit`."""

from __future__ import annotations

import logging
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from mvmm_monai import CLASS_NAMES
from mvmm_monai.atlas import PLACEMENTS, atlas_roi, crop_box, place_atlas, place_atlas_auto, read_atlas
from mvmm_monai.evaluation import segmentation_metrics
from mvmm_monai.fit_module import MvMMFit
from mvmm_monai.postprocess import follow_labelling_conventions, lv_cavity_fill_mode
from mvmm_monai.progress import lightning_notes_silenced
from mvmm_monai.outputs import native_segmentation, save_json, save_nifti, save_png
from mvmm_monai.scar_output import write_scar

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
log = logging.getLogger(__name__)



def hparams(cfg: DictConfig) -> dict:
    """Flat settings for TensorBoard's HParams dashboard: subtype counts, MRF, registration weights."""
    flat = {f"subtypes/{k}": int(v) for k, v in cfg.model.subtypes.items()}
    for seq, row in (cfg.model.get("subtype_overrides") or {}).items():
        flat.update({f"subtypes/{seq}/{k}": int(v) for k, v in row.items()})
    flat.update(
        {
            "mrf_beta": float(cfg.model.em.beta),
            "update_pi": bool(cfg.model.em.update_pi),
            "roi_margin_mm": -1.0 if cfg.model.roi_margin_mm is None else float(cfg.model.roi_margin_mm),
            "atlas_weight": float(cfg.model.get("atlas_weight", 1.0)),
            "registration": str(cfg.registration.model._target_).rsplit(".", 1)[-1],
        }
    )
    reg = cfg.registration.model
    if "bending_weight" in reg:
        flat["bending_weight"] = float(reg.bending_weight)
        flat.update({f"lr/{k}": float(v) for k, v in (reg.get("lr") or {}).items()})
    return flat


def final_scalars(metrics: dict) -> dict:
    """``final/...`` scalars of a finished fit (Dice per structure and sequence, log-likelihood)."""
    out = {"final/log_likelihood": metrics["log_likelihood"]}
    for seq, d in metrics.get("dice", {}).items():
        out.update({f"final/dice/{seq}/{k}": v for k, v in d.items() if v == v})
    return out


def _build(node, *args, **kwargs):
    """``hydra.utils.instantiate`` that lets our own clear errors through unwrapped.

    Hydra wraps an exception raised by a ``_target_`` in ``InstantiationException``; a
    ``ValueError``/``FileNotFoundError`` from our constructors already names the problem.
    """
    from hydra.errors import InstantiationException

    try:
        return instantiate(node, *args, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, (ValueError, FileNotFoundError)):
            raise err.__cause__ from None
        raise


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


def _metrics(subject, posterior: torch.Tensor, shifts: dict) -> tuple[dict, dict]:
    """Native-grid segmentations of every sequence and their Dice/HD95 where labels exist."""
    segs = {s: native_segmentation(posterior, subject, s, shifts.get(s)) for s in subject.sequences}
    scores: dict = {"dice": {}, "hd95_mm": {}}
    done: dict = {}
    for s, label in subject.labels.items():
        # the same label file on the same grid with the same segmentation (co-registered sequences): score once
        key = (str(subject.files.labels.get(s)), tuple(subject.grids[s].shape), subject.grids[s].affine.numpy().round(3).tobytes())
        if key in done and torch.equal(segs[s], segs[done[key]]):
            scores["dice"][s], scores["hd95_mm"][s] = scores["dice"][done[key]], scores["hd95_mm"][done[key]]
            continue
        done[key] = s
        m = segmentation_metrics(segs[s], label, tuple(subject.grids[s].spacing.tolist()))
        scores["dice"][s] = m["dice"]
        scores["hd95_mm"][s] = m["hd95_mm"]
    return segs, scores


def _subjects(cfg: DictConfig, dataset) -> list[str] | None:
    """``subject``: null (the first), a name, ``all``, or a list. ``None`` means a single fit."""
    sel = cfg.subject
    if sel is None:
        return None
    if isinstance(sel, str) and sel != "all":
        return None
    names = dataset.subjects() if sel == "all" else [str(x) for x in sel]
    if not names:
        raise ValueError(f"{dataset.name}: no subjects found")
    return names


def fit(cfg: DictConfig) -> dict:
    """Fit what ``cfg`` asks for and write the results under ``cfg.paths.output_dir``.

    One subject (``subject=NAME`` or null): returns the content of its ``metrics.json``. A cohort
    (``subject=all`` or ``subject=[a,b]``): every subject into its own folder, a failing subject
    reported with its error while the others go on, and ``cohort_summary.{csv,md}``; returns the
    summary (``{"subjects": [...], "failed": {...}, "mean": ..., "std": ...}``).
    """
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    several = str(devices) not in ("1", "auto") or int(nodes) != 1
    dataset = _build(cfg.data)
    names = _subjects(cfg, dataset)
    out = Path(cfg.paths.output_dir)
    if names is None:
        if several:
            raise ValueError(
                f"trainer.devices={devices}, trainer.num_nodes={nodes}: one subject is fitted on one device; "
                "several devices shard a cohort (subject=all or subject=[a,b,...])"
            )
        name = cfg.subject if cfg.subject is not None else dataset.subjects()[0]
        return fit_subject(cfg, dataset, name, out)
    if several:
        from mvmm_monai.distributed import run_cohort_distributed

        return run_cohort_distributed(cfg, names, out, fit_subject)
    from mvmm_monai.cohort import run_cohort

    return run_cohort(cfg, dataset, names, out, fit_subject)


def _place(cfg: DictConfig, dataset, atlas, subject):
    """The atlas in the subject's common space ``[K, *S]`` and the automatic placement (or ``None``).

    ``atlas.placement`` null means the dataset's default (``auto`` on full-field-of-view real data).
    """
    placement = cfg.atlas.get("placement") or dataset.default_placement
    if placement not in PLACEMENTS:
        raise ValueError(f"atlas.placement must be one of {PLACEMENTS} or null, got {placement!r}")
    if placement != "auto":
        return place_atlas(atlas, subject.grid, placement), None
    search = _build(cfg.atlas.auto, _convert_="all") if cfg.atlas.get("auto") else None
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
    in its common space, ``roi`` ``[*S]``, and the automatic ``placement`` (or ``None``)."""

    subject: object
    atlas: torch.Tensor
    roi: torch.Tensor
    placement: object


def prepare_subject(cfg: DictConfig, dataset, name: str) -> Prepared:
    """Load ``name``, place the atlas (``atlas.placement``), cut the region of interest: everything a
    fit does before its first ICM iteration (benchmarks call it to give peers the same inputs)."""
    subject = dataset.load(name)
    atlas_path = cfg.atlas.path or dataset.default_atlas()
    if atlas_path is None:
        raise ValueError(
            f"atlas.path is required for data={dataset.name} (a 4D NIfTI: background, myocardium, LV, RV; "
            "build one with scripts/build_atlas.py)"
        )
    atlas, placement = _place(cfg, dataset, read_atlas(atlas_path), subject)
    roi = atlas_roi(atlas, tuple(subject.grid.spacing.tolist()), cfg.model.roi_margin_mm)
    crop = cfg.atlas.get("crop")
    if (crop if crop is not None else placement is not None) and bool(roi.sum() < roi.numel()):
        x0, x1, y0, y1 = crop_box(roi, int(cfg.atlas.get("crop_margin_voxels", 4)))
        subject, atlas, roi = subject.cropped((x0, x1, y0, y1)), atlas[:, x0:x1, y0:y1], roi[x0:x1, y0:y1]
    return Prepared(subject.with_roi(roi), atlas, roi, placement)


def convergence_window(cfg: DictConfig) -> int:
    """ICM iterations in a row the log-likelihood must be still for before a fit stops:
    ``model.tol_window``, or the registration preset's ``min_tol_window`` if that is larger."""
    window, least = cfg.model.tol_window, cfg.registration.get("min_tol_window")
    for key, value in (("model.tol_window", window), ("registration.min_tol_window", least)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    return max(window, least or 1)


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


def with_dataset_defaults(cfg: DictConfig, dataset) -> DictConfig:
    """``cfg`` with the ``model.em`` keys left null filled from the dataset's ``em_defaults``."""
    em = cfg.model.em
    missing = {k: v for k, v in dataset.em_defaults.items() if k in em and em[k] is None}
    if not missing:
        return cfg
    cfg = cfg.copy()
    with open_dict(cfg):
        for k, v in missing.items():
            cfg.model.em[k] = v
    return cfg


def _per_sequence(model_cfg: DictConfig, key: str, sequences, default: dict | None, valid, requirement: str) -> dict[str, float]:
    """``model.<key>``, a mapping sequence -> number, checked: its names among ``sequences`` and
    ``valid(value)`` for each value (else ``model.<key> must be <requirement>``); null takes
    ``default`` (for the sequences there are)."""
    given = model_cfg.get(key)
    if given is None:
        given = {k: v for k, v in (default or {}).items() if k in sequences}
    if not isinstance(given, (dict, DictConfig)):
        raise ValueError(f"model.{key} must be a mapping sequence -> number (e.g. {{C0: 0.5}}), {{}} or null, got {given!r}")
    given = dict(given)
    unknown = sorted(set(given) - set(sequences))
    if unknown:
        raise ValueError(f"model.{key}: {unknown} not among the subject's sequences {list(sequences)}")
    bad = {k: v for k, v in given.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or not valid(v)}
    if bad:
        raise ValueError(f"model.{key} must be {requirement}, got {bad}")
    return {k: float(v) for k, v in given.items()}


def sequence_weights(model_cfg: DictConfig, sequences, defaults: dict | None = None) -> list[float]:
    """``model.sequence_weights`` (sequence -> weight, the others 1) as one weight per sequence;
    null takes the dataset's ``sequence_weights_default`` (for the sequences the subject has)."""
    given = _per_sequence(model_cfg, "sequence_weights", sequences, defaults, lambda v: v > 0, "positive numbers")
    return [given.get(s, 1.0) for s in sequences]


def _postprocess_amount(model_cfg: DictConfig, key: str, default: float, upper: float, unit: str) -> float:
    """``model.<key>`` checked: a number in [0, upper] (0: off), null: the dataset's ``default``."""
    value = model_cfg.get(key)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= upper:
        raise ValueError(f"model.{key} must be {unit} in [0, {upper:g}] (0: off) or null, got {value!r}")
    return float(value)


def min_wall_mm(model_cfg: DictConfig, default: float = 0.0) -> float:
    """``model.min_wall_mm`` checked (null: the dataset's ``min_wall_mm_default``; 0: off)."""
    return _postprocess_amount(model_cfg, "min_wall_mm", default, 30, "a thickness in mm")


def endocardium_median_deg(model_cfg: DictConfig, default: float = 0.0) -> float:
    """``model.endocardium_median_deg`` checked (null: the dataset's ``endocardium_median_deg_default``; 0: off)."""
    return _postprocess_amount(model_cfg, "endocardium_median_deg", default, 180, "an angle in degrees")


def blood_rim(model_cfg: DictConfig, sequences, default: dict | None = None) -> dict[str, float]:
    """``model.blood_rim`` (sequence -> fraction in [-1, 1]) checked against the dataset's
    ``sequences``; null takes the dataset's ``blood_rim_default`` (for the sequences it has), ``{}``
    is off."""
    return _per_sequence(model_cfg, "blood_rim", sequences, default, lambda v: -1 <= v <= 1, "fractions in [-1, 1]")


def fit_subject(cfg: DictConfig, dataset, name: str, out: Path) -> dict:
    """Fit subject ``name`` of ``dataset`` and write its results into ``out``; returns its metrics."""
    start = time.perf_counter()
    cfg = with_dataset_defaults(cfg, dataset)
    fill_mode = lv_cavity_fill_mode(cfg.model.get("lv_cavity_fill", False))  # a bad value fails before any work
    min_wall = min_wall_mm(cfg.model, dataset.min_wall_mm_default)
    endo_median = endocardium_median_deg(cfg.model, dataset.endocardium_median_deg_default)
    rim = blood_rim(cfg.model, dataset.sequences, dataset.blood_rim_default)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    out = Path(out)
    if str(cfg.paths.get("output_dir")) != str(out):  # a cohort member: logs and checkpoints go with it
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.paths.output_dir = str(out)
    prep = prepare_subject(cfg, dataset, name)
    subject, atlas, placement = prep.subject, prep.atlas, prep.placement
    atlas = temper_atlas(atlas, float(cfg.model.get("atlas_weight", 1.0)))
    registration = _build(cfg.registration.model)(subject=subject, atlas=atlas, atlas_floor=cfg.model.atlas_floor)
    optimizer = _build(cfg.registration.optimizer) if cfg.registration.get("optimizer") else None
    if getattr(registration, "fits_anything", False) and optimizer is None:
        raise ValueError("registration.optimizer is required when the registration fits parameters")
    module = MvMMFit(
        subject=subject,
        registration=registration,
        counts=subtype_counts(cfg.model, subject.sequences),
        em=_build(cfg.model.em),
        em_steps=cfg.model.em_steps,
        optimizer=optimizer,
        scheduler=_build(cfg.registration.scheduler) if cfg.registration.get("scheduler") else None,
        tol_window=convergence_window(cfg),
        settle_tol=cfg.model.tol if cfg.registration.get("settle", True) else None,
        sequence_weights=sequence_weights(cfg.model, subject.sequences, dataset.sequence_weights_default),
    )
    callbacks = [_build(c) for c in (cfg.get("callbacks") or {}).values()]
    logger = _build(cfg.logger) if cfg.get("logger") else False
    with lightning_notes_silenced():
        trainer: pl.Trainer = _build(cfg.trainer, logger=logger, callbacks=callbacks)
        trainer.fit(module, ckpt_path=cfg.get("ckpt_path"))
    if not trainer.is_global_zero:
        return {}

    result = module.result()
    # the manual labelling conventions: scar and oedema are wall, which is never thinner than min_wall; trabeculae
    # are cavity; the endocardium is a smooth curve; the pool's partial-volume rim is cavity
    posterior = follow_labelling_conventions(
        result.posterior,
        tuple(float(v) for v in subject.grid.spacing[:2]),
        min_wall_mm=min_wall,
        fill_mode=fill_mode,
        endocardium_median_deg=endo_median,
        blood_rim={subject.sequences.index(k): v for k, v in rim.items() if k in subject.sequences},
        images=result.warped.images[0],
        coverage=result.warped.coverage[0],
    )
    result = dataclasses.replace(result, posterior=posterior)
    full = subject.parent or subject  # the uncut subject when the common space was cropped
    segs, scores = _metrics(full, subject.uncrop(result.posterior, 0.0, 1.0), registration.native_shifts_voxels())
    if subject.reference in full.labels:  # the placed (and deformed) atlas alone: the baseline the mixture must beat
        atlas_seg = subject.uncrop(result.warped.log_atlas[0].float().exp(), 0.0, 1.0).argmax(0)
        ref_labels = full.labels[subject.reference]
        scores["atlas_dice"] = {
            subject.reference: segmentation_metrics(atlas_seg, ref_labels, tuple(full.grid.spacing.tolist()))["dice"]
        }
    scores["scar"] = write_scar(subject, result, registration.native_shifts_voxels(), out, **(cfg.model.get("scar") or {}))
    # met the criterion: stopped before max_epochs, or was kept running past it (trainer.min_epochs)
    converged = trainer.current_epoch < trainer.max_epochs or float(module.recent_changes.max()) < cfg.model.tol
    if not converged:
        log.warning(
            "%s: stopped at trainer.max_epochs=%d before the relative log-likelihood change fell below model.tol=%g "
            "(last %.1e); raise trainer.max_epochs or model.tol if the curve in TensorBoard is still moving",
            subject.name, trainer.max_epochs, cfg.model.tol, float(module.recent_changes.max()),
        )
    metrics = {
        "subject": subject.name,
        **scores,
        "log_likelihood": result.log_likelihood,
        "iterations": result.iterations,
        "converged": converged,
        **({"registration_settled_at": int(module.settled_at) or None} if registration.fits_anything else {}),
        **({"placement": placement.as_dict()} if placement is not None else {}),
        "seconds": time.perf_counter() - start,
    }
    ref_affine = subject.grid.affine.numpy()
    for s in subject.sequences:
        save_nifti(out / f"{subject.name}_{s}_seg.nii.gz", subject.label_map.to_values(segs[s]).numpy(), full.grids[s].affine.numpy())
    save_nifti(out / f"{subject.name}_posterior.nii.gz", np.moveaxis(result.posterior.float().numpy(), 0, -1), ref_affine)
    for key, vol in registration.extra_outputs().items():
        arr = np.moveaxis(vol.float().cpu().numpy(), 0, -1)
        save_nifti(out / f"{subject.name}_{key}.nii.gz", arr, ref_affine, vector=key.startswith("displacement"))
    p = result.params
    save_json(
        out / "params.json",
        {
            "sequences": list(subject.sequences),
            "classes": list(CLASS_NAMES),
            "pi": dict(zip(CLASS_NAMES, torch.exp(p.log_pi[0]).tolist())),
            "subtypes": {
                s: {
                    c: {
                        "tau": torch.exp(p.log_tau[0, n, k][p.valid[0, n, k]]).tolist(),
                        "mu": p.mean[0, n, k][p.valid[0, n, k]].tolist(),
                        "var": p.var[0, n, k][p.valid[0, n, k]].tolist(),
                    }
                    for k, c in enumerate(CLASS_NAMES)
                }
                for n, s in enumerate(subject.sequences)
            },
            "slice_shifts_mm": registration.slice_shifts_mm(),
            "placement": placement.as_dict() if placement is not None else "identity",
            "common_space_box": list(subject.box) if subject.box is not None else None,
            "intensity_scale": "each sequence clipped at its percentiles and scaled to [0, 1]",
            "config": OmegaConf.to_container(cfg.model, resolve=True),
        },
    )
    save_png(out / f"{subject.name}_overlay.png", module.overlay(title=f"{subject.name}: final segmentation", posterior=result.posterior))
    metrics["seconds"] = time.perf_counter() - start
    if logger:
        logger.log_hyperparams(hparams(cfg), metrics=final_scalars(metrics))
        logger.finalize("success")
    save_json(out / "metrics.json", metrics)
    if "dice" in metrics and subject.reference in metrics["dice"]:
        d = metrics["dice"][subject.reference]
        log.info("%s: Dice on %s " + ", ".join(f"{k} %.3f" for k in d), subject.name, subject.reference, *d.values())
    log.info("results written to %s", out)
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="fit")
def fit_main(cfg: DictConfig) -> float | None:
    """``python scripts/fit.py [overrides]``; returns the final log-likelihood (for sweepers)."""
    metrics = fit(cfg)
    return metrics.get("log_likelihood")


def compose_config(overrides: list[str] | tuple[str, ...] = (), config_name: str = "fit") -> DictConfig:
    """The config that ``scripts/fit.py`` would run with ``overrides``, for tests and benchmarks.

    ``paths.output_dir`` must be among the overrides (there is no Hydra run directory here).
    """
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def select_subjects(selection, available: list[str], owner: str = "subjects") -> list[str]:
    """Subjects named by ``selection``: null (all), a list, one name, or an inclusive range ``"A..B"``."""
    if selection is None:
        names = list(available)
    elif isinstance(selection, str) and ".." in selection:
        a, b = selection.split("..", 1)
        missing = [x for x in (a, b) if x not in available]
        if missing:
            raise ValueError(f"{owner}={selection}: {missing} not among the dataset's subjects {available}")
        i, j = available.index(a), available.index(b)
        if i > j:
            raise ValueError(f"{owner}={selection}: {a} comes after {b}")
        names = available[i : j + 1]
    else:
        names = [str(selection)] if isinstance(selection, str) else [str(x) for x in selection]
        unknown = [x for x in names if x not in available]
        if unknown:
            raise ValueError(f"{owner}: unknown subjects {unknown}; available: {available}")
    if not names:
        raise ValueError(f"{owner}: no subjects selected")
    return names


def build_atlas(cfg: DictConfig) -> dict:
    """Build and write the canonical atlas ``cfg.output`` from ``cfg.subjects`` of ``cfg.data``;
    returns the written paths."""
    from tqdm.auto import tqdm

    from mvmm_monai.atlas_builder import build_canonical_atlas, write_canonical_atlas

    start = time.perf_counter()
    dataset = _build(cfg.data)
    names = select_subjects(cfg.get("subjects"), dataset.subjects())
    subjects = []
    for name in tqdm(names, desc="loading", unit="subject", leave=False):
        subj = dataset.load(name)
        if subj.reference not in subj.labels:
            raise ValueError(
                f"{name}: no manual label for the reference sequence {subj.reference} "
                f"(expected {dataset.files(name).images[subj.reference]} to have a label beside it)"
            )
        subjects.append(subj)
    atlas = build_canonical_atlas(
        subjects, size=int(cfg.size), pixel_mm=float(cfg.pixel_mm), levels=int(cfg.levels), sigma_mm=float(cfg.sigma_mm)
    )
    lm = subjects[0].label_map
    paths = write_canonical_atlas(
        atlas,
        cfg.output,
        label_values={**{c: list(v) for c, v in zip(CLASS_NAMES, lm.values)}, **{k: [v] for k, v in lm.extra.items()}},
        built={"dataset": dataset.name, "root": str(getattr(dataset, "root", "")), "size": int(cfg.size), "sigma_mm": float(cfg.sigma_mm)},
    )
    log.info(
        "atlas from %d subjects in %.1f s: mean heart radius %.1f mm, LV->RV direction %.0f deg; wrote %s",
        len(subjects), time.perf_counter() - start, atlas.radius_mm, atlas.angle_deg, ", ".join(str(p) for p in paths.values()),
    )
    return paths


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="build_atlas")
def build_atlas_main(cfg: DictConfig) -> None:
    """``python scripts/build_atlas.py [overrides]``."""
    build_atlas(cfg)
