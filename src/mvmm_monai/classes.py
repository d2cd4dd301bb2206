"""The model's classes and the label values of each labelling protocol: one place for both."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

#: the model's classes, in the order of every ``[B, K, ...]`` tensor and atlas channel
CLASS_NAMES = ("background", "myocardium", "lv", "rv")

#: one colour per heart class, used by every picture (fit overlays, TensorBoard, the atlas PNG)
CLASS_COLOURS = {"myocardium": "#f5d000", "lv": "#ff3b30", "rv": "#2f7bff"}


def class_argmax(scores: Tensor) -> Tensor:
    """The winning class ``[*S]`` (int64) of class scores ``[K, *S]`` (probabilities or log-densities):
    ``scores.argmax(0)``, ties to the lower class as there. On the CPU the reduction runs over the last,
    contiguous axis, which is about 9x faster than PyTorch's reduction over a leading axis (4 x 1.4M
    voxels: 0.02 s against 0.2 s on 2 cores)."""
    if scores.device.type != "cpu" or scores.dim() < 2:
        return scores.argmax(0)
    return scores.movedim(0, -1).contiguous().argmax(-1)


def class_rgb(prob) -> np.ndarray:
    """An RGB picture ``[*S, 3]`` in [0, 1] of class probabilities ``[K, *S]`` (numpy or torch, linear):
    each heart class adds its :data:`CLASS_COLOURS` colour weighted by its probability."""
    p = prob.detach().float().cpu().numpy() if hasattr(prob, "detach") else np.asarray(prob, dtype=np.float32)
    rgb = np.zeros((*p.shape[1:], 3), dtype=np.float32)
    for k, name in enumerate(CLASS_NAMES):
        if name in CLASS_COLOURS:
            colour = np.array([int(CLASS_COLOURS[name][i : i + 2], 16) / 255 for i in (1, 3, 5)], dtype=np.float32)
            rgb += p[k][..., None] * colour
    return np.clip(rgb, 0, 1)


@dataclass(frozen=True)
class LabelMap:
    """Which label values of a dataset make up each class.

    Attributes:
        values: per class (in :data:`mvmm_monai.CLASS_NAMES` order) the label values that belong to
            it; the first value is the one written in output label maps.
        extra: named sub-structures kept for their own metrics (e.g. MyoPS scar 2221).
    """

    values: tuple[tuple[int, ...], ...]
    extra: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.values) != len(CLASS_NAMES):
            raise ValueError(f"LabelMap: need {len(CLASS_NAMES)} classes {CLASS_NAMES}, got {len(self.values)}")

    @property
    def scar_value(self) -> int | None:
        """The label value of scar (``extra["scar"]``, MyoPS 2221), or ``None`` when there is none."""
        return self.extra.get("scar")

    @property
    def output_values(self) -> tuple[int, ...]:
        return tuple(v[0] for v in self.values)

    @property
    def known_values(self) -> set[int]:
        return {v for vs in self.values for v in vs}

    def to_classes(self, label: Tensor, source: str = "label") -> Tensor:
        """Label values -> class indices (long, same shape). Unknown values raise ``ValueError``."""
        known = torch.tensor(sorted(self.known_values), dtype=label.dtype, device=label.device)
        inside = torch.isin(label, known)
        unknown = [] if bool(inside.all()) else sorted({int(v) for v in torch.unique(label[~inside])})
        if unknown:
            hint = ""
            if self is not MYOPS_LABELS and set(unknown) <= MYOPS_LABELS.known_values:
                hint = " (these are MyoPS label values: with data=files add data.label_values=myops, and postprocess=myops for MyoPS's labelling conventions)"
            raise ValueError(
                f"{source}: label values {unknown} are not in the dataset's label map "
                f"{dict(zip(CLASS_NAMES, self.values))}{hint}"
            )
        out = torch.zeros(label.shape, dtype=torch.long, device=label.device)
        for k, vs in enumerate(self.values):
            for v in vs:
                out[label == v] = k
        return out

    def to_values(self, classes: Tensor) -> Tensor:
        """Class indices -> output label values (int16)."""
        lut = torch.tensor(self.output_values, dtype=torch.int16, device=classes.device)
        return lut[classes.long()]


MSCMR_LABELS = LabelMap(values=((0,), (200,), (500,), (600,)))
MYOPS_LABELS = LabelMap(values=((0,), (200, 1220, 2221), (500,), (600,)), extra={"edema": 1220, "scar": 2221})
