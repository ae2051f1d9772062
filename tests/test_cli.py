"""The console entry in a subprocess: a real `-m` multirun and Ctrl-C, against a real sqlite store."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from .conftest import tiny_overrides

pytestmark = pytest.mark.slow


def runs(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("test")
    return [] if exp is None else client.search_runs([exp.experiment_id])


def test_multirun_logs_every_job_and_a_failed_trial_does_not_stop_the_sweep(tmp_path: Path, text_file: Path):
    cmd = [sys.executable, "-m", "lesson7_sweeps.train", "-m", *tiny_overrides(tmp_path, text_file),
           "trainer.epochs=1", "optim=sgd", "optim.momentum=0", "data.bptt=6,8", "optim.lr=0.5,1e20",
           f"hydra.sweep.dir={tmp_path}/multirun"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = runs(tmp_path)
    assert len(found) == 4
    by_name = {}
    for r in found:
        by_name.setdefault(r.info.run_name, []).append(r)
    assert set(by_name) == {"lstm-h32-bptt6", "lstm-h32-bptt8"}
    statuses = sorted((r.data.params["data.bptt"], r.data.params["optim.lr"], r.info.status) for r in found)
    assert statuses == [("6", "0.5", "FINISHED"), ("6", "1e+20", "FAILED"),
                        ("8", "0.5", "FINISHED"), ("8", "1e+20", "FAILED")]
    assert "trial failed, objective +inf" in proc.stdout + proc.stderr
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    some = found[0]
    assert ".hydra" in {a.path for a in client.list_artifacts(some.info.run_id)}
    assert "data.bptt=" in some.data.tags["hydra_overrides"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_and_marks_the_run_killed(tmp_path: Path, text_file: Path, signum: int):
    cmd = [sys.executable, "-m", "lesson7_sweeps.train", *tiny_overrides(tmp_path, text_file),
           "trainer.epochs=1000", "trainer.log_every=1", f"hydra.run.dir={tmp_path}/run"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the run is really training (it has logged a loss)
        found = runs(tmp_path) if (tmp_path / "mlflow.db").exists() else []
        if found and client.get_metric_history(found[0].info.run_id, "train_loss"):
            break
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.5)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err[-2000:]
    assert err.strip().splitlines()[-1] == (
        f"lesson7-train: interrupted by {name}; the run was marked KILLED; its checkpoint was saved")
    (run,) = runs(tmp_path)
    assert run.info.status == "KILLED"
    assert run.data.tags["failure_reason"] == f"interrupted ({name})"
    assert "checkpoints/last.pt" in {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
