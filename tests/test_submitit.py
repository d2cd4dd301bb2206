"""Sweeps through Hydra's submitit launcher: the packaged ``hydra/launcher=slurm`` (and the plugin's
own ``submitit_slurm``) compose into the sbatch request a fit needs, and a real 2-job sweep runs
through submitit's local executor, each job a separate process, with one summary at the end."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from mvmm_monai.cohort.sweep import main as sweep_summary_main
from mvmm_monai.config import CONFIG_DIR
from mvmm_monai.data.synthetic import SyntheticConfig, ensure_cohort

submitit = pytest.importorskip("submitit")
pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

ROOT = Path(__file__).resolve().parents[1]


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("fit", list(overrides), return_hydra_config=True)


class _Submitted(Exception):
    """Raised instead of calling sbatch: the executor is ready, nothing was submitted."""


def _sbatch_script(cfg, monkeypatch) -> str:
    """The sbatch script the launcher of ``cfg`` would submit (no SLURM needed: the executor is
    caught when the plugin's own ``launch`` hands it the jobs)."""
    captured = {}

    def capture(executor, *args, **kwargs):
        captured["executor"] = executor
        raise _Submitted

    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # "srun" is there
    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    with pytest.raises(_Submitted):
        launcher.launch([["model.subtypes.myocardium=1"]], initial_job_idx=0)
    return captured["executor"]._executor._make_submission_file_text("<command>", "<uid>")


def test_the_plugins_own_slurm_launcher_composes(tmp_path, monkeypatch):
    cfg = _compose("hydra/launcher=submitit_slurm", f"hydra.sweep.dir={tmp_path}", f"paths.output_dir={tmp_path}")
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert "#SBATCH --time=60" in _sbatch_script(cfg, monkeypatch)


def test_slurm_launcher_asks_for_what_the_fit_uses(tmp_path, monkeypatch):
    cfg = _compose("hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}", f"paths.output_dir={tmp_path}",
                   "hydra.launcher.partition=short")
    script = _sbatch_script(cfg, monkeypatch)
    for line in ("--job-name=mvmm-fit", "--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=4", "--mem=16GB",
                 "--time=60", "--partition=short"):
        assert f"#SBATCH {line}\n" in script, line
    assert f"#SBATCH --output={tmp_path}/submitit/" in script  # the job logs, inside the sweep folder
    assert "gpus" not in script
    assert "export OMP_NUM_THREADS=4\n" in script


def test_slurm_gpu_launcher_asks_for_one_gpu(tmp_path, monkeypatch):
    cfg = _compose("hydra/launcher=slurm_gpu", "trainer.accelerator=gpu", f"hydra.sweep.dir={tmp_path}",
                   f"paths.output_dir={tmp_path}")
    script = _sbatch_script(cfg, monkeypatch)
    for line in ("--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=4"):
        assert f"#SBATCH {line}\n" in script, line


@pytest.mark.slow
def test_two_job_sweep_through_submitits_local_executor(tmp_path):
    cache = tmp_path / "cache"
    ensure_cohort(cache, SyntheticConfig(n_subjects=2, misalignment=False))  # once, not in both jobs
    sweep = tmp_path / "sweep"
    env = {**os.environ, "MVMM_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "scripts" / "fit.py"), "-m", "model.subtypes.myocardium=1,2", "hydra/launcher=local",
           "data.n_subjects=2", "trainer.max_epochs=3", "~logger", "~callbacks.overlay", "callbacks.progress.refresh_rate=0",
           f"hydra.sweep.dir={sweep}"]
    run = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    for job, subtypes in (("0", 1), ("1", 2)):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["iterations"] == 3
        for seq in ("DE", "C0", "T2"):
            assert all(0.0 < d <= 1.0 for d in metrics["dice"][seq].values()), metrics["dice"]
        assert metrics["dice"]["DE"]["lv"] > 0.8
        assert f"model.subtypes.myocardium={subtypes}" in (sweep / job / ".hydra" / "overrides.yaml").read_text()

    rows = list(csv.DictReader((sweep / "summary.csv").read_text().splitlines()))
    assert [(r["run"], r["model.subtypes.myocardium"], r["status"]) for r in rows] == [("0", "1", "ok"), ("1", "2", "ok")]
    # the same summary from the folder alone (SLURM jobs that outlived the submitting process)
    written = (sweep / "summary.csv").read_text()
    (sweep / "summary.csv").unlink()
    sweep_summary_main([str(sweep)])
    assert (sweep / "summary.csv").read_text() == written

    # each job ran in its own submitit process, its log in the configured folder inside the sweep
    logs = sorted((sweep / "submitit").glob("*_0_log.out"))
    assert len(logs) == 2 and len({p.name.split("_")[0] for p in logs}) == 2
    for log in logs:
        text = log.read_text()
        assert "Job completed successfully" in text and f"results written to {sweep}" in text
    assert len(list((sweep / "submitit").glob("*_0_result.pkl"))) == 2
