"""The console entry in a subprocess: a real `-m` multirun and Ctrl-C, against a real sqlite store."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from .conftest import make_text, run_cli, tiny_overrides

pytestmark = pytest.mark.slow


def runs(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("test")
    return [] if exp is None else client.search_runs([exp.experiment_id])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR2])  # USR2: submitit's time limit
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


def test_killed_runs_resume_to_the_metrics_of_an_uninterrupted_run(monkeypatch, capsys, tmp_path: Path):
    """Two CPU runs are stopped during their second epoch, one by SIGKILL (it resumes from the last
    epoch-end checkpoint and replays the lost steps), one by SIGTERM (it saves a mid-epoch
    checkpoint: loader position, hidden state, RNGs). Both resume with resume=RUN_ID in the same
    MLflow run and end with the same metrics, at the same steps, as a run never interrupted. Only the
    runs that are killed need a process of their own; the others run the same entry in this one.
    With the lesson's text rules, whose state is all in a checkpoint too: the hidden state never
    reset (carried across the epoch end the SIGKILL run resumes from) and validation sections drawn
    from the training loader's stream."""
    text = tmp_path / "long.txt"
    text.write_text(make_text(20000), encoding="utf-8")
    # a new phase with a fresh optimizer starts at epoch 2: the SIGKILL run resumes from that boundary
    phases = ("[{kind: constant, epochs: 1, lr_mult: 1.0, reset_optimizer: false}, {kind: sgdr, epochs: null,"
              " lr_mult: 1.0, reset_optimizer: true, cycle_len: 1, cycle_mult: 2, warmup_frac: 0.05, warmup: phase}]")
    args = [*tiny_overrides(tmp_path, text), "trainer.epochs=3", "trainer.log_every=5", "schedule=sgdr",
            f"schedule.phases={phases}", "trainer.deterministic=true", "model.dropout=0.0",
            "model.reset_hidden=false", "data.loader=lesson", "data.vocab=lesson", "data.val_average=batches"]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")

    def launch(*extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "lesson7_sweeps.train", *args, *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)

    def finish(*extra: str) -> None:
        code, err, _ = run_cli(monkeypatch, capsys, tmp_path, [*args, *extra])
        assert code == 0, err[-20:]

    def run_named(name: str):
        return next(r for r in runs(tmp_path) if r.info.run_name == name)

    finish("tracking.run_name=straight", f"hydra.run.dir={tmp_path}/straight")
    for signum in (signal.SIGKILL, signal.SIGTERM):
        name = signal.Signals(signum).name
        proc = launch(f"tracking.run_name={name}", f"hydra.run.dir={tmp_path}/{name}")
        deadline = time.time() + 180
        while time.time() < deadline:  # stop it once the second epoch is well under way
            found = [r for r in runs(tmp_path) if r.info.run_name == name]
            epochs = client.get_metric_history(found[0].info.run_id, "epoch") if found else []
            losses = client.get_metric_history(found[0].info.run_id, "train_loss") if epochs else []
            # ... and every log point of the first epoch is stored: MLflow's async queue writes from a
            # thread pool, and a SIGKILL resumes from the epoch end, so nothing would log a lost one again
            logged = {m.step for m in losses}
            if epochs and max(logged) > epochs[0].step + 10 and logged >= set(range(5, epochs[0].step + 1, 5)):
                break
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            time.sleep(0.1)
        proc.send_signal(signum)
        proc.communicate(timeout=60)
        stopped = run_named(name)
        assert stopped.info.status == ("RUNNING" if signum == signal.SIGKILL else "KILLED")
        gone = ["force_resume=true"] if signum == signal.SIGKILL else []  # its heartbeat is fresh, its process gone
        finish(f"resume={stopped.info.run_id}", *gone, f"hydra.run.dir={tmp_path}/{name}-resumed")

    assert sorted(r.info.run_name for r in runs(tmp_path)) == ["SIGKILL", "SIGTERM", "straight"]
    straight = run_named("straight")
    for name in ("SIGKILL", "SIGTERM"):
        resumed = run_named(name)
        assert resumed.info.status == "FINISHED"
        for key in ("train_loss", "lr", "val_loss", "val_accuracy", "val_bpc", "epoch"):
            got = sorted((m.step, m.value) for m in client.get_metric_history(resumed.info.run_id, key))
            want = sorted((m.step, m.value) for m in client.get_metric_history(straight.info.run_id, key))
            # same steps, same values, no duplicates (a short message: CI prints a full diff of lists)
            assert got == want, (name, key, "missing", sorted(set(want) - set(got))[:5], "extra",
                                 sorted(set(got) - set(want))[:5], len(got), len(want))
