"""Where a subject's files are: the built-in synthetic cohort, MS-CMRSeg, MyoPS, explicit files.

Each dataset class answers two questions, ``subjects()`` and ``files(subject)``; reading the
files is :func:`mvmm_monai.data.subject.load_subject`'s job. The classes are built by Hydra from
the ``data`` config group (``_target_``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from mvmm_monai.classes import MSCMR_LABELS, MYOPS_LABELS, LabelMap
from mvmm_monai.data.subject import SubjectFiles, load_subject


def check_subject_name(name: str, owner: str = "subject") -> str:
    """``name`` if it can name files inside an output folder, else a ``ValueError``: a subject's
    name becomes part of output paths, so it must not hold a path separator, be ``.``/``..``, start
    with a dot or be empty."""
    text = str(name)
    if not text or text in (".", "..") or text.startswith(".") or "/" in text or "\\" in text or "\0" in text:
        raise ValueError(f"{owner} name {text!r} cannot name an output: no path separators, no leading dot, not empty")
    return text


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _check_sequences(sequences, reference: str, owner: str) -> tuple[str, ...]:
    seqs = tuple(sequences)
    if not seqs:
        raise ValueError(f"{owner}: no sequences configured")
    if reference not in seqs:
        raise ValueError(f"{owner}: reference sequence {reference!r} is not one of the sequences {seqs}")
    return (reference, *[s for s in seqs if s != reference])


class _Dataset:
    """Shared behaviour: subject lookup with a helpful error."""

    name = "dataset"
    sequences: tuple[str, ...]
    reference: str
    label_map: LabelMap

    def subjects(self) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _subject_files(self, subject: str) -> SubjectFiles:  # pragma: no cover - abstract
        raise NotImplementedError

    def default_atlas(self) -> Path | None:
        """An atlas that ships with the dataset (the synthetic cohort's), else ``None``."""
        return None


    lower_percentile: float = 1.0
    upper_percentile: float = 99.0
    default_label_map: LabelMap = MSCMR_LABELS

    def _setup(self, root, sequences, reference: str, lower_percentile: float, upper_percentile: float) -> None:
        """Shared constructor of the folder layouts: root, sequences (reference first), labels."""
        self._set_percentiles(lower_percentile, upper_percentile)
        self.root = Path(root)
        self.sequences = _check_sequences(sequences, reference, self.name)
        self.reference = reference
        self.label_map = self.default_label_map

    def _set_percentiles(self, lower: float, upper: float) -> None:
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"{self.name}: need 0 <= lower_percentile < upper_percentile <= 100, got {lower}, {upper}")
        self.lower_percentile, self.upper_percentile = float(lower), float(upper)

    def load(self, subject: str):
        """Read ``subject`` into a :class:`~mvmm_monai.data.subject.SubjectData`."""
        return load_subject(self.files(subject), self.lower_percentile, self.upper_percentile)

    def files(self, subject: str) -> SubjectFiles:
        check_subject_name(subject)
        available = self.subjects()
        if subject not in available:
            shown = ", ".join(available[:8]) + (", ..." if len(available) > 8 else "")
            raise ValueError(f"{self.name}: unknown subject {subject!r}; available: {shown or 'none'}")
        f = self._subject_files(subject)
        for path in (*f.images.values(), *f.labels.values()):
            if not path.is_file():
                raise FileNotFoundError(f"{self.name}: subject {subject}: missing file {path}")
        return f


class MSCMRDataset(_Dataset):
    """MS-CMRSeg 2019 layout, as released or in one flat folder.

    Images ``patientN_<SEQ>.nii.gz`` and manual labels ``patientN_<SEQ>_manual.nii.gz`` (``.nii``
    too) anywhere under ``root``: the release keeps the images in
    ``C0LET2_nii45_for_challenge19/c0t2lge/`` and the labels in ``.../c0gt/``, ``.../t2gt/``,
    ``.../lgegt/`` and ``C0LET2_gt_for_challenge19/{C0_manual_10,T2_manual_10,LGE_manual_35_TestData}/``;
    ``root`` may be the release's top folder, one of its folders, or a flat folder of all files.
    A label is optional; a file name found in two folders is an error (which one is meant?).

    ``file_names`` maps a sequence to the names its files may carry, tried in order (the release
    calls the late gadolinium enhancement sequence ``LGE``, this package's default ``DE``: the
    config maps ``DE: [DE, LGE]``); a sequence not in it is named by itself.
    """

    name = "mscmr"

    def __init__(
        self,
        root: str | Path,
        sequences=("DE", "C0", "T2"),
        reference: str = "DE",
        file_names=None,
        lower_percentile: float = 1.0,
        upper_percentile: float = 99.0,
    ) -> None:
        self._setup(root, sequences, reference, lower_percentile, upper_percentile)
        self.file_names = _file_names(file_names, self.name)

    def _tags(self, sequence: str) -> tuple[str, ...]:
        return self.file_names.get(sequence, (sequence,))

    def _index(self) -> dict[str, list[Path]]:
        """File name -> paths of every ``patient*.nii[.gz]`` under ``root`` (hidden folders skipped)."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.name}: data.root {self.root} is not a directory")
        found: dict[str, list[Path]] = {}
        for folder, dirs, names in os.walk(self.root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for n in names:
                if n.startswith("patient") and n.endswith((".nii.gz", ".nii")):
                    found.setdefault(n, []).append(Path(folder) / n)
        return found

    def subjects(self) -> list[str]:
        tags = "|".join(re.escape(t) for t in self._tags(self.reference))
        pat = re.compile(rf"^(patient\d+)_(?:{tags})\.nii(\.gz)?$")
        names = {m.group(1) for n in self._index() if (m := pat.match(n))}
        return sorted(names, key=_natural_key)

    def _first(self, index: dict[str, list[Path]], subject: str, sequence: str, suffix: str = "") -> Path | None:
        """The first of the sequence's file names found under ``root``; ``None`` if none is."""
        for tag in self._tags(sequence):
            for ext in (".nii.gz", ".nii"):
                paths = index.get(name := f"{subject}_{tag}{suffix}{ext}", [])
                if len(paths) > 1:
                    raise ValueError(f"{self.name}: {name} is in {len(paths)} folders under {self.root}: "
                                     f"{', '.join(map(str, paths))}; keep one")
                if paths:
                    return paths[0]
        return None

    def _subject_files(self, subject: str) -> SubjectFiles:
        index = self._index()
        images = {}
        for s in self.sequences:
            if (path := self._first(index, subject, s)) is None:
                tried = " or ".join(f"{subject}_{t}.nii.gz" for t in self._tags(s))
                raise FileNotFoundError(f"{self.name}: subject {subject}: missing {s} image {tried} under {self.root}")
            images[s] = path
        labels = {s: p for s in self.sequences if (p := self._first(index, subject, s, "_manual")) is not None}
        truth = self.root / "truth" / f"{subject}_truth.json"
        scar = {s: p for s in self.sequences if (p := self.root / "truth" / f"{subject}_{s}_scar.nii.gz").exists()}
        return SubjectFiles(
            subject, images, labels, self.label_map, self.reference, truth if truth.exists() else None, scar
        )


def _file_names(file_names, owner: str) -> dict[str, tuple[str, ...]]:
    """``{sequence: (name, ...)}`` from a mapping of a sequence to one name or a list of names."""
    out = {}
    for seq, names in dict(file_names or {}).items():
        names = (names,) if isinstance(names, str) else tuple(str(n) for n in names)
        if not names or any(not n or "/" in n or "\\" in n for n in names):
            raise ValueError(f"{owner}: file_names.{seq} must be one or more names without path separators, got {names}")
        out[str(seq)] = names
    return out


class SyntheticDataset(MSCMRDataset):
    """The built-in synthetic cohort, generated deterministically into ``cache_dir`` on first use."""

    name = "synthetic"

    def __init__(
        self,
        cache_dir: str | Path,
        n_subjects: int = 5,
        seed: int = 0,
        misalignment: bool = False,
        noise: float = 0.04,
        max_slice_shift_mm: float = 6.0,
        sequences=("DE", "C0", "T2"),
        reference: str = "DE",
        lower_percentile: float = 1.0,
        upper_percentile: float = 99.0,
    ) -> None:
        from mvmm_monai.data.synthetic import SyntheticConfig

        self._set_percentiles(lower_percentile, upper_percentile)
        if n_subjects < 1:
            raise ValueError(f"synthetic: n_subjects must be >= 1, got {n_subjects}")
        self.config = SyntheticConfig(
            n_subjects=n_subjects,
            seed=seed,
            misalignment=misalignment,
            noise=noise,
            max_slice_shift_mm=max_slice_shift_mm,
        )
        self.cache_dir = Path(cache_dir)
        self._root: Path | None = None
        self.file_names = {}
        self.sequences = _check_sequences(sequences, reference, self.name)
        self.reference = reference
        self.label_map = MSCMR_LABELS

    @property
    def root(self) -> Path:  # generated lazily, so building the config costs nothing
        if self._root is None:
            from mvmm_monai.data.synthetic import ensure_cohort

            self._root = ensure_cohort(self.cache_dir, self.config)
        return self._root

    def default_atlas(self) -> Path:
        return self.root / "atlas.nii.gz"


class MyoPSDataset(_Dataset):
    """MyoPS 2020 layout: ``CaseN/CaseN_{C0,LGE,T2}.nii.gz`` and ``CaseN_gd.nii.gz`` (one grid)."""

    name = "myops"
    default_label_map = MYOPS_LABELS

    def __init__(
        self,
        root: str | Path,
        sequences=("LGE", "C0", "T2"),
        reference: str = "LGE",
        lower_percentile: float = 1.0,
        upper_percentile: float = 99.0,
    ) -> None:
        self._setup(root, sequences, reference, lower_percentile, upper_percentile)

    def subjects(self) -> list[str]:
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.name}: data.root {self.root} is not a directory")
        names = [p.name for p in self.root.iterdir() if (p / f"{p.name}_{self.reference}.nii.gz").exists()]
        return sorted(names, key=_natural_key)

    def _subject_files(self, subject: str) -> SubjectFiles:
        d = self.root / subject
        images = {s: d / f"{subject}_{s}.nii.gz" for s in self.sequences}
        gd = d / f"{subject}_gd.nii.gz"
        labels = {s: gd for s in self.sequences} if gd.exists() else {}
        return SubjectFiles(subject, images, labels, self.label_map, self.reference)


@dataclass
class FilesDataset(_Dataset):
    """Explicit files: ``images`` maps sequence names to paths; ``label`` lies on ``label_sequence``."""


    images: dict[str, str | None] = field(default_factory=dict)
    label: str | None = None
    label_sequence: str | None = None
    subject: str = "subject"
    reference: str = "DE"
    label_values: str = "mscmr"
    lower_percentile: float = 1.0
    upper_percentile: float = 99.0
    name: str = "files"

    def __post_init__(self) -> None:
        check_subject_name(self.subject, "data.subject")
        self._set_percentiles(self.lower_percentile, self.upper_percentile)
        given = {s: Path(p) for s, p in dict(self.images).items() if p not in (None, "")}
        if not given:
            raise ValueError("files: give at least one image, e.g. data.images.DE=/path/to/lge.nii.gz")
        self.sequences = _check_sequences(given, self.reference, self.name)
        self._paths = {s: given[s] for s in self.sequences}
        maps = {"mscmr": MSCMR_LABELS, "myops": MYOPS_LABELS}
        if self.label_values not in maps:
            raise ValueError(f"files: label_values must be one of {sorted(maps)}, got {self.label_values!r}")
        self.label_map = maps[self.label_values]
        seq = self.label_sequence or self.reference
        if seq not in self._paths:
            raise ValueError(f"files: label_sequence {seq!r} is not one of the sequences {self.sequences}")
        self._label_seq = seq

    def subjects(self) -> list[str]:
        return [self.subject]

    def _subject_files(self, subject: str) -> SubjectFiles:
        labels = {self._label_seq: Path(self.label)} if self.label else {}
        return SubjectFiles(subject, dict(self._paths), labels, self.label_map, self.reference)
