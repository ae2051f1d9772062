"""The job's side of a trial: any task reports its objective as it goes, and stops when pruned.

    from hydra_plugins.lesson7_optuna_sweeper import current_trial

    @hydra.main(config_path="conf", config_name="config", version_base="1.3")
    def train(cfg) -> float:
        trial = current_trial()  # None outside an Optuna sweep: a plain run
        for epoch in range(cfg.epochs):
            loss = fit_one_epoch(cfg)
            if trial is not None:
                trial.report(epoch, loss)
                if trial.should_prune():
                    break  # the sweeper tells Optuna PRUNED, whatever the task returns
        return loss

The job may run in another process or on another machine than the sweeper: it opens the study
through the storage and finds its trial by number (the sweeper launches trial N as Hydra job N).
Raising `optuna.TrialPruned` works too.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from hydra_plugins.lesson7_optuna_sweeper.study import build_pruner, is_optuna_sweep, storage_url, study_name

log = logging.getLogger(__name__)
PRUNED_AT = "pruned_at_step"  # trial user attr: the job stopped on the pruner's word (the sweeper tells PRUNED)
SLURM_JOB = "slurm_job_id"  # trial user attr: the SLURM job running it (cancelled if its sweeper died)


class Trial:
    """The Optuna trial a Hydra job runs: report(step, value) and should_prune()."""

    def __init__(self, trial: Any) -> None:
        self.optuna_trial = trial  # optuna.Trial: user attrs, study, number
        self.number: int = trial.number
        self.pruned = False
        self._step: int | None = None

    def report(self, step: int, value: float) -> None:
        """The objective's value at `step` (an epoch, a number of samples): what the pruner compares."""
        self.optuna_trial.report(float(value), step)
        self._step = step

    def should_prune(self) -> bool:
        """Whether to stop now; once True, the sweeper tells the trial PRUNED when the job returns."""
        if not self.pruned and self._step is not None and self.optuna_trial.should_prune():
            self.pruned = True
            self.optuna_trial.set_user_attr(PRUNED_AT, self._step)
            log.info("trial %d pruned at step %d", self.number, self._step)
        return self.pruned


def current_trial() -> Trial | None:
    """The trial of the current Hydra job when an Optuna sweep of ours launched it, else None."""
    trial = optuna_trial()
    return None if trial is None else Trial(trial)


def optuna_trial() -> Any:
    """The optuna.Trial the current Hydra job runs (trial N is job N), or None outside our sweeps."""
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    # mode: null when a multirun is started from Python (hydra.test_utils), not from the command line
    if hc.mode == RunMode.RUN or not is_optuna_sweep(hc.sweeper):
        return None
    import optuna

    storage = _storage(storage_url(hc.sweeper, hc.sweep.dir))
    study = optuna.load_study(study_name=study_name(hc.sweeper), storage=storage, pruner=build_pruner(hc.sweeper))
    study_id = storage.get_study_id_from_name(study.study_name)
    return optuna.Trial(study, storage.get_trial_id_from_study_id_trial_number(study_id, hc.job.num))


@functools.cache
def _storage(url: str) -> Any:
    """One storage per URL and process: opening one checks the schema (~0.4 s), and a process may
    run many jobs (the basic launcher, joblib's workers)."""
    import optuna

    return optuna.storages.get_storage(url)
