"""A parallel Optuna sweep with pruning against a real `mlflow server` backed by PostgreSQL, with
the Optuna storage on the same PostgreSQL: the set-up the README gives for many machines. And a
database outage in the middle of a sweep, on a cluster of its own that the test stops and restarts.

`.ci/run` starts a throwaway cluster (`.ci/postgres`) and exports LESSON7_TEST_POSTGRES_URL; locally:
    eval "$(.ci/postgres)"   # then run this file; `.ci/postgres stop $LESSON7_TEST_POSTGRES_DIR`
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from pathlib import Path

import optuna
import psycopg2
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from lesson7_sweeps.sweeps.optuna_trial import RUN_ID

from .test_optuna_sweeper import grid_sweep, mlflow_runs, run
from .test_sweep_faults import held_workers
from .test_tracking_server import Server

URL = os.environ.get("LESSON7_TEST_POSTGRES_URL")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    URL is None, reason='no PostgreSQL: set LESSON7_TEST_POSTGRES_URL (eval "$(.ci/postgres)" starts one)')]


@pytest.fixture
def databases():
    """Two fresh databases on the cluster: MLflow's and Optuna's (each keeps its own schema version)."""
    names = [f"{kind}_{uuid.uuid4().hex[:8]}" for kind in ("mlflow", "optuna")]
    conn = psycopg2.connect(URL)
    conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
    with conn.cursor() as cur:
        for name in names:
            cur.execute(f"CREATE DATABASE {name}")
    base = URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg2://")  # MLflow's default is psycopg 3
    yield [f"{base}/{name}" for name in names]
    with conn.cursor() as cur:
        for name in names:
            cur.execute(f"DROP DATABASE {name} WITH (FORCE)")
    conn.close()


@pytest.fixture
def server(tmp_path: Path, databases):
    srv = Server(tmp_path, backend=databases[0])
    srv.start()
    yield srv
    srv.kill()


def test_parallel_pruned_sweep_on_an_mlflow_server_and_optuna_storage_in_postgresql(tmp_path: Path, databases,
                                                                                    server: Server):
    optuna_db = databases[1]
    run(grid_sweep(tmp_path, "optim.lr=choice(0.5,0.2,0.0001,0.00001)", 0, 4, "optim=sgd", "optim.momentum=0",
                   f"tracking.uri={server.uri}", f"hydra.sweeper.storage={optuna_db}",
                   "hydra.sweeper.study_name=pg", "hydra.sweeper.median.n_startup_trials=1",
                   "hydra.sweeper.n_jobs=2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"), tmp_path)
    trials = optuna.load_study(study_name="pg", storage=optuna_db).trials
    client = MlflowClient(server.uri)
    runs = {r.info.run_id: r for r in client.search_runs([client.get_experiment_by_name("test").experiment_id])}
    (parent,) = [r for r in runs.values() if r.data.tags.get("run_type") == "sweep"]
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_trials"] == 4
    assert "optuna/history.png" in {a.path for a in client.list_artifacts(parent.info.run_id, "optuna")}
    runs.pop(parent.info.run_id)
    assert len(trials) == 4 and len(runs) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in runs.values()} == {parent.info.run_id}
    assert sorted(t.params["optim.lr"] for t in trials) == [0.00001, 0.0001, 0.2, 0.5]
    for t in trials:
        r = runs[t.user_attrs[RUN_ID]]
        assert t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        assert r.info.status == "FINISHED"
        assert r.data.tags.get("trial_state") == ("PRUNED" if t.state == TrialState.PRUNED else None)
        val_loss = {m.step: m.value for m in client.get_metric_history(r.info.run_id, "val_loss")}
        assert t.intermediate_values == val_loss  # Optuna saw exactly what MLflow holds
        assert len(val_loss) == (1 if t.state == TrialState.PRUNED else 2)
        if t.state == TrialState.COMPLETE:
            assert t.value == r.data.metrics["val_loss"]
        assert {"train_loss", "val_accuracy", "val_bpc"} <= set(r.data.metrics)
        assert "config.yaml" in {a.path for a in client.list_artifacts(r.info.run_id)}  # through the server


@pytest.fixture
def own_cluster():
    """A throwaway cluster of this test's own (stopping the shared one would fail the tests beside it)."""
    ci = Path(__file__).resolve().parents[1] / ".ci" / "postgres"
    env = dict(line.removeprefix("export ").split("=", 1) for line in
               subprocess.run([ci], capture_output=True, text=True, check=True).stdout.splitlines())
    folder = env["LESSON7_TEST_POSTGRES_DIR"]
    yield env["LESSON7_TEST_POSTGRES_URL"].replace("postgresql://", "postgresql+psycopg2://"), \
        lambda what: subprocess.run([ci, what, folder], check=True)
    subprocess.run([ci, "stop", folder], check=True)


def test_a_database_outage_mid_sweep_is_one_line_and_the_same_command_resumes_the_study(tmp_path: Path,
                                                                                        own_cluster):
    url, cluster = own_cluster
    cmd = grid_sweep(tmp_path, "optim.lr=choice(0.5,0.2,0.0001)", 0, 3, "optim=sgd", "optim.momentum=0",
                     f"hydra.sweeper.storage={url}", "hydra.sweeper.study_name=outage")
    # trial 0 runs in a joblib worker that the test holds until the database is gone
    proc = subprocess.Popen([*cmd, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        workers = held_workers(proc)
        cluster("down")
        for w in workers:
            w.resume()
        err = proc.communicate(timeout=300)[1]
    finally:
        proc.send_signal(signal.SIGKILL)
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    shown = url.split("//", 1)[1]
    assert err.splitlines()[-1].startswith(f"lesson7-train: error: the Optuna storage postgresql+psycopg2://{shown} "
                                           f"failed ("), err[-1500:]
    assert err.splitlines()[-1].endswith("run the same command to resume it")

    cluster("up")
    run(cmd, tmp_path)  # the same sweep, its trials in this process this time
    trials = optuna.load_study(study_name="outage", storage=url).trials
    assert trials[0].state == TrialState.FAIL and trials[0].params in [t.params for t in trials[1:]]  # retried
    assert len(trials) == 4 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials[1:])
    client, runs = mlflow_runs(tmp_path, trials)  # trial 0's job found the study gone before it made a run
    assert sorted(runs) == [1, 2, 3] and {r.info.status for r in runs.values()} == {"FINISHED"}
    parent = client.get_run(runs[1].data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED" and "failure_reason" not in parent.data.tags  # the outage's is gone
    assert parent.data.metrics["n_trials"] == 3
    best = min((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert parent.data.tags["best_run_id"] == runs[best.number].info.run_id
