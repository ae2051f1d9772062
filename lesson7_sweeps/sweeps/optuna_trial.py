"""This project's side of an Optuna trial, on top of the sweeper's reporting API
(hydra_plugins.lesson7_optuna_sweeper.trial): the runner's `report(step, value)` hook, the trial's
MLflow run recorded on it, a requeued SLURM job continuing that run, and the runs of failed trials
ended FAILED (the sweep callback's on_trials_failed).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from hydra_plugins.lesson7_optuna_sweeper.trial import PRUNED_AT, SLURM_JOB, Trial, optuna_trial  # noqa: F401
from lesson7_sweeps.errors import UserError

log = logging.getLogger(__name__)
RUN_ID = "mlflow_run_id"  # trial user attr: the trial's MLflow run (a dead sweeper's trials are failed there too)
CONTINUE_RUN = "continue_run_id"  # trial user attr: the run of a trial the user stopped, that this retry continues


class Reporter:
    """`runner.fit`'s `report(step, value, may_prune)` hook for one trial: True = pruned, stop now
    (never when not `may_prune`: the run's last evaluation, after which there is nothing to save)."""

    def __init__(self, trial: Trial) -> None:
        self.trial = trial

    @property
    def pruned(self) -> bool:
        return self.trial.pruned

    def __call__(self, step: int, value: float, may_prune: bool) -> bool:
        self.trial.report(step, value)
        return may_prune and self.trial.should_prune()


def reporter_for_job(run_id: str | None) -> Reporter | None:
    """The reporter of the current Hydra job when it is a trial of our Optuna sweeper, else None;
    records the job's MLflow run (None: tracking=none) on the trial."""
    from optuna.exceptions import UpdateFinishedTrialError

    trial = optuna_trial()
    if trial is None:
        return None
    try:
        if run_id is not None:
            trial.set_user_attr(RUN_ID, run_id)
    except UpdateFinishedTrialError:  # a sweeper failed it (its own had died) while this job started
        raise UserError(f"trial {trial.number} was ended by another sweeper as this job started: the sweeper "
                        f"that launched the job had died, so the job trains nothing") from None
    return Reporter(Trial(trial))


def run_to_continue() -> str | None:
    """The MLflow run of this trial when its job runs a second time (SLURM requeued it after a
    preemption or its time limit), or the run of the trial this one retries after the user stopped
    the sweep (Ctrl-C; CONTINUE_RUN): the job continues that run from its last checkpoint.
    On SLURM, records the job on the trial first (a sweeper resuming a dead one's study cancels
    it); a job whose trial already ended (that sweeper failed it while the job was queued) stops."""
    from optuna.exceptions import UpdateFinishedTrialError

    trial = optuna_trial()
    if trial is None:
        return None
    try:
        if "SLURM_JOB_ID" in os.environ:  # first: a sweeper that fails the trial from now on cancels the job
            trial.set_user_attr(SLURM_JOB, os.environ["SLURM_JOB_ID"])
    except UpdateFinishedTrialError:  # Optuna refuses it once the trial has ended
        pass
    state = trial.study._storage.get_trial(trial._trial_id).state
    if state.is_finished():
        raise UserError(f"trial {trial.number} already ended ({state.name}): the sweeper that launched this "
                        f"job gave it up, so the job trains nothing")
    return trial.user_attrs.get(RUN_ID) or trial.user_attrs.get(CONTINUE_RUN)


def hand_run_to_retry(study: Any, trial: Any) -> None:
    """The user stopped `trial` (its retry is added next): the retry continues its run (CONTINUE_RUN,
    copied with the user attrs); RUN_ID is cleared, as it says whose run a FAIL trial failed."""
    run = study._storage.get_trial_user_attrs(trial._trial_id).get(RUN_ID)  # set by the job: not the cached copy
    if run:
        trial.set_user_attr(CONTINUE_RUN, run)
        trial.set_user_attr(RUN_ID, None)


def fail_trial_runs(tracking: Any, trials: list[Any], why: str) -> None:
    """The MLflow runs of these FAIL trials (RUNNING or FINISHED: their sweeper died or lost the
    database before telling) end FAILED: Optuna's state of a trial is the truth."""
    from lesson7_sweeps.sweeps import parent
    from lesson7_sweeps.tracking import fail_runs

    run_ids = [t.user_attrs[RUN_ID] for t in trials if t.user_attrs.get(RUN_ID)]
    # a job killed between starting its run and recording it on the trial: found by its tags
    run_ids += parent.trial_runs([t.number for t in trials if not t.user_attrs.get(RUN_ID)])
    if run_ids and "uri" in tracking:
        fail_runs(tracking.uri, run_ids, why)
