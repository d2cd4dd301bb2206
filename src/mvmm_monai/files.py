"""Writing files: NIfTI (qform and sform, mm), PNG and JSON, each written atomically with the
permissions the user's umask gives any new file."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np


def current_umask() -> int:
    """The process's umask (read without changing it for longer than the call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write) -> Path:
    """Write ``path`` through ``write(tmp)`` on a hidden temporary name beside it, then rename.

    A reader sees the old file or the whole new one, never a part. The temporary file (private
    while it is written) gets the mode the user's umask gives any new file before the rename, so
    colleagues sharing a group can read the result. A failed ``write`` leaves nothing behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
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
    return atomic_write(Path(path), lambda tmp: nib.save(img, tmp))


PNG_COMPRESS_LEVEL = 1  # zlib level: 0.08 of a 5-panel overlay's 0.14 s at PIL's default 6, a few % larger files


def save_png(path: str | Path, fig) -> Path:
    """Save a matplotlib figure as PNG atomically (fast zlib compression: :data:`PNG_COMPRESS_LEVEL`)."""
    return atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL}))


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
    return atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text + "\n"))
