"""Hydra callbacks for multiruns: one MLflow parent run per sweep, whatever the sweeper and launcher."""

from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from lesson7_sweeps.sweeps import parent


class SweepParentRun(Callback):
    """Before any job: create the store, the experiment and the sweep's parent run (parallel jobs
    that each try to create a fresh sqlite store collide). After the last job: the summary, and the
    parent ends FINISHED (FAILED if every trial failed). An interrupted sweep is ended KILLED by
    lesson7-train's entry point, which sees the interrupt."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        parent.start(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        parent.finish()
