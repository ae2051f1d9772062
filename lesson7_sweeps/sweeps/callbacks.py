"""Hydra callbacks for multiruns: one MLflow parent run per sweep, whatever the sweeper and launcher."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from hydra_plugins.lesson7_optuna_sweeper import OptunaSweepCallback
from lesson7_sweeps.config import is_multi_objective, objective_names
from lesson7_sweeps.sweeps import parent
from lesson7_sweeps.sweeps.optuna_study import is_optuna_sweep

log = logging.getLogger(__name__)


def _unused_pruner(config: DictConfig) -> None:
    """Optuna prunes single-objective studies only (trial.report refuses several objectives), so the
    trials of a multi-objective sweep report nothing and train to their end. Said, not refused: the
    sweeper's default pruner is median, and a list objective should run as typed."""
    sweeper = config.hydra.sweeper
    if is_multi_objective(config.objective) and is_optuna_sweep(sweeper) and sweeper.pruner != "none":
        log.warning("hydra.sweeper.pruner=%s is not used: Optuna prunes single-objective studies only, and "
                    "objective=[%s] is several; every trial trains to its end (hydra.sweeper.pruner=none: no note)",
                    sweeper.pruner, ",".join(config.objective))


class SweepParentRun(OptunaSweepCallback):
    """Before any job: create the store, the experiment and the sweep's parent run (parallel jobs
    that each try to create a fresh sqlite store collide). After the last job: the summary, and the
    parent ends FINISHED (FAILED if every trial failed). An interrupted sweep is ended KILLED by
    lesson7-train's entry point, which sees the interrupt.

    With hydra/sweeper=optuna it also follows the study: the objective's way is the default direction,
    the MLflow runs of trials the study failed end FAILED, and the sweeper that ends a shared study
    adds the Optuna report (importances, history) to the parent run."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.tracking = config.tracking
        self.objectives = objective_names(config.objective)
        _unused_pruner(config)
        parent.start(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        parent.finish()

    # ---- the Optuna sweeper's calls ----

    def default_direction(self, config: DictConfig) -> str | list[str] | None:
        from lesson7_sweeps.sweeps.optuna_study import direction

        return direction(config.hydra.sweeper, config.objective)  # losses down, accuracies up; one per objective

    def on_trials_failed(self, study: Any, trials: list[Any], why: str) -> None:
        from lesson7_sweeps.sweeps.optuna_trial import fail_trial_runs

        fail_trial_runs(self.tracking, trials, why)

    def on_trial_stopped(self, study: Any, trial: Any) -> None:
        from lesson7_sweeps.sweeps.optuna_trial import hand_run_to_retry

        hand_run_to_retry(study, trial)

    def claim_study_end(self, key: str, owner: str) -> bool:
        return parent.claim_end(key, owner)

    def on_hand_over(self, why: str) -> None:
        parent.hand_over(why)

    def on_study_end(self, study: Any, sweep_dir: Path) -> None:
        from lesson7_sweeps.sweeps.optuna_report import write_report

        run = parent.current()
        if run is not None:
            for path in write_report(study, sweep_dir / "optuna", self.objectives):
                run.log_artifact(path, "optuna")

    def on_sweep_cancelled(self, reason: str) -> None:
        parent.finish("KILLED", reason)  # not FAILED: nothing went wrong
