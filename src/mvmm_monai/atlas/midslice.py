"""The "2D mid-slice" protocol on MyoPS 2020: one short-axis slice per case, cropped around the heart.

For every case the middle slice ``z = nz // 2`` of C0, LGE, T2 and the manual label ``gd`` is cut
out, ``size x size`` voxels centred on the (rounded) centroid of the label's foreground
(``gd > 0``) on that slice, zero-padded where the crop leaves the image. The crop keeps its true
place in world space: its affine is the case's with the origin moved to the crop's first voxel
(``affine @ [i0, j0, z, 1]``), so the crops of C0, LGE, T2 and gd of a case share one grid
``(size, size, 1)``.

An atlas for the protocol is the Gaussian-smoothed (in-plane only) mean of the one-hot class maps
(background, myocardium = 200 | 1220 | 2221, LV = 500, RV = 600) of the crops of the atlas cases,
renormalised. As every crop is centred on its own label centroid, the atlas is used in voxel
correspondence with a test crop: write it with the test crop's affine (:func:`write_atlas`) and
fit with ``atlas.placement=identity``. The centring uses the test case's manual label, so the
protocol measures segmentation given the heart's position, not heart localisation.

Only numpy, nibabel and scipy (through :func:`mvmm_monai.atlas.build.atlas_from_labels`) are used; the
atlas and output helpers are imported inside the functions that need them, so importing this data
module pulls in nothing from the layers above it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from mvmm_monai.classes import CLASS_NAMES, MYOPS_LABELS

SEQUENCES = ("C0", "LGE", "T2")
PROTOCOL = (
    "MyoPS 2020 2D mid-slice protocol: middle slice z = nz // 2 of each case, cropped {size}x{size} voxels "
    "around the rounded centroid of gd > 0 on that slice (zero-padded), affine = case affine with the origin "
    "at the crop's first voxel; atlas = mean one-hot class maps of the atlas cases' crops, Gaussian-smoothed "
    "with sigma {sigma} px in-plane only, renormalised; use it in voxel correspondence with a test crop "
    "(written with that crop's affine, atlas.placement=identity)"
)


@dataclass(frozen=True)
class MidSliceCrop:
    """One case's mid-slice crop.

    Attributes:
        name: case name (e.g. ``Case3016``).
        images: sequence (C0, LGE, T2) -> float32 ``(size, size, 1)`` raw intensities.
        label: int16 ``(size, size, 1)`` raw MyoPS label values (0, 200, 500, 600, 1220, 2221).
        affine: ``4x4`` float64 voxel-to-world affine of the crop.
        centroid: ``(i, j, z)`` voxel indices, in the case's grid, of the crop centre (the rounded
            label centroid on slice ``z``).
    """

    name: str
    images: dict[str, np.ndarray]
    label: np.ndarray
    affine: np.ndarray
    centroid: tuple[int, int, int]

    @property
    def size(self) -> int:
        return int(self.label.shape[0])

    def classes(self) -> np.ndarray:
        """Class indices ``(size, size, 1)`` in :data:`mvmm_monai.CLASS_NAMES` order."""
        return label_classes(self.label)


def label_classes(label: np.ndarray) -> np.ndarray:
    """MyoPS label values -> class indices (background, myocardium = 200|1220|2221, LV 500, RV 600).

    Raises:
        ValueError: a value outside the MyoPS label map.
    """
    label = np.asarray(label)
    unknown = sorted(set(np.unique(label).tolist()) - MYOPS_LABELS.known_values)
    if unknown:
        raise ValueError(f"label values {unknown} are not MyoPS values {sorted(MYOPS_LABELS.known_values)}")
    out = np.zeros(label.shape, dtype=np.int64)
    for k, values in enumerate(MYOPS_LABELS.values):
        out[np.isin(label, values)] = k
    return out


def _crop2d(data: np.ndarray, i0: int, j0: int, size: int) -> np.ndarray:
    """``data[i0:i0+size, j0:j0+size]`` of a 2D array, zero where it leaves the array."""
    out = np.zeros((size, size), dtype=data.dtype)
    nx, ny = data.shape
    si, sj = max(i0, 0), max(j0, 0)
    ei, ej = min(i0 + size, nx), min(j0 + size, ny)
    if si < ei and sj < ej:
        out[si - i0 : ei - i0, sj - j0 : ej - j0] = data[si:ei, sj:ej]
    return out


def mid_slice_crop(case_dir: str | Path, size: int = 192) -> MidSliceCrop:
    """The mid-slice crop of the MyoPS case in ``case_dir`` (``<name>_{C0,LGE,T2,gd}.nii.gz``).

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: ``size`` < 1, the files have different grids, they are not 3D, or the label
            is empty on the middle slice.
    """
    case_dir = Path(case_dir)
    name = case_dir.name
    if size < 1:
        raise ValueError(f"mid_slice_crop: size must be >= 1, got {size}")
    paths = {s: case_dir / f"{name}_{s}.nii.gz" for s in (*SEQUENCES, "gd")}
    for p in paths.values():
        if not p.is_file():
            raise FileNotFoundError(f"mid_slice_crop: missing file {p}")
    imgs = {s: nib.load(str(p)) for s, p in paths.items()}
    gd = imgs["gd"]
    if len(gd.shape) != 3:
        raise ValueError(f"{paths['gd']}: expected a 3D label volume, got shape {gd.shape}")
    for s, img in imgs.items():
        if img.shape != gd.shape or not np.allclose(img.affine, gd.affine, atol=1e-3):
            raise ValueError(f"{paths[s]}: grid (shape {img.shape}) differs from the label {paths['gd']} (shape {gd.shape})")
    z = gd.shape[2] // 2
    lab = np.asarray(gd.dataobj[:, :, z]).round().astype(np.int16)
    fg = np.argwhere(lab > 0)
    if fg.size == 0:
        raise ValueError(f"{paths['gd']}: no labelled voxel on the middle slice z={z}")
    ci, cj = (int(v) for v in np.rint(fg.mean(0)))
    i0, j0 = ci - size // 2, cj - size // 2
    affine = np.asarray(gd.affine, dtype=np.float64).copy()
    affine[:, 3] = affine @ np.array([i0, j0, z, 1.0])
    images = {
        s: _crop2d(np.asarray(imgs[s].dataobj[:, :, z], dtype=np.float32), i0, j0, size)[..., None] for s in SEQUENCES
    }
    return MidSliceCrop(
        name=name,
        images=images,
        label=_crop2d(lab, i0, j0, size)[..., None],
        affine=affine,
        centroid=(ci, cj, z),
    )


def crop_paths(name: str, out_dir: str | Path) -> dict[str, Path]:
    """Where :func:`write_crop` puts ``<name>_{C0,LGE,T2,gd}.nii.gz`` in ``out_dir``."""
    return {s: Path(out_dir) / f"{name}_{s}.nii.gz" for s in (*SEQUENCES, "gd")}


def write_crop(crop: MidSliceCrop, out_dir: str | Path) -> dict[str, Path]:
    """Write the crop as ``<name>_{C0,LGE,T2,gd}.nii.gz`` in ``out_dir`` (atomically); returns the paths."""
    from mvmm_monai.files import save_nifti

    paths = crop_paths(crop.name, out_dir)
    for s in SEQUENCES:
        save_nifti(paths[s], crop.images[s].astype(np.float32), crop.affine)
    save_nifti(paths["gd"], crop.label.astype(np.int16), crop.affine)
    return paths


def mid_slice_atlas(crops: list[MidSliceCrop], sigma_px: float = 2.0) -> np.ndarray:
    """Probabilistic atlas ``[4, size, size, 1]`` (float32) from the crops of the atlas cases.

    The mean of the one-hot class maps, Gaussian-smoothed with ``sigma_px`` voxels in-plane (none
    across slices), renormalised to sum to one over the classes.
    """
    from mvmm_monai.atlas.build import atlas_from_labels

    if not crops:
        raise ValueError("mid_slice_atlas: no crops given")
    shapes = {c.label.shape for c in crops}
    if len(shapes) != 1:
        raise ValueError(f"mid_slice_atlas: crops have different sizes {sorted(shapes)}")
    return atlas_from_labels([c.classes() for c in crops], len(CLASS_NAMES), sigma=(sigma_px, sigma_px, 0.0))


def write_atlas(
    prob: np.ndarray,
    affine: np.ndarray,
    path: str | Path,
    built_from: list[str] | None = None,
    sigma_px: float = 2.0,
) -> Path:
    """Write ``prob`` ``[K, X, Y, Z]`` as a 4D NIfTI ``[X, Y, Z, K]`` with ``affine`` at ``path``
    and a JSON sidecar ``<stem>.json`` beside it (classes, label values, cases, protocol)."""
    from mvmm_monai.atlas.io import atlas_sidecar
    from mvmm_monai.atlas.io import write_atlas as write_atlas_files

    sidecar = atlas_sidecar("world", MYOPS_LABELS, {"from": list(built_from or []), "protocol": PROTOCOL.format(size=np.shape(prob)[1], sigma=sigma_px)})
    write_atlas_files(path, prob, affine, sidecar)
    return Path(path)


def fit_overrides(name: str, paths: dict[str, Path], atlas_path: str | Path, output_dir: str | Path) -> list[str]:
    """Hydra overrides that fit a written crop (:func:`write_crop`) with ``data=files``, LGE as reference,
    the MyoPS label values and the crop's own atlas placed as it lies."""
    return [
        "data=files",
        "data.images.DE=null",
        f"+data.images.LGE={paths['LGE']}",
        f"data.images.C0={paths['C0']}",
        f"data.images.T2={paths['T2']}",
        f"data.label={paths['gd']}",
        "data.label_values=myops",
        "data.reference=LGE",
        f"data.subject={name}",
        f"atlas.path={atlas_path}",
        "atlas.placement=identity",
        f"paths.output_dir={output_dir}",
    ]
