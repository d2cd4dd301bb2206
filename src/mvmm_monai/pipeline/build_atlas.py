"""Build a canonical atlas from a dataset's labelled subjects (``mvmm-build-atlas``)."""

from __future__ import annotations

import logging
import time

from omegaconf import DictConfig

from mvmm_monai.config import build

log = logging.getLogger(__name__)


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

    from mvmm_monai.atlas.build import build_canonical_atlas, write_canonical_atlas

    start = time.perf_counter()
    dataset = build(cfg.data)
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
    paths = write_canonical_atlas(
        atlas,
        cfg.output,
        label_map=subjects[0].label_map,
        built={"dataset": dataset.name, "root": str(getattr(dataset, "root", "")), "size": int(cfg.size), "sigma_mm": float(cfg.sigma_mm)},
    )
    log.info(
        "atlas from %d subjects in %.1f s: mean heart radius %.1f mm, LV->RV direction %.0f deg; wrote %s",
        len(subjects), time.perf_counter() - start, atlas.radius_mm, atlas.angle_deg, ", ".join(str(p) for p in paths.values()),
    )
    return paths
