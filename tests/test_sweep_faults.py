"""Faults of a distributed Optuna sweep, for real: two sweeping processes on one study (one
interrupted, one on "another host" that dies), a killed joblib worker, a tampered trial record, a
result Optuna never got, and two first sweeps racing to create a new MLflow store. (A database
outage: tests/test_postgres_optuna.py.) Trials are tiny (an epoch takes ~50 ms), so a test that
needs a trial to stay RUNNING holds its joblib worker (SIGSTOP) rather than counting on time."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from hydra_plugins.lesson7_optuna_sweeper.optuna_sweeper import OWNER

from .conftest import run_cli
from .test_optuna_sweeper import grid_sweep, mlflow_runs, study


def shared_study(tmp_path: Path, space: str, seed: int, n_trials: int, *extra: str) -> tuple[list[str], str]:
    url = f"sqlite:///{tmp_path}/study.db"
    return grid_sweep(tmp_path, space, seed, n_trials, f"hydra.sweeper.storage={url}",
                      "hydra.sweeper.study_name=shared", *extra), url


def start(cmd: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env=env)


def wait_until(check, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    """Until `check()` holds; fails at once if `proc` ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"never {what}: {proc.communicate()[1][-2000:]}")


def the_parent(client: MlflowClient, runs: dict[int, object]):
    return client.get_run(next(iter(runs.values())).data.tags["mlflow.parentRunId"])


def assert_summary_written_once(client: MlflowClient, parent, n_trials: int) -> None:
    assert parent.info.status == "FINISHED" and "failure_reason" not in parent.data.tags
    history = client.get_metric_history(parent.info.run_id, "n_trials")
    assert [m.value for m in history] == [n_trials]  # one summary, from the study's final state


def held_workers(proc: subprocess.Popen, n: int = 2) -> list[psutil.Process]:
    """Suspend the sweeper's `n` joblib workers as they appear, before a trial in them touches a store
    (a process held inside a write would hold the sqlite lock): their trial stays RUNNING, and the
    sweeper lives and beats for it."""
    workers: dict[int, psutil.Process] = {}

    def command(p: psutil.Process) -> str:
        try:
            return " ".join(p.cmdline())
        except psutil.Error:  # a short-lived helper process that ended (or is a zombie) meanwhile
            return ""

    wait_until(lambda: len(workers) == n or any(
        workers.setdefault(p.pid, p).suspend() for p in psutil.Process(proc.pid).children(recursive=True)
        if p.pid not in workers and "popen_loky_posix" in command(p)), proc, "saw its joblib workers")
    return list(workers.values())


def joblib_sweeper(cmd: list[str]) -> list[str]:
    return [*cmd, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]


def wait_for_waiting(url: str, proc: subprocess.Popen, states: list[TrialState]) -> None:
    """Until the study's trials are in `states` and `proc` has nothing left to ask, but is waiting."""
    wait_until(lambda: [t.state for t in study(url, "shared").trials] == states, proc, f"saw the trials {states}")
    time.sleep(2)
    assert proc.poll() is None, proc.stderr.read()[-2000:]


@pytest.mark.slow
def test_two_sweepers_on_one_study_end_only_their_own_trials_and_the_last_ends_the_parent(tmp_path: Path):
    cmd, url = shared_study(tmp_path, "optim.lr=choice(0.01,0.02,0.03)", 0, 3, "trainer.epochs=2")
    a = start(joblib_sweeper(cmd), tmp_path)
    workers = held_workers(a)
    # an owner record in the old host:pid form naming a dead pid of this host must not fail A's live trial
    shared = study(url, "shared")
    shared._storage.set_trial_user_attr(shared.trials[0]._trial_id, OWNER, f"{socket.gethostname()}:999999")
    try:
        b = start(cmd, tmp_path)
        wait_for_waiting(url, b, [TrialState.RUNNING, TrialState.COMPLETE, TrialState.COMPLETE])
        b.send_signal(signal.SIGINT)  # B has nothing left to ask: it waits for A's trial
        assert b.wait(timeout=120) == 130, b.stderr.read()[-2000:]
        trials = study(url, "shared").trials
        assert trials[0].state == TrialState.RUNNING  # B ended nothing of A's
        client, runs = mlflow_runs(tmp_path, trials)
        assert the_parent(client, runs).info.status == "RUNNING"  # nor the parent: A's sweep goes on
    finally:
        for w in workers:
            w.resume()
    assert a.wait(timeout=300) == 0, a.stderr.read()[-3000:]
    trials = study(url, "shared").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    client, runs = mlflow_runs(tmp_path, trials)
    assert {r.info.status for r in runs.values()} == {"FINISHED"} and len(runs) == 3
    assert_summary_written_once(client, the_parent(client, runs), 3)
    assert sorted(p.name for p in (tmp_path / "multirun").iterdir() if p.name.isdigit()) == ["0", "1", "2"]


def on_another_host(cmd: list[str], tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """`cmd` as a sweeper of another machine: its own temp folder (where sweepers keep their locks)
    and, where we may (root), its own host name."""
    env = {**os.environ, "TMPDIR": str(tmp_path / "other-host-tmp")}
    Path(env["TMPDIR"]).mkdir()
    if subprocess.run(["unshare", "--uts", "true"], capture_output=True).returncode == 0:
        cmd = ["unshare", "--uts", "sh", "-c", 'hostname other-host && exec "$@"', "sh", *cmd]
    return cmd, env


@pytest.mark.slow
def test_a_dead_sweeper_on_another_host_is_found_by_its_heartbeat_and_its_trial_retried(tmp_path: Path):
    cmd, url = shared_study(tmp_path, "optim.lr=choice(0.01,0.02)", 0, 2, "trainer.epochs=2",
                            "hydra.sweeper.heartbeat_interval=2")
    a_cmd, env = on_another_host(joblib_sweeper(cmd), tmp_path)
    a = start(a_cmd, tmp_path, env)
    workers = held_workers(a)
    b = start(cmd, tmp_path)
    wait_for_waiting(url, b, [TrialState.RUNNING, TrialState.COMPLETE])  # B waits: the study is not complete
    for p in [*workers, psutil.Process(a.pid)]:  # A dies with its trial RUNNING
        p.kill()
    a.wait(timeout=60)
    assert b.wait(timeout=300) == 0, b.stderr.read()[-3000:]
    trials = study(url, "shared").trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[0].user_attrs["owner_host"] == ("other-host" if a_cmd[0] == "unshare" else socket.gethostname())
    assert trials[2].params == trials[0].params  # A's trial, retried by B
    client, runs = mlflow_runs(tmp_path, trials)
    assert sorted(runs) == [1, 2]  # A's trial died before its job made a run
    assert_summary_written_once(client, the_parent(client, runs), 2)


@pytest.mark.slow
def test_a_killed_joblib_worker_fails_its_trial_which_is_retried_and_the_sweep_goes_on(tmp_path: Path):
    url = f"sqlite:///{tmp_path}/multirun/optuna.db"
    proc = start(grid_sweep(tmp_path, "optim.lr=choice(0.01,0.02,0.03)", 0, 3, "trainer.epochs=20",
                            "hydra.sweeper.n_jobs=2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"), tmp_path)
    log = tmp_path / "multirun" / "0" / "train.log"
    wait_until(lambda: log.exists() and "MLflow run" in log.read_text(), proc, "saw trial 0 start")  # ~1 s to go
    (worker,) = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if any(f.path == str(log) for f in p.open_files())]
    worker.kill()
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    trials = study(url).trials
    assert trials[0].state == TrialState.FAIL
    failed = [t for t in trials if t.state == TrialState.FAIL]  # loky ends the pool's other worker too
    retries = [t for t in trials if t.system_attrs.get("failed_trial") is not None]
    assert sorted(t.system_attrs["failed_trial"] for t in retries) == [t.number for t in failed]
    assert all(t.state == TrialState.COMPLETE for t in trials if t.state != TrialState.FAIL)
    assert len(trials) - len(retries) == 3  # n_trials, a retried trial counted once
    client, runs = mlflow_runs(tmp_path, trials)
    assert {n: r.info.status for n, r in runs.items()} == {
        t.number: "FAILED" if t.state == TrialState.FAIL else "FINISHED" for t in trials if t.number in runs}
    assert runs[0].data.tags["failure_reason"] == "its worker process died (TerminatedWorkerError)"
    assert_summary_written_once(client, the_parent(client, runs), len(runs))


def test_a_tampered_trial_record_is_refused_in_one_line_and_leaves_no_trial_running(monkeypatch, capsys,
                                                                                    tmp_path: Path):
    cmd, url = shared_study(tmp_path, "optim.lr=choice(0.01,0.02)", 0, 1, "trainer.epochs=1")
    code, err, _ = run_cli(monkeypatch, capsys, tmp_path, cmd[1:])
    assert code == 0, err[-20:]
    with sqlite3.connect(tmp_path / "study.db") as db:  # the stored lr: no longer the space's categories
        db.execute("""UPDATE trial_params SET distribution_json = '{"name": "FloatDistribution", "attributes":
                      {"low": 0.0, "high": 1.0, "step": null, "log": false}}'""")
    code, err, _ = run_cli(monkeypatch, capsys, tmp_path, [*cmd[1:], "hydra.sweeper.n_trials=2"])
    assert code == 2 and not any("Traceback" in line for line in err), err[-20:]
    assert err[-1].startswith("lesson7-train: error: study shared holds a trial record this sweep's search space "
                              "does not fit (Cannot set different distribution kind")
    assert [t.state for t in study(url, "shared").trials] == [TrialState.COMPLETE, TrialState.FAIL]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert not client.search_runs([client.get_experiment_by_name("test").experiment_id],
                                  "attributes.status = 'RUNNING'")


def test_a_result_optuna_never_got_is_failed_in_mlflow_too_when_the_study_resumes(monkeypatch, capsys,
                                                                                  tmp_path: Path):
    # seed 1 runs lr 0.5 (the best) first; then its result is lost, as when the database went away
    # between the run's end and the tell, and another sweeper failed the trial
    cmd, url = shared_study(tmp_path, "optim.lr=choice(0.5,0.0001)", 1, 2, "optim=sgd", "optim.momentum=0",
                            "trainer.epochs=1")
    code, err, _ = run_cli(monkeypatch, capsys, tmp_path, cmd[1:])
    assert code == 0, err[-20:]
    with sqlite3.connect(tmp_path / "study.db") as db:
        db.execute("UPDATE trials SET state = 'FAIL' WHERE number = 0")
    code, err, _ = run_cli(monkeypatch, capsys, tmp_path, cmd[1:])
    assert code == 0, err[-20:]
    trials = study(url, "shared").trials
    assert trials[0].params["optim.lr"] == 0.5 and trials[0].state == TrialState.FAIL
    client, runs = mlflow_runs(tmp_path, trials)
    assert runs[0].info.status == "FAILED"  # Optuna's state is the truth
    parent = the_parent(client, runs)
    assert parent.data.tags["best_run_id"] == runs[1].info.run_id and parent.data.metrics["n_finished"] == 1


@pytest.mark.slow
def test_two_first_sweeps_on_a_new_store_both_create_it(tmp_path: Path):
    # what a sweep's parent does first, in two processes that start it at the same moment
    code = ("import sys, time, pathlib\n"
            "from lesson7_sweeps.tracking import MlflowLogger\n"
            "import mlflow.store.tracking.sqlalchemy_store\n"
            "pathlib.Path(sys.argv[2] + '.ready').touch()\n"
            "while not pathlib.Path(sys.argv[2]).exists(): time.sleep(0.01)\n"
            "print(MlflowLogger(sys.argv[1], 'e', None, None, heartbeat_s=30, stale_after_s=300).prepare())")
    uri = f"sqlite:///{tmp_path}/new/mlflow.db"
    procs = [subprocess.Popen([sys.executable, "-c", code, uri, str(tmp_path / f"go{i}")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    while not all((tmp_path / f"go{i}.ready").exists() for i in range(2)):
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-1500:] for p in procs]
        time.sleep(0.05)
    for i in range(2):
        (tmp_path / f"go{i}").touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-1500:] for _, err in outs]
    assert [out.strip() for out, _ in outs] == ["1", "1"]
