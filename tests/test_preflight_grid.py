"""The grid (basic sweeper) path of a sweep's command line: what a glob() sees, interval() refused before
any run exists, and a preset's sweep a command line replaces (issue 18)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from hydra_plugins.lesson7_optuna_sweeper import search_space
from lesson7_sweeps.config import CONF_DIR, SCHEMAS, register_schemas
from lesson7_sweeps.errors import ConfigError
from lesson7_sweeps.preflight import preflight
from lesson7_sweeps.usage import options

register_schemas()


def test_a_glob_sees_only_the_options_of_a_group_never_its_schemas():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        for group in SCHEMAS:  # the groups whose options build on a registered schema
            assert loader.get_group_options(group) == options(group), group
        # what Hydra's basic sweeper does with `optim=glob(*)`
        (glob,) = OverridesParser.create(config_loader=loader).parse_overrides(["optim=glob(*)"])
        assert list(glob.sweep_string_iterator()) == ["adam", "sgd"]


def _store(tmp_path: Path) -> list[str]:
    return [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "tracking.experiment=test"]


@pytest.fixture
def conf(tmp_path: Path) -> str:
    """conf/ with two presets of our own: a glob and an interval in hydra.sweeper.params."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    for name, params in (("globbed", "optim: glob(*)"), ("searched", "optim.lr: interval(1e-4, 1e-2)")):
        (conf / "sweep" / f"{name}.yaml").write_text(
            f"# @package _global_\nhydra:\n  sweeper:\n    params:\n      {params}\n      data.bptt: 8,16\n")
    return str(conf)


@pytest.mark.parametrize("argv", [["-m", "optim.lr=interval(1e-4,1e-2)"], ["-m", "sweep=searched"]])
def test_interval_needs_the_optuna_sweeper(tmp_path: Path, conf: str, argv: list[str]):
    with pytest.raises(ConfigError, match=r"^optim.lr=interval\(1e-4, ?1e-2\): interval\(\) needs hydra/sweeper=optuna "
                                          r".* a list \(a,b,c\), range\(\) or glob\(\)$"):
        preflight([*argv, *_store(tmp_path)], conf, "train")
    assert not (tmp_path / "mlflow.db").exists()  # refused before any store (let alone a parent run) exists
    preflight([*argv, "hydra/sweeper=optuna", *_store(tmp_path)], conf, "train")


def test_a_presets_glob_the_command_line_replaces_is_never_read(tmp_path: Path, conf: str):
    for sweeper in (["hydra/sweeper=optuna"], []):
        preflight(["-m", "sweep=globbed", "optim=choice(adam,sgd)", *sweeper, *_store(tmp_path)], conf, "train")
    with pytest.raises(ConfigError, match=r"^optim: Glob sweeps are not supported"):  # not replaced: refused
        preflight(["-m", "sweep=globbed", "hydra/sweeper=optuna", *_store(tmp_path)], conf, "train")
    space, fixed = search_space.parse({"optim": "glob(*)", "seed": "1"}, ["optim=choice(adam,sgd)", "seed=2"])
    assert list(space["optim"].choices) == ["adam", "sgd"] and fixed == ["seed=2"]
