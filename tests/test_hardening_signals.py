"""Issue 15, class 4: no run or parent left RUNNING, by any signal at any moment: while a sweep is
being summarised and ended, SIGHUP (a closed terminal) like SIGTERM, a full disk in a sweep, a sample
that cannot be drawn. Real signals to this process, sent at the planned moment; a real sqlite store."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from lesson7_sweeps import runner
from lesson7_sweeps.sweeps import summary

from .conftest import make_text, run_cli, tiny_overrides
from .test_hardening_runs import HERE, SignalAt

PREFIX = "lesson7-train: error: "


class Died(BaseException):
    """What SIGTERM or SIGHUP does to a process nobody handles them in (here: without killing pytest)."""


@pytest.fixture(autouse=True)
def fatal_signals():
    def die(signum, frame):
        raise Died(signum)

    previous = {s: signal.signal(s, die) for s in (signal.SIGTERM, signal.SIGHUP)}
    yield
    for s, h in previous.items():
        signal.signal(s, h)


def runs(tmp_path: Path, uri: str | None = None) -> list:
    client = MlflowClient(uri or f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("test")
    return client.search_runs([exp.experiment_id]) if exp else []


def small(tmp_path: Path, text: Path) -> list[str]:
    return [*tiny_overrides(tmp_path, text), "trainer.epochs=1", "trainer.max_steps=2", "trainer.sample.chars=0"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_while_the_sweep_is_summarised_leaves_nothing_running(monkeypatch, capsys, tmp_path: Path,
                                                                      text_file: Path, signum: int):
    write = summary.write_summary

    def signalled(parent):  # the moment: the trials are done, the summary is being written
        os.kill(os.getpid(), signum)
        time.sleep(0.05)
        return write(parent)

    monkeypatch.setattr(summary, "write_summary", signalled)
    code, err, _ = run_cli(monkeypatch, capsys, tmp_path,
                           ["-m", *small(tmp_path, text_file), "seed=1", f"hydra.sweep.dir={tmp_path}/sweep"])
    name = signal.Signals(signum).name
    assert code == 128 + signum, err[-5:]
    (parent,) = [r for r in runs(tmp_path) if r.data.tags.get("run_type") == "sweep"]
    assert err[-1] == (f"lesson7-train: interrupted by {name}; the sweep {parent.data.tags['sweep_id']} had ended "
                       f"FINISHED, its summary written")
    assert {r.info.status for r in runs(tmp_path)} == {"FINISHED"}
    artifacts = {a.path for a in MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").list_artifacts(parent.info.run_id)}
    assert {"summary.csv", "summary.html"} <= artifacts and "best_run_id" in parent.data.tags


def test_sighup_stops_a_run_like_sigterm(monkeypatch, capsys, tmp_path: Path, text_file: Path):
    monkeypatch.setattr(SignalAt, "plan", [("metrics", lambda m: "train_loss" in m, signal.SIGHUP)])
    argv = [*tiny_overrides(tmp_path, text_file), f"tracking._target_={HERE}", f"hydra.run.dir={tmp_path}/run"]
    code, err, _ = run_cli(monkeypatch, capsys, tmp_path, argv)
    assert code == 129, err[-5:]
    assert err[-1] == "lesson7-train: interrupted by SIGHUP; the run was marked KILLED; its checkpoint was saved"
    (run,) = runs(tmp_path)
    assert run.info.status == "KILLED" and run.data.tags["failure_reason"] == "interrupted (SIGHUP)"


@pytest.mark.parametrize(("setting", "message"), [
    ("trainer.sample.prompt=''", "trainer.sample.prompt='' is invalid: a sample continues a prompt"),
    ("trainer.sample.temperature=5e-324", "trainer.sample.temperature=5e-324 is invalid: use 0 (greedy) or a "
                                          "temperature >= 0.001"),
])
def test_bad_sample_settings_are_refused_before_training(monkeypatch, capsys, tmp_path: Path, text_file: Path,
                                                         setting: str, message: str):
    argv = [*tiny_overrides(tmp_path, text_file, fresh_store=True), setting, f"hydra.run.dir={tmp_path}/run"]
    code, err, _ = run_cli(monkeypatch, capsys, tmp_path, argv)
    assert code == 2 and len(err) == 1 and err[0].startswith(PREFIX + message), err
    assert not (tmp_path / "mlflow.db").exists()


def test_a_sample_that_fails_after_training_is_a_warning(monkeypatch, capsys, tmp_path: Path, text_file: Path):
    def broken(*args, **kwargs):
        raise RuntimeError("invalid multinomial distribution (sum of probabilities <= 0)")

    monkeypatch.setattr(runner, "generate", broken)
    argv = [*tiny_overrides(tmp_path, text_file), "trainer.epochs=1", "trainer.max_steps=2",
            f"hydra.run.dir={tmp_path}/run"]
    code, err, out = run_cli(monkeypatch, capsys, tmp_path, argv)
    assert code == 0, err[-5:]
    (run,) = runs(tmp_path)
    assert run.info.status == "FINISHED" and "objective" in run.data.metrics
    assert "the text sample failed, the run is kept: RuntimeError: invalid multinomial" in out + "\n".join(err)


def fill(disk: Path) -> None:
    """Take the file system's last free bytes (filler2; a file system full already has none to give)."""
    try:
        with (disk / "filler2").open("wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    except OSError:
        pass


@pytest.mark.slow
def test_a_full_disk_in_a_sweep_is_one_line_at_the_end_and_the_printed_repair_works(monkeypatch, capsys,
                                                                                  tmp_path: Path, small_disk: Path):
    disk = small_disk
    uri = f"sqlite:///{disk}/mlflow.db"
    MlflowClient(uri).search_experiments()
    free_kb = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize // 1024
    (disk / "filler").write_bytes(b"\0" * (free_kb - 120) * 1024)  # room for the parent and a trial's start
    text = tmp_path / "long.txt"
    text.write_text(make_text(20000))
    write = summary.write_summary

    def on_a_full_disk(parent):  # whatever the trial's failure freed (sqlite's journal) is gone again
        fill(disk)
        return write(parent)

    monkeypatch.setattr(summary, "write_summary", on_a_full_disk)
    argv = ["-m", *tiny_overrides(tmp_path, text), f"tracking.uri={uri}", "trainer.log_every=1",
            "trainer.epochs=3", "trainer.sample.chars=0", "seed=1", f"hydra.sweep.dir={tmp_path}/sweep"]
    code, err, out = run_cli(monkeypatch, capsys, tmp_path, argv)
    assert code == 2 and "Traceback" not in out + "\n".join(err), err[-5:]
    line = err[-1]
    assert line.startswith(f"{PREFIX}the MLflow store {uri} failed, so sweep ") and " left 2 run(s) RUNNING" in line
    assert sorted(r.info.status for r in runs(tmp_path, uri)) == ["RUNNING", "RUNNING"]
    (disk / "filler").unlink()
    (disk / "filler2").unlink()
    repair = line.split("end them with: lesson7-train ", 1)[1].split()
    code, err, _ = run_cli(monkeypatch, capsys, tmp_path, repair)  # as printed
    assert code == 0, err
    assert sorted(r.info.status for r in runs(tmp_path, uri)) == ["FAILED", "FAILED"]


@pytest.mark.slow
def test_an_interrupted_sweep_whose_store_fills_up_says_what_it_left_running(monkeypatch, capsys, tmp_path: Path,
                                                                         small_disk: Path):
    # Ctrl-C in a trial; the disk fills as the sweep ends KILLED: the last line names what it left
    # RUNNING and the repair, instead of saying the sweep was marked KILLED
    from hydra_plugins.lesson7_optuna_sweeper import slurm

    disk = small_disk
    uri = f"sqlite:///{disk}/mlflow.db"
    MlflowClient(uri).search_experiments()
    cancel = slurm.cancel_jobs_in_flight

    def then_the_disk_fills():  # the first thing an interrupted sweep's end does
        fill(disk)
        return cancel()

    monkeypatch.setattr(slurm, "cancel_jobs_in_flight", then_the_disk_fills)
    monkeypatch.setattr(SignalAt, "plan", [("metrics", lambda m: "train_loss" in m, signal.SIGINT)])
    text = tmp_path / "long.txt"
    text.write_text(make_text(20000))
    argv = ["-m", *tiny_overrides(tmp_path, text), f"tracking.uri={uri}", f"tracking._target_={HERE}",
            "trainer.log_every=1", "trainer.epochs=3", "trainer.sample.chars=0", "seed=1",
            f"hydra.sweep.dir={tmp_path}/sweep"]
    code, err, out = run_cli(monkeypatch, capsys, tmp_path, argv)
    assert code == 130 and "Traceback" not in out + "\n".join(err), err[-5:]
    (parent,) = [r for r in runs(tmp_path, uri) if r.data.tags.get("run_type") == "sweep"]
    assert err[-1].startswith(f"lesson7-train: interrupted by SIGINT; the MLflow store {uri} failed, so sweep "
                              f"{parent.data.tags['sweep_id']} left 1 run(s) RUNNING"), err[-1]
    assert "marked KILLED" not in err[-1] and parent.info.status == "RUNNING"
    (trial,) = [r for r in runs(tmp_path, uri) if r.data.tags.get("run_type") != "sweep"]
    assert trial.info.status == "KILLED"  # ended by its own interrupt, before the disk filled
    (disk / "filler2").unlink(missing_ok=True)
    repair = err[-1].split("end them with: lesson7-train ", 1)[1].split("; ")[0].split()
    code, err, _ = run_cli(monkeypatch, capsys, tmp_path, repair)  # as printed
    assert code == 0, err
    assert sorted(r.info.status for r in runs(tmp_path, uri)) == ["FAILED", "KILLED"]
