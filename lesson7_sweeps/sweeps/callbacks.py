"""Hydra callbacks for multiruns: one MLflow parent run per sweep, whatever the sweeper and launcher."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from hydra_plugins.lesson7_optuna_sweeper import OptunaSweepCallback
from lesson7_sweeps.sweeps import parent


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
        parent.start(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        parent.finish()

    # ---- the Optuna sweeper's calls ----

    def default_direction(self, config: DictConfig) -> str | None:
        from lesson7_sweeps.config import OBJECTIVES

        return OBJECTIVES[config.objective]  # losses down, accuracies up

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
            for path in write_report(study, sweep_dir / "optuna"):
                run.log_artifact(path, "optuna")

    def on_sweep_cancelled(self, reason: str) -> None:
        parent.finish("KILLED", reason)  # not FAILED: nothing went wrong
