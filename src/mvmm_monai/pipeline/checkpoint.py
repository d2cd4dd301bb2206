"""Checkpoints keyed on the ICM iteration, whether or not an optimiser stepped, written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

from mvmm_monai.files import current_umask


class ICMCheckpoint(ModelCheckpoint):
    """:class:`~pytorch_lightning.callbacks.ModelCheckpoint` keyed on the ICM iteration (the epoch).

    Lightning skips a save when ``global_step`` has not moved since the last one; ``global_step``
    counts optimiser steps, and with ``registration=none`` an ICM iteration takes none, so the stock
    callback would save only once. Here the epoch decides: a checkpoint (and ``last.ckpt``) every
    ``every_n_epochs`` ICM iterations and at the fit's last one, never on the others (the stock
    ``save_last`` check passes on every epoch when no optimiser steps, and a checkpoint per
    iteration costs a share of a small fit).
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

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_skip_saving_checkpoint(trainer) or not self._should_save_on_train_epoch_end(trainer):
            return
        every = self._every_n_epochs
        due = every >= 1 and (trainer.current_epoch + 1) % every == 0
        # EarlyStopping has run by now: Lightning orders checkpoint callbacks last
        final = trainer.should_stop or (trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs)
        if not (due or final):
            return
        candidates = self._monitor_candidates(trainer)
        if due:
            self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        """Write to a hidden temporary file beside ``filepath`` and rename it: a kill or a full disk
        while saving leaves the previous checkpoint whole, never a truncated one to resume from."""
        path = Path(filepath)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            super()._save_checkpoint(trainer, str(tmp))
            if tmp.exists():
                os.chmod(tmp, 0o666 & ~current_umask())
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self._last_checkpoint_saved = filepath
        self._last_epoch_saved = trainer.current_epoch
