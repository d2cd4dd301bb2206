"""Spatial transforms of the ICM loop: atlas deformation and per-slice motion shifts."""

from mvmm_monai.registration.atlas_deformation import AtlasDeformation
from mvmm_monai.registration.base import IdentityRegistration, Warped
from mvmm_monai.registration.mvmm_registration import (
    MvMMRegistration,
    RegistrationError,
    thick_slices,
)
from mvmm_monai.registration.slice_shift import SliceShifts

__all__ = [
    "AtlasDeformation",
    "IdentityRegistration",
    "MvMMRegistration",
    "RegistrationError",
    "SliceShifts",
    "Warped",
    "thick_slices",
]
