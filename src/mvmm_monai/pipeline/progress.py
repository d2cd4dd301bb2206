"""A Lightning progress bar for fits whose every epoch is one ICM iteration, and Lightning notes we silence."""

from __future__ import annotations

import logging
import sys
import warnings
from contextlib import contextmanager

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ProgressBar
from tqdm.auto import tqdm


class ICMProgressBar(ProgressBar):
    """One bar over the ICM iterations (``max_epochs``), showing the log-likelihood and its change.

    Lightning's default bar counts batches within an epoch; here an epoch is a single batch, so it
    would print a new bar per iteration.
    """

    def __init__(self, refresh_rate: int = 1) -> None:
        super().__init__()
        self._refresh_rate = refresh_rate
        self._enabled = True
        self._bar: tqdm | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled and self._refresh_rate > 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.is_enabled or not trainer.is_global_zero:
            return
        name = getattr(pl_module, "progress_name", None) or getattr(getattr(pl_module, "subject", None), "name", "")
        self._bar = tqdm(
            total=trainer.max_epochs,
            initial=trainer.current_epoch,
            desc=f"MvMM {name}".strip(),
            unit="it",
            dynamic_ncols=True,
            file=sys.stderr,
            leave=True,
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._bar is None:
            return
        m = trainer.callback_metrics
        post = {}
        if "em/log_likelihood" in m:
            post["ll"] = f"{float(m['em/log_likelihood']):.5f}"
        if "em/relative_change" in m:
            post["rel"] = f"{float(m['em/relative_change']):.1e}"
        self._bar.set_postfix(post, refresh=False)
        self._bar.update(1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# Lightning advice that does not apply to a one-item, in-memory "dataset" and to registration=none
LIGHTNING_NOTES = (
    ".*does not have many workers.*",
    ".*configure_optimizers` returned `None`.*",
    ".*The number of training batches .* is smaller than the logging interval.*",
    ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",  # Lightning 2.6's own use of torch 2.13's pytree
    ".*when logging on epoch level in distributed setting.*",  # per-subject metrics of a cohort shard: no sync wanted
)


class _NoAdverts(logging.Filter):
    """Drops Lightning's log line advertising its cloud logger (printed at every Trainer start)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


@contextmanager
def lightning_notes_silenced():
    """Silence, by message, the Lightning advice in :data:`LIGHTNING_NOTES` and its cloud-logger
    advert (nothing else)."""
    lg = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    adverts = _NoAdverts()
    lg.addFilter(adverts)
    try:
        with warnings.catch_warnings():
            _ignore_notes()
            yield
    finally:
        lg.removeFilter(adverts)


def _ignore_notes() -> None:
    for msg in LIGHTNING_NOTES:
        warnings.filterwarnings("ignore", message=msg)


def silence_lightning_notes_in_this_process() -> None:
    """:func:`lightning_notes_silenced` for the rest of this process: a cohort shard's spawned
    process, whose launcher's notes come before any fit (the launching process's filters do not
    reach a spawned one)."""
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_NoAdverts())
    _ignore_notes()
