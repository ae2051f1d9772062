"""The Optuna extras of a sweep's summary: importances (plot + tables) and the optimisation history."""

from __future__ import annotations

import csv
from pathlib import Path

import optuna
from optuna.distributions import FloatDistribution, IntDistribution
from PIL import Image

from lesson7_sweeps.sweeps.optuna_report import write_report


def test_report_writes_importances_and_history(tmp_path: Path):
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.RandomSampler(seed=0))
    space = {"lr": FloatDistribution(1e-4, 1e-1, log=True), "n_hidden": IntDistribution(32, 256)}
    for i in range(20):  # the objective follows lr only: it must come out as the most important
        trial = study.ask(space)
        study.tell(trial, (trial.params["lr"] - 0.01) ** 2 + 1e-9 * i)
    pruned = study.ask(space)
    pruned.report(5.0, step=1)
    study.tell(pruned, state=optuna.trial.TrialState.PRUNED)

    paths = write_report(study, tmp_path / "optuna")
    assert {p.name for p in paths} == {"history.png", "importances.png", "importances.csv", "importances.md"}
    for png in ("history.png", "importances.png"):
        assert Image.open(tmp_path / "optuna" / png).size[0] > 100
    with open(tmp_path / "optuna" / "importances.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["param", "importance"] and rows[1][0] == "lr" and {r[0] for r in rows[1:]} == {"lr", "n_hidden"}
    assert "| lr |" in (tmp_path / "optuna" / "importances.md").read_text()


def test_report_with_one_finished_trial_has_no_importances(tmp_path: Path):
    study = optuna.create_study()
    study.tell(study.ask({"lr": FloatDistribution(0.1, 1.0)}), 1.0)
    assert [p.name for p in write_report(study, tmp_path)] == ["history.png"]
