"""Sweepers that race: two starting a brand-new study at the same instant get one parent run; two
creating a store at once (sqlite or PostgreSQL) both get a working one."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import ViewType

from lesson7_sweeps.errors import UserError
from lesson7_sweeps.sweeps import parent
from lesson7_sweeps.tracking import MlflowLogger

from .conftest import seed_store

# A sweeping process up to its parent run (what the multirun callback does), once the test says go.
# Each looks for the study's parent, then waits until the other has looked too: the interleaving of a
# race (neither finds one), which two processes on 2 busy cores rarely hit by themselves.
START_PARENT = """
import os, pathlib, sys, time
from hydra import compose, initialize_config_dir
from lesson7_sweeps.config import CONF_DIR, register_schemas
from lesson7_sweeps.sweeps import parent
register_schemas()
find, folder = parent.find, pathlib.Path(sys.argv[1]).parent
def find_then_wait(logger, key):
    found = find(logger, key)
    (folder / f"looked{os.getpid()}").touch()
    while len(list(folder.glob("looked*"))) < 2:
        time.sleep(0.01)
    return found
parent.find = find_then_wait
with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
    cfg = compose("train", overrides=sys.argv[3:], return_hydra_config=True)
pathlib.Path(sys.argv[1]).touch()
while not pathlib.Path(sys.argv[2]).exists():
    time.sleep(0.01)
p = parent.start(cfg)
print(p.run_id, p.sweep_id)
"""


def _at_once(tmp_path: Path, script: str, *args: str) -> list[str]:
    """Run `script` in two processes, released together once both are ready; their outputs."""
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / f"ready{i}"), str(go), *args],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.time() < deadline:
        time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    return [out for out, _ in outs]


def _study(tmp_path: Path) -> list[str]:
    return [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "tracking.experiment=test", "hydra/sweeper=optuna",
            f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db", "hydra.sweeper.study_name=race",
            f"hydra.sweep.dir={tmp_path}/multirun"]


def _parents(uri: str, view: int = ViewType.ACTIVE_ONLY) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("test")
    return client.search_runs([exp.experiment_id], "tags.run_type = 'sweep'", run_view_type=view)


@pytest.mark.slow
def test_two_sweepers_starting_a_new_study_at_once_share_one_parent(tmp_path: Path):
    seed_store(tmp_path / "mlflow.db")
    outs = _at_once(tmp_path, START_PARENT, *_study(tmp_path))
    ids = {out.split()[0] for out in outs}
    assert len(ids) == 1 and len({out.strip() for out in outs}) == 1, outs  # one parent, one sweep id
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    (active,) = _parents(uri)
    assert active.info.run_id in ids and active.info.status == "RUNNING" and active.data.params["parent_claim"] == "won"
    (lost,) = _parents(uri, ViewType.DELETED_ONLY)  # the parent that lost the race: gone, not left RUNNING
    assert lost.info.status == "KILLED" and lost.data.params.get("parent_claim") != "won"


def test_the_smallest_parent_wins_whichever_sweeper_looks_first(monkeypatch, tmp_path: Path):
    """The interleaving two processes can take, played in one: both parents exist, the sweeper of the
    larger run id looks first (it gives way and waits), then the smaller one settles it."""
    seed_store(tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    loggers = []
    for _ in range(2):
        logger = MlflowLogger(uri, "test", None, None, heartbeat_s=60, stale_after_s=300)
        logger.start("sweep x", {}, {"run_type": "sweep", "sweep_key": "k", "sweep_id": "s"})
        loggers.append(logger)
    small, large = sorted(loggers, key=lambda lg: lg.run_id)
    monkeypatch.setattr(parent, "CLAIM_WAIT_S", 0.0)
    with pytest.raises(UserError, match="another sweeper of this study is creating its parent run"):
        parent._one_parent(large, "k")
    assert parent._one_parent(small, "k") == small.run_id
    assert parent._one_parent(large, "k") == small.run_id
    claims = {r.info.run_id: r.data.params["parent_claim"] for r in _parents(uri)}
    assert claims == {small.run_id: "won", large.run_id: "lost"}


# a sweeping process opening its MLflow store (pre-flight check, then the parent's prepare), on go
OPEN_STORE = """
import pathlib, sys, time
from lesson7_sweeps.tracking import MlflowLogger
logger = MlflowLogger(sys.argv[3], "test", None, None, heartbeat_s=60, stale_after_s=300)
pathlib.Path(sys.argv[1]).touch()
while not pathlib.Path(sys.argv[2]).exists():
    time.sleep(0.01)
logger.check()
print(logger.prepare())
"""


PG_URL = os.environ.get("LESSON7_TEST_POSTGRES_URL")


@pytest.mark.slow
@pytest.mark.skipif(PG_URL is None, reason='no PostgreSQL: set LESSON7_TEST_POSTGRES_URL (eval "$(.ci/postgres)")')
def test_two_sweepers_creating_a_new_postgresql_store_at_once_both_work(tmp_path: Path):
    import psycopg2

    name = f"mlflow_{uuid.uuid4().hex[:8]}"
    conn = psycopg2.connect(PG_URL)
    conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    uri = f"{PG_URL.rsplit('/', 1)[0]}/{name}".replace("postgresql://", "postgresql+psycopg2://")
    try:
        outs = _at_once(tmp_path, OPEN_STORE, uri)
        assert len({out.strip() for out in outs}) == 1  # one experiment, in one working store
        client = MlflowClient(uri)
        run = client.create_run(outs[0].strip())
        assert client.get_run(run.info.run_id).info.status == "RUNNING"
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE {name} WITH (FORCE)")
        conn.close()
