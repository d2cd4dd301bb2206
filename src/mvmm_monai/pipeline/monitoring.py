"""What a researcher watches: overlays of the segmentation on every sequence, TensorBoard images.

Figures are drawn with matplotlib's object API on an Agg canvas (no display, no global pyplot
state), so they work on headless servers and inside DDP workers.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from mvmm_monai.classes import CLASS_COLOURS, CLASS_NAMES, class_argmax, class_rgb


def overlay_figure(
    images: Tensor,
    coverage: Tensor,
    sequences: tuple[str, ...],
    posterior: Tensor,
    atlas: Tensor | None = None,
    slice_index: int | None = None,
    title: str = "",
    labels: Tensor | None = None,
) -> Figure:
    """One row: every sequence with the segmentation contours, then the posterior and the atlas.

    Args:
        images, coverage: ``[N, X, Y, Z]`` common-space sequences and coverage masks.
        sequences: names of the N sequences.
        posterior: ``[K, X, Y, Z]`` class posteriors.
        atlas: ``[K, X, Y, Z]`` warped atlas, or None.
        slice_index: the slice to show (default: the middle one).
        labels: ``[X, Y, Z]`` class indices whose contours are drawn (e.g. the label map of the
            ``postprocess`` stage); default: the posterior's argmax.
    """
    z = images.shape[-1] // 2 if slice_index is None else slice_index
    labels = (class_argmax(posterior) if labels is None else labels)[..., z].cpu().numpy()
    panels = len(sequences) + 1 + (atlas is not None)
    fig = Figure(figsize=(3.2 * panels, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels)
    for n, name in enumerate(sequences):
        ax = axes[n]
        img = images[n, ..., z].detach().float().cpu().numpy()
        shown = np.where(coverage[n, ..., z].cpu().numpy() > 0, img, np.nan)
        ax.imshow(shown.T, cmap="gray", origin="lower", vmin=0, vmax=1)
        for k, colour in ((k, CLASS_COLOURS[c]) for k, c in enumerate(CLASS_NAMES) if c in CLASS_COLOURS):
            mask = (labels == k).astype(float)
            if mask.any() and not mask.all():
                ax.contour(mask.T, levels=[0.5], colors=[colour], linewidths=1.0, origin="lower")
        ax.set_title(f"{name} (slice {z})", fontsize=9)
    axes[len(sequences)].imshow(np.transpose(class_rgb(posterior[..., z]), (1, 0, 2)), origin="lower")
    axes[len(sequences)].set_title("posterior (myo yellow, LV red, RV blue)", fontsize=9)
    if atlas is not None:
        axes[-1].imshow(np.transpose(class_rgb(atlas[..., z]), (1, 0, 2)), origin="lower")
        axes[-1].set_title("atlas as used", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


SCAR_COLOUR = "magenta"


def montage_figure(
    image: np.ndarray,
    labels: np.ndarray,
    scar: np.ndarray | None = None,
    title: str = "",
    spacing: tuple[float, float] = (1.0, 1.0),
    margin_mm: float = 25.0,
    columns: int = 6,
) -> Figure:
    """Every slice of one sequence, apex to base as stored, with the contours of the myocardium
    (yellow), LV (red), RV (blue) and scar (magenta), cut to the labelled heart plus ``margin_mm``:
    the picture a person checks a fit with (apex and base errors show; one middle slice hides them).

    Args:
        image: ``[X, Y, Z]`` intensities scaled to [0, 1].
        labels: ``[X, Y, Z]`` class indices (0 background).
        scar: ``[X, Y, Z]`` scar mask, or None.
        spacing: in-plane voxel size (mm), for the margin and the aspect ratio.
    """
    if image.shape != labels.shape or (scar is not None and scar.shape != labels.shape):
        raise ValueError(f"montage_figure: image {image.shape}, labels {labels.shape} and scar must share one [X, Y, Z] grid")
    heart = np.argwhere(labels > 0)
    if len(heart):
        pad = [int(round(margin_mm / s)) for s in spacing]
        lo = [max(int(heart[:, a].min()) - pad[a], 0) for a in range(2)]
        hi = [min(int(heart[:, a].max()) + pad[a] + 1, labels.shape[a]) for a in range(2)]
    else:
        lo, hi = [0, 0], list(labels.shape[:2])
    cut = (slice(lo[0], hi[0]), slice(lo[1], hi[1]))
    nz = image.shape[2]
    cols = min(columns, nz)
    rows = -(-nz // cols)
    fig = Figure(figsize=(2.4 * cols, 2.4 * rows + (0.25 + 0.25 * title.count("\n") + 0.25 if title else 0.1)), dpi=100)
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    aspect = spacing[1] / spacing[0]
    for z, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if z >= nz:
            ax.axis("off")
            continue
        ax.imshow(image[cut + (z,)].T, cmap="gray", origin="lower", vmin=0, vmax=1, aspect=aspect)
        lab = labels[cut + (z,)]
        masks = [(lab == k, CLASS_COLOURS[c]) for k, c in enumerate(CLASS_NAMES) if c in CLASS_COLOURS]
        if scar is not None:
            masks.append((scar[cut + (z,)] > 0, SCAR_COLOUR))
        for mask, colour in masks:
            if mask.any() and not mask.all():
                ax.contour(mask.T.astype(float), levels=[0.5], colors=[colour], linewidths=0.8, origin="lower")
        ax.set_title(f"slice {z}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def figure_to_array(fig: Figure) -> np.ndarray:
    """RGB ``uint8`` array ``[H, W, 3]`` of a figure."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def png_to_array(path) -> np.ndarray:
    """RGB ``uint8`` array ``[H, W, 3]`` of a PNG file (a figure already written: decoding it costs
    a fraction of drawing the figure again)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def add_png(writer, tag: str, path, step: int) -> None:
    """Add a PNG file to TensorBoard as it is written: its bytes go into the event file as the
    image's encoding (``add_image`` would decode and encode it again, about 0.05 s per MyoPS
    picture). Uses the writer's ``_get_file_writer`` (what ``add_image`` itself calls; no public
    method takes encoded bytes); any other writer (Lightning's stand-in on ranks other than 0)
    gets the decoded picture through ``add_image``."""
    from torch.utils.tensorboard import SummaryWriter

    if not isinstance(writer, SummaryWriter):
        writer.add_image(tag, png_to_array(path), step, dataformats="HWC")
        return
    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    with Image.open(path) as im:  # reads the header only
        width, height = im.size
        colorspace = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}.get(im.mode, 3)
    image = Summary.Image(height=height, width=width, colorspace=colorspace, encoded_image_string=Path(path).read_bytes())
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


class OverlayLogger(pl.Callback):
    """Adds the overlay figure to TensorBoard after every ICM iteration that is due (every
    ``every_n_iterations``) and within the time budget. The final overlay is not drawn here: the
    pipeline logs the one it writes (``<subject>_overlay.png``, with the labelling conventions'
    labels) at the last iteration (:func:`~mvmm_monai.pipeline.fit.fit_subject`).

    ``max_time_fraction`` keeps the pictures off the fit's hot path: an overlay is drawn at a due
    iteration only if the overlays so far plus this one (estimated by the last one's cost) stay
    within that fraction of the fit's elapsed time (before the first one, ``first_cost_s`` stands in for
    its cost: about what a MyoPS overlay takes on 2 CPU cores). A long fit (registration, minutes) then shows
    its progress every ``every_n_iterations``; a fit of a few seconds shows its final overlay only.
    ``None`` draws at every due iteration whatever it costs. The module must offer
    ``overlay(title) -> Figure``.
    """

    def __init__(self, every_n_iterations: int = 10, max_time_fraction: float | None = 0.05, first_cost_s: float = 0.5) -> None:
        if every_n_iterations < 1:
            raise ValueError(f"OverlayLogger: every_n_iterations must be >= 1, got {every_n_iterations}")
        if max_time_fraction is not None and not 0 < max_time_fraction <= 1:
            raise ValueError(f"OverlayLogger: max_time_fraction must be in (0, 1] or null, got {max_time_fraction}")
        self.every = every_n_iterations
        self.fraction = max_time_fraction
        self.first_cost = float(first_cost_s)
        self._start = self._spent = 0.0
        self._last = self.first_cost
        self.logged: list[int] = []  # the iterations whose overlay was drawn here (the final one is the pipeline's)

    def _log(self, trainer: pl.Trainer, module: pl.LightningModule, step: int) -> None:
        logger = trainer.logger
        if logger is None or not trainer.is_global_zero or not hasattr(logger.experiment, "add_image"):
            return
        t = time.perf_counter()
        fig = module.overlay(title=f"{module.subject.name}, ICM iteration {step}")
        logger.experiment.add_image("overlay", figure_to_array(fig), step, dataformats="HWC")
        self._last = time.perf_counter() - t
        self._spent += self._last
        self.logged.append(step)

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._start, self._spent, self._last, self.logged = time.perf_counter(), 0.0, self.first_cost, []

    def _affordable(self) -> bool:
        if self.fraction is None:
            return True
        elapsed = time.perf_counter() - self._start
        return self._spent + self._last <= self.fraction * elapsed

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        it = trainer.current_epoch + 1
        if it % self.every == 0 and it < trainer.max_epochs and not trainer.should_stop and self._affordable():
            self._log(trainer, module, it)
