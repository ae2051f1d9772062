"""The job's side of an Optuna trial: report the objective after each evaluation, ask the pruner.

The job may run in another process or on another machine than the sweeper: it opens the study
through the storage, finds its trial by number (the sweeper launches trial N as job N), reports
the same value the runner logs to MLflow at the same step, and stops when the pruner says so.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from lesson7_sweeps.errors import UserError
from lesson7_sweeps.sweeps.optuna_study import build_pruner, is_optuna_sweep, storage_url, study_name

log = logging.getLogger(__name__)
PRUNED_AT = "pruned_at_step"  # trial user attr: the job stopped on the pruner's word (the sweeper tells PRUNED)
RUN_ID = "mlflow_run_id"  # trial user attr: the trial's MLflow run (a dead sweeper's trials are failed there too)
CONTINUE_RUN = "continue_run_id"  # trial user attr: the run of a trial the user stopped, that this retry continues
SLURM_JOB = "slurm_job_id"  # trial user attr: the SLURM job running it (cancelled if its sweeper died)


class Reporter:
    """`runner.fit`'s `report(step, value)` hook for one trial: True = pruned, stop now."""

    def __init__(self, trial: Any) -> None:
        self.trial = trial
        self.pruned = False

    def __call__(self, step: int, value: float) -> bool:
        self.trial.report(value, step)
        if self.trial.should_prune():
            self.pruned = True
            self.trial.set_user_attr(PRUNED_AT, step)
            log.info("trial %d pruned at step %d (value %.4f)", self.trial.number, step, value)
        return self.pruned


def reporter_for_job(run_id: str | None) -> Reporter | None:
    """The reporter of the current Hydra job when it is a trial of our Optuna sweeper, else None;
    records the job's MLflow run (None: tracking=none) on the trial."""
    trial = _job_trial()
    if trial is None:
        return None
    if run_id is not None:
        trial.set_user_attr(RUN_ID, run_id)
    return Reporter(trial)


def run_to_continue() -> str | None:
    """The MLflow run of this trial when its job runs a second time (SLURM requeued it after a
    preemption or its time limit), or the run of the trial this one retries after the user stopped
    the sweep (Ctrl-C; CONTINUE_RUN): the job continues that run from its last checkpoint.
    On SLURM, records the job on the trial first (a sweeper resuming a dead one's study cancels
    it); a job whose trial already ended (that sweeper failed it while the job was queued) stops."""
    trial = _job_trial()
    if trial is None:
        return None
    state = trial.study._storage.get_trial(trial._trial_id).state
    if state.is_finished():
        raise UserError(f"trial {trial.number} already ended ({state.name}): the sweeper that launched this "
                        f"job gave it up, so the job trains nothing")
    if "SLURM_JOB_ID" in os.environ:
        trial.set_user_attr(SLURM_JOB, os.environ["SLURM_JOB_ID"])
    return trial.user_attrs.get(RUN_ID) or trial.user_attrs.get(CONTINUE_RUN)


def _job_trial() -> Any:
    """The Optuna trial the current Hydra job runs (trial N is job N), or None outside our sweeps."""
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN or not is_optuna_sweep(hc.sweeper):
        return None
    import optuna

    storage = optuna.storages.get_storage(storage_url(hc.sweeper, hc.sweep.dir))
    study = optuna.load_study(study_name=study_name(hc.sweeper), storage=storage, pruner=build_pruner(hc.sweeper))
    study_id = storage.get_study_id_from_name(study.study_name)
    return optuna.Trial(study, storage.get_trial_id_from_study_id_trial_number(study_id, hc.job.num))
