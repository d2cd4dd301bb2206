"""Cohorts on several devices or nodes: Lightning launches the processes, each fits its shard.

Per-subject state is never shared between processes: every subject is fitted, start to finish,
by exactly one process (subject ``i`` by rank ``i % world_size``), with its own single-device
:class:`~mvmm_monai.pipeline.module.MvMMFit` run, so neither DDP's gradient averaging nor Lightning's
unsynchronised buffers ever touch it. Lightning's ``ddp_spawn`` strategy only provides the
processes, their ranks and the process group (``trainer.devices``, ``trainer.num_nodes``); each
shard writes its subjects' results (or ``error.txt``) into their folders, and the launching
process writes the cohort summary once, after all shards are done.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities import rank_zero as fabric_rank_zero
from omegaconf import DictConfig, open_dict
from pytorch_lightning.strategies import SingleDeviceStrategy
from pytorch_lightning.utilities import rank_zero as pl_rank_zero
from torch import nn
from torch.utils.data import DataLoader

from mvmm_monai.cohort.summary import read_results, write_cohort_summary
from mvmm_monai.config import build
from mvmm_monai.files import atomic_write
from mvmm_monai.pipeline.module import SingleStep
from mvmm_monai.pipeline.progress import lightning_notes_silenced, silence_lightning_notes_in_this_process

log = logging.getLogger(__name__)


class CohortShards(pl.LightningModule):
    """One training step per process: fit this rank's share of ``names`` with ``fit_cohort``
    (:func:`~mvmm_monai.pipeline.fit.fit_cohort`: one subject after another, or in batches).

    ``_anchor`` exists only because DDP refuses a module without parameters; it gets no gradient.
    """

    def __init__(self, cfg: DictConfig, names: list[str], out: Path, fit_cohort: Callable) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.cfg, self.names, self.out, self.fit_cohort = cfg, list(names), Path(out), fit_cohort
        self._anchor = nn.Parameter(torch.zeros(1))

    def setup(self, stage: str) -> None:
        silence_lightning_notes_in_this_process()  # runs in each spawned shard process, before its notes

    def train_dataloader(self) -> DataLoader:
        return DataLoader(SingleStep(), batch_size=None)

    def configure_optimizers(self):
        return None

    def shard(self, rank: int, world: int) -> list[str]:
        return self.names[rank::world]

    def training_step(self, batch, batch_idx: int) -> None:
        rank, world = self.global_rank, self.trainer.world_size
        mine = self.shard(rank, world)
        log.info("rank %d/%d fits %s", rank, world, mine)
        cfg = self.cfg.copy()
        with open_dict(cfg):  # each subject: a single-device world on the device Lightning gave this rank
            cfg.trainer.devices = 1
            cfg.trainer.accelerator = self.device.type
            cfg.trainer.strategy = {"_target_": f"{__name__}.ShardMemberStrategy", "device": str(self.device)}
        dataset = build(cfg.data)
        for name, outcome in self.fit_cohort(cfg, dataset, mine, self.out):
            if isinstance(outcome, Exception):  # reported in the summary; the shard goes on
                msg = f"{type(outcome).__name__}: {outcome}"
                log.error("subject %s failed on rank %d: %s\n%s", name, rank, msg, "".join(traceback.format_exception(outcome, limit=3)))
                atomic_write(self.out / name / "error.txt", lambda tmp, m=msg: Path(tmp).write_text(m + "\n"))
            else:
                dice = next(iter(outcome.get("dice", {}).values()), {})  # the reference sequence's, when labelled
                log.info("rank %d: %s done: Dice %s", rank, name, ", ".join(f"{k} {v:.3f}" for k, v in dice.items()) or "(no labels)")


class ShardMemberStrategy(SingleDeviceStrategy):
    """The strategy of one subject's fit inside a cohort shard: a world of one process.

    Lightning's distributed strategies declare the process's rank to its ``rank_zero_only``
    utilities when they set up (``rank_zero_only.rank = global_rank``); a subject fitted by shard
    process r is its own single-device world, so this strategy declares rank 0 while it runs (its
    TensorBoard logs, checkpoints and messages are written) and restores the shard's rank after.
    """

    strategy_name = "mvmm_shard_member"

    def setup_environment(self) -> None:
        self._shard_rank = pl_rank_zero.rank_zero_only.rank, fabric_rank_zero.rank_zero_only.rank
        pl_rank_zero.rank_zero_only.rank = fabric_rank_zero.rank_zero_only.rank = 0
        super().setup_environment()

    def teardown(self) -> None:
        super().teardown()
        saved = getattr(self, "_shard_rank", None)
        if saved is not None:
            pl_rank_zero.rank_zero_only.rank, fabric_rank_zero.rank_zero_only.rank = saved


def run_cohort_distributed(cfg: DictConfig, names: list[str], out: Path, fit_cohort: Callable) -> dict:
    """Fit ``names`` across ``trainer.devices`` x ``trainer.num_nodes`` processes; summary by the launcher."""
    single = cfg.copy()
    with open_dict(single):
        single.trainer.devices = 1
        single.trainer.num_nodes = 1
        single.trainer.strategy = "auto"
    accelerator = cfg.trainer.get("accelerator", "auto")
    launcher = pl.Trainer(
        accelerator=accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.get("num_nodes", 1),
        strategy="ddp_spawn",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    out.mkdir(parents=True, exist_ok=True)
    with lightning_notes_silenced():
        launcher.fit(CohortShards(single, names, out, fit_cohort))
    results, failed = read_results(out, names)
    return write_cohort_summary(out, results, failed)
