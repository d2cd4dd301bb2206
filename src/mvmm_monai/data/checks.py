"""Checks of a loaded subject that need its sequences together (one image alone:
:mod:`mvmm_monai.data.transforms`).

A sequence whose voxel data are mirrored against its header (an export or conversion error) still
loads, resamples and fits without complaint, and its segmentation misses the heart it shows. The
sequences of one patient image the same anatomy, so they share far more information where they
overlap than a mirrored copy does: on the 25 shared MyoPS cases a flipped C0 or T2 shares at most
about half the mutual information with LGE that it shares as given, and a mirrored C0 is caught in
every case (``benchmarks/mirror_check.py``, docs/results.md).
"""

from __future__ import annotations

import logging

import torch
from monai.losses import GlobalMutualInformationLoss

log = logging.getLogger(__name__)

#: the in-plane flips tried: name -> spatial axes of the common-space image ``[X, Y, Z]``
FLIPS = {"left-right": (0,), "up-down": (1,), "both": (0, 1)}


def mirrored_sequences(subject, ratio: float = 1.5, stride: int = 4, bins: int = 32) -> dict[str, dict]:
    """Mutual information of every other sequence with the reference, as given and flipped in-plane.

    Each comparison uses the voxels both images cover (every ``stride``-th in-plane, for speed) of
    the common space, intensities as loaded ([0, 1]); MONAI's Parzen-window
    :class:`~monai.losses.GlobalMutualInformationLoss`. A sequence counts as mirrored when a flipped
    copy shares ``ratio`` times more information with the reference than the sequence as given;
    a warning names it and its file.

    Returns:
        sequence -> ``{"mutual_information": as given, "flipped": {flip: value}, "mirrored": bool}``
        (a flip whose overlap with the reference is empty is left out).
    """
    measure = GlobalMutualInformationLoss(num_bins=bins)
    ref = subject.sequences.index(subject.reference)
    x_ref, c_ref = subject.images[ref], subject.coverage[ref] > 0
    sub = (slice(None, None, stride), slice(None, None, stride))

    def mutual_information(image, cover) -> float | None:
        both = (c_ref & cover)[sub]
        if int(both.sum()) < 64:
            return None
        return -float(measure(x_ref[sub][both].reshape(1, 1, -1), image[sub][both].reshape(1, 1, -1)))

    out = {}
    for n, seq in enumerate(subject.sequences):
        if n == ref:
            continue
        x, c = subject.images[n], subject.coverage[n] > 0
        given = mutual_information(x, c)
        if given is None:
            continue
        flipped = {name: mutual_information(x.flip(axes), c.flip(axes)) for name, axes in FLIPS.items()}
        flipped = {k: v for k, v in flipped.items() if v is not None}
        best = max(flipped, key=flipped.get) if flipped else None
        mirrored = best is not None and flipped[best] > ratio * max(given, 1e-6)
        out[seq] = {"mutual_information": given, "flipped": flipped, "mirrored": mirrored}
        if mirrored:
            log.warning(
                "%s: %s looks mirrored against %s (%s flip): it shares %.2f of mutual information with %s flipped "
                "and %.2f as given; check the header of %s",
                subject.name, seq, subject.reference, best, flipped[best], subject.reference, given,
                subject.files.images.get(seq, seq),
            )
    return out
