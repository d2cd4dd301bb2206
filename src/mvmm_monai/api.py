"""The Python API: segment one subject's images from a notebook or a pipeline.

>>> import mvmm_monai
>>> seg = mvmm_monai.segment({"LGE": "lge.nii.gz", "C0": "bssfp.nii.gz", "T2": "t2.nii.gz"},
...                          atlas="atlas/myops.nii.gz", overrides=["postprocess=myops"])  # doctest: +SKIP
>>> seg.labels["LGE"].to_filename("lge_seg.nii.gz")  # doctest: +SKIP

It composes the same Hydra config as ``mvmm-fit`` (``data=files``), so every override of the
command line works here, and with ``output_dir`` it writes the same files.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from mvmm_monai.config import compose_config

#: sequence names that ``data=files`` knows without a ``+`` (others are added)
_FILES_KEYS = ("DE", "C0", "T2")


@dataclass(frozen=True)
class Segmentation:
    """What :func:`segment` returns.

    Attributes:
        labels: sequence -> label map (nibabel image) on that sequence's native grid, in the label
            values of ``data.label_values`` (0, 200 myocardium, 500 LV, 600 RV).
        posterior: the class posteriors ``[X, Y, Z, K]`` exactly as the mixture computed them, on
            the common space (the reference sequence's grid, cut to a box around the heart when the
            atlas was placed automatically).
        scar: the scar mask (uint8) on the reference sequence's native grid.
        metrics: the content of ``metrics.json``.
        params: the content of ``params.json`` (mixture parameters and every effective setting).
        output_dir: where the files were written, or ``None`` when nothing was kept on disk.
    """

    labels: dict[str, nib.Nifti1Image]
    posterior: nib.Nifti1Image
    scar: nib.Nifti1Image
    metrics: dict
    params: dict
    output_dir: Path | None


def _in_memory(path: Path) -> nib.Nifti1Image:
    img = nib.load(str(path))
    return nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header)


def _as_path(value, name: str, folder: Path) -> str:
    """A path for ``value`` (a path, or a nibabel image saved into ``folder``)."""
    if isinstance(value, (str, Path)):
        path = Path(value).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"segment: {name}: no such file {path}")
        return str(path)
    if isinstance(value, nib.spatialimages.SpatialImage):
        path = folder / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(value.dataobj), value.affine, value.header), str(path))
        return str(path)
    raise ValueError(f"segment: {name} must be a path or a nibabel image, got {type(value).__name__}")


def _override_value(text: str) -> str:
    """Quote a path for a Hydra override (spaces, commas and brackets survive)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def segment(
    images: Mapping[str, str | Path | nib.spatialimages.SpatialImage],
    atlas: str | Path,
    output_dir: str | Path | None = None,
    overrides: Sequence[str] = (),
    subject: str = "subject",
    label: str | Path | nib.spatialimages.SpatialImage | None = None,
) -> Segmentation:
    """Segment one subject: fit the MvMM to ``images`` with the probabilistic ``atlas``.

    Args:
        images: sequence name (``C0``, ``DE`` or ``LGE``, ``T2``, ...) -> a NIfTI path or a nibabel
            image. The reference sequence (whose grid is the common space) is ``DE`` or ``LGE``
            when given, else the first; ``overrides=["data.reference=..."]`` chooses another.
        atlas: an atlas NIfTI (from ``mvmm-build-atlas``: placed automatically on the full field
            of view; or one in world space: used where its affine puts it).
        output_dir: write every output file there, as ``mvmm-fit`` does; ``None``: nothing is kept
            on disk (the results are returned in memory).
        overrides: Hydra override strings, as on the ``mvmm-fit`` command line (e.g.
            ``["postprocess=myops", "model.em.beta=0.5"]``).
        subject: the name used in output file names.
        label: an optional manual label on the reference's grid (Dice in ``metrics``).

    Raises:
        FileNotFoundError, ValueError: a missing file or a bad value, named.
    """
    if not images:
        raise ValueError("segment: images is empty; give at least one sequence, e.g. {'LGE': 'lge.nii.gz'}")
    names = [str(s) for s in images]
    reference = next((s for s in ("DE", "LGE") if s in names), names[0])
    with tempfile.TemporaryDirectory(prefix="mvmm-segment-") as tmp:
        tmp = Path(tmp)
        out = Path(output_dir).expanduser().resolve() if output_dir is not None else tmp / "out"
        staged = tmp / "inputs"
        staged.mkdir()
        args = ["data=files", f"data.subject={subject}", f"data.reference={reference}"]
        args += [f"data.images.{s}=null" for s in _FILES_KEYS if s not in names]
        for s, value in images.items():
            plus = "" if s in _FILES_KEYS else "+"
            args.append(f"{plus}data.images.{s}={_override_value(_as_path(value, s, staged))}")
        args.append(f"atlas.path={_override_value(_as_path(atlas, 'atlas', staged))}")
        if label is not None:
            args.append(f"data.label={_override_value(_as_path(label, 'label', staged))}")
        args.append(f"paths.output_dir={_override_value(str(out))}")
        cfg = compose_config([*args, *overrides])
        from mvmm_monai.cohort.run import fit

        metrics = fit(cfg)
        return Segmentation(
            labels={s: _in_memory(out / f"{subject}_{s}_seg.nii.gz") for s in names},
            posterior=_in_memory(out / f"{subject}_posterior.nii.gz"),
            scar=_in_memory(out / f"{subject}_scar.nii.gz"),
            metrics=metrics,
            params=json.loads((out / "params.json").read_text()),
            output_dir=out if output_dir is not None else None,
        )
