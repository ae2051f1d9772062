"""Search spaces in the published Hydra Optuna plugin's syntax, as Optuna distributions.

    hydra.sweeper.params:
      bptt: choice(8, 16, 32)             # categorical (also: 8,16,32)
      n_hidden: range(64, 513, step=64)   # int, stop excluded as in Python (64..512)
      lr: tag(log, interval(1e-4, 1e-2))  # float on a log scale
      weight_decay: interval(0, 1e-3)     # float, uniform
      epochs: 4                           # a plain value: fixed for every trial

Unlike the published plugin, `range(a, b)` keeps Hydra's meaning (b excluded). The search space and
the fixed overrides hash to one value stored with the study, so a resumed study with a different
space is refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from hydra.errors import HydraException

from hydra_plugins.lesson7_optuna_sweeper._errors import SweeperError

if TYPE_CHECKING:  # optuna is imported when a sweep starts: Hydra imports this module on every run
    from optuna.distributions import BaseDistribution


def _distribution(o: Override) -> BaseDistribution:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = o.value()
    key = o.get_key_element()
    if isinstance(value, ChoiceSweep) or (isinstance(value, RangeSweep) and value.shuffle):
        choices = list(o.sweep_iterator(transformer=Transformer.encode))
        if len(set(map(str, choices))) != len(choices):
            raise SweeperError(f"{o.input_line}: a choice lists a value twice; give each value once")
        return CategoricalDistribution(choices)
    if isinstance(value, RangeSweep):
        values = list(o.sweep_iterator())
        if not values:
            raise SweeperError(f"{o.input_line}: the range is empty; use range(start, stop, step=...) with "
                               f"start < stop")
        if all(isinstance(v, int) for v in values):
            return IntDistribution(values[0], values[-1], step=int(value.step))
        return FloatDistribution(values[0], values[-1], step=value.step)
    if isinstance(value, IntervalSweep):
        start, end, log = value.start, value.end, "log" in value.tags
        if not start < end or (log and start <= 0):
            raise SweeperError(f"{o.input_line}: use interval(low, high) with low < high (and low > 0 on a log scale)")
        if isinstance(start, int) and isinstance(end, int):  # int(interval(...))
            return IntDistribution(start, end, log=log)
        return FloatDistribution(float(start), float(end), log=log)
    raise SweeperError(f"{key}: {type(value).__name__} sweeps are not supported; use choice, range or interval")


def parse(params: Mapping[str, Any] | None, arguments: list[str]) -> tuple[dict[str, BaseDistribution], list[str]]:
    """`hydra.sweeper.params` then the command line (which wins for a key both name) ->
    (search space by key, fixed overrides as `key=value`)."""
    lines = [f"{k}={v}" for k, v in (params or {}).items()] + list(arguments)
    try:
        overrides = OverridesParser.create().parse_overrides(lines)
    except HydraException as e:
        raise SweeperError(f"hydra.sweeper.params: {str(e).splitlines()[0]}") from None
    space: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    final = {o.get_key_element(): o for o in overrides}  # a preset's glob() the command line replaces: never read
    for o in overrides:
        key = o.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if o is not final[key]:
            continue
        if o.is_sweep_override():
            space[key] = _distribution(o)
        else:
            fixed[key] = o.input_line
    return space, list(fixed.values())


def job_overrides(params: Mapping[str, Any] | None, arguments: list[str], fixed: list[str],
                  sampled: dict[str, Any]) -> list[str]:
    """A trial's overrides in the order their keys were given (`params`, then the command line), as
    Hydra's basic sweeper orders them; parameters a custom_search_space added come last."""
    lines = [f"{k}={v}" for k, v in (params or {}).items()] + list(arguments)
    keys = [o.get_key_element() for o in OverridesParser.create().parse_overrides(lines)]
    by_key = {OverridesParser.create().parse_override(f).get_key_element(): f for f in fixed}
    by_key.update({k: to_override(k, v) for k, v in sampled.items()})
    ordered = [by_key.pop(k) for k in dict.fromkeys(keys) if k in by_key]
    return ordered + list(by_key.values())


def to_override(key: str, value: Any) -> str:
    """One sampled value as a Hydra override (choices of lists arrive encoded as strings, e.g. '[16,32]')."""
    return f"{key}={value}"


def config_hash(space: dict[str, BaseDistribution], fixed: list[str]) -> str:
    """A short, stable hash of the search space and the fixed overrides (order-independent)."""
    from optuna.distributions import distribution_to_json

    text = json.dumps({"space": {k: distribution_to_json(d) for k, d in sorted(space.items())},
                       "fixed": sorted(fixed)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def grid(space: dict[str, BaseDistribution]) -> dict[str, list[Any]]:
    """Every value of each key, for Optuna's GridSampler (discrete distributions only)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, list[Any]] = {}
    for key, d in space.items():
        if isinstance(d, CategoricalDistribution):
            out[key] = list(d.choices)
        elif isinstance(d, IntDistribution) and not d.log:
            out[key] = list(range(d.low, d.high + 1, d.step))
        elif isinstance(d, FloatDistribution) and d.step is not None:
            n = round((d.high - d.low) / d.step)
            out[key] = [d.low + i * d.step for i in range(n + 1)]
        else:
            raise SweeperError(f"hydra.sweeper.sampler=grid needs a finite set of values for {key}: use choice(...) "
                              f"or range(...), or another sampler (tpe, random, gp)")
    return out
