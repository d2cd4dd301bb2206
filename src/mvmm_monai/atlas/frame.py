"""The heart-centred frame of a canonical atlas (see :mod:`mvmm_monai.atlas.placement` for the maths).

Every short-axis slice of an atlas subject is moved so that the centre of its left ventricle is the
origin, rotated so that the LV-to-RV direction points the cohort's mean way, scaled to the cohort's
mean heart, and filed at its normalised long-axis position (``t = 0`` apex, ``t = 1`` base).
Pure numpy: no files, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class SliceFrame:
    """Where the heart is on one slice: ``centre`` (mm, in-plane index axes times spacing)."""

    centre: tuple[float, float]


@dataclass(frozen=True)
class HeartFrame:
    """The heart's frame on one labelled stack (from its manual label).

    Attributes:
        centres: ``{slice index: (x, y)}`` LV centre in mm for every slice with LV or myocardium.
        angle_deg: LV-to-RV direction (degrees, in-plane index axes), circular mean over slices.
        radius_mm: epicardial radius ``sqrt(area(myocardium + LV) / pi)``, median over slices.
        levels: ``{slice index: t}`` normalised long-axis position (0 apex, 1 base).
    """

    centres: dict[int, tuple[float, float]]
    angle_deg: float
    radius_mm: float
    levels: dict[int, float]


def heart_frame(classes: np.ndarray, spacing: tuple[float, float], myo: int = 1, lv: int = 2, rv: int = 3) -> HeartFrame:
    """The :class:`HeartFrame` of a label stack ``classes`` ``[X, Y, Z]`` (class indices).

    The apex is the end of the labelled range whose slice has the smaller LV + myocardium area
    (stacks come either way round). Raises ``ValueError`` when no slice has a left ventricle.
    """
    sx, sy = float(spacing[0]), float(spacing[1])
    centres, areas, angles = {}, {}, []
    for z in range(classes.shape[2]):
        lvm = np.isin(classes[..., z], (myo, lv))
        if lvm.sum() < 3:
            continue
        c = np.argwhere(lvm).mean(0) * (sx, sy)
        centres[z] = (float(c[0]), float(c[1]))
        areas[z] = float(lvm.sum() * sx * sy)
        r = classes[..., z] == rv
        if r.sum() >= 3:
            d = np.argwhere(r).mean(0) * (sx, sy) - c
            angles.append(math.atan2(d[1], d[0]))
    if not centres:
        raise ValueError("heart_frame: the label has no left ventricle or myocardium on any slice")
    zs = sorted(centres)
    if not angles:
        raise ValueError("heart_frame: the label has no right ventricle on any slice (the orientation is undefined)")
    angle = math.degrees(math.atan2(np.mean(np.sin(angles)), np.mean(np.cos(angles))))
    radius = float(np.sqrt(np.median(list(areas.values())) / math.pi))
    if len(zs) == 1:
        levels = {zs[0]: 0.5}
    else:
        apex_first = areas[zs[0]] <= areas[zs[-1]]
        span = zs[-1] - zs[0]
        levels = {z: ((z - zs[0]) / span if apex_first else (zs[-1] - z) / span) for z in zs}
    return HeartFrame(centres, angle, radius, levels)


def rotation(phi_deg: float) -> np.ndarray:
    """2x2 rotation matrix by ``phi_deg`` degrees (in-plane index axes)."""
    a = math.radians(phi_deg)
    return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


def canonical_axis(size: int, pixel_mm: float) -> np.ndarray:
    """Canonical coordinates (mm) of the ``size`` pixel centres along one axis (origin in the middle)."""
    return (np.arange(size) - (size - 1) / 2.0) * pixel_mm


def slice_to_canonical(
    image: np.ndarray, spacing, centre, sigma: float, phi_deg: float, size: int, pixel_mm: float, order: int = 1, cval: float = 0.0
) -> np.ndarray:
    """Sample a slice ``[C, X, Y]`` into the canonical frame ``[C, size, size]``.

    Canonical point q comes from slice point ``p = centre + sigma R(phi) q`` (mm), i.e. voxel
    index ``p / spacing``; outside the slice ``cval``.
    """
    ax = canonical_axis(size, pixel_mm)
    q = np.stack(np.meshgrid(ax, ax, indexing="ij"), -1)  # [H, W, 2]
    p = sigma * q @ rotation(phi_deg).T + np.asarray(centre)
    idx = (p / np.asarray(spacing, dtype=float)).transpose(2, 0, 1)
    return np.stack([ndimage.map_coordinates(ch, idx, order=order, mode="constant", cval=cval) for ch in image])


def canonical_to_slice(
    canon: np.ndarray, pixel_mm: float, shape, spacing, centre, sigma: float, phi_deg: float, order: int = 1, cval: float = 0.0
) -> np.ndarray:
    """Sample canonical maps ``[C, H, W]`` onto a slice grid ``[C, *shape]`` (the inverse of
    :func:`slice_to_canonical`): slice point p looks up ``q = R(-phi) (p - centre) / sigma``."""
    sx, sy = float(spacing[0]), float(spacing[1])
    px = np.stack(np.meshgrid(np.arange(shape[0]) * sx, np.arange(shape[1]) * sy, indexing="ij"), -1)
    q = (px - np.asarray(centre)) @ rotation(-phi_deg).T / sigma
    idx = (q / pixel_mm + (canon.shape[1] - 1) / 2.0).transpose(2, 0, 1)
    return np.stack([ndimage.map_coordinates(ch, idx, order=order, mode="constant", cval=cval) for ch in canon])


def level_weights(t: float, levels: int) -> np.ndarray:
    """Linear (tent) weights ``[levels]`` of position ``t`` in [0, 1] over evenly spaced levels."""
    if levels == 1:
        return np.ones(1)
    x = np.clip(t, 0.0, 1.0) * (levels - 1)
    w = np.clip(1.0 - np.abs(np.arange(levels) - x), 0.0, None)
    return w / w.sum()


def at_level(volume: np.ndarray, t: float) -> np.ndarray:
    """A canonical volume ``[C, H, W, L]`` interpolated at long-axis position ``t``: ``[C, H, W]``."""
    return np.tensordot(volume, level_weights(t, volume.shape[-1]), axes=([-1], [0]))


def stack_levels(n: int, apex_first: bool = True, start: float = 0.0, end: float = 1.0) -> list[float]:
    """Normalised long-axis positions of ``n`` evenly spaced slices whose apical slice lies at
    ``start`` and basal slice at ``end`` (default: spanning apex to base); one slice sits midway."""
    if n == 1:
        return [(start + end) / 2]
    t = [start + (end - start) * z / (n - 1) for z in range(n)]
    return t if apex_first else t[::-1]
