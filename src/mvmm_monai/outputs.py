"""Result files: NIfTI on each sequence's native grid, JSON; every file written atomically."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from mvmm_monai.data.common_space import SamplingMap, sample, sampling_map


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_nifti(path: str | Path, data: np.ndarray, affine: np.ndarray, vector: bool = False) -> Path:
    """Write ``data`` with ``affine`` (qform and sform, mm) to ``path`` atomically.

    ``vector=True`` stores ``[X, Y, Z, C]`` as a NIfTI vector image ``[X, Y, Z, 1, C]`` (intent
    vector), the layout ITK-SNAP and 3D Slicer read as a displacement field.
    """
    data = np.asarray(data)
    if vector:
        data = data[:, :, :, None, :]
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    if vector:
        img.header.set_intent("vector")
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    img.header.set_xyzt_units("mm")
    return _atomic(Path(path), lambda tmp: nib.save(img, tmp))


def save_png(path: str | Path, fig) -> Path:
    """Save a matplotlib figure as PNG atomically."""
    return _atomic(Path(path), lambda tmp: fig.savefig(tmp, format="png"))


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/Inf become ``None``, numpy and torch scalars become Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "tolist"):
        return _clean(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


def save_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (NaN/Inf as null)."""
    text = json.dumps(_clean(obj), indent=2)
    return _atomic(Path(path), lambda tmp: Path(tmp).write_text(text + "\n"))


def native_segmentation(posterior: torch.Tensor, subject, sequence: str, slice_shifts=None, smap: SamplingMap | None = None):
    """Class indices ``[X_n, Y_n, Z_n]`` of ``sequence``'s own grid from the common-space posterior
    ``[K, *S]``: the posterior is resampled (bilinear in-plane, nearest slice) and its argmax taken;
    voxels the common space does not cover are background. ``slice_shifts`` ``[Z_n, 2]`` (voxels)
    are the fitted motions of the sequence's slices: the labels move with them. Without shifts, a
    precomputed ``smap`` (:func:`~mvmm_monai.data.common_space.sampling_map` from the common space
    to the sequence) saves recomputing the index map, e.g. at every iteration of a fit."""
    if sequence == subject.reference:
        return posterior.argmax(0)
    if smap is None or slice_shifts is not None:
        smap = sampling_map(subject.grid, subject.grids[sequence], target_slice_shifts=slice_shifts)
    prob = sample(posterior.float(), smap)
    return torch.where(smap.coverage.to(prob.device) > 0, prob.argmax(0), torch.zeros((), dtype=torch.long, device=prob.device))
