"""MONAI dictionary pipelines that read a subject's sequences and labels."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    ScaleIntensityRangePercentilesd,
)


class CheckFinited(MapTransform):
    """Raise ``ValueError`` naming the file when an image holds NaN or Inf (before any scaling)."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            bad = ~torch.isfinite(torch.as_tensor(img))
            if bad.any():
                name = getattr(img, "meta", {}).get("filename_or_obj", key)
                raise ValueError(f"{name}: image contains {int(bad.sum())} NaN/Inf voxels")
        return d


class CheckInformatived(MapTransform):
    """Raise ``ValueError`` naming the file and the sequence when an image carries no intensity
    information: every voxel the same value, or its ``lower`` and ``upper`` percentiles equal (the
    percentile scaling that follows would divide by zero and make it all zeros)."""

    def __init__(self, keys: KeysCollection, lower: float, upper: float) -> None:
        super().__init__(keys)
        self.lower, self.upper = float(lower), float(upper)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            name = getattr(img, "meta", {}).get("filename_or_obj", key)
            values = np.asarray(torch.as_tensor(img), dtype=np.float64).ravel()
            lo, hi = np.percentile(values, [self.lower, self.upper])
            if values.min() == values.max():
                raise ValueError(f"{name}: sequence {key} has the same value ({values[0]:.6g}) in every voxel; it carries no image")
            if lo == hi:
                raise ValueError(
                    f"{name}: sequence {key} has its {self.lower:g}th and {self.upper:g}th intensity percentiles equal ({lo:.6g}): "
                    "almost every voxel has the same value (data.lower_percentile / data.upper_percentile)"
                )
        return d


class CheckSpatiald(MapTransform):
    """Raise ``ValueError`` naming the file unless the image is 3D ``[1, X, Y, Z]`` (or 2D, made 3D)."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            name = getattr(img, "meta", {}).get("filename_or_obj", key)
            if img.ndim == 3:  # a single 2D slice: add the slice axis
                img = img[..., None]
            if img.ndim != 4 or img.shape[0] != 1:
                raise ValueError(
                    f"{name}: expected a single-channel 2D or 3D image [X, Y(, Z)], got shape {tuple(img.shape[1:])} "
                    f"with {img.shape[0]} channel(s)"
                )
            if min(img.shape[1:3]) < 2:
                raise ValueError(f"{name}: in-plane size {tuple(img.shape[1:3])} is too small")
            d[key] = img
        return d


def subject_transforms(
    image_keys: Sequence[str],
    label_keys: Sequence[str],
    lower_percentile: float = 1.0,
    upper_percentile: float = 99.0,
) -> Compose:
    """Loading pipeline: NIfTI via nibabel, channel first, checks (shape, NaN/Inf, an image with
    information), percentile clipping to [0, 1].

    Geometry stays in each image's ``MetaTensor.affine``; no reorientation is applied, because the
    common space is the reference sequence's own voxel grid and every other image is resampled
    into it through world coordinates (:mod:`mvmm_monai.data.common_space`).
    """
    keys: KeysCollection = [*image_keys, *label_keys]
    transforms = [
        LoadImaged(keys=keys, reader="NibabelReader", image_only=True),
        EnsureChannelFirstd(keys=keys, channel_dim="no_channel"),
        CheckSpatiald(keys=keys),
        CheckFinited(keys=keys),
        EnsureTyped(keys=keys, dtype=torch.float32, track_meta=True),
    ]
    if image_keys:
        transforms.append(CheckInformatived(keys=list(image_keys), lower=lower_percentile, upper=upper_percentile))
    if image_keys:
        transforms.append(
            ScaleIntensityRangePercentilesd(
                keys=list(image_keys),
                lower=lower_percentile,
                upper=upper_percentile,
                b_min=0.0,
                b_max=1.0,
                clip=True,
            )
        )
    return Compose(transforms)
