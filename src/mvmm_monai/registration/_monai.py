"""MONAI spatial blocks, built and called with their known chatter silenced by name."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

from monai.losses import BendingEnergyLoss
from monai.networks.blocks import DVF2DDF, Warp

# Warp warns at every construction that it uses torch's grid_sample (what we want);
# BendingEnergyLoss indexes with a list, which torch 2.13 flags on every call.
_NAMED = (
    ("ignore", r"monai\.networks\.blocks\.Warp: Using PyTorch native grid_sample", UserWarning),
    ("ignore", r"Using a non-tuple sequence for multidimensional indexing", UserWarning),
)


@contextmanager
def quiet_monai():
    """Context in which MONAI's known, harmless warnings (named in ``_NAMED``) are ignored."""
    with warnings.catch_warnings():
        for action, message, category in _NAMED:
            warnings.filterwarnings(action, message=message, category=category)
        yield


def make_warp(mode: str = "bilinear", padding_mode: str = "border") -> Warp:
    """MONAI ``Warp``: ``warp(image [B, C, *S], ddf [B, ndim, *S] in voxels) -> [B, C, *S]``."""
    with quiet_monai():
        return Warp(mode=mode, padding_mode=padding_mode)


def make_dvf2ddf(num_steps: int) -> DVF2DDF:
    """MONAI ``DVF2DDF``: velocity ``[B, ndim, *S]`` (voxels) -> displacement by ``num_steps`` of scaling and squaring."""
    with quiet_monai():
        return DVF2DDF(num_steps=num_steps, mode="bilinear", padding_mode="zeros")


def bending_energy(ddf):
    """MONAI ``BendingEnergyLoss`` (mean reduction) of a displacement ``[B, ndim, *S]`` (every S > 4)."""
    with quiet_monai():
        return BendingEnergyLoss(normalize=False)(ddf)
