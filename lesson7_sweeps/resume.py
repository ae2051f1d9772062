"""`lesson7-train resume=RUN_ID [OVERRIDES]`: whether a run may be continued, and with which config.

A resumed run trains with its own config, rebuilt from the store (`stored.rebuild_config`: data,
never code). The command line may still change what is safe to change mid-run (`SAFE`: how long,
on which device, how it reports); any other override that differs from the run's value is refused
in one line (a different run is a `lesson7-rerun RUN_ID KEY=VALUE`). A run another process is still
training (fresh heartbeat) is refused unless `force_resume=true`; a FINISHED run only continues
when `trainer.epochs` is raised (it is then extended, from its final checkpoint).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from lesson7_sweeps.config import SCHEMAS, validate
from lesson7_sweeps.errors import ConfigError, UserError
from lesson7_sweeps.stored import apply_overrides, read_run, rebuild_config
from lesson7_sweeps.tracking import heartbeat_age

log = logging.getLogger(__name__)
SAFE = ("trainer.epochs", "trainer.max_steps", "trainer.device", "trainer.log_every", "trainer.progress")
WHICH_RUN = ("resume", "force_resume", "tracking.uri")  # they say which run to continue, not how


class Plan(NamedTuple):
    cfg: DictConfig  # the run's config, with the safe overrides applied
    checkpoint: str  # what to continue from: last.pt, or final.pt to extend a FINISHED run
    overrides: list[str]  # the overrides applied (tagged on the run)
    notes: list[str]  # what rebuilding the stored config changed (tagged on the run)


def changed_overrides(cfg: DictConfig, run_cfg: DictConfig, run_tags: dict[str, str],
                      overrides: list[str]) -> list[str]:
    """The command-line overrides that would change the run: safe ones returned, others refused."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise ConfigError(f"{getattr(e, 'override', '')}: {e}") from None
    last = {o.key_or_group: o for o in parsed}  # a key given twice: the last one counts (Hydra's rule)
    changed = []
    for key, o in last.items():
        if key.startswith("hydra") or key in WHICH_RUN:
            continue
        if key in SCHEMAS:  # a group choice: the same option as the run's is no change
            same = run_tags.get(f"choice.{key}") == o.value() or (
                OmegaConf.to_container(cfg[key], resolve=True) == OmegaConf.to_container(run_cfg[key]))
        else:
            same = OmegaConf.select(cfg, key, default=None) == OmegaConf.select(run_cfg, key, default=None)
        if same:
            continue
        if key not in SAFE:
            raise ConfigError(f"{o.input_line}: resume continues the run with its own config; only "
                              f"{', '.join(SAFE)} may change (lesson7-rerun {cfg.resume} {o.input_line} trains a new "
                              f"run with it)")
        changed.append(o.input_line)
    return changed


def plan(cfg: DictConfig, overrides: list[str]) -> Plan:
    """Read the run `cfg.resume` from `cfg.tracking.uri`, check it may be continued, and rebuild its
    config with the safe `overrides` (the command line's) applied."""
    if "uri" not in cfg.tracking:
        raise ConfigError(f"resume={cfg.resume} needs the MLflow store the run is in; drop tracking=none")
    _, run, stored = read_run(cfg.tracking.uri, cfg.resume)
    run_cfg, notes = rebuild_config(stored, run.data.tags)
    for note in notes:
        log.warning(note)
    status, epochs = run.info.status, run_cfg.trainer.epochs
    age = heartbeat_age(run)
    if status == "RUNNING" and age is not None and age < cfg.tracking.stale_after_s and not cfg.force_resume:
        raise UserError(f"resume={cfg.resume}: the run is still training elsewhere (its heartbeat is {age:.0f} s old, "
                        f"tracking.stale_after_s={cfg.tracking.stale_after_s:g}); stop that process first, or add "
                        f"force_resume=true if it is gone")
    changed = changed_overrides(cfg, run_cfg, run.data.tags, overrides)
    apply_overrides(run_cfg, changed)
    run_cfg.tracking.uri, run_cfg.force_resume = cfg.tracking.uri, cfg.force_resume  # which run, and how to take it
    validate(run_cfg)
    if status != "FINISHED":
        return Plan(run_cfg, "last.pt", changed, notes)
    if run_cfg.trainer.epochs <= epochs:
        raise UserError(f"resume={cfg.resume}: the run FINISHED its {epochs} epochs; to train it further, raise "
                        f"trainer.epochs (e.g. trainer.epochs={epochs * 2}), or rerun it with lesson7-rerun")
    log.info("extending the FINISHED run %s from %d to %d epochs", cfg.resume, epochs, run_cfg.trainer.epochs)
    return Plan(run_cfg, "final.pt", changed, notes)
