"""This project's view of the Optuna sweeper (hydra_plugins.lesson7_optuna_sweeper, its own small
distribution): the objective's way as the default direction, and lesson7-train's pre-flight check of
its settings, with the project's ConfigError."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from hydra_plugins.lesson7_optuna_sweeper import SweeperError
from hydra_plugins.lesson7_optuna_sweeper.config import OptunaSweeperConf  # noqa: F401 (tests build settings)
from hydra_plugins.lesson7_optuna_sweeper.study import (  # noqa: F401 (re-exported)
    build_pruner,
    check_settings,
    directions,
    exhaustive,
    is_optuna_sweep,
    sampler_config,
    storage_url,
)
from lesson7_sweeps.config import OBJECTIVES, check_objective, is_multi_objective, objective_names
from lesson7_sweeps.errors import ConfigError


def direction(sweeper: DictConfig, objective: Any) -> str | list[str]:
    """The sweep's direction: hydra.sweeper.direction, else the objective's (losses down, accuracies up,
    time down); a list, one each, when `objective` is a list of several."""
    check_objective(objective)  # (pre-flight checks the sweeper before composing each job's config)
    names = objective_names(objective)
    ways = [OBJECTIVES[n] for n in names]
    try:
        found = directions(sweeper, ways if is_multi_objective(objective) else ways[0])
    except SweeperError as e:
        raise ConfigError(str(e)) from None
    if len(found) == len(names):
        return found if is_multi_objective(objective) else found[0]
    if len(names) == 1:
        raise ConfigError(f"hydra.sweeper.direction={sweeper.direction}: lesson7-train returns one objective "
                          f"({objective}), so give one direction")
    raise ConfigError(f"hydra.sweeper.direction={sweeper.direction} gives {len(found)} direction(s) for the "
                      f"{len(names)} objectives [{','.join(names)}]: give one each, e.g. [{','.join(ways)}], or "
                      f"leave it unset (each objective's own way)")


def check_optuna(settings: DictConfig, launcher: DictConfig, objective: Any, arguments: list[str]) -> None:
    """Every setting of an Optuna sweep and its search space (`hydra.sweeper.params`, then the command
    line's `arguments`), checked before any store, study or run exists (lesson7-train's pre-flight);
    ConfigError in one line."""
    from hydra_plugins.lesson7_optuna_sweeper import search_space

    try:
        space, _ = search_space.parse(settings.params, arguments)
        check_settings(settings, launcher, space)
        if exhaustive(sampler_config(settings)):
            search_space.grid(space)
    except SweeperError as e:
        raise ConfigError(str(e)) from None
    direction(settings, objective)
