"""Checkpoint after every ICM iteration, whether or not an optimiser stepped."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint


class ICMCheckpoint(ModelCheckpoint):
    """:class:`~pytorch_lightning.callbacks.ModelCheckpoint` keyed on the ICM iteration (the epoch).

    Lightning skips a save when ``global_step`` has not moved since the last one; ``global_step``
    counts optimiser steps, and with ``registration=none`` an ICM iteration takes none, so the stock
    callback would save only once. Here the epoch decides.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._last_epoch_saved = -1

    def _should_skip_saving_checkpoint(self, trainer: pl.Trainer) -> bool:
        return (
            bool(trainer.fast_dev_run)
            or trainer.state.fn != "fit"
            or trainer.sanity_checking
            or self._last_epoch_saved == trainer.current_epoch
        )

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self._last_epoch_saved = trainer.current_epoch
