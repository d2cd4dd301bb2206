"""Atlas files: reading and checking, writing, and the one JSON sidecar schema.

An atlas is a 4D NIfTI ``[X, Y, Z, K]`` (one channel per class in :data:`CLASS_NAMES` order,
probabilities summing to one) with a JSON sidecar ``<name>.json`` (or ``atlas.json``) beside it
(:func:`atlas_sidecar`: classes, label values, frame, how it was built) and, for an atlas in the
heart-centred frame, an intensity template ``<name>_template.nii.gz`` for automatic placement.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch import Tensor

from mvmm_monai.classes import CLASS_NAMES, LabelMap
from mvmm_monai.data.common_space import Grid
from mvmm_monai.files import save_json, save_nifti
from mvmm_monai.version import __version__

#: the one sidecar schema of every atlas this package writes (built, 2D mid-slice, synthetic)
ATLAS_FORMAT = "mvmm-monai atlas 2"
FRAMES = ("world", "canonical")


@dataclass(frozen=True)
class Atlas:
    """A probabilistic atlas: ``prob`` ``[K, X, Y, Z]`` on ``grid``; ``path`` it was read from."""

    prob: Tensor
    grid: Grid
    path: Path | None = None
    sidecar: dict | None = None
    template: Tensor | None = None

    @property
    def canonical(self) -> bool:
        """Built by ``scripts/build_atlas.py`` in the heart-centred frame (placed with ``auto``)."""
        return bool(self.sidecar) and self.sidecar.get("frame") == "canonical"


def atlas_paths(path: str | Path) -> dict[str, Path]:
    """The files of an atlas named ``path`` (``NAME.nii.gz``): ``atlas``, ``template``
    (``NAME_template.nii.gz``), ``sidecar`` (``NAME.json``) and ``picture`` (``NAME.png``)."""
    path = Path(path)
    stem = path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem
    return {
        "atlas": path,
        "template": path.with_name(f"{stem}_template.nii.gz"),
        "sidecar": path.with_name(f"{stem}.json"),
        "picture": path.with_name(f"{stem}.png"),
    }


def atlas_sidecar(frame: str, label_map: LabelMap, built: dict, **fields) -> dict:
    """The JSON sidecar of an atlas: ``format``, ``frame`` (``world``: placed where its affine puts
    it; ``canonical``: the heart-centred frame of :mod:`mvmm_monai.atlas.frame`, placed
    automatically), ``classes``, ``label_values`` (class, and named sub-structure such as MyoPS
    scar, -> label values), ``built`` (by, date, and ``built``'s entries: from what, how) and
    ``fields`` (a canonical atlas: levels, pixel_mm, radius_mm, angle_deg, template, ...)."""
    if frame not in FRAMES:
        raise ValueError(f"atlas_sidecar: frame must be one of {FRAMES}, got {frame!r}")
    values = {c: list(v) for c, v in zip(CLASS_NAMES, label_map.values)} | {k: [v] for k, v in label_map.extra.items()}
    return {
        "format": ATLAS_FORMAT,
        "frame": frame,
        "classes": list(CLASS_NAMES),
        "label_values": values,
        "built": {"by": f"mvmm-monai {__version__}", "date": datetime.date.today().isoformat(), **built},
        **fields,
    }


def write_atlas(path: str | Path, prob: np.ndarray, affine: np.ndarray, sidecar: dict, template: np.ndarray | None = None) -> dict[str, Path]:
    """Write ``prob`` ``[K, X, Y, Z]`` as the 4D NIfTI ``[X, Y, Z, K]`` ``path`` with ``affine``, its
    ``sidecar`` (:func:`atlas_sidecar`) beside it and, if given, the intensity ``template``
    ``[S, X, Y, Z]`` (named in the sidecar's ``template``); each file atomically. Returns the paths."""
    paths = atlas_paths(path)
    if not str(paths["atlas"]).endswith((".nii.gz", ".nii")):
        raise ValueError(f"atlas output must be a .nii.gz path, got {path}")
    prob = np.asarray(prob, dtype=np.float32)
    if prob.ndim != 4 or prob.shape[0] != len(CLASS_NAMES):
        raise ValueError(f"write_atlas: prob must be [{len(CLASS_NAMES)}, X, Y, Z], got {prob.shape}")
    if template is not None:
        save_nifti(paths["template"], np.moveaxis(np.asarray(template, dtype=np.float32), 0, -1), affine)
        sidecar = {**sidecar, "template": paths["template"].name}
    save_nifti(paths["atlas"], np.moveaxis(prob, 0, -1), affine)
    save_json(paths["sidecar"], sidecar)
    return paths


def _sidecar(path: Path) -> dict | None:
    for cand in (path.with_name(path.name.replace(".nii.gz", ".json").replace(".nii", ".json")), path.with_name("atlas.json")):
        if cand.is_file():
            return json.loads(cand.read_text())
    return None


MIN_CLASS_PEAK = 0.1  # an atlas class whose probability stays below this everywhere is empty


def read_atlas(path: str | Path) -> Atlas:
    """Read and check a 4D atlas NIfTI (classes in the last dimension; 2D atlases ``[X, Y, 1, K]``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: wrong dimensionality or number of classes, NaN, negative values, voxels
            whose probabilities do not sum to ~1, or an empty class (below ``MIN_CLASS_PEAK``
            everywhere); the file and the class are named.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"atlas file not found: {path}")
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj).astype(np.float32)
    if data.ndim == 3 and data.shape[-1] == len(CLASS_NAMES):  # a 2D atlas [X, Y, K]
        data = data[:, :, None, :]
    if data.ndim != 4:
        raise ValueError(f"{path}: atlas must be 4D [X, Y, Z, K], got shape {data.shape}")
    if data.shape[-1] != len(CLASS_NAMES):
        raise ValueError(
            f"{path}: atlas has {data.shape[-1]} classes, expected {len(CLASS_NAMES)} {list(CLASS_NAMES)}"
        )
    if not np.isfinite(data).all():
        raise ValueError(f"{path}: atlas contains NaN/Inf")
    if data.min() < -1e-4:
        raise ValueError(f"{path}: atlas has negative probabilities (min {data.min():.3g})")
    total = data.sum(-1)
    if np.abs(total - 1).max() > 1e-2:
        raise ValueError(f"{path}: atlas probabilities must sum to 1 over classes (found {total.min():.3g}..{total.max():.3g})")
    for k, name in enumerate(CLASS_NAMES):
        peak = float(data[..., k].max())
        if peak < MIN_CLASS_PEAK:
            raise ValueError(
                f"{path}: atlas class {name!r} (channel {k}) is empty (its highest probability is {peak:.3g}); "
                "the fit could never find that structure (rebuild the atlas from labels that contain it)"
            )
    prob = torch.from_numpy(np.moveaxis(np.clip(data, 0, None) / total[..., None], -1, 0).copy())
    grid = Grid(torch.as_tensor(img.affine, dtype=torch.float64), tuple(prob.shape[1:]))
    sidecar = _sidecar(path)
    template = None
    if sidecar and sidecar.get("frame") == "canonical":
        for key in ("pixel_mm", "radius_mm", "template", "template_sequences"):
            if key not in sidecar:
                raise ValueError(f"{path}: the sidecar of a canonical atlas lacks {key!r} (rebuild it with scripts/build_atlas.py)")
        tpath = path.with_name(sidecar["template"])
        if not tpath.is_file():
            raise FileNotFoundError(f"{path}: its intensity template {tpath} is missing (rebuild with scripts/build_atlas.py)")
        tdata = np.asanyarray(nib.load(str(tpath)).dataobj).astype(np.float32)
        if tdata.ndim != 4 or tdata.shape[:3] != data.shape[:3] or tdata.shape[3] != len(sidecar["template_sequences"]):
            raise ValueError(
                f"{tpath}: template shape {tdata.shape} does not match the atlas {data.shape[:3]} "
                f"with {len(sidecar['template_sequences'])} sequences"
            )
        if not np.isfinite(tdata).all():
            raise ValueError(f"{tpath}: template contains NaN/Inf")
        template = torch.from_numpy(np.moveaxis(tdata, -1, 0).copy())
    return Atlas(prob=prob, grid=grid, path=path, sidecar=sidecar, template=template)
