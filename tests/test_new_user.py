"""What a new user hits first: Hydra's one-command rule, each console script's own --help, a rerun's
lines printed once, and an experiment the MLflow UI opens as model training."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from lesson7_sweeps.tracking import EXPERIMENT_TAGS
from lesson7_sweeps.train import lr_find_cli, train

from .conftest import run_cli


@pytest.mark.parametrize("flags", [["-m", "data.bptt=8,16", "--cfg", "hydra"], ["--cfg", "job", "--info"]])
def test_two_hydra_commands_are_one_line_and_exit_2(flags, monkeypatch, capsys, tmp_path: Path):
    code, err, _ = run_cli(monkeypatch, capsys, tmp_path, flags)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("lesson7-train: error: ") and "cannot be combined" in err[0]
    assert not (tmp_path / "outputs").exists()  # refused before Hydra made anything


def test_a_sweep_with_cfg_says_how_to_see_a_trial(monkeypatch, capsys, tmp_path: Path):
    _, err, _ = run_cli(monkeypatch, capsys, tmp_path, ["-m", "data.bptt=8,16", "--cfg", "job"])
    assert "drop -m" in err[0] and "--cfg job" in err[0]


def test_lr_find_help_is_its_own(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lesson7-lr-find", "--help"])
    lr_find_cli()
    out = capsys.readouterr().out
    assert out.startswith("usage: lesson7-lr-find ") and "trainer.lr_finder.start_lr" in out
    assert "usage: lesson7-train" not in out


@pytest.mark.slow
def test_a_rerun_prints_each_line_once_and_the_experiment_is_model_training(make_cfg, tmp_path: Path, one_thread):
    # log_model=true: mlflow.pytorch gives the root logger a handler of its own in a fresh process
    train(make_cfg("trainer.max_steps=4", "trainer.epochs=1", "tracking.log_model=true"))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("test")
    assert {k: exp.tags[k] for k in EXPERIMENT_TAGS} == EXPERIMENT_TAGS
    (run,) = client.search_runs([exp.experiment_id])
    proc = subprocess.run([sys.executable, "-m", "lesson7_sweeps.rerun", run.info.run_id, "--tracking-uri", uri,
                           "trainer.threads=1"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    ended = [line for line in proc.stderr.splitlines() if line.endswith("ended FINISHED")]
    assert len(ended) == 1 and ended[0].startswith("lesson7-rerun: MLflow run "), proc.stderr
