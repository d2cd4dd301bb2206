"""Spatial transforms of the ICM loop and their schedule.

``functional`` (pure tensor maths), ``atlas_deformation`` (similarity + SVF of the atlas),
``slice_motion`` (per-slice in-plane motion of the non-reference sequences), ``composite`` (what
an ICM step moves: either part, both or neither), ``schedule`` (when each part moves).
"""

from mvmm_monai.registration.atlas_deformation import AtlasDeformation, DeformedAtlas
from mvmm_monai.registration.composite import Registration, RegistrationError, Warped
from mvmm_monai.registration.functional import thick_slices
from mvmm_monai.registration.schedule import ICMSchedule, Parts
from mvmm_monai.registration.slice_motion import SliceMotion

__all__ = [
    "AtlasDeformation",
    "DeformedAtlas",
    "ICMSchedule",
    "Parts",
    "Registration",
    "RegistrationError",
    "SliceMotion",
    "Warped",
    "thick_slices",
]
