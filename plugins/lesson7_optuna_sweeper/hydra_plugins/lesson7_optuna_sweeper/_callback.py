"""What an app adds to the sweeper's work: a Hydra callback (`hydra.callbacks`) that subclasses
OptunaSweepCallback gets these calls from the sweeping process, e.g. to keep an experiment
tracker's runs in step with the study. Each does nothing by default."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class OptunaSweepCallback(Callback):
    def default_direction(self, config: DictConfig) -> str | list[str] | None:
        """The direction when hydra.sweeper.direction is null (None: minimize); a list, one per value,
        for a task that returns several."""
        return None

    def on_trials_failed(self, study: Any, trials: list[Any], why: str) -> None:
        """These trials are FAIL in the study though their jobs may have recorded otherwise (their
        sweeper or worker died, or never told the result)."""

    def on_trial_stopped(self, study: Any, trial: Any) -> None:
        """The user stopped the sweep while this trial ran: it becomes FAIL with a WAITING copy that the
        next run of the command asks first (its user attrs are copied: mark there what to continue)."""

    def claim_study_end(self, key: str, owner: str) -> bool:
        """Several sweepers may share one study: whether this one (`owner`) ends it; the first to
        claim `key` (one per end of the study) does."""
        return True

    def on_hand_over(self, why: str) -> None:
        """Another sweeper of the shared study ends it, not this one."""

    def on_study_end(self, study: Any, sweep_dir: Path) -> None:
        """This sweeper ended the study (optimization_results.yaml is written)."""

    def on_sweep_cancelled(self, reason: str) -> None:
        """Every running trial's SLURM job was cancelled (scancel): the user stopped the sweep."""
