r"""ANTs Atropos as a benchmark peer: multi-channel Gaussian mixture + MRF with atlas priors.

Atropos (Avants et al., Neuroinformatics 2011) through antspyx, an optional benchmark extra
(``pip install -e '.[bench]'``), never a core dependency: ``ants`` is imported inside the
functions, so this module imports without it and only a call raises the :class:`ImportError`.

Use from another benchmark script (same folder, or ``sys.path.insert(0, <repo>/benchmarks)``)::

    from atropos_peer import atlas_mask, atropos_segment
    labels = atropos_segment([c0, lge, t2], spacing, priors)   # [*S] class indices

Conventions (those of :mod:`mvmm_monai`): ``images`` are N arrays of one shape ``S`` = ``(X, Y)``
or ``(X, Y, Z)`` (all sequences on one grid, raw or scaled intensities, linear space);
``priors`` is ``[K, *S]`` linear probabilities in :data:`mvmm_monai.CLASS_NAMES` order
(background, myocardium, LV, RV) -- the placed atlas; the result is int64 class indices ``[*S]``
in the same order. Atropos labels the voxels of its mask ``1..K`` in the order of the prior
images and gives 0 outside the mask; here ``label - 1`` inside the mask and 0 (background)
outside, so class ``k`` of the priors is class ``k`` of the result.

What runs (the ``Atropos`` program inside antspyx, called with the arguments
:func:`ants.atropos` builds, because ``ants.atropos`` drops extra keyword arguments for
multi-channel input and leaves its probability files in the system temporary folder)::

    Atropos -d D -a I_1 ... -a I_N -x MASK -i PriorProbabilityImages[K, prior%02d, w]
            -m [s, 1x1(x1)] -c [iterations, convergence] -k Gaussian -r 0 -o [labels, posterior%02d]

i.e. the Socrates posterior ``prior^w * (likelihood * MRF)^(1 - w)``, a multivariate Gaussian per
class (full covariance over the N channels), initialised from the prior-weighted statistics, a
fixed random seed (``-r 0``: reproducible).

2D and 3D: a 2D slice (or an ``(X, Y, 1)`` stack) runs as one 2D problem. A 3D stack runs by
default as one 3D problem (one Gaussian per class shared by all slices); when its slices are thick
(slice spacing > ``thick_ratio`` x in-plane spacing, e.g. MyoPS: 12-23 mm against 0.73 mm) the
default MRF neighbourhood is in-plane only (radius ``1x1x0``), since voxels 10+ mm apart are not
neighbours. ``per_slice=True`` instead runs each slice that holds mask voxels as an independent
2D problem (own Gaussians per slice, 2D MRF); slices without mask voxels are background.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

INSTALL_HINT = "pip install -e '.[bench]'"
DEFAULT_MRF_SMOOTHING = 0.1


def _import_ants():
    """``ants`` (antspyx), or an :class:`ImportError` that says how to install it."""
    try:
        import ants
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"ANTs Atropos needs antspyx, an optional benchmark extra: {INSTALL_HINT} "
            f"(or pip install antspyx); import failed with: {err}"
        ) from err
    return ants


def ants_version() -> str:
    """The installed antspyx version (raises the install-hint :class:`ImportError` without it)."""
    return str(getattr(_import_ants(), "__version__", "unknown"))


@dataclass(frozen=True)
class AtroposResult:
    """Output of :func:`atropos_fit`.

    Attributes:
        labels: int64 class indices ``[*S]`` in the priors' order (0 = background, also outside the mask).
        posteriors: float32 ``[K, *S]`` Atropos posterior probabilities (linear); outside the mask
            (and in per-slice mode on skipped slices) one-hot background.
        mask: bool ``[*S]`` the region Atropos labelled.
        seconds: wall-clock seconds of the Atropos calls (I/O of the prior images included).
        arguments: the Atropos ``-i``/``-m``/``-c`` option strings used.
    """

    labels: np.ndarray
    posteriors: np.ndarray
    mask: np.ndarray
    seconds: float
    arguments: dict[str, str]


def atlas_mask(priors: np.ndarray, spacing: Sequence[float], margin_mm: float | None = 20.0,
               threshold: float = 0.01) -> np.ndarray:
    """Bool ``[*S]``: voxels within ``margin_mm`` (in-plane, per slice) of where the atlas
    foreground ``1 - priors[0]`` exceeds ``threshold`` -- the region our fit uses
    (:func:`mvmm_monai.atlas.roi.atlas_roi`, ``model.roi_margin_mm``, default 20 mm).

    Args:
        priors: ``[K, X, Y]`` or ``[K, X, Y, Z]`` linear probabilities, background first.
        spacing: voxel size in mm, at least the two in-plane values.
        margin_mm: margin in mm; ``None`` = the whole grid.
    """
    import torch

    from mvmm_monai.atlas.roi import atlas_roi

    priors = np.asarray(priors)
    if priors.ndim not in (3, 4):
        raise ValueError(f"atlas_mask: priors must be [K, X, Y] or [K, X, Y, Z], got shape {priors.shape}")
    squeeze = priors.ndim == 3
    p = priors[..., None] if squeeze else priors
    roi = atlas_roi(torch.from_numpy(np.ascontiguousarray(p, dtype=np.float64)),
                    tuple(float(s) for s in spacing), margin_mm, threshold).numpy() > 0.5
    return roi[..., 0] if squeeze else roi


def _check(images: Sequence[np.ndarray], spacing: Sequence[float], priors: np.ndarray,
           mask: np.ndarray | None) -> tuple[list[np.ndarray], tuple[float, ...], np.ndarray, tuple[int, ...]]:
    if len(images) == 0:
        raise ValueError("atropos: no images given")
    imgs = [np.asarray(im, dtype=np.float32) for im in images]
    shape = imgs[0].shape
    if len(shape) not in (2, 3):
        raise ValueError(f"atropos: images must be 2D (X, Y) or 3D (X, Y, Z), got shape {shape}")
    for n, im in enumerate(imgs):
        if im.shape != shape:
            raise ValueError(f"atropos: image {n} has shape {im.shape}, expected {shape} (that of image 0)")
        if not np.isfinite(im).all():
            raise ValueError(f"atropos: image {n} holds NaN or Inf")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != len(shape) or min(spacing) <= 0:
        raise ValueError(f"atropos: spacing must be {len(shape)} positive values (mm), got {spacing}")
    priors = np.asarray(priors, dtype=np.float32)
    if priors.ndim != len(shape) + 1 or priors.shape[1:] != shape or priors.shape[0] < 2:
        raise ValueError(f"atropos: priors must be [K >= 2, {', '.join(map(str, shape))}], got {priors.shape}")
    if not np.isfinite(priors).all() or (priors < 0).any():
        raise ValueError("atropos: priors must be finite and non-negative")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != shape:
            raise ValueError(f"atropos: mask has shape {mask.shape}, expected {shape}")
    return imgs, spacing, priors, shape


def _run_atropos(ants, images: list[np.ndarray], spacing: tuple[float, ...], priors: np.ndarray,
                 mask: np.ndarray, prior_weight: float, mrf: str, convergence: str, verbose: bool
                 ) -> tuple[np.ndarray, np.ndarray]:
    """One Atropos call on arrays of one shape (2D or 3D): Atropos labels ``[*S]`` (0 outside the
    mask, 1..K inside) and posteriors ``[K, *S]``."""
    from ants.internal import get_lib_fn, get_pointer_string, process_arguments

    k = priors.shape[0]
    make = lambda a: ants.from_numpy(np.ascontiguousarray(a, dtype=np.float32), spacing=spacing)  # noqa: E731
    a_imgs = [make(im) for im in images]
    x_img = make(mask.astype(np.float32)).clone("unsigned int")
    out = a_imgs[0].clone("unsigned int")
    with tempfile.TemporaryDirectory(prefix="atropos_") as tmp:
        prior_fmt, post_fmt = str(Path(tmp) / "prior%02d.nii.gz"), str(Path(tmp) / "posterior%02d.nii.gz")
        for c in range(k):
            ants.image_write(make(priors[c]), prior_fmt % (c + 1))
        args: dict[str, object] = {"d": len(images[0].shape)}
        for n, im in enumerate(a_imgs):
            args[f"a-MULTINAME-{n}"] = im
        args.update({
            "x": x_img,
            "i": f"PriorProbabilityImages[{k},{prior_fmt},{prior_weight}]",
            "m": mrf,
            "c": convergence,
            "k": "Gaussian",
            "r": 0,
            "v": int(verbose),
            "o": f"[{get_pointer_string(out)},{post_fmt}]",
        })
        status = get_lib_fn("Atropos")(process_arguments(args))
        if status != 0:
            raise RuntimeError(f"Atropos exited with status {status} (run with verbose=True to see its messages)")
        posts = []
        for c in range(k):
            path = Path(post_fmt % (c + 1))
            if not path.is_file():
                raise RuntimeError(f"Atropos wrote no posterior image {path.name} for class {c}")
            posts.append(ants.image_read(str(path)).numpy())
    return out.numpy().astype(np.int64), np.stack(posts).astype(np.float32)


def atropos_fit(
    images: Sequence[np.ndarray],
    spacing: Sequence[float],
    priors: np.ndarray,
    mask: np.ndarray | None = None,
    prior_weight: float = 0.5,
    mrf: str | None = None,
    mrf_smoothing: float = DEFAULT_MRF_SMOOTHING,
    iterations: int = 25,
    convergence_threshold: float = 0.0,
    per_slice: bool = False,
    roi_margin_mm: float | None = 20.0,
    thick_ratio: float = 3.0,
    rescale: float | None = 1000.0,
    verbose: bool = False,
) -> AtroposResult:
    """Segment with ANTs Atropos given atlas priors; see the module docstring for what runs.

    Args:
        images: N arrays ``(X, Y)`` or ``(X, Y, Z)`` (one per sequence, one grid; linear
            intensities). All go to Atropos as channels of one multivariate Gaussian per class.
        spacing: voxel size in mm, one value per image axis.
        priors: ``[K, *S]`` linear prior probabilities (the placed atlas), background first;
            renormalised over K where they sum to more than 0.
        mask: ``[*S]`` region to label (non-zero = inside); ``None`` = :func:`atlas_mask` of the
            priors with ``roi_margin_mm`` (the region our fit uses).
        prior_weight: Atropos prior weighting ``w`` in [0, 1] (0: priors initialise only; 0.5: the
            published peer setting).
        mrf: Atropos ``-m`` string, e.g. ``"[0.1,1x1]"`` (2D) or ``"[0.1,1x1x1]"`` (3D); ``None`` =
            ``[mrf_smoothing, 1x1]`` in 2D, ``[mrf_smoothing, 1x1x1]`` in 3D, ``[mrf_smoothing,
            1x1x0]`` for thick-slice 3D stacks (see ``thick_ratio``); ``"[0,1x1]"`` switches it off.
        mrf_smoothing: the MRF smoothing factor used when ``mrf`` is ``None``.
        iterations: maximum Atropos iterations.
        convergence_threshold: Atropos stops when the mean maximum posterior changes less than
            this; 0 runs all ``iterations``.
        per_slice: run every slice of a 3D stack as its own 2D problem (own Gaussians, 2D MRF).
        roi_margin_mm: margin of the default mask (ignored when ``mask`` is given).
        thick_ratio: a 3D stack counts as thick-slice when ``spacing[2] > thick_ratio *
            max(spacing[:2])``.
        rescale: map each channel linearly so that its range inside the mask is ``[0, rescale]``
            before Atropos sees it (``None``: as given). Neutral for the result up to round-off (Gaussian
            posteriors do not change under a per-channel affine map), but needed: ITK rejects a
            class covariance whose determinant is below an absolute 1e-6, which intensities
            scaled to [0, 1] reach with three channels.
        verbose: let Atropos print its progress.

    Returns:
        :class:`AtroposResult` (labels ``[*S]`` int64 in the priors' class order).

    Raises:
        ImportError: antspyx is not installed (message: ``pip install -e '.[bench]'``).
        ValueError: shapes, spacing, priors or mask do not fit, or the mask is empty.
        RuntimeError: Atropos failed.
    """
    ants = _import_ants()
    imgs, spacing, priors, shape = _check(images, spacing, priors, mask)
    if not 0.0 <= prior_weight <= 1.0:
        raise ValueError(f"atropos: prior_weight must be in [0, 1], got {prior_weight}")
    if iterations < 1:
        raise ValueError(f"atropos: iterations must be >= 1, got {iterations}")
    total = priors.sum(0, keepdims=True)
    priors = np.where(total > 0, priors / np.where(total > 0, total, 1.0), 0.0).astype(np.float32)
    mask = (np.asarray(mask) != 0) if mask is not None else atlas_mask(priors, spacing, roi_margin_mm)
    if not mask.any():
        raise ValueError("atropos: the mask is empty")
    if rescale is not None:
        if rescale <= 0:
            raise ValueError(f"atropos: rescale must be > 0 or None, got {rescale}")
        for n, im in enumerate(imgs):
            lo, hi = float(im[mask].min()), float(im[mask].max())
            imgs[n] = ((im - lo) * (rescale / (hi - lo) if hi > lo else 1.0)).astype(np.float32)
    convergence = f"[{int(iterations)},{convergence_threshold}]"
    k = priors.shape[0]

    # 2D problems: a 2D slice, a (X, Y, 1) stack, or every slice of a stack in per-slice mode.
    two_d = len(shape) == 2 or shape[2] == 1 or per_slice
    mode = "2D" if len(shape) == 2 or shape[2] == 1 else ("2D per slice" if per_slice else "3D")
    start = time.perf_counter()
    if two_d:
        mrf_used = mrf if mrf is not None else f"[{mrf_smoothing},1x1]"
        stack = len(shape) == 3
        labels = np.zeros(shape, dtype=np.int64)
        posts = np.zeros((k, *shape), dtype=np.float32)
        for z in range(shape[2] if stack else 1):
            sl = (slice(None), slice(None), z) if stack else (slice(None), slice(None))
            if not mask[sl].any():
                continue
            lab, post = _run_atropos(ants, [im[sl] for im in imgs], spacing[:2], priors[(slice(None), *sl)],
                                     mask[sl], prior_weight, mrf_used, convergence, verbose)
            labels[sl], posts[(slice(None), *sl)] = lab, post
    else:
        thick = spacing[2] > thick_ratio * max(spacing[:2])
        mrf_used = mrf if mrf is not None else f"[{mrf_smoothing},1x1x{0 if thick else 1}]"
        labels, posts = _run_atropos(ants, imgs, spacing, priors, mask, prior_weight, mrf_used, convergence, verbose)
    seconds = time.perf_counter() - start

    # Atropos: 0 outside the mask, 1..K inside in the priors' order -> our class indices.
    inside = mask & (labels > 0)
    if (mask & (labels == 0)).any():
        raise RuntimeError("Atropos left voxels inside the mask unlabelled")
    classes = np.where(inside, labels - 1, 0).astype(np.int64)
    posts = np.where(mask[None], posts, 0.0).astype(np.float32)
    posts[0][~mask] = 1.0
    return AtroposResult(
        labels=classes,
        posteriors=posts,
        mask=mask,
        seconds=seconds,
        arguments={"i": f"PriorProbabilityImages[{k},<priors>,{prior_weight}]", "m": mrf_used, "c": convergence,
                   "mode": mode},
    )


def atropos_segment(*args, **kwargs) -> np.ndarray:
    """Class indices ``[*S]`` (int64, the priors' order: 0 background, 1 myocardium, 2 LV, 3 RV)
    from ANTs Atropos; the arguments are those of :func:`atropos_fit`."""
    return atropos_fit(*args, **kwargs).labels
