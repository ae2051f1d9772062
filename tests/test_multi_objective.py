"""Several objectives (objective=[val_loss,throughput]): a real Optuna study with two directions, the
Pareto front in the sweep's summary (also of a grid sweep with Hydra's basic sweeper), the one-line
refusals, and the front computed as Optuna computes it."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import optuna
import pytest
from mlflow import MlflowClient
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.study import StudyDirection
from optuna.trial import TrialState, create_trial

from lesson7_sweeps.sweeps.optuna_report import write_report
from lesson7_sweeps.sweeps.optuna_trial import RUN_ID
from lesson7_sweeps.sweeps.summary import pareto_front
from lesson7_sweeps.sweeps.ui import VIEW_TAG_PREFIX

from .conftest import run_cli
from .test_optuna_sweeper import grid_sweep, mlflow_runs, study, sweep_cmd


def summary_rows(client: MlflowClient, parent_id: str, tmp_path: Path) -> list[dict[str, str]]:
    with open(client.download_artifacts(parent_id, "summary.csv", str(tmp_path))) as f:
        return list(csv.DictReader(f))


def test_an_optuna_sweep_of_two_objectives_tells_both_and_its_summary_shows_the_pareto_front(
        monkeypatch, capsys, tmp_path: Path):
    # 4 grid trials of 1 epoch, evaluated mid-epoch too (nothing may be reported to a multi-objective trial);
    # the default pruner (median) is not used, and said so
    cmd = grid_sweep(tmp_path, "model.n_hidden=choice(8,16,32,64)", 0, 4, "objective=[val_loss,throughput]",
                     "trainer.epochs=1", "trainer.eval_every=5")
    code, err, out = run_cli(monkeypatch, capsys, tmp_path, cmd[1:])
    assert code == 0, err[-5:]
    found = study(f"sqlite:///{tmp_path}/multirun/optuna.db")
    assert found.directions == [StudyDirection.MINIMIZE, StudyDirection.MAXIMIZE]  # each objective's own way
    client, runs = mlflow_runs(tmp_path, found.trials)
    assert len(found.trials) == 4
    for t in found.trials:
        metrics = runs[t.number].data.metrics
        assert t.state == TrialState.COMPLETE and t.intermediate_values == {}
        assert t.values == [metrics["val_loss"], metrics["throughput"]]  # the runs' final metrics, in order
        assert "objective" not in metrics  # several objectives keep their own names
    front = {t.user_attrs[RUN_ID] for t in found.best_trials}
    (parent,) = client.search_runs([runs[0].info.experiment_id], "tags.run_type = 'sweep'")
    tags = parent.data.tags
    assert (tags["objective"], tags["direction"]) == ("val_loss,throughput", "minimize,maximize")
    assert set(tags["best_run_id"].split(",")) == front and "best_value" not in tags
    assert {r.info.run_id for r in runs.values() if r.data.tags.get("best") == "true"} == front
    rows = summary_rows(client, parent.info.run_id, tmp_path)
    assert list(rows[0])[3:8] == ["n_hidden", "val_loss", "throughput", "pareto", "status"]
    assert [r["pareto"] for r in rows] == ["✓"] * len(front) + [""] * (4 - len(front))  # the front first
    assert {r["run_id"] for r in rows if r["pareto"]} == front
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pareto_front.png", "summary.html", "objective_vs_params.png", "optuna"} <= artifacts
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "optuna")} >= {"optuna/history.png",
                                                                                      "optuna/importances.csv"}
    assert f"Pareto front: {len(front)} trial{'' if len(front) == 1 else 's'}: " in out
    assert "hydra.sweeper.pruner=median is not used" in out + "\n".join(err)


def test_a_grid_sweep_with_the_basic_sweeper_marks_the_same_front(monkeypatch, capsys, tmp_path: Path):
    cmd = sweep_cmd(tmp_path, "model.n_hidden=8,16,32", "objective=[val_loss,train_time]", "trainer.epochs=1")
    cmd.remove("hydra/sweeper=optuna")
    code, err, out = run_cli(monkeypatch, capsys, tmp_path, cmd[1:])
    assert code == 0, err[-5:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("run_type") == "sweep"]
    trials = [r for r in runs if r is not parent]
    assert len(trials) == 3 and parent.data.tags["direction"] == "minimize,minimize"
    # what Optuna makes of the same values
    same = optuna.create_study(directions=["minimize", "minimize"])
    for r in trials:
        same.add_trial(create_trial(values=[r.data.metrics["val_loss"], r.data.metrics["train_time"]],
                                    user_attrs={"run_id": r.info.run_id}))
    front = {t.user_attrs["run_id"] for t in same.best_trials}
    assert set(parent.data.tags["best_run_id"].split(",")) == front
    rows = summary_rows(client, parent.info.run_id, tmp_path)
    assert {r["run_id"] for r in rows if r["pareto"] == "✓"} == front
    assert "pareto_front.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert f"Pareto front: {len(front)} trial{'' if len(front) == 1 else 's'}: " in out
    # the sweep's saved MLflow view: the objectives' metrics as columns, sorted by the first
    tag = client.get_experiment_by_name("test").tags[f"{VIEW_TAG_PREFIX}{parent.data.tags['sweep_id']}"]
    view = json.loads(json.loads(tag)["state"])
    assert view["orderByKey"] == "metrics.`val_loss`" and view["orderByAsc"]
    assert view["selectedColumns"][:2] == ["metrics.`val_loss`", "metrics.`train_time`"]


TWO = "objective=[val_loss,train_time]"


@pytest.mark.parametrize("overrides, message", [
    ([TWO, "hydra.sweeper.direction=minimize"], "hydra.sweeper.direction=minimize gives 1 direction(s) for the 2 "
     "objectives [val_loss,train_time]: give one each, e.g. [minimize,minimize], or leave it unset"),
    ([TWO, "hydra.sweeper.direction=[minimize,maximize,minimize]"], "gives 3 direction(s) for the 2 objectives"),
    (["objective=[val_loss,val_loss]"], "objective='[val_loss,val_loss]' is invalid: name each objective once"),
    (["objective=[val_loss,speed]"], "objective='[val_loss,speed]' is invalid: speed is not an objective; use one of"),
    (["objective=[val_loss]"], "objective='[val_loss]' is invalid: a list names two or more objectives (a Pareto "
     "front); for one, write objective=val_loss"),
    (["objective=[]"], "objective='[]' is invalid: a list names two or more objectives"),
    (["objective=[val_loss,val_accuracy_tta]"], "objective='val_accuracy_tta' is invalid: text data reports only "
     "val_loss, val_bpc, val_accuracy, train_time, throughput"),
])
def test_bad_objectives_and_directions_are_one_line_before_any_run(monkeypatch, capsys, tmp_path: Path, overrides,
                                                                   message):
    cmd = sweep_cmd(tmp_path, "model.n_hidden=choice(8,16)", *overrides)
    code, err, _ = run_cli(monkeypatch, capsys, tmp_path, cmd[1:])
    assert code == 2 and len(err) == 1 and message in err[0], err
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_the_pareto_front_is_optunas_with_ties_and_failed_trials():
    rng = np.random.default_rng(0)
    directions = ["minimize", "maximize"]
    for _ in range(20):
        values = rng.integers(0, 4, size=(12, 2)).astype(float)  # few levels: ties and equal rows are common
        values[rng.random(12) < 0.2] = math.nan  # failed trials: no values
        values[rng.random(12) < 0.1, 1] = math.inf  # a value a store would not keep
        found = optuna.create_study(directions=directions)
        for v in values:
            ok = np.isfinite(v).all()
            found.add_trial(create_trial(values=list(v) if ok else None,
                                         state=TrialState.COMPLETE if ok else TrialState.FAIL))
        expected = {t.number for t in found.best_trials}
        assert set(np.flatnonzero(pareto_front(values, directions))) == expected
    assert list(pareto_front(np.array([[1.0, 2.0], [1.0, 2.0], [1.0, 3.0]]), ["minimize", "minimize"])) == [
        True, True, False]  # equal rows are on the front together; a tie in one objective decides by the other


def test_the_optuna_report_of_two_objectives_has_a_panel_and_an_importance_column_each(tmp_path: Path):
    found = optuna.create_study(directions=["minimize", "maximize"], sampler=optuna.samplers.RandomSampler(seed=0))
    space = {"lr": FloatDistribution(1e-4, 1e-1, log=True), "n_hidden": IntDistribution(32, 256)}
    for _ in range(12):
        trial = found.ask(space)
        found.tell(trial, [trial.params["lr"], trial.params["n_hidden"]])  # each follows one param
    paths = write_report(found, tmp_path, ["val_loss", "throughput"])
    assert {p.name for p in paths} == {"history.png", "importances.png", "importances.csv", "importances.md"}
    with open(tmp_path / "importances.csv") as f:
        rows = {r["param"]: r for r in csv.DictReader(f)}
    assert float(rows["lr"]["val_loss"]) > float(rows["n_hidden"]["val_loss"])
    assert float(rows["n_hidden"]["throughput"]) > float(rows["lr"]["throughput"])
    assert (tmp_path / "importances.md").read_text().startswith("| param | val_loss | throughput |\n|---|---|---|\n")


def test_a_run_returns_each_objective_and_its_train_time_goes_on_over_a_resume(make_cfg, one_thread):
    from lesson7_sweeps import resume
    from lesson7_sweeps.train import train_run

    first = train_run(make_cfg("objective=[val_loss,train_time]", "trainer.sample.chars=0"))
    client = MlflowClient(make_cfg().tracking.uri)
    run = client.get_run(first.run_id)
    assert first.objective == [run.data.metrics["val_loss"], run.data.metrics["train_time"]]
    cfg = make_cfg(f"resume={first.run_id}", "trainer.epochs=3")
    plan = resume.plan(cfg, ["trainer.epochs=3"])
    extended = train_run(plan.cfg, resume=cfg.resume, checkpoint=plan.checkpoint)
    times = [m.value for m in sorted(client.get_metric_history(first.run_id, "train_time"), key=lambda m: m.step)]
    assert len(times) == 3 and times[0] < times[1] < times[2]  # the third epoch adds to the first two's
    assert extended.objective[1] == times[2]
