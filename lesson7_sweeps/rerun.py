"""`lesson7-rerun RUN_ID [OVERRIDE ...]`: train exactly what an MLflow run trained, again, and compare.

    lesson7-rerun 3f2a9c...                         # same config, same store; refuses if the data changed
    lesson7-rerun 3f2a9c... trainer.device=cpu      # a GPU run, again on CPU
    lesson7-rerun 3f2a9c... --strict                # refuse unless the code is provably the run's
    lesson7-rerun 3f2a9c... --tracking-uri http://mlflow:5000   # or MLFLOW_TRACKING_URI=...

The run's config.yaml artifact (resolved) is turned back into a typed, validated config
(`rebuild_config`), every `_target_` in it is checked against an allow-list (`check_targets`), the
code version and the data are compared with the run's, and the new run (tagged `rerun_of`) goes to
the same store. Its final metrics are printed next to the original's.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra._internal.utils import _locate
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lesson7_sweeps.checkpoint import interrupt_signal
from lesson7_sweeps.config import SCHEMAS, validate
from lesson7_sweeps.errors import ConfigError, UserError
from lesson7_sweeps.runner import TrainingDiverged
from lesson7_sweeps.tracking import MlflowLogger, git_tags
from lesson7_sweeps.train import CONF_DIR, train_run

PROG = "lesson7-rerun"
# Packages whose callables a config read back from a tracking server may instantiate.
ALLOWED_TARGETS = ("lesson7_sweeps", "torch.nn", "torch.optim")
_TARGET_PATH = re.compile(rf"^({'|'.join(map(re.escape, ALLOWED_TARGETS))})(\.[A-Za-z]\w*)+$")
PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
TIMING_METRICS = frozenset({"throughput"})  # wall-clock measurements: never equal between two runs


@contextmanager
def _composing() -> Iterator[None]:
    """Hydra's compose() over conf/; inside a running lesson7-train (resume) Hydra is set up already."""
    if GlobalHydra.instance().is_initialized():
        yield
        return
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        yield


# --- the stored config: safety checks ----------------------------------------------------------


def _items(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every (key, value) of a plain container, depth first: 'model', 'model._target_', ...,
    'schedule.phases', 'schedule.phases[0]', 'schedule.phases[0].kind'."""
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in children:
        key = f"{prefix}[{k}]" if isinstance(node, list) else f"{prefix}.{k}" if prefix else str(k)
        yield key, v
        yield from _items(v, key)


def _in_allowed_package(module: object) -> bool:
    return isinstance(module, str) and any(module == p or module.startswith(p + ".") for p in ALLOWED_TARGETS)


def check_targets(cfg: DictConfig | dict) -> None:
    """Raise ConfigError (one line, naming the key and the target) unless every `_target_`, at any
    depth, names a callable defined in lesson7_sweeps, torch.nn or torch.optim.

    The dotted path alone is not enough: `lesson7_sweeps.tracking.subprocess.run` starts with our
    package but Hydra would locate `subprocess.run` through the module's import. So the path must be
    plain public names under an allowed package, and the object it locates must be *defined* in one.
    Locating only imports modules of those packages; nothing is called."""
    container = OmegaConf.to_container(cfg) if isinstance(cfg, DictConfig) else cfg
    allowed = ", ".join(f"{p}." for p in ALLOWED_TARGETS)
    for key, value in _items(container):
        if key.rpartition(".")[2] != "_target_":
            continue
        refused = ConfigError(f"{key}={value!r} is not allowed: a config read back from a tracking store may only "
                              f"instantiate callables defined in {allowed}")
        if not (isinstance(value, str) and _TARGET_PATH.match(value)):
            raise refused
        try:  # Hydra's own lookup (instantiate's), so the object checked is the one it would build
            module = getattr(_locate(value), "__module__", None)
        except Exception:
            raise ConfigError(f"{key}={value!r}: no such callable in this checkout (the code changed since the run?)"
                              ) from None
        if not _in_allowed_package(module):
            raise refused


def parse_stored_config(text: str) -> DictConfig:
    """config.yaml of a run -> DictConfig, refusing anything a resolved config cannot contain."""
    try:
        cfg = OmegaConf.create(text)
    except Exception as e:  # yaml's and OmegaConf's errors share no base class
        raise ConfigError(f"config.yaml is not a valid config: {_first_line(e)}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError("config.yaml is not a mapping of config keys")
    for key, value in _items(OmegaConf.to_container(cfg)):
        # Resolving an interpolation from a tracking store could read (and log) environment variables.
        if isinstance(value, str) and "${" in value:
            raise ConfigError(f"{key}={value!r}: a stored config is resolved, so an interpolation in it is refused")
    check_targets(cfg)
    return cfg


# --- the stored config -> a typed, validated config --------------------------------------------


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
    raise ConfigError(f"{group}._target_={target}: no option in conf/{group}/ builds it any more "
                      f"(the code changed since the run)")


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
    `hydra_overrides` tag) are kept."""
    stored_tree = OmegaConf.to_container(stored)
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

    appended = {t.lstrip("+").split("=")[0] for t in tags.get("hydra_overrides", "").split() if t.startswith("+")}
    unknown = [k for k in only_in(stored_nodes, base_nodes) if k not in appended]
    notes = []
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
    for key in appended & stored_nodes.keys() - base_nodes.keys():
        OmegaConf.update(base, key, stored_nodes[key], force_add=True)
    try:
        cfg = OmegaConf.merge(base, stored_tree)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "")
        raise ConfigError(f"{key}: the run's value does not fit the current schema: {_first_line(e)}") from None
    validate(cfg)
    return cfg, notes


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


# --- the tracking store ------------------------------------------------------------------------


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def default_uri() -> str:
    """lesson7-train's store: MLFLOW_TRACKING_URI, else the default of conf/tracking/mlflow.yaml."""
    with _composing():
        return compose("train", overrides=["tracking=mlflow"]).tracking.uri


def read_run(uri: str, run_id: str) -> tuple[MlflowClient, Run, DictConfig]:
    """(client, run, its stored config) from the store at `uri`; UserError when any is missing."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserError(f"no MLflow store at {uri} (no such file); give --tracking-uri or set MLFLOW_TRACKING_URI")
    # a server must answer now, not after MLflow's minutes of retries
    MlflowLogger(uri, experiment="", artifact_location=None, run_name=None).check()
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
    bar = os.environ.get(PROGRESS_BAR)
    os.environ[PROGRESS_BAR] = "false"  # MLflow draws one on stderr for any download, even of one small file
    try:
        with tempfile.TemporaryDirectory(prefix="lesson7-rerun-") as tmp:
            if "config.yaml" not in {a.path for a in client.list_artifacts(run_id)}:
                raise UserError(f"run {run_id} has no config.yaml artifact, so it cannot be rerun")
            text = Path(client.download_artifacts(run_id, "config.yaml", tmp)).read_text(encoding="utf-8")
    except (MlflowException, OSError) as e:
        raise UserError(f"cannot read the artifacts of run {run_id}: {_first_line(e)}") from None
    finally:
        if bar is None:
            del os.environ[PROGRESS_BAR]
        else:
            os.environ[PROGRESS_BAR] = bar
    return client, run, parse_stored_config(text)


def check_code(run_tags: dict[str, str], strict: bool) -> None:
    """Compare the run's git commit and dirty flag with the project checkout's: warn on stderr, or
    with `strict` raise, unless both are the same commit with no uncommitted changes."""
    now = git_tags()

    def describe(tags: dict[str, str]) -> str:
        if "git_commit" not in tags:
            return "an unknown commit"
        return tags["git_commit"][:12] + (" + uncommitted changes" if tags.get("git_dirty") != "false" else "")

    if "git_commit" in now and describe(run_tags) == describe(now) and now["git_dirty"] == "false":
        return
    problem = f"the code may differ from the run's: it ran at {describe(run_tags)}, this checkout is at {describe(now)}"
    if strict:
        raise UserError(f"{problem} (--strict)")
    print(f"{PROG}: warning: {problem}", file=sys.stderr)


def comparison(original: dict[str, float], rerun: dict[str, float]) -> str:
    """An aligned table of the final metrics both runs have, and a verdict that ignores timing metrics."""
    names = sorted(original.keys() & rerun.keys())
    rows = [("metric", "original", "rerun", "difference")]
    for name in names:
        a, b = original[name], rerun[name]
        diff = "(timing)" if name in TIMING_METRICS else "0" if a == b else f"{b - a:+.3g}"
        rows.append((name, repr(a), repr(b), diff))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3] for r in rows]
    compared = [n for n in names if n not in TIMING_METRICS]
    differ = [n for n in compared if original[n] != rerun[n]]
    timing = [n for n in names if n in TIMING_METRICS]
    verdict = (f"{len(differ)} of {len(compared)} final metrics differ: {', '.join(differ)}" if differ
               else f"all {len(compared)} final metrics are identical")
    lines.append(verdict + (f" (timing, not compared: {', '.join(timing)})" if timing else ""))
    return "\n".join(lines)


# --- the command -------------------------------------------------------------------------------


def rerun(args: argparse.Namespace) -> None:
    """Read the run, check it, rebuild its config, train it again, print the comparison."""
    uri = args.tracking_uri or default_uri()
    client, run, stored = read_run(uri, args.run_id)
    check_code(run.data.tags, args.strict)
    cfg, notes = rebuild_config(stored, run.data.tags, force=args.force)
    for note in notes:
        print(f"{PROG}: warning: {note}", file=sys.stderr)
    if "uri" not in cfg.tracking:
        raise ConfigError(f"tracking._target_={cfg.tracking._target_}: the run was not tracked to MLflow, "
                          f"so its rerun cannot be compared with it")
    apply_overrides(cfg, args.overrides)
    cfg.tracking.uri = uri
    fingerprint = run.data.params.get("dataset.fingerprint")
    if fingerprint is None and not args.force:
        print(f"{PROG}: warning: the run recorded no dataset.fingerprint; the data cannot be checked", file=sys.stderr)
    outcome = train_run(cfg, tags={"rerun_of": args.run_id, "rerun_overrides": " ".join(args.overrides)},
                        expect_data=None if args.force else fingerprint)
    new = client.get_run(outcome.run_id)
    if fingerprint is not None and new.data.params.get("dataset.fingerprint") != fingerprint:
        print(f"{PROG}: warning: the rerun trained on other data than the run (--force)", file=sys.stderr)
    where = uri
    if uri.startswith(("http://", "https://")):  # a link into the MLflow UI
        where = f"{uri.rstrip('/')}/#/experiments/{new.info.experiment_id}/runs/{new.info.run_id}"
    print(f"rerun of {args.run_id}: new run {new.info.run_id} in experiment '{cfg.tracking.experiment}' at {where}")
    print(comparison(run.data.metrics, new.data.metrics))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Train an MLflow run's exact config again, check the code "
                                "and data versions, and compare the final metrics.")
    p.add_argument("run_id", help="the MLflow run to reproduce")
    p.add_argument("overrides", nargs="*", help="Hydra-style key=value overrides applied to the run's config "
                   "(e.g. trainer.device=cpu); recorded in the tag rerun_overrides")
    p.add_argument("--tracking-uri", help="the MLflow store of the run, where the rerun goes too "
                   "(default: MLFLOW_TRACKING_URI, else lesson7-train's default store)")
    p.add_argument("--strict", action="store_true", help="refuse unless the checkout is the run's commit, clean")
    p.add_argument("--force", action="store_true", help="train even if the data differs from the run's, and drop "
                   "settings the current code no longer has")
    return p


def main(argv: list[str] | None = None) -> int:
    """Console entry; returns the exit code: 0, 1 (training diverged), 2 (a user error, one line)."""
    args = parser().parse_intermixed_args(argv)
    # epoch lines on stderr, as lesson7-train prints them through Hydra's logging
    handler, pkg = logging.StreamHandler(sys.stderr), logging.getLogger("lesson7_sweeps")
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    level = pkg.level
    pkg.addHandler(handler)
    pkg.setLevel(logging.INFO)
    try:
        rerun(args)
        return 0
    except (UserError, TrainingDiverged) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UserError) else 1
    except KeyboardInterrupt as e:
        name, code = interrupt_signal(e)
        print(f"{PROG}: interrupted by {name}", file=sys.stderr)
        return code
    finally:
        pkg.removeHandler(handler)
        pkg.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
