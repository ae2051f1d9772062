"""hydra/sweeper=optuna: the search-space syntax, and real subprocess sweeps (pruning, a NaN trial,
no batch barrier, resume after a kill, a changed search space refused) against real sqlite stores."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from hydra_plugins.lesson7_optuna_sweeper import SweeperError, search_space
from hydra_plugins.lesson7_optuna_sweeper.optuna_sweeper import OptunaSweeper
from lesson7_sweeps.errors import ConfigError
from lesson7_sweeps.sweeps.optuna_study import OptunaSweeperConf, build_pruner, direction, storage_url
from lesson7_sweeps.sweeps.optuna_trial import CONTINUE_RUN, RUN_ID

from .conftest import make_text, run_cli, tiny_overrides

# ---- search space -------------------------------------------------------------------------------


def test_search_space_reads_the_published_plugin_syntax():
    space, fixed = search_space.parse(
        {"data.bptt": "choice(8, 16)", "model.n_hidden": "range(64, 257, step=64)", "optim.lr": "interval(0.1, 1.0)",
         "optim.weight_decay": "tag(log, interval(1e-5, 1e-2))", "model.n_layers": "int(interval(1, 3))",
         "model.layers": "choice([16,32],[32,64])", "trainer.epochs": "3"},
        ["data.bptt=4,8,12", "seed=7"])
    assert space == {
        "data.bptt": CategoricalDistribution([4, 8, 12]),  # the command line wins over params
        "model.n_hidden": IntDistribution(64, 256, step=64),  # Hydra's range: the stop is excluded
        "optim.lr": FloatDistribution(0.1, 1.0),
        "optim.weight_decay": FloatDistribution(1e-5, 1e-2, log=True),
        "model.n_layers": IntDistribution(1, 3),
        "model.layers": CategoricalDistribution(["[16,32]", "[32,64]"]),  # encoded: back into an override as is
    }
    assert fixed == ["trainer.epochs=3", "seed=7"]
    assert search_space.to_override("model.layers", "[16,32]") == "model.layers=[16,32]"


def test_config_hash_follows_the_space_and_the_fixed_overrides_not_their_order():
    space, fixed = search_space.parse({"a": "choice(1,2)", "b": "interval(0,1)"}, ["c=3", "d=4"])
    same = search_space.parse({"b": "interval(0,1)", "a": "choice(1,2)"}, ["d=4", "c=3"])
    assert search_space.config_hash(space, fixed) == search_space.config_hash(*same)
    for other in (search_space.parse({"a": "choice(1,3)", "b": "interval(0,1)"}, ["c=3", "d=4"]),
                  search_space.parse({"a": "choice(1,2)", "b": "interval(0,1)"}, ["c=3", "d=5"])):
        assert search_space.config_hash(*other) != search_space.config_hash(space, fixed)


@pytest.mark.parametrize(("params", "message"), [
    ({"a": "interval(2, 1)"}, "low < high"),
    ({"a": "tag(log, interval(0, 1))"}, "low > 0"),
    ({"a": "range(5, 1)"}, "range is empty"),
    ({"a": "choice(1, 1)"}, "twice"),
])
def test_bad_search_spaces_are_one_line_errors(params, message):
    with pytest.raises(SweeperError, match=message):
        search_space.parse(params, [])


def test_grid_needs_finite_values():
    space, _ = search_space.parse({"a": "choice(1,2)", "b": "range(0, 1, step=0.5)", "c": "range(1,4)"}, [])
    assert search_space.grid(space) == {"a": [1, 2], "b": [0.0, 0.5], "c": [1, 2, 3]}
    with pytest.raises(SweeperError, match="sampler=grid needs a finite set of values for lr"):
        search_space.grid(search_space.parse({"lr": "interval(0.1, 1)"}, [])[0])


def settings(**changes: object):
    return OmegaConf.merge(OmegaConf.structured(OptunaSweeperConf), changes)


def test_every_sampler_pruner_and_direction_builds_and_a_wrong_name_is_one_line():
    space, _ = search_space.parse({"a": "choice(1,2)"}, [])
    kinds = {"tpe": "TPESampler", "random": "RandomSampler", "grid": "GridSampler", "gp": "GPSampler"}
    for name, cls in kinds.items():
        assert isinstance(OptunaSweeper(**settings(sampler=name))._sampler(space), getattr(optuna.samplers, cls))
    pruners = {"median": "MedianPruner", "hyperband": "HyperbandPruner", "none": "NopPruner"}
    for name, cls in pruners.items():
        assert type(build_pruner(settings(pruner=name))).__name__ == cls
    assert direction(settings(), "val_bpc") == "minimize" and direction(settings(), "val_accuracy") == "maximize"
    assert direction(settings(direction="maximize"), "val_loss") == "maximize"
    for bad, match in ((lambda: OptunaSweeper(**settings(sampler="bogus"))._sampler(space), "sampler=bogus"),
                       (lambda: build_pruner(settings(pruner="asha")), "pruner=asha"),
                       (lambda: direction(settings(direction="up"), "val_loss"), "direction=up"),
                       (lambda: storage_url(settings(storage="sqlite:///x.db"), "/tmp"), "needs hydra.sweeper.study")):
        with pytest.raises((ConfigError, SweeperError), match=match):
            bad()
    assert storage_url(settings(), "multirun") == f"sqlite:///{Path('multirun').resolve()}/optuna.db"


# ---- real sweeps ---------------------------------------------------------------------------------


def sweep_cmd(tmp_path: Path, *extra: str) -> list[str]:
    """A sequential Optuna sweep of tiny CPU trials (about 19 steps per epoch), writing into tmp_path."""
    text = tmp_path / "tiny.txt"
    text.write_text(make_text(1500), encoding="utf-8")
    # the console script, not `python -m`: joblib would pickle a task function of __main__ by value
    return [str(Path(sys.executable).with_name("lesson7-train")), "-m", *tiny_overrides(tmp_path, text),
            "data.random_bptt=false", "trainer.sample.chars=0", "trainer.checkpoints=false", "hydra/sweeper=optuna",
            f"hydra.sweep.dir={tmp_path}/multirun", *extra]


def grid_sweep(tmp_path: Path, space: str, seed: int, n_trials: int, *extra: str) -> list[str]:
    """A grid over `space` in the order that `seed` gives (tests pick one that sets up their case)."""
    return sweep_cmd(tmp_path, space, "hydra/sweeper/sampler=grid", f"hydra.sweeper.sampler.seed={seed}",
                     f"hydra.sweeper.n_trials={n_trials}", *extra)


def run(cmd: list[str], tmp_path: Path, code: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == code, proc.stderr[-3000:]
    return proc


def mlflow_runs(tmp_path: Path, trials: list[optuna.trial.FrozenTrial]) -> tuple[MlflowClient, dict[int, object]]:
    """Every run of the test experiment, by the number of the trial that recorded it (its `trial`
    tag; a job killed before it started a run has none)."""
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    by_trial = {int(r.data.tags["trial"]): r for r in runs if "trial" in r.data.tags}
    (parent,) = [r for r in runs if "trial" not in r.data.tags]  # no run but the trials' and the sweep's parent
    assert parent.data.tags["run_type"] == "sweep" and set(by_trial) <= {t.number for t in trials}
    assert {r.data.tags["mlflow.parentRunId"] for r in by_trial.values()} == {parent.info.run_id}
    for t in trials:  # a trial records its job's run (a job killed early may not have yet)
        assert not t.user_attrs.get(RUN_ID) or t.user_attrs[RUN_ID] == by_trial[t.number].info.run_id
    return client, by_trial


def study(url: str, name: str = "optuna") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)


def metric(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.mark.slow
def test_median_pruner_prunes_a_trial_in_another_process_and_a_nan_trial_fails_without_stopping_the_sweep(
        tmp_path: Path):
    # seed 1 makes the grid run lr 0.5 (learns), 1e20 (NaN), then 1e-4 (learns nothing: pruned at epoch 1);
    # each trial is a submitit job (a process of its own) that reports to the study through its storage
    run(grid_sweep(tmp_path, "optim.lr=choice(0.5,0.0001,1e20)", 1, 3, "optim=sgd", "optim.momentum=0",
                   "hydra.sweeper.median.n_startup_trials=1", "hydra.sweeper.max_failure_rate=0.5",
                   "hydra/launcher=submitit_local"), tmp_path)
    found = study(f"sqlite:///{tmp_path}/multirun/optuna.db").trials
    client, runs = mlflow_runs(tmp_path, found)
    trials = {t.params["optim.lr"]: t for t in found}
    assert {lr: t.state for lr, t in trials.items()} == {
        0.5: TrialState.COMPLETE, 1e20: TrialState.FAIL, 0.0001: TrialState.PRUNED}
    for t in found:
        r = runs[t.number]
        if t.state == TrialState.FAIL:
            assert r.info.status == "FAILED"
            continue
        assert r.info.status == "FINISHED"
        # what Optuna saw is what MLflow holds, at the same steps
        assert t.intermediate_values == metric(client, r.info.run_id, "val_loss")
        assert r.data.tags.get("trial_state") == ("PRUNED" if t.state == TrialState.PRUNED else None)
        assert r.info.run_name.endswith(" ✂") == (t.state == TrialState.PRUNED)  # the runs table shows it
    pruned = trials[0.0001]
    assert len(pruned.intermediate_values) == 1  # stopped after its first evaluation of two
    assert trials[0.5].value == runs[trials[0.5].number].data.metrics["val_loss"]
    jobs = [p for p in (tmp_path / "multirun" / ".submitit").iterdir() if p.name.isdigit()]
    assert len(jobs) == 3  # one submitit job (a process: its pid) per trial


@pytest.mark.slow
def test_no_batch_barrier_a_free_slot_takes_the_next_trial_at_once(tmp_path: Path):
    # seed 1 asks for the 20-epoch trial among the first two; two at once on the joblib launcher
    run(grid_sweep(tmp_path, "trainer.epochs=choice(20,1,2)", 1, 3, "hydra.sweeper.n_jobs=2",
                   "hydra.sweeper.pruner=none", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"), tmp_path)
    trials = study(f"sqlite:///{tmp_path}/multirun/optuna.db").trials
    assert all(t.state == TrialState.COMPLETE for t in trials) and len(trials) == 3
    long = next(t for t in trials[:2] if t.params["trainer.epochs"] == 20)
    assert trials[2].datetime_start < long.datetime_complete  # a barrier would hold it until the long one ended
    assert sorted(p.name for p in (tmp_path / "multirun").iterdir() if p.name.isdigit()) == ["0", "1", "2"]


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_repeating_trials_and_a_changed_space_is_refused(monkeypatch, capsys,
                                                                                        tmp_path: Path):
    url = f"sqlite:///{tmp_path}/study.db"
    cmd = grid_sweep(tmp_path, "optim.lr=choice(0.01,0.02,0.03)", 0, 3, "trainer.epochs=3",
                     f"hydra.sweeper.storage={url}", "hydra.sweeper.study_name=resume")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    wait_for_training(tmp_path, proc, 1)
    proc.send_signal(signal.SIGKILL)  # the sweeper and its in-process trial die while trial 1 trains
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]

    run(cmd, tmp_path)
    trials = study(url, "resume").trials
    states = [t.state for t in trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert sorted(t.params["optim.lr"] for t in trials if t.state == TrialState.COMPLETE) == [0.01, 0.02, 0.03]
    assert trials[2].params == trials[1].params or trials[3].params == trials[1].params  # the killed one, retried
    client, runs = mlflow_runs(tmp_path, trials)  # the resumed sweep reused the killed one's parent run
    assert {k: r.info.status for k, r in runs.items()} == {0: "FINISHED", 1: "FAILED", 2: "FINISHED", 3: "FINISHED"}
    parent = client.get_run(runs[0].data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_trials"] == 4
    assert sorted(p.name for p in (tmp_path / "multirun").iterdir() if p.name.isdigit()) == ["0", "1", "2", "3"]

    # the sweeps that do not need killing run the console entry in this process
    changed = [a.replace("choice(0.01,0.02,0.03)", "choice(0.01,0.05)") for a in cmd[1:]]
    code, err, _ = run_cli(monkeypatch, capsys, tmp_path, changed)
    assert code == 2 and len(err) == 1, err
    assert "study resume in" in err[0] and "another search space" in err[0]
    assert len(study(url, "resume").trials) == 4  # nothing ran, nothing lost
    code, err, _ = run_cli(monkeypatch, capsys, tmp_path, [*changed, "hydra.sweeper.new_study=true",
                                                           "hydra.sweeper.n_trials=1"])  # asked for: replaced
    assert code == 0, err[-20:]
    assert [t.params["optim.lr"] in (0.01, 0.05) for t in study(url, "resume").trials] == [True]


def wait_for_training(tmp_path: Path, proc: subprocess.Popen, job: int) -> None:
    """Until job `job` of the sweep has finished an epoch (its log says so; the study's storage is
    not touched, as a reader could race the sweeper creating it)."""
    log = tmp_path / "multirun" / str(job) / "train.log"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        if log.exists() and "epoch 1 step" in log.read_text():
            return
    raise AssertionError(f"job {job} never finished an epoch: {proc.stderr.read()[-2000:]}")


@pytest.mark.slow
def test_a_ctrl_c_d_trial_continues_its_run_when_the_command_is_run_again(tmp_path: Path):
    url = f"sqlite:///{tmp_path}/study.db"
    cmd = grid_sweep(tmp_path, "optim.lr=choice(0.01,0.02)", 0, 1, "trainer.epochs=15",
                     f"hydra.sweeper.storage={url}", "hydra.sweeper.study_name=stopped")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    wait_for_training(tmp_path, proc, 0)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, proc.stderr.read()[-2000:]
    trials = study(url, "stopped").trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]  # stopped: to run again
    _, runs = mlflow_runs(tmp_path, trials)
    killed = runs[0].info.run_id
    assert runs[0].info.status == "KILLED" and trials[1].user_attrs[CONTINUE_RUN] == killed

    run(cmd, tmp_path)  # what the README says to do after a Ctrl-C
    trials = study(url, "stopped").trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]  # n_trials=1: the retry counts
    assert trials[1].params == trials[0].params and trials[1].user_attrs[RUN_ID] == killed
    client, runs = mlflow_runs(tmp_path, trials)  # the stopped trial's run is the retry's now (its trial tag)
    assert list(runs) == [1] and runs[1].info.run_id == killed and runs[1].info.status == "FINISHED"
    assert "from checkpoints/last.pt" in (tmp_path / "multirun" / "1" / "train.log").read_text()
    epochs = client.get_metric_history(killed, "epoch")  # continued from its checkpoint: no epoch twice
    assert [m.value for m in epochs] == list(range(1, 16)) and trials[1].value == runs[1].data.metrics["objective"]
    parent = client.get_run(runs[1].data.tags["mlflow.parentRunId"])
    m = parent.data.metrics  # 1 asked, 1 result: the stopped trial is no failure
    assert parent.info.status == "FINISHED" and (m["n_trials"], m["n_finished"], m["n_killed"]) == (1, 1, 0)


def test_too_many_failed_trials_stop_the_sweep_with_one_line(monkeypatch, capsys, tmp_path: Path):
    cmd = grid_sweep(tmp_path, "optim.lr=choice(1e20,1e21)", 0, 2, "optim=sgd", "optim.momentum=0",
                     "hydra.sweeper.max_failure_rate=0")
    code, err, _ = run_cli(monkeypatch, capsys, tmp_path, cmd[1:])  # the console entry, in this process
    assert code == 2 and err[-1].startswith(
        "lesson7-train: error: the sweep stopped: 1 trials failed, more than hydra.sweeper.max_failure_rate=0")
    assert [t.state for t in study(f"sqlite:///{tmp_path}/multirun/optuna.db").trials] == [TrialState.FAIL]


def test_an_optuna_trial_that_fails_before_training_records_its_failed_run(monkeypatch, capsys, tmp_path: Path):
    cmd = grid_sweep(tmp_path, "model.n_hidden=choice(32,3000000)", 0, 2, "hydra.sweeper.max_failure_rate=0.5")
    code, err, _ = run_cli(monkeypatch, capsys, tmp_path, cmd[1:])
    assert code == 0, err[-5:]
    found = study(f"sqlite:///{tmp_path}/multirun/optuna.db").trials
    _, runs = mlflow_runs(tmp_path, found)  # each trial's run recorded on it, the failed one's too
    (failed,) = [t for t in found if t.state == TrialState.FAIL]
    assert failed.params["model.n_hidden"] == 3000000 and failed.user_attrs[RUN_ID] == runs[failed.number].info.run_id
    assert runs[failed.number].info.status == "FAILED"
    assert runs[failed.number].data.tags["failure_reason"].startswith("the model does not fit")


def test_parallel_trials_in_one_process_and_unknown_settings_are_refused(monkeypatch, capsys, tmp_path: Path):
    cmd = sweep_cmd(tmp_path, "optim.lr=choice(0.1,0.2)", "hydra.sweeper.n_jobs=2")
    code, err, _ = run_cli(monkeypatch, capsys, tmp_path, cmd[1:])
    assert code == 2 and err[-1] == (
        "lesson7-train: error: hydra.sweeper.n_jobs=2 needs jobs in other processes: add hydra/launcher=joblib "
        "(hydra.launcher.n_jobs > 1), submitit_local or submitit_slurm")
    code, err, _ = run_cli(monkeypatch, capsys, tmp_path, [*cmd[1:-1], "+hydra.sweeper.n_trial=50"])
    assert code == 2 and len(err) == 1 and err[0].startswith(  # a typo is not silently ignored
        "lesson7-train: error: hydra.sweeper.n_trial is not a setting of hydra/sweeper=optuna: use ")
