"""`hydra/sweeper=optuna` and the sampler group `hydra/sweeper/sampler=...`, as the published
hydra-optuna-sweeper names them, with Optuna's own defaults (a test compares them with Optuna's
signatures). `hydra.sweeper.sampler=NAME` (a plain string, with `hydra.sweeper.seed`) is a shorthand."""

# no `from __future__ import annotations`: Hydra loads plugin modules outside sys.modules, where
# dataclasses cannot resolve string annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

SWEEPER_TARGET = "hydra_plugins.lesson7_optuna_sweeper.optuna_sweeper.OptunaSweeper"


@dataclass
class TPESamplerConf:  # null: Optuna's own default
    _target_: str = "optuna.samplers.TPESampler"
    seed: Any = None
    consider_prior: Any = None
    prior_weight: Any = None
    consider_magic_clip: Any = None
    consider_endpoints: Any = None
    n_startup_trials: int = 10
    n_ei_candidates: int = 24
    multivariate: Any = None
    group: bool = False
    warn_independent_sampling: Any = None
    constant_liar: bool = True  # parallel trials (n_jobs > 1) spread out instead of piling on one point


@dataclass
class RandomSamplerConf:
    _target_: str = "optuna.samplers.RandomSampler"
    seed: Any = None


@dataclass
class CmaEsSamplerConf:
    _target_: str = "optuna.samplers.CmaEsSampler"
    seed: Any = None
    x0: Any = None
    sigma0: Any = None
    n_startup_trials: int = 1
    independent_sampler: Any = None
    warn_independent_sampling: bool = True
    consider_pruned_trials: bool = False
    restart_strategy: Any = None
    popsize: Any = None
    inc_popsize: int = -1
    use_separable_cma: bool = False
    with_margin: bool = False
    lr_adapt: bool = False
    source_trials: Any = None


@dataclass
class NSGAIISamplerConf:
    _target_: str = "optuna.samplers.NSGAIISampler"
    seed: Any = None
    population_size: int = 50
    mutation_prob: Any = None
    crossover_prob: float = 0.9
    swapping_prob: float = 0.5
    constraints_func: Any = None


@dataclass
class QMCSamplerConf:
    _target_: str = "optuna.samplers.QMCSampler"
    seed: Any = None
    qmc_type: str = "sobol"
    scramble: bool = False
    independent_sampler: Any = None
    warn_asynchronous_seeding: bool = True
    warn_independent_sampling: bool = True


@dataclass
class GPSamplerConf:
    _target_: str = "optuna.samplers.GPSampler"
    seed: Any = None
    independent_sampler: Any = None
    n_startup_trials: int = 10
    deterministic_objective: bool = False
    constraints_func: Any = None
    warn_independent_sampling: bool = True


@dataclass
class GridSamplerConf:  # the grid itself comes from the search space
    _target_: str = "optuna.samplers.GridSampler"
    seed: Any = None


@dataclass
class BruteForceSamplerConf:  # every combination of a discrete space once
    _target_: str = "optuna.samplers.BruteForceSampler"
    seed: Any = None
    avoid_premature_stop: bool = False


SAMPLER_CONFS = {"tpe": TPESamplerConf, "random": RandomSamplerConf, "cmaes": CmaEsSamplerConf,
                 "nsgaii": NSGAIISamplerConf, "qmc": QMCSamplerConf, "gp": GPSamplerConf, "grid": GridSamplerConf,
                 "bruteforce": BruteForceSamplerConf}


@dataclass
class MedianPrunerConf:
    n_startup_trials: int = 4  # trials that must finish before any is pruned
    n_warmup_steps: int = 0  # steps of a trial before it may be pruned
    n_min_trials: int = 1  # trials that must have reported at a step before it is compared


@dataclass
class HyperbandPrunerConf:
    min_resource: int = 1  # steps every trial gets before its first rung
    max_resource: Any = "auto"  # steps of a full trial; auto = those of the first finished trial
    reduction_factor: int = 3  # 1 in reduction_factor trials goes on at each rung


@dataclass
class OptunaSweeperConf:
    _target_: str = SWEEPER_TARGET
    _recursive_: bool = False  # the sweeper builds its sampler (the grid's needs the search space)
    defaults: list[Any] = field(default_factory=lambda: ["_self_", {"sampler": "tpe"}])  # the group over sampler: null
    n_trials: int = 20  # in the study, over every run of the command (resumes count what is done)
    n_jobs: int = 1  # trials at once; > 1 needs a launcher with other processes (joblib, submitit_*)
    # minimize | maximize, or a list of them (multi-objective: the task returns one value each);
    # null = minimize, or what a sweep callback's default_direction() says
    direction: Any = None
    sampler: Any = None  # hydra/sweeper/sampler=NAME (tpe by default), or the shorthand sampler=NAME
    seed: Any = None  # the shorthand sampler's seed (hydra.sweeper.sampler.seed with the group); null = random
    storage: Any = None  # an Optuna RDB URL (sqlite:///..., postgresql://...); null = optuna.db in the sweep dir
    study_name: Any = None  # needed with storage; the same storage + study_name resumes the study
    new_study: bool = False  # true = replace a stored study of this name whose search space differs
    max_failure_rate: float = 0.25  # stop once more than this fraction of n_trials has failed
    heartbeat_interval: int = 60  # seconds; a trial without a heartbeat for 2 intervals is FAIL (dead sweeper);
    # also how often a sweeper with nothing left to ask looks at the other sweepers' trials
    pruner: str = "median"  # median | hyperband | none
    median: MedianPrunerConf = field(default_factory=MedianPrunerConf)
    hyperband: HyperbandPrunerConf = field(default_factory=HyperbandPrunerConf)
    params: Any = None  # key: search space, in the published plugin's syntax
    custom_search_space: Any = None  # "module.function": called as f(cfg, trial) to suggest more parameters


cs = ConfigStore.instance()
cs.store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="lesson7_optuna_sweeper")
for _name, _conf in SAMPLER_CONFS.items():
    cs.store(group="hydra/sweeper/sampler", name=_name, node=_conf, provider="lesson7_optuna_sweeper")
