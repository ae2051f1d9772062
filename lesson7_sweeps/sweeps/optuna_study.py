"""The Optuna sweeper's settings (`hydra/sweeper=optuna`) and what both sides of a trial build from
them: the sweeping process (ask/tell) and the job (report/prune), which may be another process on
another machine. Both open the same study through the same storage URL and build the same pruner.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from lesson7_sweeps.config import OBJECTIVES
from lesson7_sweeps.errors import ConfigError

SWEEPER_TARGET = "hydra_plugins.lesson7_optuna_sweeper.OptunaSweeper"  # the shim Hydra accepts
IN_PROCESS_LAUNCHERS = ("hydra._internal.core_plugins.basic_launcher.BasicLauncher",)
SAMPLERS = ("tpe", "random", "grid", "gp")


@dataclass
class MedianPrunerConf:
    n_startup_trials: int = 4  # trials that must finish before any is pruned
    n_warmup_steps: int = 0  # training steps of a trial before it may be pruned
    n_min_trials: int = 1  # trials that must have reported at a step before it is compared


@dataclass
class HyperbandPrunerConf:
    min_resource: int = 1  # training steps every trial gets before its first rung
    max_resource: Any = "auto"  # steps of a full trial; auto = those of the first finished trial
    reduction_factor: int = 3  # 1 in reduction_factor trials goes on at each rung


@dataclass
class OptunaSweeperConf:
    _target_: str = SWEEPER_TARGET
    n_trials: int = 20  # in the study, over every run of the command (resumes count what is done)
    n_jobs: int = 1  # trials at once; > 1 needs a launcher with other processes (joblib, submitit_*)
    direction: Any = None  # minimize | maximize; null = from the objective (losses down, accuracies up)
    sampler: str = "tpe"  # tpe | random | grid | gp
    seed: Any = None  # the sampler's seed; null = random
    storage: Any = None  # an Optuna RDB URL (sqlite:///..., postgresql://...); null = optuna.db in the sweep dir
    study_name: Any = None  # needed with storage; the same storage + study_name resumes the study
    new_study: bool = False  # true = replace a stored study of this name whose search space differs
    max_failure_rate: float = 0.25  # stop once more than this fraction of n_trials has failed
    heartbeat_interval: int = 60  # seconds; a trial without a heartbeat for 2 intervals is FAIL (dead sweeper);
    # also how often a sweeper with nothing left to ask looks at the other sweepers' trials
    pruner: str = "median"  # median | hyperband | none
    median: MedianPrunerConf = field(default_factory=MedianPrunerConf)
    hyperband: HyperbandPrunerConf = field(default_factory=HyperbandPrunerConf)
    params: dict[str, str] = field(default_factory=dict)  # key: search space, in the published plugin's syntax


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="lesson7_sweeps")


def is_optuna_sweep(sweeper: DictConfig) -> bool:
    return sweeper.get("_target_") == SWEEPER_TARGET  # other sweepers' configs lack our keys


def storage_url(sweeper: DictConfig, sweep_dir: str) -> str:
    """The study's storage: the user's URL, or a sqlite file in the sweep dir (every job of this
    machine reaches it; Optuna's heartbeats need an RDB storage)."""
    if sweeper.storage is None:
        return f"sqlite:///{os.path.abspath(sweep_dir)}/optuna.db"
    if sweeper.study_name is None:
        raise ConfigError(f"hydra.sweeper.storage={sweeper.storage} needs hydra.sweeper.study_name: the name "
                          f"to find the study by (the same name resumes it)")
    return str(sweeper.storage)


def study_name(sweeper: DictConfig) -> str:
    return sweeper.study_name or "lesson7"


def direction(sweeper: DictConfig, objective: str) -> str:
    if sweeper.direction is None:
        return OBJECTIVES[objective]  # losses down, accuracies up
    if sweeper.direction not in ("minimize", "maximize"):
        raise ConfigError(f"hydra.sweeper.direction={sweeper.direction} is invalid: use minimize, maximize or null")
    return str(sweeper.direction)


def build_pruner(sweeper: DictConfig) -> Any:
    import optuna

    if sweeper.pruner == "median":
        m = sweeper.median
        return optuna.pruners.MedianPruner(n_startup_trials=m.n_startup_trials, n_warmup_steps=m.n_warmup_steps,
                                           n_min_trials=m.n_min_trials)
    if sweeper.pruner == "hyperband":
        h = sweeper.hyperband
        return optuna.pruners.HyperbandPruner(min_resource=h.min_resource, max_resource=h.max_resource,
                                              reduction_factor=h.reduction_factor)
    if sweeper.pruner == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"hydra.sweeper.pruner={sweeper.pruner} is invalid: use median, hyperband or none")


def check_settings(s: DictConfig, launcher: DictConfig, space: dict[str, Any]) -> None:
    if not space:
        raise ConfigError("hydra/sweeper=optuna needs a search space: e.g. 'optim.lr=tag(log,interval(1e-4,1e-2))' "
                          "on the command line or hydra.sweeper.params (or a sweep=..._optuna preset)")
    if s.n_trials < 1 or s.n_jobs < 1 or not 0 <= s.max_failure_rate <= 1:
        raise ConfigError(f"hydra.sweeper: n_trials={s.n_trials} and n_jobs={s.n_jobs} must be >= 1 and "
                          f"max_failure_rate={s.max_failure_rate} in [0, 1]")
    # in-process jobs share HydraConfig (a process global) and the signal handlers: one at a time
    if s.n_jobs > 1 and (launcher._target_ in IN_PROCESS_LAUNCHERS or launcher.get("n_jobs") == 1):
        raise ConfigError(f"hydra.sweeper.n_jobs={s.n_jobs} needs jobs in other processes: add "
                          f"hydra/launcher=joblib (hydra.launcher.n_jobs > 1), submitit_local or submitit_slurm")


def check_optuna(settings: DictConfig, launcher: DictConfig, objective: str, arguments: list[str]) -> None:
    """Every setting of an Optuna sweep and its search space (`hydra.sweeper.params`, then the command
    line's `arguments`), checked before any store, study or run exists (lesson7-train's pre-flight);
    ConfigError in one line."""
    from lesson7_sweeps.sweeps import search_space

    space, _ = search_space.parse(OmegaConf.to_container(settings.params), arguments)
    check_settings(settings, launcher, space)
    direction(settings, objective)
    if settings.sampler not in SAMPLERS:
        raise ConfigError(f"hydra.sweeper.sampler={settings.sampler} is invalid: use {', '.join(SAMPLERS)}")
    if settings.sampler == "grid":
        search_space.grid(space)
    build_pruner(settings)
