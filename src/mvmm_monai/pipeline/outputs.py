"""A fit's result folder: whole or absent, never shared by two live fits.

:class:`ResultFolder` holds a lock on the folder for the whole fit (a second fit aimed at it stops
with a clear error instead of overwriting), refuses a folder that holds another subject's
results, stages the result files in a hidden ``.staging/`` folder and moves them into place
together, ``metrics.json`` last: a folder with ``metrics.json`` holds a complete result, and one
without it holds none that looks complete. Leftovers of a killed fit (a ``.staging/`` folder,
hidden ``.*.tmp*`` files of an interrupted atomic write) are removed when the next fit opens the
folder. TensorBoard logs and checkpoints are written into the folder while the fit runs (that is
what resuming needs); checkpoints are atomic too (:mod:`mvmm_monai.pipeline.checkpoint`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from mvmm_monai.classes import CLASS_NAMES
from mvmm_monai.files import save_json, save_nifti, save_png

log = logging.getLogger(__name__)

LOCK_NAME = ".mvmm-fit.lock"
STAGING_NAME = ".staging"
COMPLETE_NAME = "metrics.json"


class ResultFolder:
    """Context manager around one subject's output folder ``path``.

    Use ``with ResultFolder(path, subject) as folder``: write every result file into
    ``folder.staging``, then call :meth:`commit`. Leaving the block without ``commit`` (an error, a
    kill) leaves the folder's earlier complete result, if any, untouched.

    Raises:
        FileExistsError: another live fit holds the folder, or it holds another subject's results.
    """

    def __init__(self, path: str | Path, subject: str) -> None:
        self.path = Path(path)
        self.subject = subject
        self.staging = self.path / STAGING_NAME
        self._lock = None

    def __enter__(self) -> ResultFolder:
        self.path.mkdir(parents=True, exist_ok=True)
        lock = open(self.path / LOCK_NAME, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            lock.close()
            if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise FileExistsError(
                    f"{self.path}: another fit is writing into this folder now; give each fit its own paths.output_dir"
                ) from None
            raise
        self._lock = lock
        try:
            self._refuse_other_subject()
            self._clean_leftovers()
            self.staging.mkdir()
        except BaseException:
            self._release()
            raise
        return self

    def _refuse_other_subject(self) -> None:
        done = self.path / COMPLETE_NAME
        if not done.is_file():
            return
        try:
            owner = json.loads(done.read_text()).get("subject")
        except (OSError, ValueError):
            owner = None
        if owner is not None and owner != self.subject:
            raise FileExistsError(
                f"{self.path} holds the results of subject {owner!r}; fitting {self.subject!r} there would overwrite "
                "them: choose another paths.output_dir"
            )

    def _clean_leftovers(self) -> None:
        if self.staging.exists():
            log.warning("%s: removing the unfinished results of an interrupted fit (%s)", self.path, self.staging.name)
            shutil.rmtree(self.staging)
        # only where a fit writes (the folder itself and its checkpoints), never the user's other files below it
        for tmp in [*self.path.glob(".*.tmp*"), *(self.path / "checkpoints").glob(".*.tmp*")]:
            if tmp.is_file():
                log.warning("removing the leftover of an interrupted write: %s", tmp)
                tmp.unlink()

    def commit(self) -> None:
        """Move every staged file into the folder, ``metrics.json`` last (the mark of a complete result)."""
        (self.path / COMPLETE_NAME).unlink(missing_ok=True)  # from here until the end, the folder is incomplete
        staged = sorted(self.staging.iterdir(), key=lambda p: p.name == COMPLETE_NAME)
        for f in staged:
            os.replace(f, self.path / f.name)
        self.staging.rmdir()

    def _release(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def __exit__(self, *exc) -> None:
        if exc[0] is not None and self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)
        self._release()


def params_record(subject, result, registration, placement, settings: dict) -> dict:
    """The content of ``params.json``: the mixture's parameters as computed (pi; tau, mu and
    variance of every subtype of every sequence and class; the MRF strength, estimated with
    ``model.em.beta=auto`` or as configured), the registration's slice shifts and rotations, the
    placement, and every effective setting (``settings``: the config with the dataset's defaults
    filled in)."""
    p = result.params
    return {
        "sequences": list(subject.sequences),
        "classes": list(CLASS_NAMES),
        "pi": dict(zip(CLASS_NAMES, torch.exp(p.log_pi[0]).tolist())),
        "subtypes": {
            s: {
                c: {
                    "tau": torch.exp(p.log_tau[0, n, k][p.valid[0, n, k]]).tolist(),
                    "mu": p.mean[0, n, k][p.valid[0, n, k]].tolist(),
                    "var": p.var[0, n, k][p.valid[0, n, k]].tolist(),
                }
                for k, c in enumerate(CLASS_NAMES)
            }
            for n, s in enumerate(subject.sequences)
        },
        "mrf_beta": (
            {"value": float(p.beta[0]), "estimated": True} if p.beta is not None
            else {"value": settings.get("model", {}).get("em", {}).get("beta"), "estimated": False}
        ),
        "slice_shifts_mm": registration.slice_shifts_mm(),
        "slice_rotations_deg": registration.slice_rotations_deg(),
        "slice_alignment_gain": registration.slice_alignment_gain(),
        "placement": placement.as_dict() if placement is not None else "identity",
        "common_space_box": list(subject.box) if subject.box is not None else None,
        "intensity_scale": "each sequence clipped at its percentiles and scaled to [0, 1]",
        "settings": settings,
    }


def write_results(folder: Path, subject, result, labels: dict, registration, params: dict, figures: dict) -> None:
    """Write a fit's files into ``folder`` (the staging folder): one label map per sequence on its
    native grid (``labels``: sequence -> label values), the posterior exactly as the mixture
    computed it (``[X, Y, Z, K]``, the common space), the registration's extra volumes, ``params.json``
    and the figures (``figures``: name -> figure, written as ``<subject>_<name>.png``)."""
    full = subject.parent or subject
    ref_affine = subject.grid.affine.numpy()
    for s, values in labels.items():
        save_nifti(folder / f"{subject.name}_{s}_seg.nii.gz", values.numpy(), full.grids[s].affine.numpy())
    save_nifti(folder / f"{subject.name}_posterior.nii.gz", np.moveaxis(result.posterior.float().numpy(), 0, -1), ref_affine)
    for key, vol in registration.extra_outputs().items():
        arr = np.moveaxis(vol.float().cpu().numpy(), 0, -1)
        save_nifti(folder / f"{subject.name}_{key}.nii.gz", arr, ref_affine, vector=key.startswith("displacement"))
    save_json(folder / "params.json", params)
    for name, fig in figures.items():
        save_png(folder / f"{subject.name}_{name}.png", fig)
