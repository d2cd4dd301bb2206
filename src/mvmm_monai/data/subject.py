"""Read one subject and bring its sequences into the common space (the reference's grid)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.data import Dataset
from torch import Tensor

from mvmm_monai.classes import LabelMap
from mvmm_monai.data.common_space import Grid, resample
from mvmm_monai.data.transforms import subject_transforms


@dataclass(frozen=True)
class SubjectFiles:
    """The files of one subject.

    Attributes:
        name: subject name used in output file names.
        images: sequence name -> image path (the reference first).
        labels: sequence name -> manual label path on that sequence's grid (may be empty).
        label_map: the dataset's label values.
        reference: the sequence whose grid is the common space.
        truth: optional JSON with generator ground truth (synthetic cohort only).
        scar_labels: sequence -> scar mask (nonzero = scar) on that sequence's grid, for datasets
            whose labels do not carry a scar value (the synthetic cohort's ``truth/<name>_DE_scar``).
    """

    name: str
    images: dict[str, Path]
    labels: dict[str, Path]
    label_map: LabelMap
    reference: str
    truth: Path | None = None
    scar_labels: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class SubjectData:
    """One subject, loaded.

    Attributes:
        name: subject name.
        sequences: sequence names, the reference first (the order of the image channels).
        grids: native grid of every sequence.
        native_images: ``[1, X_n, Y_n, Z_n]`` every sequence on its own grid, scaled to [0, 1].
        images: ``[N, X, Y, Z]`` all sequences in the common space (the reference grid).
        coverage: ``[N, X, Y, Z]`` 1 where sequence n covers the common-space voxel.
        labels: sequence -> ``[X_n, Y_n, Z_n]`` manual class indices on that sequence's grid.
        label_map: the dataset's label values.
        files: where it came from.
        scar_labels: sequence -> ``[X_n, Y_n, Z_n]`` bool manual scar mask on that sequence's grid
            (from the label's scar value, e.g. MyoPS 2221, or a scar mask file); empty without one.
    """

    name: str
    sequences: tuple[str, ...]
    grids: dict[str, Grid]
    native_images: dict[str, Tensor]
    images: Tensor
    coverage: Tensor
    labels: dict[str, Tensor]
    label_map: LabelMap
    files: SubjectFiles
    scar_labels: dict[str, Tensor] = field(default_factory=dict)
    parent: "SubjectData | None" = None
    box: tuple[int, int, int, int] | None = None

    @property
    def reference(self) -> str:
        return self.sequences[0]

    def cropped(self, box: tuple[int, int, int, int]) -> "SubjectData":
        """The subject with its common space cut to the in-plane box ``(x0, x1, y0, y1)`` of the
        reference grid (all slices), e.g. around the placed atlas on a full field of view.

        The reference's grid (affine moved to the box), image, labels and scar labels are cut;
        the other sequences keep their own native grids. ``parent`` and ``box`` remember the
        uncut subject: :meth:`uncrop` puts common-space results back on its grid.
        """
        x0, x1, y0, y1 = (int(v) for v in box)
        X, Y, Z = self.grid.shape
        if not (0 <= x0 < x1 <= X and 0 <= y0 < y1 <= Y):
            raise ValueError(f"{self.name}: crop box {box} is not inside the common space {self.grid.shape}")
        ref = self.reference
        aff = self.grid.affine.clone()
        aff[:3, 3] = self.grid.affine[:3, :3] @ torch.tensor([x0, y0, 0.0], dtype=aff.dtype) + self.grid.affine[:3, 3]

        def cut(d: dict) -> dict:
            return {k: (v[..., x0:x1, y0:y1, :] if k == ref else v) for k, v in d.items()}

        # a crop of a crop keeps its box relative to the first, uncut subject
        ox, oy = (self.box[0], self.box[2]) if self.box is not None else (0, 0)
        return dataclasses.replace(
            self,
            grids={**self.grids, ref: Grid(aff, (x1 - x0, y1 - y0, Z))},
            native_images=cut(self.native_images),
            images=self.images[:, x0:x1, y0:y1],
            coverage=self.coverage[:, x0:x1, y0:y1],
            labels=cut(self.labels),
            scar_labels=cut(self.scar_labels),
            parent=self.parent or self,
            box=(x0 + ox, x1 + ox, y0 + oy, y1 + oy),
        )

    def uncrop(self, volume: Tensor, fill: float = 0.0, fill_first: float | None = None) -> Tensor:
        """A common-space result ``[C, x, y, z]`` of a :meth:`cropped` subject on the uncut grid
        ``[C, X, Y, Z]``: ``fill`` outside the box (``fill_first`` for channel 0, e.g. 1 for the
        background probability). Identity for an uncut subject."""
        if self.parent is None:
            return volume
        x0, x1, y0, y1 = self.box
        out = volume.new_full((volume.shape[0], *self.parent.grid.shape), fill)
        if fill_first is not None:
            out[0] = fill_first
        out[:, x0:x1, y0:y1] = volume
        return out

    def with_roi(self, roi: Tensor) -> "SubjectData":
        """A copy whose coverage is restricted to ``roi`` ``[X, Y, Z]`` (the model's region of interest)."""
        if tuple(roi.shape) != tuple(self.coverage.shape[1:]):
            raise ValueError(f"with_roi: roi shape {tuple(roi.shape)} != common space {tuple(self.coverage.shape[1:])}")
        return dataclasses.replace(self, coverage=self.coverage * roi.to(self.coverage.dtype)[None])

    @property
    def grid(self) -> Grid:
        """The common space."""
        return self.grids[self.reference]


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _first_unreadable(paths) -> ValueError | None:
    """A ``ValueError`` naming the first of ``paths`` that nibabel cannot read as an image (an empty
    file, a text file, a truncated download), with nibabel's reason; ``None`` if all can be read."""
    import nibabel as nib

    for path in paths:
        try:
            img = nib.load(str(path))
            np.asarray(img.dataobj[(0,) * len(img.shape)])  # reads the header and the first voxel
        except Exception as err:  # nibabel raises several kinds (ImageFileError, EOFError, OSError, ...)
            return ValueError(f"{path}: cannot be read as a NIfTI image ({type(err).__name__}: {err})")
    return None


def load_subject(files: SubjectFiles, lower_percentile: float = 1.0, upper_percentile: float = 99.0) -> SubjectData:
    """Load, check and resample a subject with a MONAI :class:`~monai.data.Dataset`.

    Raises:
        FileNotFoundError: a file is missing (named).
        ValueError: NaN/Inf, wrong dimensions, a label on another grid than its image, unknown
            label values, or a sequence that does not overlap the reference in world space (the
            offending file is named).
    """
    seqs = tuple(files.images)
    for path in (*files.images.values(), *files.labels.values(), *files.scar_labels.values()):
        if not path.is_file():
            raise FileNotFoundError(f"subject {files.name}: missing file {path}")
    item = {s: str(p) for s, p in files.images.items()} | {f"{s}_label": str(p) for s, p in files.labels.items()}
    item |= {f"{s}_scar": str(p) for s, p in files.scar_labels.items()}
    label_keys = [f"{s}_label" for s in files.labels] + [f"{s}_scar" for s in files.scar_labels]
    ds = Dataset(
        data=[item],
        transform=subject_transforms(seqs, label_keys, lower_percentile, upper_percentile),
    )
    try:
        loaded = ds[0]
    except RuntimeError as err:  # MONAI wraps transform errors; surface the clear one
        cause = _root_cause(err)
        if isinstance(cause, (ValueError, FileNotFoundError)):
            raise cause from None
        unreadable = _first_unreadable((*files.images.values(), *files.labels.values(), *files.scar_labels.values()))
        if unreadable is not None:
            raise unreadable from None
        raise

    grids = {s: Grid(loaded[s].affine.to(torch.float64).clone(), tuple(loaded[s].shape[1:])) for s in seqs}
    ref = files.reference
    native = {s: loaded[s].as_tensor().clone() for s in seqs}
    images, coverage = [], []
    for s in seqs:
        if s == ref:
            img, cov = native[s], torch.ones(grids[s].shape)
        else:
            img, cov = resample(native[s], grids[s], grids[ref])
            if cov.sum() == 0:
                raise ValueError(
                    f"{files.images[s]}: sequence {s} does not overlap the reference {files.images[ref]} in world space "
                    "(check the NIfTI affines)"
                )
        images.append(img[0])
        coverage.append(cov)

    labels, scar_labels = {}, {}
    for s, path in files.labels.items():
        lab = loaded[f"{s}_label"]
        grid = grids[s]
        if tuple(lab.shape[1:]) != grid.shape or not torch.allclose(lab.affine.to(torch.float64), grid.affine, atol=1e-2):
            raise ValueError(
                f"{path}: label grid (shape {tuple(lab.shape[1:])}) does not match its image {files.images[s]} "
                f"(shape {grid.shape}) or their affines differ"
            )
        raw = lab.as_tensor()[0].round().long()
        same = next((t for t, p in files.labels.items() if t in labels and p == path and grids[t].shape == grid.shape), None)
        labels[s] = labels[same] if same is not None else files.label_map.to_classes(raw, source=str(path))
        if files.label_map.scar_value is not None:
            scar_labels[s] = raw == files.label_map.scar_value
    for s, path in files.scar_labels.items():
        mask = loaded[f"{s}_scar"]
        if s not in grids or tuple(mask.shape[1:]) != grids[s].shape:
            raise ValueError(f"{path}: scar mask (shape {tuple(mask.shape[1:])}) does not lie on the grid of sequence {s}")
        scar_labels[s] = mask.as_tensor()[0] > 0.5
    return SubjectData(
        name=files.name,
        sequences=seqs,
        grids=grids,
        native_images=native,
        images=torch.stack(images),
        coverage=torch.stack(coverage),
        labels=labels,
        label_map=files.label_map,
        files=files,
        scar_labels=scar_labels,
    )
