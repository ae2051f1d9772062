"""Compose and validate the config of every job, and check its tracking store, before Hydra launches
any, with one-line errors.

Hydra reports a bad override as several lines (and exits 1) and only once the job has started;
a sweep with one bad value would fail half-way. Here the values of each sweep override that stand
for all of them are composed with Hydra's own `compose()` and checked by `config.validate`, so
`lesson7-train -m optim.lr=1e-3,-1` stops at once with `optim.lr=-1 is invalid: ...` and exit code
2, and `data.bptt=range(1,501)` costs two configs, not 500. Settings that one sweep cannot vary
(`NOT_SWEPT`) and an Optuna sweeper's settings and search space are refused here too, before any
store or run exists.
"""

from __future__ import annotations

import math
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, RangeSweep
from hydra.errors import HydraException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lesson7_sweeps.config import data_kind, validate
from lesson7_sweeps.errors import ConfigError
from lesson7_sweeps.sweeps.optuna_study import is_optuna_sweep

MULTIRUN_FLAGS = ("-m", "--multirun")
# a sweep compares its trials by one objective, and finds them in one store and experiment
NOT_SWEPT = ("objective", "tracking", "tracking.uri", "tracking.experiment")


def _representatives(values: list[Any]) -> list[int]:
    """Which of a sweep's values stand for all: every numeric check of the schemas is an interval, so
    the smallest and the largest number of each type do; any other value stands for itself."""
    numbers: dict[type, list[int]] = {}
    others: dict[str, int] = {}
    for i, v in enumerate(values):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            numbers.setdefault(type(v), []).append(i)
        else:
            others.setdefault(str(v), i)
    ends = [i for group in numbers.values() for i in (min(group, key=values.__getitem__),
                                                      max(group, key=values.__getitem__))]
    return sorted(set(ends) | set(others.values()))


def _values(o: Override) -> list[str]:
    """The override as plain `key=value` strings: for a sweep, the values that stand for all of them
    (`_representatives`; a range's two ends, never enumerated); intervals: none."""
    key = o.get_key_element()
    if not o.is_sweep_override():
        return [o.input_line]
    value = o.value()
    if isinstance(value, IntervalSweep):  # (for Optuna) no finite list of values
        return []
    if isinstance(value, RangeSweep):
        n = math.ceil((value.stop - value.start) / value.step)
        return [f"{key}={value.start + i * value.step}" for i in dict.fromkeys((0, n - 1)) if n > 0]
    try:
        typed, strings = list(o.sweep_iterator()), list(o.sweep_string_iterator())
    except Exception:  # a glob() of group options: left to Hydra
        return []
    return [f"{key}={strings[i]}" for i in _representatives(typed)]


def variants(overrides: list[str]) -> list[list[str]]:
    """The first value of every sweep, then each other value of each sweep in turn."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:  # the grammar's message does not repeat the override
        raise ConfigError(f"{getattr(e, 'override', '')}: {_one_line(e)}") from None
    parsed = [o for o in parsed if not _is_hydra(o.get_key_element())]
    for o in parsed:
        if o.is_sweep_override() and o.key_or_group.lstrip("+~") in NOT_SWEPT:
            raise ConfigError(f"{o.input_line}: one sweep compares its trials by one objective, in one store and "
                              f"experiment; run a sweep for each value instead")
    choices = [_values(o) for o in parsed]
    base = [vals[0] for vals in choices if vals]
    out = [base]
    for i, vals in enumerate(c for c in choices if c):
        out += [base[:i] + [v] + base[i + 1 :] for v in vals[1:]]
    return out


def _one_line(e: Exception) -> str:
    """Hydra's/OmegaConf's message (and its cause) as one line, without search paths or key dumps."""
    if isinstance(e, MissingConfigException) and e.options:
        return f"{e.missing_cfg_file}: no such option; choose one of {', '.join(sorted(e.options))}"
    lines = []
    for exc in (e, e.__cause__):
        for line in str(exc or "").splitlines():
            line = line.strip()
            if line.startswith(("full_key:", "object_type", "reference_type", "Config search path")):
                break
            if line and not line.startswith(("Available options", "provider=")):
                lines.append(line.rstrip("."))
    return "; ".join(dict.fromkeys(lines))


def _sweeper_params(config_name: str, overrides: list[str]) -> list[str]:
    """A sweep preset's `hydra.sweeper.params` as overrides, for the keys the command line leaves
    alone; an Optuna sweeper's settings and search space are checked on the way."""
    try:
        hydra_overrides = [o for o in overrides if _is_hydra(o)]  # hydra/sweeper=optuna, hydra.sweeper.*
        cfg = compose(config_name, overrides=variants(overrides)[0] + hydra_overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException):
        return []  # composing each variant reports it
    hc = cfg.hydra
    if is_optuna_sweep(hc.sweeper):
        from lesson7_sweeps.sweeps.optuna_study import check_optuna  # optuna: only for its sweeps

        check_optuna(hc.sweeper, hc.launcher, cfg.objective, [o for o in overrides if not _is_hydra(o)])
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    params = [f"{k}={v}" for k, v in (hc.sweeper.get("params") or {}).items() if k not in given]
    if not is_optuna_sweep(hc.sweeper):  # Hydra's basic sweeper would fail after the parent run exists
        try:
            parsed = OverridesParser.create().parse_overrides([o for o in overrides if not _is_hydra(o)] + params)
        except HydraException:
            return params  # composing each variant reports it
        for o in parsed:
            if o.is_sweep_override() and isinstance(o.value(), IntervalSweep):
                raise ConfigError(f"{o.input_line}: interval() needs hydra/sweeper=optuna (a search); a grid sweep "
                                  f"takes a list (a,b,c), range() or glob()")
    return params


def _is_hydra(override: str) -> bool:
    return override.lstrip("+~").startswith("hydra")


def check_data_source(kind: str, data: Any) -> None:
    """The data exists and is not empty, checked without reading it (DataError, one line); a public
    copy of the text is downloaded here, once."""
    from pathlib import Path

    from lesson7_sweeps.data.cifar.formats import find_source
    from lesson7_sweeps.data.text import check_source

    if kind == "text":
        check_source(data.path, data.url, data.cache_dir)
    elif not data.download:  # images: a download makes any root good
        find_source(Path(data.root).expanduser(), download=False)


def preflight(argv: list[str], config_dir: str, config_name: str) -> None:
    """Raise ConfigError (one line) if any job of this command line would get a bad config."""
    flags = [a for a in argv if a.startswith("-")]
    if any(f not in MULTIRUN_FLAGS for f in flags):
        return  # --help, --cfg, --config-name ...: Hydra's own business
    stores, sources = [], []
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        given = [a for a in argv if not a.startswith("-")]
        if flags:  # a multirun: a preset's hydra.sweeper.params are sweeps too
            given += _sweeper_params(config_name, given)
        for overrides in variants(given):
            try:
                cfg = compose(config_name, overrides=overrides)
            except (HydraException, OmegaConfBaseException) as e:
                raise ConfigError(_one_line(e)) from None
            validate(cfg)
            stores.append(cfg.tracking)
            sources.append((data_kind(cfg), cfg.data))
    # a bad tracking.uri or a deleted experiment: one line now, not a traceback after data and model
    # were built (or from the multirun callback); each distinct store once
    for tracking in {OmegaConf.to_yaml(t, resolve=True): t for t in stores}.values():
        instantiate(tracking).check()
    # missing or empty data: one line now, not every trial of a sweep failing on it in turn
    for kind, data in {OmegaConf.to_yaml(d, resolve=True): (k, d) for k, d in sources}.values():
        check_data_source(kind, data)
