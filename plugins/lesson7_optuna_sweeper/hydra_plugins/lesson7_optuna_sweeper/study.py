"""What both sides of a trial build from the sweeper's settings: the sweeping process (ask/tell)
and the job (report/prune), which may be another process on another machine. Both open the same
study through the same storage URL and build the same pruner. Settings are checked here, in one line."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hydra_plugins.lesson7_optuna_sweeper._errors import SweeperError
from hydra_plugins.lesson7_optuna_sweeper.config import SAMPLER_CONFS, SWEEPER_TARGET, OptunaSweeperConf

IN_PROCESS_LAUNCHERS = ("hydra._internal.core_plugins.basic_launcher.BasicLauncher",)
DIRECTIONS = ("minimize", "maximize")
SETTINGS = {f.name for f in dataclasses.fields(OptunaSweeperConf)} - {"_target_", "_recursive_", "defaults"}


def is_optuna_sweep(sweeper: DictConfig) -> bool:
    return sweeper.get("_target_") == SWEEPER_TARGET  # other sweepers' configs lack our keys


def storage_url(sweeper: DictConfig, sweep_dir: str) -> str:
    """The study's storage: the user's URL, or a sqlite file in the sweep dir (every job of this
    machine reaches it; Optuna's heartbeats need an RDB storage)."""
    if sweeper.storage is None:
        return f"sqlite:///{os.path.abspath(sweep_dir)}/optuna.db"
    if sweeper.study_name is None:
        raise SweeperError(f"hydra.sweeper.storage={sweeper.storage} needs hydra.sweeper.study_name: the name "
                           f"to find the study by (the same name resumes it)")
    return str(sweeper.storage)


def study_name(sweeper: DictConfig) -> str:
    return sweeper.study_name or "optuna"


def directions(sweeper: DictConfig, default: str | None = None) -> list[str]:
    """One direction per objective: `hydra.sweeper.direction` (a name or a list), else `default`
    (a sweep callback's), else minimize."""
    chosen = sweeper.direction if sweeper.direction is not None else default or "minimize"
    names = [str(d) for d in chosen] if OmegaConf.is_list(chosen) or isinstance(chosen, list) else [str(chosen)]
    if not names or any(d not in DIRECTIONS for d in names):
        raise SweeperError(f"hydra.sweeper.direction={chosen} is invalid: use minimize, maximize or null, or a "
                           f"list of minimize/maximize (one per value the task returns)")
    return names


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
    raise SweeperError(f"hydra.sweeper.pruner={sweeper.pruner} is invalid: use median, hyperband or none")


def sampler_config(sweeper: DictConfig) -> DictConfig:
    """The sampler's config: the group's node, or the shorthand `sampler=NAME` (+ `seed`) as that node."""
    s = sweeper.sampler if sweeper.sampler is not None else "tpe"
    if isinstance(s, str):
        if s not in SAMPLER_CONFS:
            raise SweeperError(f"hydra.sweeper.sampler={s} is invalid: use {', '.join(SAMPLER_CONFS)}")
        return OmegaConf.merge(OmegaConf.structured(SAMPLER_CONFS[s]), {"seed": sweeper.seed})
    if not OmegaConf.is_dict(s) or "_target_" not in s:
        raise SweeperError("hydra.sweeper.sampler needs a _target_: pick one with hydra/sweeper/sampler="
                           + "|".join(SAMPLER_CONFS))
    if sweeper.seed is not None and s.get("seed") is None:
        s = OmegaConf.merge(s, {"seed": sweeper.seed})
    return s


def exhaustive(sampler: DictConfig) -> bool:
    """Grid and brute force: every combination once, so n_trials is at most their number."""
    return str(sampler._target_).rsplit(".", 1)[-1] in ("GridSampler", "BruteForceSampler")


def check_settings(s: DictConfig, launcher: DictConfig, space: dict[str, Any]) -> None:
    unknown = sorted(set(s) - SETTINGS - {"_target_", "_recursive_"})
    if unknown:
        raise SweeperError(f"hydra.sweeper.{unknown[0]} is not a setting of hydra/sweeper=optuna: use "
                           f"{', '.join(sorted(SETTINGS))}")
    if not space and s.custom_search_space is None:
        raise SweeperError("hydra/sweeper=optuna needs a search space: e.g. 'lr=tag(log,interval(1e-4,1e-2))' "
                           "on the command line, hydra.sweeper.params or hydra.sweeper.custom_search_space")
    if s.n_trials < 1 or s.n_jobs < 1 or not 0 <= s.max_failure_rate <= 1:
        raise SweeperError(f"hydra.sweeper: n_trials={s.n_trials} and n_jobs={s.n_jobs} must be >= 1 and "
                           f"max_failure_rate={s.max_failure_rate} in [0, 1]")
    # in-process jobs share HydraConfig (a process global) and the signal handlers: one at a time
    if s.n_jobs > 1 and (launcher._target_ in IN_PROCESS_LAUNCHERS or launcher.get("n_jobs") == 1):
        raise SweeperError(f"hydra.sweeper.n_jobs={s.n_jobs} needs jobs in other processes: add "
                           f"hydra/launcher=joblib (hydra.launcher.n_jobs > 1), submitit_local or submitit_slurm")
    sampler_config(s)
    build_pruner(s)
