"""Data: dataset layouts, MONAI loading pipelines, the common space and the synthetic cohort."""

from mvmm_monai.classes import MSCMR_LABELS, MYOPS_LABELS, LabelMap
from mvmm_monai.data.common_space import Grid, resample
from mvmm_monai.data.datasets import (
    FilesDataset,
    MSCMRDataset,
    MyoPSDataset,
    SubjectFiles,
    SyntheticDataset,
)
from mvmm_monai.data.subject import SubjectData, load_subject

__all__ = [
    "FilesDataset",
    "Grid",
    "LabelMap",
    "MSCMRDataset",
    "MSCMR_LABELS",
    "MYOPS_LABELS",
    "MyoPSDataset",
    "SubjectData",
    "SubjectFiles",
    "SyntheticDataset",
    "load_subject",
    "resample",
]
