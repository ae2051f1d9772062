"""Sweeps on a real one-node SLURM cluster: trials are SLURM jobs submitted by Hydra's submitit launcher.

`.ci/run` starts the cluster (`.ci/slurm`: munged, slurmdbd, slurmctld, slurmd) and exports SLURM_CONF;
locally:
    eval "$(.ci/slurm)"   # then run this file; `.ci/slurm stop $LESSON7_TEST_SLURM_DIR`
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from .test_optuna_sweeper import grid_sweep, metric, mlflow_runs, run, study
from .test_sweeps import all_runs, finished, launch, split


def _cluster_up() -> bool:
    if shutil.which("sinfo") is None or "SLURM_CONF" not in os.environ:
        return False
    return subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.strip() == "idle"


pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not _cluster_up(), reason='no SLURM cluster: set SLURM_CONF to an idle one (eval "$(.ci/slurm)" starts one)')]

# one CPU and no GPU per trial; the time limit is the README's knob (minutes)
SLURM = ["hydra/launcher=submitit_slurm", "hydra.launcher.gpus_per_task=null", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.timeout_min=10"]


def queue_empty() -> bool:
    return subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout == ""


def test_an_optuna_sweep_with_pruning_runs_its_trials_as_slurm_jobs(tmp_path: Path):
    run(grid_sweep(tmp_path, "optim.lr=choice(0.5,0.3,0.0001,0.00005)", 0, 4, "optim=sgd", "optim.momentum=0",
                   "hydra.sweeper.n_jobs=2", "hydra.sweeper.median.n_startup_trials=1", *SLURM), tmp_path)
    found = study(f"sqlite:///{tmp_path}/multirun/optuna.db").trials
    client, runs = mlflow_runs(tmp_path, found)  # one parent, one run per trial
    assert len(found) == 4 and {t.state for t in found} <= {TrialState.COMPLETE, TrialState.PRUNED}
    for t in found:
        r = runs[t.number]
        assert r.info.status == "FINISHED" and t.intermediate_values == metric(client, r.info.run_id, "val_loss")
        assert r.data.tags.get("trial_state") == ("PRUNED" if t.state == TrialState.PRUNED else None)
    jobs = {p.name for p in (tmp_path / "multirun" / ".submitit").iterdir() if p.name.isdigit()}
    assert len(jobs) == 4  # one SLURM job per trial
    (parent,) = [r for r in client.search_runs([r.info.experiment_id]) if r.data.tags["run_type"] == "sweep"]
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_trials"] == 4
    assert "summary.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert queue_empty()


def test_a_grid_sweep_runs_its_jobs_on_the_cluster(tmp_path: Path, text_file: Path):
    finished(launch(tmp_path, text_file, "data.bptt=6,8", *SLURM))
    parent, children = split(all_runs(tmp_path))
    assert parent.info.status == "FINISHED" and parent.data.tags["launcher"].endswith("SlurmLauncher")
    assert [c.info.status for c in children] == ["FINISHED", "FINISHED"]
    assert parent.data.metrics["n_finished"] == 2
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert "summary.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert queue_empty()
