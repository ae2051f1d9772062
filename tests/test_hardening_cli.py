"""Issue 9 through the console entries: bad input caught before training in one line (item 4), the
full-disk store and the repair command (item 2), a finished run extended by resume (item 3), any
exception of a multirun trial (item 5), our own --help (item 6)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from .conftest import make_text, run_cli, tiny_overrides

PREFIX = "lesson7-train: error: "


@pytest.fixture
def bad_paths(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "notes.db").write_text("not a database")
    return {"file": tmp_path / "a_file", "notdb": tmp_path / "notes.db"}


BEFORE_TRAINING = [  # (argv, what the one line says)
    (["seed=-1"], "seed=-1 is invalid: use an integer in [0, 2**32)"),
    (["seed=1099511627776"], "seed=1099511627776 is invalid"),
    (["data=cifar10", "model=lstm"], "is a text model but data._target_=lesson7_sweeps.data.cifar.CifarData is image"),
    (["model=resnet2"], "is an image model but data._target_=lesson7_sweeps.data.text.TextData is text data"),
    (["objective=val_accuracy_tta"], "objective='val_accuracy_tta' is invalid: text data reports only"),
    (["data=cifar10", "model=resnet2", "objective=val_accuracy_tta", "data.tta=none"], "with data.tta=none"),
    (["+trainer.epoch=5"], "trainer.epoch: no such setting (did you mean trainer.epochs?)"),
    (["+data.min_freqs=2"], "data.min_freqs: no such setting (did you mean data.min_freq?)"),
    (["tracking.uri=foo://bar"], "tracking.uri=foo://bar: MLflow has no store for this scheme"),
    (["tracking.uri=sqlite:///{file}/sub/mlflow.db"], "is a file, so no store can be created under it"),
    (["tracking.uri=sqlite:///{notdb}"], "is not an SQLite database"),
    (["-m", "seed=1,2", "tracking.uri=sqlite:///{notdb}"], "is not an SQLite database"),  # before any job
]


@pytest.mark.parametrize(("argv", "message"), BEFORE_TRAINING)
def test_bad_input_is_one_line_before_data_or_any_run(monkeypatch, capsys, tmp_path: Path, bad_paths, argv, message):
    argv = [a.format(**bad_paths) for a in argv]
    store = [] if any(a.startswith("tracking.uri") for a in argv) else [f"tracking.uri=sqlite:///{tmp_path}/m.db"]
    data = [] if any(a.startswith(("data=", "model=")) for a in argv) else ["data=text", "data.path=/nowhere.txt"]
    code, err, _ = run_cli(monkeypatch, capsys, tmp_path, [*argv, *store, *data])
    assert code == 2 and len(err) == 1 and err[0].startswith(PREFIX) and message in err[0], err
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "outputs").exists()


def test_an_unwritable_store_folder_is_one_line(monkeypatch, capsys, tmp_path: Path):
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() == 0:  # root writes anywhere, except on a read-only file system
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1M", "tmpfs", str(folder)]).returncode:
            pytest.skip("running as root without permission to mount a read-only tmpfs")
    else:
        folder.chmod(0o555)
    try:
        code, err, _ = run_cli(monkeypatch, capsys, tmp_path, [f"tracking.uri=sqlite:///{folder}/sub/mlflow.db"])
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(folder)])
    assert code == 2 and err == [f"{PREFIX}tracking.uri=sqlite:///{folder}/sub/mlflow.db: {folder} is not writable, so "
                                 f"the store cannot be created there; use a writable folder"]


def test_a_deleted_experiment_is_one_line(monkeypatch, capsys, tmp_path: Path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    client.delete_experiment(client.create_experiment("gone", artifact_location=str(tmp_path / "art")))
    code, err, _ = run_cli(monkeypatch, capsys, tmp_path, [f"tracking.uri={uri}", "tracking.experiment=gone"])
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"{PREFIX}tracking.experiment=gone was deleted in {uri}: restore it (mlflow experiments "
                             f"restore --experiment-id ")


def test_a_model_that_cannot_fit_is_one_line(monkeypatch, capsys, tmp_path: Path, text_file: Path):
    argv = [*tiny_overrides(tmp_path, text_file, fresh_store=True), "model.n_hidden=10000000",
            f"hydra.run.dir={tmp_path}/run"]
    code, err, _ = run_cli(monkeypatch, capsys, tmp_path, argv)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"{PREFIX}the model does not fit: its "), err
    assert not (tmp_path / "mlflow.db").exists()


def test_help_is_ours(monkeypatch, capsys, tmp_path: Path):
    code, _, out = run_cli(monkeypatch, capsys, tmp_path, ["--help"])
    assert code == 0
    for needed in ("config groups", "experiment", "lesson7_resnet2", "resnet2", "resume=RUN_ID", "lesson7-rerun",
                   "lesson7-lr-find", "outputs/mlflow.db", "--mark-failed"):
        assert needed in out
    assert "_schema" not in out and "lesson7_base" not in out and "Powered by Hydra" not in out


# --- subprocesses ------------------------------------------------------------------------------


def runs(uri: str, experiment: str = "test"):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def test_resume_extends_a_finished_run_when_epochs_are_raised(monkeypatch, capsys, tmp_path: Path, text_file: Path):
    args = [*tiny_overrides(tmp_path, text_file), "trainer.epochs=1"]
    code, err, _ = run_cli(monkeypatch, capsys, tmp_path, [*args, f"hydra.run.dir={tmp_path}/a"])
    assert code == 0, err[-20:]
    (run,) = runs(f"sqlite:///{tmp_path}/mlflow.db")
    again = [*args, f"resume={run.info.run_id}", f"hydra.run.dir={tmp_path}/b"]
    code, err, _ = run_cli(monkeypatch, capsys, tmp_path, again)
    assert code == 2 and err[-1].startswith(
        f"{PREFIX}resume={run.info.run_id}: the run FINISHED its 1 epochs; to train it further, raise trainer.epochs")
    code, err, _ = run_cli(monkeypatch, capsys, tmp_path, [*again, "trainer.epochs=2"])
    assert code == 0, err[-20:]
    assert not [line for line in err if "Downloading artifacts" in line or "%|" in line]  # no progress bars
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (after,) = runs(f"sqlite:///{tmp_path}/mlflow.db")
    assert after.info.status == "FINISHED" and after.data.tags["resume_overrides"] == "trainer.epochs=2"
    epochs = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "epoch"))
    assert [v for _, v in epochs] == [1.0, 2.0] and epochs[0][0] < epochs[1][0]


@pytest.mark.slow
def test_two_quick_ctrl_c_leave_the_run_killed(tmp_path: Path, text_file: Path):
    cmd = [sys.executable, "-m", "lesson7_sweeps.train", *tiny_overrides(tmp_path, text_file),
           "trainer.epochs=1000", "trainer.log_every=1", f"hydra.run.dir={tmp_path}/run"]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).search_experiments()  # the store exists before the job and this test both open it
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 180
    while time.time() < deadline:
        found = runs(uri)
        if found and MlflowClient(uri).get_metric_history(found[0].info.run_id, "train_loss"):
            break
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    (run,) = runs(uri)
    assert run.info.status == "KILLED"
    assert err.strip().splitlines()[-1].startswith("lesson7-train: interrupted by SIGINT; the run was marked KILLED")


@pytest.mark.slow
def test_any_exception_of_a_multirun_trial_gives_inf_and_a_failed_run(monkeypatch, capsys, tmp_path: Path,
                                                                       text_file: Path):
    """A CUDA out-of-memory error cannot happen on the CPU, so the trial with seed=13 gets one from
    torch's own exception type, raised by the training step; the sweep must go on."""
    import torch

    from lesson7_sweeps import runner

    fit = runner.fit

    def fit_or_oom(cfg, *args, **kwargs):
        if cfg.seed == 13:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return fit(cfg, *args, **kwargs)

    monkeypatch.setattr(runner, "fit", fit_or_oom)
    code, err, out = run_cli(monkeypatch, capsys, tmp_path, ["-m", *tiny_overrides(tmp_path, text_file),
                                                             "trainer.epochs=1", "seed=13,14",
                                                             f"hydra.sweep.dir={tmp_path}/multirun"])
    assert code == 0, err[-20:]
    by_seed = {r.data.params["seed"]: r for r in runs(f"sqlite:///{tmp_path}/mlflow.db") if "seed" in r.data.params}
    assert by_seed["13"].info.status == "FAILED" and by_seed["14"].info.status == "FINISHED"
    assert by_seed["13"].data.tags["failure_reason"] == "CUDA out of memory. Tried to allocate 20.00 GiB"
    assert "trial failed, objective +inf: OutOfMemoryError: CUDA out of memory" in "\n".join([out, *err])


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_run_can_be_repaired(monkeypatch, capsys, tmp_path: Path, small_disk: Path):
    disk = small_disk
    uri = f"sqlite:///{disk}/mlflow.db"
    MlflowClient(uri).search_experiments()  # the store, then a disk with ~60 kB left
    free_kb = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize // 1024
    (disk / "filler").write_bytes(b"\0" * (free_kb - 60) * 1024)
    text = tmp_path / "long.txt"
    text.write_text(make_text(20000))
    args = [*tiny_overrides(tmp_path, text), f"tracking.uri={uri}", "trainer.log_every=1", "trainer.epochs=3"]
    proc = subprocess.run([sys.executable, "-m", "lesson7_sweeps.train", *args, f"hydra.run.dir={tmp_path}/r"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    said = (proc.stdout + proc.stderr).strip().splitlines()  # Hydra logs to stdout, errors go to stderr
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr, said
    assert proc.stderr.strip().splitlines() == [
        f"{PREFIX}the MLflow store {uri} cannot be written (database or disk is full); free space or fix its "
        f"permissions, then continue the run: lesson7-train resume={runs(uri)[0].info.run_id} force_resume=true"]
    problems = [line for line in said if "ERROR" in line or "error" in line]
    assert len(problems) == 2 and "--mark-failed" in problems[0], said  # the run could not be ended: repair
    (disk / "filler").unlink()
    (run,) = runs(uri)
    assert run.info.status == "RUNNING"
    repair = problems[0].split("end it with: lesson7-train ", 1)[1].split()
    assert repair == ["--mark-failed", run.info.run_id, "--tracking-uri", uri, "--force"]
    code, err, _ = run_cli(monkeypatch, capsys, tmp_path, repair[:-1])  # a live run's heartbeat guards it
    assert code == 2 and "is still training (its heartbeat is" in err[-1], err
    code, err, _ = run_cli(monkeypatch, capsys, tmp_path, repair)  # as printed
    assert code == 0, err
    assert MlflowClient(uri).get_run(run.info.run_id).info.status == "FAILED"
