"""A run's config read back from a tracking store: data, never code.

Anyone who can write to a shared store can edit a run's `config.yaml`, and `lesson7-rerun RUN_ID`
and `lesson7-train resume=RUN_ID` build a run from it. So the stored text is only *parsed*
(`parse_stored_config`: YAML without tags, no interpolations or resolvers), and a config is then
rebuilt from this checkout's conf/ (`rebuild_config`): per group, the option whose `_target_` is
exactly the stored one, with the stored values merged onto its typed schema. A Hydra key
(`_target_`, `_partial_`, `_args_`, ...) anywhere but where the chosen option has it, with that
option's value, is refused; so is a node where the schema has a scalar (the schema's types and
`config.validate` check every value). Nothing is instantiated here. Configs that older released
versions wrote are first upgraded, by a fixed table of exact old shapes (`upgrade_legacy`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.utils import instantiate
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lesson7_sweeps.config import CONF_DIR, SCHEMAS, register_schemas, validate
from lesson7_sweeps.errors import ConfigError, UserError
from lesson7_sweeps.tracking import MlflowLogger, quiet_downloads

register_schemas()


@contextmanager
def _composing() -> Iterator[None]:
    """Hydra's compose() over conf/; inside a running lesson7-train (resume) Hydra is set up already."""
    if GlobalHydra.instance().is_initialized():
        yield
        return
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        yield



# --- parsing ----------------------------------------------------------------------------------


def _items(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every (key, value) of a plain container, depth first: 'model', 'model._target_', ...,
    'schedule.phases', 'schedule.phases[0]', 'schedule.phases[0].kind'."""
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in children:
        key = f"{prefix}[{k}]" if isinstance(node, list) else f"{prefix}.{k}" if prefix else str(k)
        yield key, v
        yield from _items(v, key)


def parse_stored_config(text: str) -> DictConfig:
    """config.yaml of a run -> DictConfig of plain values, refusing anything a resolved config
    cannot contain (an interpolation would be resolved, and could call a resolver or read the
    environment). OmegaConf's YAML loader constructs no Python objects (`!!python/...` fails)."""
    try:
        cfg = OmegaConf.create(text)
    except Exception as e:  # yaml's and OmegaConf's errors share no base class
        raise ConfigError(f"config.yaml is not a valid config: {_first_line(e)}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError("config.yaml is not a mapping of config keys")
    for key, value in _items(OmegaConf.to_container(cfg)):
        if isinstance(value, str) and "${" in value or "${" in key:
            raise ConfigError(f"{key}={value!r}: a stored config is resolved, so an interpolation in it is refused")
    return cfg


def _refused(key: str, value: Any) -> ConfigError:
    return ConfigError(f"{key}={value!r} is refused: a config read back from a tracking store may only choose "
                       f"among the options in conf/ (of this checkout), and none has it")


def _is_hydra_key(key: str) -> bool:
    """`_target_`, `_partial_`, `_args_`, `_recursive_`, `_convert_`, ...: keys instantiate() obeys."""
    name = key.rpartition(".")[2].rpartition("]")[2]
    return len(name) > 2 and name.startswith("_") and name.endswith("_")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def _pick_option(group: str, node: Any, preferred: list[str | None]) -> str:
    options = _options(group)
    order = list(dict.fromkeys(o for o in [*preferred, *options] if o in options))
    target = node.get("_target_") if isinstance(node, dict) else None
    if target is None:
        return order[0]
    for option in order:
        if compose(f"{group}/{option}")[group].get("_target_") == target:
            return option
    raise _refused(f"{group}._target_", target)


# --- configs of older versions ------------------------------------------------------------------
# bfd5977 (after the releases ee16b29 and 8bb25d1) changed the schema of these keys. Each rule maps
# one exact old shape (a bool, a missing key) to the current value that trains as the old code did;
# any other shape is left to rebuild_config's checks. A rule only ever writes its constant.

_ABSENT = object()  # the old shape "the key is not there"


def _group_node(group: str) -> Callable[[dict], list[tuple[str, dict]]]:
    def nodes(tree: dict) -> list[tuple[str, dict]]:
        node = tree.get(group)
        return [(group, node)] if isinstance(node, dict) else []

    return nodes


_data_node, _trainer_node = _group_node("data"), _group_node("trainer")


def _phase_nodes(tree: dict) -> list[tuple[str, dict]]:
    schedule = tree.get("schedule")
    phases = schedule.get("phases") if isinstance(schedule, dict) else None
    if not isinstance(phases, list):
        return []
    return [(f"schedule.phases[{i}]", p) for i, p in enumerate(phases) if isinstance(p, dict)]


class Rule(NamedTuple):
    nodes: Callable[[dict], list[tuple[str, dict]]]  # where the key lives: [(path, node), ...]
    key: str
    old: Any  # the old shape, compared by identity: `tta: 1` is no `tta: true`
    new: Any  # the current value that trains as the old code did
    why: str
    applies: Callable[[dict], bool] = lambda node: True


LEGACY_RULES = [
    Rule(_data_node, "tta", True, "views", "identity, flip, 2-pixel shifts: what tta=true averaged"),
    Rule(_data_node, "tta", False, "none", "no val_accuracy_tta, as tta=false"),
    Rule(_data_node, "valid_from_line", _ABSENT, None, "the valid_frac cut, the old code's only split",
         applies=lambda node: "valid_frac" in node),  # text data
    Rule(_phase_nodes, "reset_optimizer", _ABSENT, False, "the old code kept one optimizer for all phases"),
    Rule(_phase_nodes, "warmup", _ABSENT, "cycle", "the old per-cycle warm-up",
         applies=lambda node: node.get("kind") == "sgdr"),
    Rule(_trainer_node, "compile", False, "off", "eager, as compile=false"),
    Rule(_trainer_node, "compile", True, "default", "torch.compile's default mode, as compile=true"),
]


def _yaml_scalar(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def upgrade_legacy(tree: dict) -> list[str]:
    """Upgrade, in place, the settings of a plain config `tree` that have the shape an older released
    version wrote (LEGACY_RULES); one line per rule applied, e.g. 'schedule.phases[1].warmup -> cycle
    (the old per-cycle warm-up)'."""
    notes = []
    for rule in LEGACY_RULES:
        changed = []
        for path, node in rule.nodes(tree):
            if node.get(rule.key, _ABSENT) is rule.old and rule.applies(node):
                node[rule.key] = rule.new
                changed.append(f"{path}.{rule.key}" + ("" if rule.old is _ABSENT else f"={_yaml_scalar(rule.old)}"))
        if changed:
            notes.append(f"{', '.join(changed)} -> {_yaml_scalar(rule.new)} ({rule.why})")
    return notes


def rebuild_config(stored: DictConfig, tags: dict[str, str], force: bool = False) -> tuple[DictConfig, list[str]]:
    """The typed, validated config of a run, from its resolved config.yaml and its tags; and warnings.

    Values are typed by the structured schemas that conf/ options start from, so the stored values
    are merged (every one wins) onto a config composed from conf/ with, per group, the first option
    in this order whose `_target_` is the stored one:
      1. the run's `choice.<group>` tag (runs launched through Hydra have one),
      2. today's default option,
      3. the other options in conf/<group>/, by name.
    Matching `_target_`s instead of trusting the tag works without tags (train(cfg) called directly,
    reruns of reruns), with a stale tag, and with a forged one (a tag only picks among this
    checkout's options). Groups without `_target_` (schedule, trainer) have one schema for all their
    options, so the first option in that order fits.

    A stored key the current schema lacks means the code changed since the run: ConfigError naming
    it, or with `force` a warning and the key is dropped. Keys new since the run keep today's
    defaults (a warning names them). Top-level keys the run appended (`+lr_find=true` in its
    `hydra_overrides` tag) are kept. A config of an older version is upgraded first (a note names
    every change)."""
    stored_tree = OmegaConf.to_container(stored)
    upgraded = upgrade_legacy(stored_tree)
    with _composing():
        defaults = compose("train", return_hydra_config=True).hydra.runtime.choices
        choices = [f"{g}={_pick_option(g, stored_tree.get(g), [tags.get(f'choice.{g}'), defaults.get(g)])}"
                   for g in SCHEMAS]
        base = compose("train", overrides=choices)
    base_tree = OmegaConf.to_container(base)
    base_nodes = {"": base_tree, **dict(_items(base_tree))}
    stored_nodes = {"": stored_tree, **dict(_items(stored_tree))}

    def only_in(mine: dict[str, Any], other: dict[str, Any]) -> list[str]:
        """Keys of `mine` whose parent is a mapping in `other` that lacks them (list items aside:
        a merge replaces lists whole, and checks their items' keys itself)."""
        return [k for k in mine if k and "[" not in k and k not in other
                and isinstance(other.get(k.rpartition(".")[0]), dict)]

    for key, value in stored_nodes.items():
        if _is_hydra_key(key) and (key not in base_nodes or base_nodes[key] != value):
            raise _refused(key, value)
    appended = {t.lstrip("+").split("=")[0] for t in tags.get("hydra_overrides", "").split() if t.startswith("+")}
    appended = {k for k in appended if "." not in k and k not in SCHEMAS and k in stored_nodes}
    for key in appended:
        value = stored_nodes[key]
        if not isinstance(value, (str, int, float, bool)) or "[" in key:
            raise ConfigError(f"{key}={value!r}: a key appended with '+' may only hold a plain value")
    unknown = [k for k in only_in(stored_nodes, base_nodes) if k not in appended]
    notes = [f"upgraded from an older version: {'; '.join(upgraded)}"] if upgraded else []
    if unknown and not force:
        raise ConfigError(f"{', '.join(unknown)}: not a setting of the current code (it changed since the run); "
                          f"use --force to drop it from the rerun")
    if unknown:
        notes.append(f"dropped settings the current code does not have: {', '.join(unknown)}")
        for key in unknown:
            parent, _, name = key.rpartition(".")
            del stored_nodes[parent][name]
    new = only_in(base_nodes, stored_nodes)
    if new:
        notes.append(f"settings new since the run take today's defaults: {', '.join(new)}")
    for key in appended - base_nodes.keys():
        OmegaConf.update(base, key, stored_nodes[key], force_add=True)
    try:
        cfg = OmegaConf.merge(base, stored_tree)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "")
        raise ConfigError(f"{key}: the run's value does not fit the current schema: {_first_line(e)}") from None
    validate(cfg)
    return cfg, notes


def notes_tag(notes: list[str]) -> dict[str, str]:
    """The run tag that records rebuild_config's notes (an upgrade, dropped keys, new defaults)."""
    return {"config_notes": " / ".join(notes)} if notes else {}


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> None:
    """Hydra-style `key=value` (and `+key=value`, `++key=value`) overrides, applied in place.

    Group choices (`model=gru`) are refused: they would swap the very settings a rerun reproduces.
    tracking.uri is refused: a rerun goes to the store it read the run from (--tracking-uri)."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise ConfigError(f"{getattr(e, 'override', '')}: {_first_line(e)}") from None
    for o in parsed:
        key = o.key_or_group
        if o.is_sweep_override() or o.is_delete() or o.package is not None or key in SCHEMAS or key == "tracking.uri":
            raise ConfigError(f"{o.input_line}: a rerun takes single-value key=value overrides (no sweeps, "
                              f"deletions, config group choices or tracking.uri)")
        try:
            OmegaConf.update(cfg, key, o.value(), merge=True, force_add=o.is_add() or o.is_force_add())
        except OmegaConfBaseException as e:
            raise ConfigError(f"{o.input_line}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def store_logger(uri: str | None) -> MlflowLogger:
    """conf/'s MlflowLogger, for reading and repairing runs of the store at `uri` (None: lesson7-train's
    default store, MLFLOW_TRACKING_URI or conf/tracking/mlflow.yaml's) in any experiment."""
    with _composing():
        node = compose("train", overrides=["tracking=mlflow"]).tracking
    node.experiment = ""  # runs are found by id: no experiment is checked or created
    if uri is not None:
        node.uri = uri
    return instantiate(node)


def default_uri() -> str:
    """lesson7-train's store: MLFLOW_TRACKING_URI, else the default of conf/tracking/mlflow.yaml."""
    return store_logger(None).uri


def read_run(uri: str, run_id: str) -> tuple[MlflowClient, Run, DictConfig]:
    """(client, run, its stored config) from the store at `uri`; UserError when any is missing."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserError(f"no MLflow store at {uri} (no such file); give --tracking-uri or set MLFLOW_TRACKING_URI")
    # a server must answer now, not after MLflow's minutes of retries
    store_logger(uri).check()
    try:
        client = MlflowClient(uri)
    except MlflowException as e:
        raise UserError(f"cannot open the MLflow store {uri}: {_first_line(e)}") from None
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise UserError(f"no run {run_id!r} in {uri}") from None
        raise UserError(f"cannot read the MLflow store {uri}: {_first_line(e)}") from None
    try:
        with tempfile.TemporaryDirectory(prefix="lesson7-rerun-") as tmp, quiet_downloads():
            if "config.yaml" not in {a.path for a in client.list_artifacts(run_id)}:
                raise UserError(f"run {run_id} has no config.yaml artifact, so it cannot be rerun")
            text = Path(client.download_artifacts(run_id, "config.yaml", tmp)).read_text(encoding="utf-8")
    except (MlflowException, OSError) as e:
        raise UserError(f"cannot read the artifacts of run {run_id}: {_first_line(e)}") from None
    return client, run, parse_stored_config(text)


