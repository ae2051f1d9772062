"""Hydra callbacks for multiruns."""

from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import DictConfig


class PrepareTracking(Callback):
    """Create the MLflow store and experiment once, before the jobs of a multirun start: parallel
    jobs that each try to create (and migrate) a fresh sqlite store collide."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        instantiate(config.tracking).prepare()
