"""Deterministic synthetic multi-sequence cardiac MR cohort in the MS-CMRSeg layout.

A continuous world model of a short-axis thorax is sampled on the grid of each
sequence (bSSFP ``C0``, LGE ``DE`` = reference, T2-weighted ``T2``) with partial
volume (3x3 in-plane x 3 through-plane sub-samples per voxel averaged; labels are
the tissue at the voxel centre), a smooth bias field, mild texture, a per-slice
gain and Rician noise (sigma = ``noise * INTENSITY_SCALE``).

World frame (mm): short axis = world z, base at high z (about +47), apex at low z
(about -50); in-plane +x = patient left (LV lateral wall, left lung), +y = anterior
(chest wall).  Affines are axis aligned: voxel (i, j, k) -> (x0 + i*dx, y0 + j*dy,
z0 + k*dz), the in-plane field of view centred on world (0, 0).

Tissues: soft tissue, lungs, liver (inferior, growing towards the apex), fat
(epicardial rim, interventricular grooves, subcutaneous), chest-wall muscle, air,
descending aorta, RV free wall, LV myocardium, papillary muscles, LV/RV blood, scar.
Labels follow MS-CMRSeg: 0 background, 200 LV myocardium (scar included), 500 LV
blood pool (papillary muscles included), 600 RV blood pool.  The RV free wall has
myocardium-like intensity but is *background* (only the LV myocardium is annotated
in MS-CMRSeg), and so is the (bright) aortic blood.  Scar (bright in DE only) is in
the even-numbered patients (``scar_subjects``).

Ground truth, ``truth/patientN_truth.json``: ``subject``, ``has_scar``, ``scar``
(angle, width, transmurality, z range or null), ``slice_shifts_mm``,
``atlas_offset``, ``anatomy`` (shape parameters, mm/rad), ``intensity_means`` (per sequence
and tissue), ``noise_sigma``, ``geometry`` (per sequence, with slice z and affine),
``label_values``; plus ``truth/patientN_DE_scar.nii.gz``.  Misalignment
(``SyntheticConfig.misalignment``; all zeros/identity when off; ``atlas_misalignment=False``
keeps the slice shifts but places the subject where the atlas expects it):

* ``slice_shifts_mm[seq][k] = [dx, dy]``: slice ``k`` of ``C0``/``T2`` shows the
  anatomy moved by ``+shift``, i.e. ``image(p) = anatomy(p - shift)`` for world
  points ``p`` of that slice.  ``DE`` (the reference) is never shifted.
* ``atlas_offset``: the whole subject (heart and surroundings) is placed relative
  to the canonical/atlas frame by ``p = c + t + s * R(rotation) (q - c)``, with
  ``q`` the canonical point, ``c = center_mm`` (canonical LV centre), ``t =
  translation_mm``, ``s = scale``, ``R`` the in-plane rotation by ``rotation_deg``
  (counter-clockwise from +x to +y).  Natural shape variation (incl. an LV centre
  jitter of ~1-2 mm) exists either way.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

GENERATOR_VERSION = 2  # 2: atlas.json in the one atlas sidecar schema
SEQUENCES = ("C0", "DE", "T2")
REFERENCE_SEQUENCE = "DE"
LABEL_VALUES = {"background": 0, "myocardium": 200, "lv": 500, "rv": 600}
ATLAS_CLASSES = ("background", "myocardium", "lv", "rv")
INTENSITY_SCALE = 1000.0
SUPERSAMPLE = 3
N_ATLAS_DRAWS = 25
ATLAS_SPACING = (1.5, 1.5, 5.0)
ATLAS_Z_RANGE = (-60.0, 60.0)
HEART_CENTER = (6.0, 0.0)  # canonical LV centre at the base (world mm)
RV_WALL_MM = 2.5

TISSUES = ("soft", "lung", "liver", "fat", "muscle", "air", "aorta", "rv_wall",
           "myocardium", "lv", "rv", "scar", "papillary")
(SOFT, LUNG, LIVER, FAT, MUSCLE, AIR, AORTA, RV_WALL, MYO, LV, RV, SCAR,
 PAPILLARY) = range(len(TISSUES))
TISSUE_LABEL = np.array([0, 0, 0, 0, 0, 0, 0, 0, 200, 500, 600, 200, 500], dtype=np.int16)
# Mean intensities (fraction of INTENSITY_SCALE) per sequence, in TISSUES order
# (papillary muscles take the subject's myocardium value).
MEANS = {
    #       soft  lung  liver fat   musc  air   aorta rvwal myo   lv    rv    scar  pap
    "C0": (0.30, 0.04, 0.42, 0.85, 0.22, 0.01, 0.80, 0.25, 0.25, 0.90, 0.87, 0.25, 0.25),
    "DE": (0.18, 0.03, 0.32, 0.60, 0.14, 0.01, 0.50, 0.10, 0.08, 0.55, 0.50, 0.85, 0.08),
    "T2": (0.36, 0.04, 0.26, 0.70, 0.28, 0.01, 0.20, 0.38, 0.40, 0.25, 0.25, 0.40, 0.40),
}


@dataclass(frozen=True)
class SequenceGeometry:
    """Axis-aligned short-axis stack; slice thickness equals ``slice_spacing``."""

    shape: tuple[int, int]        # in-plane voxels (nx, ny)
    spacing: tuple[float, float]  # in-plane mm
    n_slices: int
    slice_spacing: float          # mm between slice centres
    first_slice_z: float          # world z (mm) of slice 0 centre

    def origin(self) -> tuple[float, float, float]:
        """World position of voxel (0, 0, 0) (in-plane FOV centred on (0, 0))."""
        return (-(self.shape[0] - 1) / 2 * self.spacing[0],
                -(self.shape[1] - 1) / 2 * self.spacing[1], self.first_slice_z)

    def affine(self) -> np.ndarray:
        """4x4 voxel-to-world affine (mm)."""
        aff = np.diag([*self.spacing, self.slice_spacing, 1.0])
        aff[:3, 3] = self.origin()
        return aff

    def slice_z(self) -> list[float]:
        """World z of every slice centre."""
        return [self.first_slice_z + k * self.slice_spacing for k in range(self.n_slices)]


@dataclass(frozen=True)
class SyntheticConfig:
    """Cohort parameters; everything generated is a deterministic function of it."""

    n_subjects: int = 5
    seed: int = 0
    misalignment: bool = True     # per-slice motion shifts of C0 and T2 + atlas misplacement
    max_slice_shift_mm: float = 6.0
    noise: float = 0.04           # Rician sigma relative to INTENSITY_SCALE
    geometries: dict[str, SequenceGeometry] | None = None  # None -> default_geometries()
    # None -> follow ``misalignment``; False with misalignment=True: slice shifts only, the subject
    # sits where the atlas expects it (to test slice-shift recovery apart from atlas placement).
    atlas_misalignment: bool | None = None


# Fields added after the first cohorts were cached: left out of the cache key while at their
# default, so existing cohorts keep their key (and their cache folder).
_KEY_OPTIONAL = {"atlas_misalignment": None}


@dataclass(frozen=True)
class _Anatomy:
    """One random draw of the shape model plus its placement (private)."""

    centre: tuple[float, float]       # LV centre at the base, canonical frame (mm)
    drift: tuple[float, float]        # LV centre displacement per mm below the base
    z_base: float
    z_apex: float                     # epicardial apex
    r_endo: float                     # LV cavity radius at the base
    wall: float
    apex_wall: float
    ellipticity: float
    ellipse_angle: float              # rad
    harmonics: tuple[float, float, float, float]  # amplitude/phase of 2nd and 3rd radial modes
    papillary: tuple[float, float, float]  # anterolateral/posteromedial angles (rad), radius factor
    rv_width: float                   # RV cavity width beyond the LV at the base
    rv_angle: float                   # rad, direction of the RV from the LV centre
    rv_span: float                    # rad, half angular extent of the RV crescent
    rv_length: float                  # RV extent below the base (mm)
    fat_rim: float                    # epicardial fat rim (mm)
    fat_groove: float                 # extra fat in the interventricular grooves (mm)
    body_shift: tuple[float, float]   # lungs/liver/chest wall jitter (mm)
    scar: dict | None
    translation: tuple[float, float] = (0.0, 0.0)
    rotation: float = 0.0             # rad
    scale: float = 1.0


def default_geometries() -> dict[str, SequenceGeometry]:
    """MS-CMRSeg-like stacks: DE reference, finer C0, coarser T2 with mid slices only."""
    return {
        "C0": SequenceGeometry((128, 128), (1.25, 1.25), 10, 10.0, -45.0),
        "DE": SequenceGeometry((112, 112), (1.5, 1.5), 10, 10.0, -45.0),
        "T2": SequenceGeometry((88, 88), (1.875, 1.875), 5, 10.0, -25.0),
    }


def subject_names(config: SyntheticConfig) -> list[str]:
    """``["patient1", ..., "patientN"]``."""
    return [f"patient{i}" for i in range(1, config.n_subjects + 1)]


def scar_subjects(config: SyntheticConfig) -> list[str]:
    """Subjects with an LGE scar: the even-numbered patients (patient2, patient4, ...)."""
    return [name for i, name in enumerate(subject_names(config), 1) if i % 2 == 0]


def _resolved(config: SyntheticConfig) -> SyntheticConfig:
    return config if config.geometries is not None else replace(config, geometries=default_geometries())


def _config_dict(config: SyntheticConfig) -> dict:
    """``asdict(config)`` without the optional fields that are at their default."""
    return {k: v for k, v in asdict(config).items() if not (k in _KEY_OPTIONAL and v == _KEY_OPTIONAL[k])}


def config_key(config: SyntheticConfig) -> str:
    """Short stable hash of the (resolved) config and the generator version."""
    payload = {"generator_version": GENERATOR_VERSION, **_config_dict(_resolved(config))}
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]


def _draw_anatomy(rng: np.random.Generator, scar: bool, misalign: bool) -> _Anatomy:
    """Draw shape, scar and pose; always consumes the same random numbers."""
    def u(lo, hi):
        return float(rng.uniform(lo, hi))

    def rad(deg):
        return float(np.deg2rad(deg))

    sc = {"angle_deg": u(20, 110), "half_width_deg": u(25, 45),
          "transmurality": u(0.5, 1.0), "z_lo": u(-30, -10)}
    sc["z_hi"] = sc["z_lo"] + u(25, 40)
    direction, shift = u(0, 2 * np.pi), u(6, 8)
    rot, scl = u(8, 12) * rng.choice([-1, 1]), 1 + u(0.04, 0.1) * rng.choice([-1, 1])
    return _Anatomy(
        centre=(HEART_CENTER[0] + float(np.clip(rng.normal(0, 1.2), -2.5, 2.5)),
                HEART_CENTER[1] + float(np.clip(rng.normal(0, 1.2), -2.5, 2.5))),
        drift=(u(0.05, 0.12), u(-0.08, 0.0)), z_base=47.0 + u(-2, 2), z_apex=-50.0 + u(-3, 3),
        r_endo=u(20, 25), wall=u(7.5, 10), apex_wall=u(5, 8), ellipticity=u(0, 0.08),
        ellipse_angle=u(0, np.pi), harmonics=(u(0, 0.04), u(0, 2 * np.pi), u(0, 0.03), u(0, 2 * np.pi)),
        papillary=(rad(45 + u(-15, 15)), rad(-115 + u(-15, 15)), u(0.16, 0.22)),
        rv_width=u(14, 22), rv_angle=rad(168 + u(-12, 12)), rv_span=rad(u(68, 82)),
        rv_length=u(60, 72), fat_rim=u(0.3, 1.2), fat_groove=u(5, 9),
        body_shift=(u(-3, 3), u(-3, 3)), scar=sc if scar else None,
        translation=(shift * float(np.cos(direction)), shift * float(np.sin(direction)))
        if misalign else (0.0, 0.0),
        rotation=rad(rot) if misalign else 0.0, scale=float(scl) if misalign else 1.0)


def _dome(h, length: float):
    """Radius profile of a half-ellipsoid: 1 at the base (h=0), 0 at h=length."""
    return np.sqrt(np.clip(1.0 - (h / length) ** 2, 0.0, 1.0)) * (h >= 0)


def _wrap(angle):
    """Wrap angles to (-pi, pi]."""
    return (angle + np.pi) % (2 * np.pi) - np.pi


def _pow8(v):
    v = v * v
    v = v * v
    return v * v


def _paint_heart(a: _Anatomy, t: np.ndarray, qx, qy, z) -> None:
    """Paint pericardial fat, RV wall/blood, LV myocardium, scar, papillary muscles and LV blood.

    ``qx``/``qy`` are canonical in-plane coordinates, ``z`` has shape (Z, 1, 1); only
    points within reach of the heart at their z are evaluated (speed).
    """
    h = a.z_base - z
    len_epi = a.z_base - a.z_apex
    r_epi = (a.r_endo + a.wall) * _dome(h, len_epi)
    r_endo = a.r_endo * _dome(h, len_epi - a.apex_wall)
    g = _dome(h, a.rv_length)
    dx = qx - (a.centre[0] + a.drift[0] * h)
    dy = qy - (a.centre[1] + a.drift[1] * h)
    # rho (below) >= true radius / 1.17, so nothing beyond this reach can be heart or fat.
    reach = 1.17 * (r_epi + np.maximum(a.rv_width * g + RV_WALL_MM + 1.0, a.fat_groove) + a.fat_rim) + 1.0
    near = np.broadcast_to(dx * dx + dy * dy < reach * reach, t.shape)
    if not near.any():
        return

    def sel(v):
        return np.broadcast_to(v, t.shape)[near]

    dx, dy, r_epi, r_endo, g, z = sel(dx), sel(dy), sel(r_epi), sel(r_endo), sel(g), sel(z)
    theta = np.arctan2(dy, dx)
    r = np.sqrt(dx * dx + dy * dy) + 1e-6
    c1, s1 = dx / r, dy / r
    c2, s2 = c1 * c1 - s1 * s1, 2 * c1 * s1
    c3, s3 = c1 * (4 * c1 * c1 - 3), s1 * (3 - 4 * s1 * s1)
    ce, se = float(np.cos(a.ellipse_angle)), float(np.sin(a.ellipse_angle))
    a2, p2, a3, p3 = a.harmonics
    rho = np.hypot((dx * ce + dy * se) / (1 + a.ellipticity), (dy * ce - dx * se) / (1 - a.ellipticity))
    rho /= 1 + a2 * (c2 * float(np.cos(p2)) - s2 * float(np.sin(p2))) \
        + a3 * (c3 * float(np.cos(p3)) - s3 * float(np.sin(p3)))
    # RV: a crescent on the septal side, widest at rv_angle, tapering to the two
    # interventricular junctions at rv_angle -/+ rv_span.
    rel = np.abs(_wrap(theta - a.rv_angle)) / a.rv_span
    w = a.rv_width * g * np.sqrt(np.cos(0.5 * np.pi * np.minimum(rel, 1.0)))
    present = (rel < 1) & (a.rv_width * g > 2.0) & (r_epi > 0)
    beyond = rho - r_epi  # ~ distance outside the LV epicardium (mm)
    groove = sum(_pow8(np.maximum(c1 * float(np.cos(f)) + s1 * float(np.sin(f)), 0))
                 for f in (a.rv_angle - a.rv_span, a.rv_angle + a.rv_span))
    fat_t = a.fat_rim + a.fat_groove * groove
    sub = t[near]
    sub[((beyond < fat_t) & (r_epi > 0)) | (present & (beyond < w + RV_WALL_MM + a.fat_rim + 1.0))] = FAT
    sub[present & (beyond < w + RV_WALL_MM)] = RV_WALL
    sub[present & (beyond < w)] = RV
    myo = rho < r_epi
    sub[myo] = MYO
    if a.scar is not None:
        sc = a.scar
        dth = _wrap(theta - np.deg2rad(sc["angle_deg"]))
        prof = np.clip(1 - (dth / np.deg2rad(sc["half_width_deg"])) ** 2, 0, 1)
        tau = (rho - r_endo) / np.maximum(r_epi - r_endo, 1e-6)
        sub[myo & (z >= sc["z_lo"]) & (z <= sc["z_hi"]) & (prof > 0)
            & (tau < sc["transmurality"] * np.sqrt(prof))] = SCAR
    cavity = rho < r_endo
    sub[cavity] = LV
    rp = a.papillary[2] * r_endo * (r_endo > 0.55 * a.r_endo) * (a.z_base - z > 15)  # not basal/apical
    for ang in a.papillary[:2]:
        px, py = 0.68 * r_endo * float(np.cos(ang)), 0.6 * r_endo * float(np.sin(ang))
        sub[cavity & ((dx - px) ** 2 + (dy - py) ** 2 < rp * rp)] = PAPILLARY
    t[near] = sub


def _tissue_map(a: _Anatomy, x, y, z, body_z: float | None = None) -> np.ndarray:
    """Tissue codes (int8) of the world points ``(x, y, z)``, broadcast to (Z, X, Y).

    The heart is evaluated at every z; the slowly varying surroundings (lungs, liver,
    aorta, chest wall) only in-plane at ``body_z`` (the slice centre), or not at all
    (soft tissue everywhere) when ``body_z`` is None.
    """
    hx, hy = HEART_CENTER
    px, py = x - hx - a.translation[0], y - hy - a.translation[1]
    cr, sr = float(np.cos(a.rotation)), float(np.sin(a.rotation))
    qx = hx + (cr * px + sr * py) / a.scale
    qy = hy + (cr * py - sr * px) / a.scale
    shape = np.broadcast_shapes(np.shape(qx), np.shape(qy), np.shape(z))
    body = np.full(np.broadcast_shapes(np.shape(qx), np.shape(qy)), SOFT, np.int8)
    if body_z is not None:
        bx, by = qx - a.body_shift[0], qy - a.body_shift[1]
        zf = 0.8 + 0.2 * float(np.clip((body_z + 60) / 120, 0, 1))  # lungs shrink towards the diaphragm
        body[((bx - 72) / (36 * zf)) ** 2 + ((by + 8) / (62 * zf)) ** 2 < 1] = LUNG
        body[((bx + 86) / (38 * zf)) ** 2 + ((by - 2) / (60 * zf)) ** 2 < 1] = LUNG
        body[((bx + 40) / 75) ** 2 + ((by + 112 - 0.45 * (45 - body_z)) / 50) ** 2 < 1] = LIVER
        body[(bx - 30) ** 2 + (by + 58) ** 2 < 11 ** 2] = AORTA
        wall_y = 60 - 0.004 * bx * bx
        body[by > wall_y] = MUSCLE
        body[by > wall_y + 9] = FAT
        body[by > wall_y + 17] = AIR
    t = np.array(np.broadcast_to(body, shape))
    _paint_heart(a, t, qx, qy, z)
    return t


def _smooth_field(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field (in-plane smoothing only)."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape), (sigma, sigma, 0), mode="wrap")
    return f / (f.std() + 1e-12)


def _render(a: _Anatomy, geo: SequenceGeometry, shifts: np.ndarray, means: np.ndarray,
            noise: float, rng: np.random.Generator):
    """Sample one sequence: returns (float32 image, int16 labels, uint8 scar mask)."""
    nx, ny = geo.shape
    x0, y0, _ = geo.origin()
    off = (np.arange(SUPERSAMPLE) - (SUPERSAMPLE - 1) / 2) / SUPERSAMPLE
    fx = (x0 + (np.arange(nx)[:, None] + off).ravel() * geo.spacing[0]).astype(np.float32)
    fy = (y0 + (np.arange(ny)[:, None] + off).ravel() * geo.spacing[1]).astype(np.float32)
    c = SUPERSAMPLE // 2
    img = np.empty((nx, ny, geo.n_slices), np.float64)
    lab = np.empty((nx, ny, geo.n_slices), np.int16)
    scar = np.empty((nx, ny, geo.n_slices), np.uint8)
    for k, zk in enumerate(geo.slice_z()):
        z = (zk + off * geo.slice_spacing).astype(np.float32)[:, None, None]
        t = _tissue_map(a, (fx - shifts[k, 0])[None, :, None], (fy - shifts[k, 1])[None, None, :], z, zk)
        img[:, :, k] = means[t].reshape(SUPERSAMPLE, nx, SUPERSAMPLE, ny, SUPERSAMPLE).mean(axis=(0, 2, 4))
        centre = t[c, c::SUPERSAMPLE, c::SUPERSAMPLE]
        lab[:, :, k] = TISSUE_LABEL[centre]
        scar[:, :, k] = centre == SCAR
    # Smooth coil-sensitivity bias, mild tissue texture, per-slice (breath-hold) gain.
    gx, gy = np.meshgrid(fx[c::SUPERSAMPLE], fy[c::SUPERSAMPLE], indexing="ij")
    bias = np.exp(rng.uniform(-1.5e-3, 1.5e-3) * gx + rng.uniform(-1.5e-3, 1.5e-3) * gy)
    texture = 1 + 0.04 * _smooth_field(rng, img.shape, 3.0)
    gain = 1 + rng.uniform(-0.03, 0.03, geo.n_slices)
    img = img * bias[:, :, None] * texture * gain * INTENSITY_SCALE
    sigma = noise * INTENSITY_SCALE
    img = np.hypot(img + sigma * rng.standard_normal(img.shape), sigma * rng.standard_normal(img.shape))
    return np.maximum(np.round(img), 1.0).astype(np.float32), lab, scar


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def _atlas_geometry(de: SequenceGeometry) -> SequenceGeometry:
    """Atlas grid: 1.5 mm in-plane covering the DE field, 5 mm slices over ATLAS_Z_RANGE."""
    fov = [n * s for n, s in zip(de.shape, de.spacing)]
    shape = tuple(int(np.ceil(f / ATLAS_SPACING[0])) for f in fov)
    n_z = int(round((ATLAS_Z_RANGE[1] - ATLAS_Z_RANGE[0]) / ATLAS_SPACING[2])) + 1
    return SequenceGeometry(shape, ATLAS_SPACING[:2], n_z, ATLAS_SPACING[2], ATLAS_Z_RANGE[0])


def _build_atlas(config: SyntheticConfig, geo: SequenceGeometry) -> np.ndarray:
    """Probabilistic atlas (X, Y, Z, 4) from N_ATLAS_DRAWS aligned shape draws."""
    x0, y0, _ = geo.origin()
    x = (x0 + np.arange(geo.shape[0]) * geo.spacing[0])[None, :, None]
    y = (y0 + np.arange(geo.shape[1]) * geo.spacing[1])[None, None, :]
    z = np.asarray(geo.slice_z())[:, None, None]
    acc = np.zeros((3, geo.n_slices, *geo.shape))
    for d in range(N_ATLAS_DRAWS):
        a = _draw_anatomy(np.random.default_rng([config.seed, 2, d]), scar=False, misalign=False)
        lab = TISSUE_LABEL[_tissue_map(a, x, y, z)]
        for c, name in enumerate(ATLAS_CLASSES[1:]):
            acc[c] += lab == LABEL_VALUES[name]
    sigma = [0, 0, 1.5 / geo.spacing[0], 1.5 / geo.spacing[1]]
    fg = ndimage.gaussian_filter(acc / N_ATLAS_DRAWS, sigma, mode="nearest")
    fg = np.clip(fg, 0, None)
    fg /= np.maximum(fg.sum(axis=0, keepdims=True), 1.0)
    prob = np.concatenate([np.clip(1 - fg.sum(axis=0, keepdims=True), 0, None), fg])
    prob /= prob.sum(axis=0, keepdims=True)
    return np.ascontiguousarray(prob.transpose(2, 3, 1, 0), dtype=np.float32)


def _make_subject(root: Path, config: SyntheticConfig, index: int) -> None:
    """Write the images, manual labels, scar mask and truth json of one subject."""
    name = f"patient{index}"
    rng = np.random.default_rng([config.seed, 1, index])
    atlas_misaligned = config.misalignment if config.atlas_misalignment is None else config.atlas_misalignment
    a = _draw_anatomy(rng, scar=index % 2 == 0, misalign=atlas_misaligned)
    truth = {"subject": name, "has_scar": a.scar is not None, "scar": a.scar,
             "slice_shifts_mm": {}, "slice_shift_convention": "image(p) = anatomy(p - shift)",
             "atlas_offset": {"translation_mm": list(a.translation),
                              "rotation_deg": float(np.rad2deg(a.rotation)), "scale": a.scale,
                              "center_mm": list(HEART_CENTER),
                              "convention": "p = center + t + scale * R(rotation) (q - center)"},
             "anatomy": {k: v for k, v in asdict(a).items()
                         if k not in ("scar", "translation", "rotation", "scale")},
             "intensity_means": {}, "noise_sigma": config.noise * INTENSITY_SCALE,
             "geometry": {}, "label_values": LABEL_VALUES}
    for si, seq in enumerate(SEQUENCES):
        geo = config.geometries[seq]
        sub = np.random.default_rng([config.seed, 3, index, si])
        shifts = sub.uniform(-config.max_slice_shift_mm, config.max_slice_shift_mm, (geo.n_slices, 2))
        if not config.misalignment or seq == REFERENCE_SEQUENCE:
            shifts = np.zeros_like(shifts)
        means = np.asarray(MEANS[seq]) * (1 + sub.uniform(-0.05, 0.05, len(TISSUES)))
        means[PAPILLARY] = means[MYO]
        img, lab, scar = _render(a, geo, shifts, means, config.noise, sub)
        _save(root / f"{name}_{seq}.nii.gz", img, geo.affine())
        _save(root / f"{name}_{seq}_manual.nii.gz", lab, geo.affine())
        if seq == REFERENCE_SEQUENCE:
            _save(root / "truth" / f"{name}_DE_scar.nii.gz", scar, geo.affine())
        truth["slice_shifts_mm"][seq] = shifts.tolist()
        truth["intensity_means"][seq] = dict(zip(TISSUES, (means * INTENSITY_SCALE).tolist()))
        truth["geometry"][seq] = {**asdict(geo), "slice_z_mm": geo.slice_z(),
                                  "affine": geo.affine().tolist()}
    (root / "truth" / f"{name}_truth.json").write_text(json.dumps(truth, indent=1))


def make_cohort(root: str | Path, config: SyntheticConfig = SyntheticConfig()) -> Path:
    """Generate the cohort into ``root`` (created if needed) and return it.

    Writes ``patientN_{C0,DE,T2}.nii.gz`` (float32), ``patientN_{seq}_manual.nii.gz``
    (int16 labels 0/200/500/600), ``atlas.nii.gz`` (float32 X,Y,Z,4 probabilities of
    background/myocardium/LV/RV) with ``atlas.json``, ``truth/patientN_truth.json``,
    ``truth/patientN_DE_scar.nii.gz`` and, last, ``cohort.json``.
    """
    root = Path(root)
    config = _resolved(config)
    if config.n_subjects < 0 or set(config.geometries) != set(SEQUENCES):
        raise ValueError(f"synthetic: need n_subjects >= 0 and geometries for {SEQUENCES}, got {config}")
    (root / "truth").mkdir(parents=True, exist_ok=True)
    for index in range(1, config.n_subjects + 1):
        _make_subject(root, config, index)
    ageo = _atlas_geometry(config.geometries[REFERENCE_SEQUENCE])
    from mvmm_monai.atlas.io import (  # the one atlas sidecar schema
        atlas_sidecar,
        write_atlas,
    )
    from mvmm_monai.classes import MSCMR_LABELS

    built = {"from": f"{N_ATLAS_DRAWS} aligned random draws of the synthetic shape model (seed {config.seed}), "
                     "averaged one-hot, Gaussian sigma 1.5 mm in-plane", "geometry": asdict(ageo)}
    write_atlas(root / "atlas.nii.gz", np.moveaxis(_build_atlas(config, ageo), -1, 0), ageo.affine(),
                atlas_sidecar("world", MSCMR_LABELS, built))
    (root / "cohort.json").write_text(json.dumps({
        "generator": "mvmm_monai.data.synthetic", "generator_version": GENERATOR_VERSION,
        "key": config_key(config), "config": _config_dict(config), "subjects": subject_names(config),
        "scar_subjects": scar_subjects(config), "sequences": list(SEQUENCES),
        "reference_sequence": REFERENCE_SEQUENCE, "label_values": LABEL_VALUES,
        "atlas": "atlas.nii.gz"}, indent=1))
    return root


def ensure_cohort(cache_dir: str | Path, config: SyntheticConfig = SyntheticConfig()) -> Path:
    """Return ``cache_dir/synthetic-<key>``, generating it atomically if missing.

    The cohort is built in a temporary sibling directory and renamed into place;
    if another process finished first its copy is kept and ours discarded.
    ``cohort.json`` (written last) marks a complete cohort.
    """
    cache_dir = Path(cache_dir)
    final = cache_dir / f"synthetic-{config_key(config)}"
    if (final / "cohort.json").is_file():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-synthetic-", dir=cache_dir))
    try:
        make_cohort(tmp, config)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "cohort.json").is_file():  # stale incomplete directory
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def sample_potts(log_prior: np.ndarray, beta: float, sweeps: int = 200, seed: int = 0) -> np.ndarray:
    """Class labels ``[*S]`` drawn from a Potts Markov random field with an external field, by Gibbs
    sampling: ``p(z) ∝ prod_x exp(log_prior[z_x, x]) * exp(beta * #{in-plane neighbour pairs that
    agree})``. Each voxel's conditional is ``softmax_k(log_prior[k, x] + beta * n_k(x))`` with
    ``n_k(x)`` the number of its 4 in-plane neighbours labelled ``k``: the model whose mean-field
    form the MvMM's MRF prior is (``mixture.prior.mrf_log_potential`` with ``neighbourhood='inplane'``),
    so a fit on images drawn from these labels should recover ``beta``.

    Args:
        log_prior: ``[K, H, W]`` or ``[K, H, W, D]`` log prior (e.g. a log atlas); slices along the
            last axis of a 3D field are independent (in-plane neighbours only).
        beta: interaction strength (>= 0).
        sweeps: full Gibbs sweeps (each updates the two checkerboard colours in turn).
        seed: random seed; the result is deterministic.
    """
    if log_prior.ndim not in (3, 4):
        raise ValueError(f"sample_potts: log_prior must be [K, H, W[, D]], got shape {log_prior.shape}")
    if beta < 0 or sweeps < 0:
        raise ValueError(f"sample_potts: need beta >= 0 and sweeps >= 0, got {beta}, {sweeps}")
    rng = np.random.default_rng(seed)
    k = log_prior.shape[0]
    spatial = log_prior.shape[1:]
    gumbel = lambda: -np.log(-np.log(rng.uniform(1e-12, 1.0, size=log_prior.shape)))
    labels = np.argmax(log_prior + gumbel(), axis=0)
    i, j = np.indices(spatial[:2])
    colour = (i + j) % 2
    if len(spatial) == 3:
        colour = np.broadcast_to(colour[..., None], spatial)
    classes = np.arange(k).reshape((k,) + (1,) * len(spatial))
    for _ in range(sweeps):
        for c in (0, 1):
            onehot = (labels[None] == classes).astype(np.float64)
            padded = np.pad(onehot, [(0, 0), (1, 1), (1, 1)] + [(0, 0)] * (len(spatial) - 2))
            counts = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
            draw = np.argmax(log_prior + beta * counts + gumbel(), axis=0)
            labels = np.where(colour == c, draw, labels)
    return labels
