"""Build a canonical probabilistic atlas (and intensity template) from labelled subjects.

Short-axis stacks differ in everything a naive average would mix up: where the heart is in the
field of view, its orientation, its size, and how many slices (2 to 16, 5 to 23 mm apart) cover it
from apex to base. Every labelled slice is therefore brought into one heart-centred frame (see
:mod:`mvmm_monai.atlas.placement`): centred on its LV, rotated to the cohort's mean LV-to-RV
direction, scaled to the cohort's mean heart, and filed at its normalised long-axis position among
``levels`` evenly spaced levels (linear weights between the two nearest). The atlas is the
weighted mean of the one-hot labels, Gaussian-smoothed in-plane; the intensity template is the
weighted mean of each sequence's slices, each standardised (zero mean, unit SD in the frame) so
that no subject's contrast dominates.

The file format (:func:`write_canonical_atlas`): ``NAME.nii.gz`` ``[H, W, L, K]`` probabilities,
``NAME_template.nii.gz`` ``[H, W, L, S]``, a JSON sidecar ``NAME.json`` (classes, label values,
frame, how it was built) and a picture ``NAME.png``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from mvmm_monai.atlas.frame import heart_frame, level_weights, slice_to_canonical
from mvmm_monai.atlas.io import atlas_sidecar, write_atlas
from mvmm_monai.classes import CLASS_NAMES, LabelMap, class_rgb
from mvmm_monai.data.subject import SubjectData
from mvmm_monai.files import save_png


@dataclass(frozen=True)
class CanonicalAtlas:
    """An atlas in the heart-centred frame.

    Attributes:
        prob: ``[K, H, W, L]`` class probabilities (CLASS_NAMES order), summing to one.
        template: ``[S, H, W, L]`` standardised mean intensity of each sequence in ``sequences``.
        sequences: template channel names.
        pixel_mm: canonical pixel size (mm).
        radius_mm: the cohort's mean epicardial radius (mm): the frame's size unit.
        angle_deg: the cohort's mean LV-to-RV direction in the source stacks' index axes.
        subjects: the subjects it was built from.
        slices_per_level: ``[L]`` effective number of subject slices behind each level.
    """

    prob: np.ndarray
    template: np.ndarray
    sequences: tuple[str, ...]
    pixel_mm: float
    radius_mm: float
    angle_deg: float
    subjects: tuple[str, ...]
    slices_per_level: np.ndarray = field(default_factory=lambda: np.zeros(0))


def _label_classes(subject: SubjectData) -> np.ndarray:
    if subject.reference in subject.labels:
        return subject.labels[subject.reference].numpy()
    raise ValueError(
        f"{subject.name}: building an atlas needs a manual label on the reference sequence {subject.reference} "
        f"(labels found for {sorted(subject.labels) or 'no sequence'}; files {subject.files.images[subject.reference]})"
    )


def build_canonical_atlas(
    subjects: list[SubjectData],
    size: int = 160,
    pixel_mm: float = 1.0,
    levels: int = 5,
    sigma_mm: float = 2.0,
    progress=None,
) -> CanonicalAtlas:
    """Build a :class:`CanonicalAtlas` from loaded, labelled subjects (labels on the reference grid).

    ``progress``: an optional callable wrapping the subject iterable (e.g. ``tqdm``).
    Raises ``ValueError`` naming the subject whose label has no heart or no RV.
    """
    if not subjects:
        raise ValueError("build_canonical_atlas: no subjects given")
    if size < 16 or pixel_mm <= 0 or levels < 1 or sigma_mm < 0:
        raise ValueError(f"build_canonical_atlas: bad geometry size={size}, pixel_mm={pixel_mm}, levels={levels}, sigma_mm={sigma_mm}")
    frames = []
    for s in subjects:
        try:
            frames.append(heart_frame(_label_classes(s), tuple(s.grid.spacing[:2].tolist())))
        except ValueError as err:
            raise ValueError(f"{s.name} ({s.files.labels.get(s.reference)}): {err}") from None
    angles = np.radians([f.angle_deg for f in frames])
    angle0 = math.degrees(math.atan2(np.sin(angles).mean(), np.cos(angles).mean()))
    radius0 = float(np.mean([f.radius_mm for f in frames]))
    sequences = tuple(dict.fromkeys(seq for s in subjects for seq in s.sequences))

    K = len(CLASS_NAMES)
    prob = np.zeros((K, size, size, levels))
    weight = np.zeros(levels)
    tmpl = np.zeros((len(sequences), size, size, levels))
    tweight = np.zeros((len(sequences), size, size, levels))
    it = zip(subjects, frames)
    if progress is not None:
        it = progress(list(it))
    for s, f in it:
        classes = _label_classes(s)
        spacing = tuple(s.grid.spacing[:2].tolist())
        phi, sigma = f.angle_deg - angle0, f.radius_mm / radius0
        for z, t in f.levels.items():
            w = level_weights(t, levels)
            onehot = np.stack([(classes[..., z] == k).astype(float) for k in range(K)])
            canon = slice_to_canonical(onehot, spacing, f.centres[z], sigma, phi, size, pixel_mm, order=1)
            canon[0] += np.clip(1 - canon.sum(0), 0, None)  # outside the slice: background
            prob += canon[..., None] * w
            weight += w
            for n, seq in enumerate(s.sequences):
                img = s.images[n, ..., z].numpy()
                cov = s.coverage[n, ..., z].numpy()
                stack = slice_to_canonical(np.stack([img * cov, cov]), spacing, f.centres[z], sigma, phi, size, pixel_mm)
                c = stack[1] > 0.5
                if c.sum() < 0.5 * size * size:
                    continue
                v = stack[0][c]
                std = v.std()
                if std <= 0:
                    continue
                zimg = np.where(c, (stack[0] - v.mean()) / std, 0.0)
                j = sequences.index(seq)
                tmpl[j] += zimg[..., None] * w
                tweight[j] += c[..., None] * w
    prob /= np.maximum(weight, 1e-12)
    if (weight == 0).any():
        empty = [i for i in range(levels) if weight[i] == 0]
        raise ValueError(f"build_canonical_atlas: no subject slice falls near levels {empty}; use fewer levels")
    if sigma_mm > 0:
        s = sigma_mm / pixel_mm
        prob = np.stack([ndimage.gaussian_filter(prob[k], (s, s, 0), mode="nearest") for k in range(K)])
    prob = np.clip(prob, 0, None)
    prob /= prob.sum(0, keepdims=True)
    template = np.where(tweight > 0, tmpl / np.maximum(tweight, 1e-12), 0.0)
    return CanonicalAtlas(
        prob=prob.astype(np.float32),
        template=template.astype(np.float32),
        sequences=sequences,
        pixel_mm=float(pixel_mm),
        radius_mm=radius0,
        angle_deg=float(angle0),
        subjects=tuple(s.name for s in subjects),
        slices_per_level=weight,
    )


def canonical_affine(size: int, pixel_mm: float, levels: int, level_mm: float = 10.0) -> np.ndarray:
    """Voxel-to-"world" affine of the canonical frame: the heart's centre at the origin."""
    aff = np.diag([pixel_mm, pixel_mm, level_mm, 1.0])
    aff[:3, 3] = [-(size - 1) / 2 * pixel_mm, -(size - 1) / 2 * pixel_mm, 0.0]
    return aff


def atlas_figure(atlas: CanonicalAtlas, title: str = ""):
    """A picture of the atlas: one row per level, the classes in the colours of every fit overlay
    (:data:`~mvmm_monai.classes.CLASS_COLOURS`: myocardium yellow, LV red, RV blue), then the
    template of each sequence."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    L = atlas.prob.shape[-1]
    cols = 1 + len(atlas.sequences)
    fig = Figure(figsize=(2.2 * cols, 2.2 * L))
    FigureCanvasAgg(fig)
    axes = fig.subplots(L, cols, squeeze=False)
    for l in range(L):
        axes[l, 0].imshow(np.transpose(class_rgb(atlas.prob[..., l]), (1, 0, 2)), origin="lower")
        axes[l, 0].set_ylabel(f"t={l / max(L - 1, 1):.2f}" + (" apex" if l == 0 else " base" if l == L - 1 else ""))
        for j, seq in enumerate(atlas.sequences):
            axes[l, 1 + j].imshow(atlas.template[j, ..., l].T, cmap="gray", origin="lower")
            if l == 0:
                axes[l, 1 + j].set_title(f"{seq} template", fontsize=9)
        if l == 0:
            axes[l, 0].set_title("myo / LV / RV", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title or f"atlas from {len(atlas.subjects)} subjects", fontsize=10)
    fig.tight_layout()
    return fig


def write_canonical_atlas(atlas: CanonicalAtlas, path: str | Path, label_map: LabelMap, built: dict | None = None) -> dict[str, Path]:
    """Write the atlas NIfTI, its template, the JSON sidecar (:func:`~mvmm_monai.atlas.io.atlas_sidecar`)
    and the picture (each atomically)."""
    size, L = atlas.prob.shape[1], atlas.prob.shape[-1]
    sidecar = atlas_sidecar(
        "canonical",
        label_map,
        built or {},
        levels=L,
        level_positions=[l / max(L - 1, 1) for l in range(L)],
        level_meaning="normalised long-axis position, 0 = apex, 1 = base",
        pixel_mm=atlas.pixel_mm,
        radius_mm=atlas.radius_mm,
        angle_deg=atlas.angle_deg,
        template_sequences=list(atlas.sequences),
        subjects=list(atlas.subjects),
        slices_per_level=np.round(atlas.slices_per_level, 2).tolist(),
    )
    paths = write_atlas(path, atlas.prob, canonical_affine(size, atlas.pixel_mm, L), sidecar, template=atlas.template)
    save_png(paths["picture"], atlas_figure(atlas, f"{paths['atlas'].name}: {len(atlas.subjects)} subjects"))
    return paths


def atlas_from_labels(labels: list[np.ndarray], num_classes: int = len(CLASS_NAMES), sigma: float | tuple = 2.0) -> np.ndarray:
    """Mean of the one-hot label maps (class indices, all the same shape), Gaussian-smoothed per class
    with ``sigma`` voxels, renormalised. Returns ``[K, *shape]`` float32 probabilities."""
    if not labels:
        raise ValueError("atlas_from_labels: no label maps given")
    shape = labels[0].shape
    acc = np.zeros((num_classes, *shape), dtype=np.float64)
    for lab in labels:
        if lab.shape != shape:
            raise ValueError(f"atlas_from_labels: label shapes differ ({lab.shape} vs {shape})")
        for k in range(num_classes):
            acc[k] += lab == k
    acc /= len(labels)
    smooth = np.stack([ndimage.gaussian_filter(a, sigma, mode="nearest") for a in acc])
    smooth = np.clip(smooth, 0, None)
    return (smooth / smooth.sum(0, keepdims=True)).astype(np.float32)
