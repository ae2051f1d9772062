"""The Optuna sweeper as a plugin for any @hydra.main app: the published hydra-optuna-sweeper's tests
(search-space parsing, the sphere example, grid, multi-objective, custom search space, failure rate)
ported to it, with a plain app (tests/plugin_app: no project keys, a formula, no training), and
its own promises (no project imports, the reporting API, one-line errors, numpy returns, resume).
Where it differs on purpose, the test says so (README: "differences from hydra-optuna-sweeper")."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.test_utils.test_utils import SweepTaskFunction
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from hydra_plugins.lesson7_optuna_sweeper import SweeperError, search_space
from hydra_plugins.lesson7_optuna_sweeper.config import SAMPLER_CONFS, OptunaSweeperConf
from hydra_plugins.lesson7_optuna_sweeper.optuna_sweeper import OptunaSweeper, _values
from hydra_plugins.lesson7_optuna_sweeper.study import check_settings

APP = Path(__file__).parent / "plugin_app"


@pytest.fixture
def app(monkeypatch, hydra_restore_singletons):
    """The plain app's task, run in this process by Hydra's sweep runner (as Hydra's suites do)."""
    monkeypatch.syspath_prepend(str(APP))  # custom_search_space names app.configure
    monkeypatch.setattr(sys, "argv", ["app.py"])  # errors name the program
    import app

    def sweep(tmp_path: Path, config_name: str, *overrides: str) -> SweepTaskFunction:
        runner = SweepTaskFunction()
        runner.calling_file, runner.calling_module = str(APP / "app.py"), None
        runner.config_path, runner.config_name = "conf", config_name
        runner.task_function = app.main.__wrapped__
        runner.overrides, runner.temp_dir = ["hydra.job.chdir=False", *overrides], str(tmp_path / "sweep")
        return runner

    return sweep


def results(tmp_path: Path):
    return OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml")


def study(tmp_path: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/sweep/optuna.db")


# ---- the plugin, alone ---------------------------------------------------------------------------


def test_discovery_and_no_torch_mlflow_or_project_import():
    assert "OptunaSweeper" in [x.__name__ for x in Plugins.instance().discover(Sweeper)]
    code = ("import sys, hydra_plugins.lesson7_optuna_sweeper.optuna_sweeper as s, "
            "hydra_plugins.lesson7_optuna_sweeper.trial, hydra_plugins.lesson7_optuna_sweeper.study;"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'mlflow', 'lesson7_sweeps', 'optuna'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # not even optuna: Hydra imports plugin modules on every run


def test_sampler_group_holds_optunas_own_arguments_and_defaults():
    for name, conf in SAMPLER_CONFS.items():
        cls = getattr(optuna.samplers, conf._target_.rsplit(".", 1)[-1])
        params = inspect.signature(cls).parameters
        for f in dataclasses.fields(conf):
            if f.name != "_target_":
                assert f.name in params, f"{name}: {f.name}"
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                assert default == params[f.name].default, f"{name}: {f.name}"


# ---- the published plugin's tests, ported ------------------------------------------------------------


@pytest.mark.parametrize(("override", "expected"), [
    ("key=choice(1,2)", CategoricalDistribution([1, 2])),
    ("key=choice(true, false)", CategoricalDistribution([True, False])),
    ("key=choice('hello', 'world')", CategoricalDistribution(["hello", "world"])),
    ("key=shuffle(range(1,3))", CategoricalDistribution((1, 2))),
    ("key=range(1,3)", IntDistribution(1, 2)),  # differs: Hydra's range, the stop excluded (published: 1..3)
    ("key=interval(1, 5)", FloatDistribution(1, 5)),
    ("key=int(interval(1, 5))", IntDistribution(1, 5)),
    ("key=tag(log, interval(1, 5))", FloatDistribution(1, 5, log=True)),
    ("key=tag(log, int(interval(1, 5)))", IntDistribution(1, 5, log=True)),
    ("key=range(0.5, 5.5, step=1)", FloatDistribution(0.5, 4.5, step=1)),  # differs: stop excluded
])
def test_create_optuna_distribution_from_override(override, expected):
    (actual,) = search_space.parse({}, [override])[0].values()
    if isinstance(expected, CategoricalDistribution):
        assert set(actual.choices) == set(expected.choices)  # shuffle() reorders
    else:
        assert actual == expected


@pytest.mark.parametrize(("overrides", "expected"), [
    (["key=choice(1,2)"], ({"key": CategoricalDistribution([1, 2])}, [])),
    (["key=5"], ({}, ["key=5"])),
    (["key1=choice(1,2)", "key2=5", "key3=range(1,3)"],
     ({"key1": CategoricalDistribution([1, 2]), "key3": IntDistribution(1, 2)}, ["key2=5"])),
    (["~z"], ({}, ["~z"])),
    (["~z=10"], ({}, ["~z=10"])),
])
def test_create_params_from_overrides(overrides, expected):
    assert search_space.parse(None, overrides) == expected


@pytest.mark.parametrize("with_commandline", [True, False])
def test_optuna_example(app, tmp_path, with_commandline):
    # the published test runs 20 trials both ways; 3 values of x need fewer
    extra = ["x=choice(0, 1, 2)", "y=0", "hydra.sweeper.n_trials=6"] if with_commandline else []
    with app(tmp_path, "sphere", "hydra.sweeper.n_trials=20", "hydra/sweeper/sampler=tpe",
             "hydra.sweeper.sampler.seed=123", "~z", *extra) as sweep:
        returns, best = results(tmp_path), study(tmp_path, "sphere").best_trial
    assert returns.name == "optuna" and returns.best_params.x == best.params["x"]
    assert returns.best_value == best.value and len(sweep.returns[0]) == (6 if with_commandline else 20)
    assert ("y" in returns.best_params) != with_commandline  # a fixed value is no parameter
    assert returns.best_value <= 2.27  # the published test's threshold for TPE


@pytest.mark.parametrize("n_trials", [10, 1])  # 10: the whole grid of 8
def test_example_with_grid_sampler(app, tmp_path, n_trials):
    with app(tmp_path, "grid", f"hydra.sweeper.n_trials={n_trials}") as sweep:
        r = results(tmp_path)
    # differs: range(-1.0, 1.0, step=1) is -1.0 and 0.0 (Hydra's range), so the grid holds 8, not 12
    assert len(sweep.returns[0]) == min(n_trials, 8)
    assert r.best_params.x in (-1, 1) and r.best_params.y in (-1, 0) and r.best_params.z in ("foo", "bar")
    if n_trials >= 8:
        assert r.best_value == 1 and abs(r.best_params.x) == 1 and r.best_params.y == 0


def _dominates(a: list[float], b: list[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


@pytest.mark.parametrize("with_commandline", [True, False])
def test_optuna_multi_objective_example(app, tmp_path, with_commandline):
    extra = ["x=range(0, 5)", "y=range(0, 3)"] if with_commandline else []
    with app(tmp_path, "multi_objective", "hydra.sweeper.n_trials=6", "hydra/sweeper/sampler=random",
             "hydra.sweeper.sampler.seed=123", *extra):
        front = results(tmp_path).solutions
        trials = study(tmp_path, "multi-objective").trials
    assert front and all(len(s["values"]) == 2 for s in front)
    steps = {0} if with_commandline else {0, 0.5}
    for a in front:
        assert a.params.x % 1 in steps and a.params.y % 1 in steps
        assert not any(_dominates(b["values"], a["values"]) for b in front)
        assert not any(_dominates(t.values, a["values"]) for t in trials)  # the true front of the study


def test_optuna_custom_search_space_example(app, tmp_path):
    with app(tmp_path, "custom_search_space", "hydra.sweeper.n_trials=5", "hydra/sweeper/sampler=random",
             "hydra.sweeper.sampler.seed=123", "max_z_difference_from_x=0.3"):
        r = results(tmp_path)
    assert abs(r.best_params.x - r.best_params.z) <= 0.3
    assert 0 <= r.best_params["+w"] <= 1


@pytest.mark.parametrize("max_failure_rate", [0.5, 1.0])
def test_failure_rate(app, tmp_path, capsys, max_failure_rate):
    # differs: n_jobs=1 (the basic launcher runs one trial at a time), and the sweep stops in one line
    overrides = ["hydra.sweeper.n_trials=4", "hydra/sweeper/sampler=random", "error=true",
                 f"hydra.sweeper.max_failure_rate={max_failure_rate}"]
    if max_failure_rate < 1:
        with pytest.raises(SystemExit) as stop, app(tmp_path, "sphere", *overrides):
            pass
        assert stop.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            "app.py: error: the sweep stopped: 3 trials failed, more than hydra.sweeper.max_failure_rate=0.5 of "
            "n_trials=4; see each failed trial's log")
    else:
        with app(tmp_path, "sphere", *overrides) as sweep:
            assert [r.status.name for r in sweep.returns[0]] == ["FAILED"] * 4
        assert "trial 0 failed: RuntimeError: cfg.error is True" in capsys.readouterr().out
        assert not (tmp_path / "sweep" / "optimization_results.yaml").exists()  # no trial completed


# ---- beyond the published plugin -------------------------------------------------------------------


def test_pruning_through_the_reporting_api_and_numpy_values(app, tmp_path):
    # the grid's seed 1 runs x=0 first, then x=4, whose curve lies above x=0's at every step: with
    # n_startup_trials=1 it is PRUNED at its first report; the task returns a 0-d numpy array
    with app(tmp_path, "sphere", "hydra.sweeper.n_trials=4", "hydra/sweeper/sampler=grid",
             "hydra.sweeper.sampler.seed=1", "x=choice(0, 4)", "y=0", "+steps=3", "+numpy=true",
             "hydra.sweeper.median.n_startup_trials=1"):
        first, second = study(tmp_path, "sphere").trials
    assert (first.params["x"], first.state, first.value) == (0, TrialState.COMPLETE, 0.0)
    assert list(first.intermediate_values) == [0, 1, 2]
    assert (second.params["x"], second.state, list(second.intermediate_values)) == (4, TrialState.PRUNED, [0])


@pytest.mark.parametrize(("value", "n", "expected"), [
    (1.5, 1, [1.5]), (3, 1, [3.0]), ("np.float32(2.5)", 1, [2.5]), ("np.asarray(4.0)", 1, [4.0]),
    ((1, 2), 2, [1.0, 2.0]), ("np.array([1.0, 2.0])", 2, [1.0, 2.0]),
    (float("inf"), 1, None), (float("nan"), 1, None), (None, 1, None), ("1.5", 1, None), (True, 1, None),
    ([1.0], 1, None), ((1, 2), 1, None), (1.0, 2, None), ({"a": 1}, 1, None),
])
def test_return_values_accepted_as_objectives(value, n, expected):
    import numpy as np

    if isinstance(value, str) and value.startswith("np."):
        value = eval(value, {"np": np})
    assert _values(value, n) == expected


def test_mandatory_group_swept_and_unknown_setting_refused_in_one_line(app, tmp_path, capsys):
    with app(tmp_path, "mandatory", "db=choice(mysql, postgresql)") as sweep:
        assert sorted(r.cfg.db.driver for r in sweep.returns[0]) == ["mysql", "postgresql"]
    with pytest.raises(SystemExit) as stop, app(tmp_path / "2", "sphere", "+hydra.sweeper.n_trial=50"):
        pass
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith(
        "app.py: error: hydra.sweeper.n_trial is not a setting of hydra/sweeper=optuna: use ")
    assert "lesson7" not in err[0] and "MLflow" not in err[0]


def test_a_rerun_into_a_finished_study_says_so_in_one_line(app, tmp_path, capsys):
    overrides = ["hydra.sweeper.n_trials=2", "hydra/sweeper/sampler=random"]
    with app(tmp_path, "sphere", *overrides), app(tmp_path, "sphere", *overrides) as again:
        assert again.returns == [[]]  # the first run's folder is removed when it exits
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"app.py: study sphere in sqlite:///{tmp_path}/sweep/optuna.db already has 2 of n_trials=2 "
                       f"trials done: nothing to run (raise hydra.sweeper.n_trials, or start another study with a "
                       f"new hydra.sweep.dir or hydra.sweeper.study_name)")


def test_deliberate_differences():
    launcher = OmegaConf.create({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"})
    full = OmegaConf.structured(OptunaSweeperConf)
    settings = OmegaConf.masked_copy(full, [k for k in full if k != "defaults"])  # as Hydra composes it
    space = search_space.parse(None, ["x=choice(1,2)"])[0]
    with pytest.raises(SweeperError, match="n_jobs=3 needs jobs in other processes"):  # published default: 2
        check_settings(OmegaConf.merge(settings, {"n_jobs": 3}), launcher, space)
    with pytest.raises(SweeperError, match="needs a search space"):  # published: runs n_trials of nothing
        check_settings(settings, launcher, {})
    assert settings.max_failure_rate == 0.25 and settings.n_jobs == 1  # published: 0.0 and 2


def test_sampler_shorthand_and_group_build_the_same_sampler():
    space = search_space.parse(None, ["x=choice(1,2)"])[0]
    flat = OptunaSweeper(**OmegaConf.merge(OmegaConf.structured(OptunaSweeperConf), {"sampler": "qmc", "seed": 3}))
    group = OptunaSweeper(**OmegaConf.merge(OmegaConf.structured(OptunaSweeperConf),
                                            {"sampler": OmegaConf.structured(SAMPLER_CONFS["qmc"]), "seed": 3}))
    for sweeper in (flat, group):
        sampler = sweeper._sampler(space)
        assert isinstance(sampler, optuna.samplers.QMCSampler) and sampler._seed == 3
    bad = OptunaSweeper(**OmegaConf.merge(OmegaConf.structured(OptunaSweeperConf),
                                          {"sampler": {"_target_": "optuna.samplers.TPESampler", "n_startup": 1}}))
    with pytest.raises(SweeperError, match=r"^hydra.sweeper.sampler \(optuna.samplers.TPESampler\): .*n_startup"):
        bad._sampler(space)
