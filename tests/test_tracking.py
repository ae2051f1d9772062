"""The MLflow logger against a real sqlite store."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric

from lesson7_sweeps.tracking import MlflowLogger

from .conftest import seed_store


def test_a_resumed_run_fills_the_gaps_a_killed_run_left_and_logs_nothing_twice(tmp_path: Path):
    """MLflow writes async batches from a thread pool, so a run killed mid-write can hold a later step
    and miss an earlier one. Resuming replays both; only the missing value is written."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first = MlflowLogger(uri, "exp", None, "killed", heartbeat_s=30, stale_after_s=300)
    first.start("killed", params={}, tags={})
    first.client.log_batch(first.run_id, metrics=[Metric("train_loss", 2.0, 0, 10)])  # step 5 never landed

    resumed = MlflowLogger(uri, "exp", None, None, heartbeat_s=30, stale_after_s=300)
    assert resumed.resume(first.run_id, tmp_path, "last.pt", lambda path: path) is None  # no checkpoint: it starts over
    for step, value in ((5, 3.0), (10, 2.0), (15, 1.0)):
        resumed.log_metrics({"train_loss": value}, step)
    resumed.close("FINISHED")

    history = MlflowClient(uri).get_metric_history(first.run_id, "train_loss")
    assert sorted((m.step, m.value) for m in history) == [(5, 3.0), (10, 2.0), (15, 1.0)]


def test_checking_a_store_keeps_the_sqlite_locks_this_process_holds(tmp_path: Path):
    """check() runs in processes that already write to the store (a sweep's search() while MLflow's
    async thread logs). Opening and closing the database file there would drop every POSIX lock the
    process holds on it, and the writers would meet "disk I/O error"."""
    db = tmp_path / "mlflow.db"
    seed_store(db)
    logger = MlflowLogger(f"sqlite:///{db}", "test", None, None, heartbeat_s=30, stale_after_s=300)
    logger.check(writing=False)  # the first check: before any connection of this process
    con = sqlite3.connect(db, timeout=0)
    con.execute("BEGIN IMMEDIATE")  # this process now holds the write lock, as a writing thread would
    try:
        logger.check(writing=False)
        other = subprocess.run([sys.executable, "-c", f"import sqlite3; sqlite3.connect({str(db)!r}, timeout=0)"
                                ".execute('BEGIN IMMEDIATE')"], capture_output=True, text=True, timeout=60)
        assert "database is locked" in other.stderr, "another process took the write lock this one holds"
    finally:
        con.rollback()
        con.close()
