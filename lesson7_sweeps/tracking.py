"""Every MLflow call of the project lives here, behind a small logger interface.

The runner only sees `Logger`: `start`, `log_metrics(step)`, `log_artifact`, `log_text`, `close`.
`MlflowLogger` writes to any MLflow store (the default is one sqlite file under outputs/);
`NullLogger` (tracking=none) writes nothing and never imports MLflow.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

from omegaconf import DictConfig, OmegaConf

from lesson7_sweeps.errors import UserError

log = logging.getLogger(__name__)
PROJECT_DIR = Path(__file__).resolve().parents[1]
T = TypeVar("T")
HEARTBEAT_TAG = "heartbeat"  # unix time of the run's last sign of life, while it trains
LEASE_TAG = "resume_lease"  # "<token> <unix time>": the process taking a stopped run over (resume=)
# a rival resume writes its lease within this after it read the run (a few store requests), so after
# writing ours and waiting this long, the lease we read back is the one that won
LEASE_SETTLE_S = 1.0
SQLITE_HEADER = b"SQLite format 3\0"
PG_MIGRATION_LOCK = 0x6C657373_6F6E3737  # pg_advisory_lock's key for opening (migrating) an MLflow store


class Logger(Protocol):
    run_id: str | None

    def check(self) -> None: ...
    def prepare(self) -> object: ...
    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> None: ...
    def resume(self, run_id: str, dest: Path, checkpoint: str, load: Callable[[Path | None], T],
               force: bool = False) -> T: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def flush(self) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_model(self, model: Any) -> None: ...
    def set_tags(self, tags: dict[str, str], run_id: str | None = None) -> None: ...
    def delete_artifacts(self, folder: str, pattern: str) -> None: ...
    def close(self, status: str, reason: str | None = None) -> bool: ...


class NullLogger:
    """tracking=none: the same interface, no MLflow."""

    run_id = None

    def check(self) -> None:
        pass

    def prepare(self) -> None:
        pass

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        pass

    def resume(self, run_id: str, dest: Path, checkpoint: str, load: Callable[[Path | None], T],
               force: bool = False) -> T:
        raise UserError(f"resume={run_id} needs a tracking store to find the run in; drop tracking=none")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_model(self, model: Any) -> None:
        pass

    def set_tags(self, tags: dict[str, str], run_id: str | None = None) -> None:
        pass

    def delete_artifacts(self, folder: str, pattern: str) -> None:
        pass

    def close(self, status: str, reason: str | None = None) -> bool:
        return True
        pass


class MlflowLogger:
    """One MLflow run. Metrics are logged asynchronously (MLflow's own queue) so a slow store or
    server never stalls the training loop; `close` waits for them before ending the run.

    A tracking server that does not answer at `prepare` fails at once (UserError naming the URI)
    instead of sitting in MLflow's retry loop for minutes. A server that goes away *during* a run
    costs nothing: every request (async metric batches, artifacts, the final status) goes through
    MLflow's HTTP retries, which also retry a refused connection. With MLflow's defaults
    (MLFLOW_HTTP_REQUEST_MAX_RETRIES=7, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=2) a request waits
    0+4+8+16+32+64+120 s (+ up to 1 s jitter each), so a server back within ~4 minutes loses
    nothing; those environment variables shorten or lengthen the window (MLflow reads them per
    request, for the whole process, so we leave them to the user)."""

    PROBE_TIMEOUT_S = 5  # one try, no retries: MLflow's own server-version probe does the same
    FLUSH_WAIT_S = 2.0  # the longest a checkpoint waits for a tracking server to store the metrics

    def __init__(self, uri: str, experiment: str, artifact_location: str | None, run_name: str | None, *,
                 heartbeat_s: float, stale_after_s: float, log_model: bool = False,
                 system_metrics: bool = False) -> None:
        self.uri, self.experiment, self.artifact_location = uri, experiment, artifact_location
        self.run_name, self.heartbeat_s, self.stale_after_s = run_name, heartbeat_s, stale_after_s
        self.log_model_enabled, self.system_metrics = log_model, system_metrics
        self._beat = 0.0  # when the heartbeat tag was last sent
        self.run_id: str | None = None
        self._monitor: Any = None  # MLflow's SystemMetricsMonitor, when tracking.system_metrics
        # resumed run: the steps each metric already has. A set, not the highest step: MLflow's async
        # queue writes batches from a thread pool, so a killed run can hold step 210 but not 205.
        self._logged: dict[str, set[int]] = {}
        self._pending: list[tuple[Any, list[Any]]] = []  # (MLflow's async operation, its metrics)

    def prepare(self) -> str:
        """Check the server answers, create the store and the experiment if needed (once, before
        parallel jobs); the experiment's id."""
        with self._creating():
            return self._prepare()

    def _prepare(self) -> str:
        from mlflow import MlflowClient

        self.check()
        try:
            self.client = MlflowClient(self.uri)
            exp = self.client.get_experiment_by_name(self.experiment)
        except Exception as e:  # OSError, sqlalchemy's and MLflow's errors: a store that cannot be opened
            raise self._store_error(e) from None
        if exp is not None:
            return exp.experiment_id
        # artifact_location only makes sense for a local store (default: beside its sqlite file); a
        # server decides its own
        location = None
        if self.uri.startswith("sqlite:///"):
            db = Path(self.uri.removeprefix("sqlite:///"))
            location = self.artifact_location or str(db.parent / "mlartifacts")
        try:
            return self.client.create_experiment(self.experiment, artifact_location=location, tags=EXPERIMENT_TAGS)
        except Exception:  # another job created it between our lookup and create
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    @contextmanager
    def _creating(self) -> Iterator[None]:
        """A lock while the store is opened: MLflow creates a new store by running its schema
        migrations, and two processes doing so at once break it ("table ... already exists", "Online
        migration expected to match one row"). sqlite: a lock on the store's folder; PostgreSQL: an
        advisory lock of the database. Reentrant in a process (prepare() opens the store in check())."""
        held = _opening.__dict__.setdefault("uris", set())
        if self.uri in held:
            yield
            return
        held.add(self.uri)
        try:
            with self._pg_lock() if self.uri.startswith("postgresql") else self._folder_lock():
                yield
        finally:
            held.discard(self.uri)

    @contextmanager
    def _pg_lock(self) -> Iterator[None]:
        """pg_advisory_lock, held by a connection of its own until the store is open (it goes with the
        connection if this process dies)."""
        import sqlalchemy

        engine = sqlalchemy.create_engine(self.uri, poolclass=sqlalchemy.pool.NullPool)
        try:
            conn = engine.connect()
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": PG_MIGRATION_LOCK})
        except Exception as e:  # a database that cannot be reached: one line
            engine.dispose()
            raise self._store_error(e) from None
        try:
            yield
        finally:
            conn.close()  # ends the session, and with it the lock
            engine.dispose()

    @contextmanager
    def _folder_lock(self) -> Iterator[None]:
        import fcntl

        folder = Path(self.uri.removeprefix("sqlite:///")).expanduser().parent
        try:
            if not self.uri.startswith("sqlite:///"):
                raise OSError
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder, os.O_RDONLY)
        except OSError:  # not a local store, or a folder that check() reports in one line
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def check(self, writing: bool = True) -> None:
        """A server must answer one GET of its /health (with the user's MLflow credentials and TLS
        settings); an sqlite store must be an SQLite file (writable unless only `reading`) or
        creatable in a writable folder; any store that exists must open, and its experiment of our
        name must not be deleted. Creates nothing."""
        if self.remote:
            self._probe_server()
        elif self.uri.startswith("sqlite:") and not self._check_sqlite(writing):
            return  # a new store: nothing to open yet
        self._check_experiment()

    def _probe_server(self) -> None:
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request

        try:
            http_request(get_default_host_creds(self.uri), "/health", "GET", max_retries=0,
                         timeout=self.PROBE_TIMEOUT_S)
        except Exception as e:
            raise UserError(
                f"the MLflow tracking server {self.uri} does not answer ({_root_cause(e)}): start it "
                f"(mlflow server --backend-store-uri sqlite:///mlflow.db --port PORT) or track to a local "
                f"store with tracking.uri=sqlite:///ABS/PATH/mlflow.db (or MLFLOW_TRACKING_URI=...)") from None

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        experiment_id = self.prepare()
        _quiet_store_errors()
        self._beat = time.time()
        tags = {**tags, HEARTBEAT_TAG: str(int(self._beat))}
        run = self.client.create_run(experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        items = [Param(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + MAX_PARAMS_TAGS_PER_BATCH])
        log.info("MLflow run %s (%s) in %s", self.run_id, run_name, self.uri)
        self._start_system_metrics()

    def attach(self, run_id: str) -> None:
        """Write into an existing run (a sweep's parent found again), marking it RUNNING; the reason
        it failed last time no longer describes it."""
        self.prepare()
        self.run_id = run_id
        if "failure_reason" in self.client.get_run(run_id).data.tags:
            self.client.delete_tag(run_id, "failure_reason")
        self.client.update_run(run_id, status="RUNNING")

    def claim(self, key: str, value: str, run_id: str | None = None) -> bool:
        """Param `key` = `value` on this run (or `run_id`), unless another value holds it: MLflow never
        changes a param (the store's unique key), so of several processes claiming one key exactly one
        wins; claiming the value it holds succeeds."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode

        try:
            self.client.log_param(run_id or self.run_id, key, value)
        except MlflowException as e:
            if e.error_code != ErrorCode.Name(INVALID_PARAMETER_VALUE):
                raise
            return False
        return True

    def _start_system_metrics(self) -> None:
        """MLflow's own CPU/GPU utilisation and memory sampler, logged into this run (opt-in)."""
        if not self.system_metrics:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=True, tracking_uri=self.uri)
        self._monitor.start()

    def resume(self, run_id: str, dest: Path, checkpoint: str, load: Callable[[Path | None], T],
               force: bool = False) -> T:
        """Continue run `run_id`: take it over (`take_lease`; `force` even from a resume that looks
        alive), download `checkpoints/<checkpoint>` into `dest` (None if the run died before its first
        one), hand it to `load` (which raises if it is unusable), and only then mark the run RUNNING
        again; returns what `load` returned. A resumed run replays the steps after that checkpoint;
        values it had already logged for those steps are not logged twice."""
        from mlflow.exceptions import MlflowException

        self.prepare()
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            raise UserError(f"resume={run_id}: no such run in {self.uri}; check the run id and tracking.uri") from None
        self.take_lease(run, force)
        try:
            logged = {k: {m.step for m in self.client.get_metric_history(run_id, k)} for k in run.data.metrics}
            names = {a.path for a in self.client.list_artifacts(run_id, "checkpoints")}
            path = None
            if f"checkpoints/{checkpoint}" in names:
                with quiet_downloads():
                    path = Path(self.client.download_artifacts(run_id, f"checkpoints/{checkpoint}", str(dest)))
            state = load(path)  # a damaged checkpoint stops here, with the run as it was
        except BaseException:
            # refused: the next resume need not wait for us (if the store failed, the lease goes stale)
            with contextlib.suppress(Exception):
                self.client.delete_tag(run_id, LEASE_TAG)
            raise
        _quiet_store_errors()
        if "failure_reason" in run.data.tags:  # training again: how it ended last time is past
            self.client.delete_tag(run_id, "failure_reason")
        self._beat = time.time()
        self.client.set_tag(run_id, HEARTBEAT_TAG, str(int(self._beat)))
        self.client.update_run(run_id, status="RUNNING")
        self.run_id, self._logged = run_id, logged
        log.info("resuming MLflow run %s from %s", run_id, f"checkpoints/{checkpoint}" if path else "the start")
        return state

    def take_lease(self, run: Any, force: bool) -> None:
        """Take the stopped run `run` over, or refuse in one line: MLflow has no compare-and-set, so
        write our lease tag, wait LEASE_SETTLE_S for a rival's write to land, and read it back; the
        lease read then is the winner's. A rival's lease counts while it is younger than
        tracking.stale_after_s and the run has not ended since (unless `force`: its process is gone)."""
        run_id = run.info.run_id

        def holder(r: Any) -> tuple[str, float]:
            token, _, when = r.data.tags.get(LEASE_TAG, "").partition(" ")
            try:
                return token, float(when)
            except ValueError:  # none, or not ours to read
                return "", 0.0

        before, when = holder(run)
        age = time.time() - when
        ended_since = (run.info.end_time or 0) / 1000 > when
        if not force and age < self.stale_after_s and not ended_since:
            raise UserError(f"resume={run_id}: another process is taking this run over (its resume began {age:.0f} s "
                            f"ago); let it, or add force_resume=true if that process is gone")
        token, failed = uuid.uuid4().hex, None
        try:
            self.client.set_tag(run_id, LEASE_TAG, f"{token} {time.time()}")
        except Exception as e:  # sqlite refuses the second of two inserts of a new tag at once (UNIQUE)
            failed = e
        time.sleep(LEASE_SETTLE_S)
        now = holder(self.client.get_run(run_id))[0]
        if failed is not None and now == before:  # no rival wrote: the store itself failed
            raise self._store_error(failed)
        if now != token:
            raise UserError(f"resume={run_id}: another process took this run over at the same moment; it continues "
                            f"the run")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        self._check_written()
        now = time.time()
        if now - self._beat >= self.heartbeat_s:  # async, like the metrics: costs the loop nothing
            self._beat = now
            self._pending.append((self.client.set_tag(self.run_id, HEARTBEAT_TAG, str(int(now)), synchronous=False),
                                  []))
        batch = [Metric(k, float(v), int(now * 1000), step) for k, v in metrics.items()
                 if step not in self._logged.get(k, ())]
        if not batch:
            return
        self._pending.append((self.client.log_batch(self.run_id, metrics=batch, synchronous=False), batch))

    @property
    def remote(self) -> bool:
        """A tracking server: a request that fails waits out MLflow's retries (a local store fails at once)."""
        return self.uri.startswith(("http://", "https://"))

    def flush(self) -> None:
        """Wait until every metric logged so far is stored. Called before a checkpoint: a resumed run
        replays only the steps after its checkpoint, so a checkpoint stored ahead of the metrics (MLflow's
        async pool was still writing when a SIGKILL came) would lose those steps for good. A batch that
        failed stays pending: `close` sends it again. A tracking server gets FLUSH_WAIT_S at most: one
        that is away must not stall training (its batches wait in MLflow's retries; a SIGKILL during
        such an outage can still lose them)."""
        from concurrent.futures import wait

        futures = [f for op, _ in self._pending for f in op._operation_futures]  # (RunOperations has no timeout)
        wait(futures, timeout=self.FLUSH_WAIT_S if self.remote else None)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if Path(path).is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_model(self, model: Any) -> None:
        """The trained module as an MLflow 3 logged model of this run, so that
        `mlflow.pytorch.load_model("runs:/RUN_ID/model")` gives a working module (tracking.log_model).
        MLflow pickles the module: load it only from a store you trust. This project's own tools
        never load it (rerun and resume read the weights-only checkpoints)."""
        if not self.log_model_enabled:
            return
        from importlib.metadata import version

        import mlflow.pytorch

        # log_model finds the store and the experiment of the model through MLflow's global state
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_experiment(experiment_id=self.client.get_run(self.run_id).info.experiment_id)
        logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)  # its pickle caution: said above, once
        mlflow.pytorch.log_model(model, name="model", run_id=self.run_id, serialization_format="pickle",
                                 pip_requirements=[f"torch=={version('torch')}"])

    def set_tags(self, tags: dict[str, str], run_id: str | None = None) -> None:
        """Tags on this run, or on another run of the store (`run_id`)."""
        from mlflow.entities import RunTag

        self.client.log_batch(run_id or self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def delete_artifacts(self, folder: str, pattern: str) -> None:
        """Delete this run's artifacts in `folder` whose names match the glob `pattern` (checkpoints a
        run that ended no longer needs). MLflow's client has no call for it: its artifact repository has."""
        from fnmatch import fnmatch

        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        run = self.client.get_run(self.run_id)
        doomed = [a.path for a in self.client.list_artifacts(self.run_id, folder)
                  if not a.is_dir and fnmatch(a.path.rsplit("/", 1)[-1], pattern)]
        repo = get_artifact_repository(run.info.artifact_uri) if doomed else None
        for path in doomed:
            repo.delete_artifacts(path)

    def last_step(self, run_id: str, key: str) -> int | None:
        from mlflow import MlflowClient

        return max((m.step for m in MlflowClient(self.uri).get_metric_history(run_id, key)), default=None)

    def set_experiment_tag(self, key: str, value: str) -> str:
        """A tag on this logger's experiment (e.g. a saved view of the MLflow UI); its id."""
        experiment_id = self.prepare()
        self.client.set_experiment_tag(experiment_id, key, value)
        return experiment_id

    def discard(self) -> None:
        """End this run KILLED and delete it (a sweep's parent that another sweeper's replaced)."""
        assert self.run_id is not None
        self.client.set_terminated(self.run_id, status="KILLED")
        self.client.delete_run(self.run_id)
        self.run_id = None

    def end_run(self, run_id: str, status: str, reason: str) -> None:
        """End another run of this store (a sweep's trial left RUNNING by a worker that died)."""
        _end(self.client, run_id, status, reason)

    def search(self, filter_string: str, order_by: list[str] | None = None, max_results: int = 50000,
               all_experiments: bool = False, experiment_id: str | None = None) -> list[Any]:
        """Runs matching an MLflow filter, in this logger's experiment (or `experiment_id`, or every
        experiment)."""
        from mlflow import MlflowClient
        from mlflow.entities import ViewType

        self.check(writing=False)
        client = MlflowClient(self.uri)
        if all_experiments:
            ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
        elif experiment_id is not None:
            ids = [experiment_id]
        else:
            exp = client.get_experiment_by_name(self.experiment)
            ids = [] if exp is None else [exp.experiment_id]
        return list(client.search_runs(ids, filter_string, order_by=order_by, max_results=max_results)) if ids else []

    def close(self, status: str, reason: str | None = None) -> bool:
        """Wait for every metric, then end the run: FINISHED, FAILED (with the reason as a tag) or
        KILLED; whether it ended so. If the store stayed away past MLflow's retry window, say what
        was lost and how to end the run later; that is a UserError for a run that otherwise
        FINISHED, only an error log line for one that failed (so it does not hide the error that
        ended it)."""
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        if self.run_id is None:
            return True
        if self._monitor is not None:
            self._monitor.finish()  # its last sample, before the run ends
            self._monitor = None
        dropped = []
        for op, batch in self._pending:
            try:
                op.wait()
            except Exception:  # MLflow's, or the store's own error (a full disk under sqlite)
                dropped += batch
        self._pending.clear()
        # MLflow's async queue drops a batch whose HTTP retries ran out (it only logs an error), so
        # we send those once more, synchronously: a server back by now still gets every metric.
        lost, error = 0, None
        for i in range(0, len(dropped), MAX_METRICS_PER_BATCH):
            try:
                self.client.log_batch(self.run_id, metrics=dropped[i : i + MAX_METRICS_PER_BATCH])
            except Exception as e:
                lost, error = len(dropped) - i, e
                break
        if dropped and not lost:
            log.warning("re-sent %d metric values that MLflow's async logging had dropped", len(dropped))
        if not lost:  # else the server is still away after one more retry window: ending would fail too
            try:
                if reason:
                    self.client.set_tag(self.run_id, "failure_reason", reason)
                self.client.set_terminated(self.run_id, status=status)  # retried by MLflow like the rest
                log.info("MLflow run %s ended %s", self.run_id, status)
            except Exception as e:
                error = e
        if error is None:
            return True
        msg = (f"MLflow at {self.uri} failed ({_root_cause(error)}): run {self.run_id} is left RUNNING "
               f"instead of {status} and {lost} of its metric values were not written; once the store "
               f"works again, end it with: lesson7-train --mark-failed {self.run_id} --tracking-uri {self.uri} "
               f"--force")  # --force: this process, which owned the run, has stopped training it
        if status != "FINISHED":
            log.error(msg)
            return False
        raise UserError(msg)

    # --- store checks, liveness and repair ------------------------------------------------------

    def _store_error(self, e: BaseException) -> UserError:
        return UserError(f"tracking.uri={self.uri}: the MLflow store cannot be used ({_root_cause(e)}); point "
                         f"tracking.uri at a writable sqlite:///ABS/PATH/mlflow.db or a running server")

    def _check_sqlite(self, writing: bool) -> bool:
        """An sqlite URI names an SQLite file, or a new file in a writable folder; whether it exists."""
        path = Path(self.uri.removeprefix("sqlite:///")).expanduser()
        if not self.uri.startswith("sqlite:///") or str(path) in ("", ".", ":memory:"):
            raise UserError(f"tracking.uri={self.uri}: give a file, e.g. sqlite:///ABS/PATH/mlflow.db")
        if path.exists():
            if path.resolve() not in _sqlite_files:
                header = b"" if path.is_dir() else path.open("rb").read(len(SQLITE_HEADER))
                if path.is_dir() or header not in (SQLITE_HEADER, b""):
                    raise UserError(f"tracking.uri={self.uri}: {path} is not an SQLite database; point "
                                    f"tracking.uri at an MLflow store or at a new file")
                if header == SQLITE_HEADER:
                    _sqlite_files.add(path.resolve())
            if writing and (not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK)):
                raise UserError(f"tracking.uri={self.uri}: {path} is not writable; fix its permissions or use "
                                f"another store")
            return path.resolve() in _sqlite_files
        folder = path.parent
        while not folder.exists():
            folder = folder.parent
        if not folder.is_dir():
            raise UserError(f"tracking.uri={self.uri}: {folder} is a file, so no store can be created under it")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UserError(f"tracking.uri={self.uri}: {folder} is not writable, so the store cannot be created "
                            f"there; use a writable folder")
        return False

    def _check_experiment(self) -> None:
        from mlflow import MlflowClient
        from mlflow.tracking.registry import UnsupportedModelRegistryStoreURIException

        try:
            # a database store is created (migrated) when first opened: under the lock (sqlite's is new
            # only when its file is, which check() leaves to prepare())
            with self._creating() if self.uri.startswith("postgresql") else contextlib.nullcontext():
                exp = MlflowClient(self.uri).get_experiment_by_name(self.experiment) if self.experiment else None
        except UserError:
            raise
        except UnsupportedModelRegistryStoreURIException:
            raise UserError(f"tracking.uri={self.uri}: MLflow has no store for this scheme; use "
                            f"sqlite:///ABS/PATH/mlflow.db, http(s)://HOST:PORT or a database URI") from None
        except Exception as e:
            raise self._store_error(e) from None
        if exp is not None and exp.lifecycle_stage == "deleted":
            raise UserError(f"tracking.experiment={self.experiment} was deleted in {self.uri}: restore it (mlflow "
                            f"experiments restore --experiment-id {exp.experiment_id}) or choose another name")

    def _check_written(self) -> None:
        """A local store that refused a write (full disk, read-only file) refuses the next ones too:
        stop the run at once, in one line, instead of training on while every batch fails. (A server
        that went away may come back: `close` sends its dropped batches again.)"""
        if self.remote:
            return
        while self._pending and all(f.done() for f in self._pending[0][0]._operation_futures):
            failed = [f.exception() for f in self._pending[0][0]._operation_futures if f.exception()]
            if failed:  # left pending: close() counts its metrics as lost
                raise UserError(f"the MLflow store {self.uri} cannot be written ({_root_cause(failed[0])}); free "
                                f"space or fix its permissions, then continue the run: lesson7-train "
                                f"resume={self.run_id} force_resume=true")
            self._pending.pop(0)

    def mark_failed(self, run_id: str, force: bool) -> None:
        """End a run left RUNNING (its process died while the store was unreachable) as FAILED.
        Refuses a run that is not RUNNING, and a live one unless `force`."""
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        self.check()
        client = MlflowClient(self.uri)
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise UserError(f"no run {run_id!r} in {self.uri}; check the run id and --tracking-uri") from None
        if run.info.status != "RUNNING":
            raise UserError(f"run {run_id} is {run.info.status}, not RUNNING: nothing to repair")
        age = heartbeat_age(run)
        if age is not None and age < self.stale_after_s and not force:
            raise UserError(f"run {run_id} is still training (its heartbeat is {age:.0f} s old); stop it first, "
                            f"or add --force")
        _end(client, run_id, "FAILED", "left RUNNING; marked FAILED by lesson7-train --mark-failed")



# SQLite databases whose header this process has read. Once: closing any file descriptor of a database
# drops every POSIX lock this process holds on it (SQLite's "how to corrupt" 2.2), so reading the header
# again while MLflow's connections (its async logging thread) write gives them "disk I/O error"
_sqlite_files: set[Path] = set()
_opening = threading.local()  # .uris: the stores whose lock this thread holds (MlflowLogger._creating)

# MLflow 3's UI opens an experiment of unknown kind in its GenAI view (a sweep's parent shown as an
# "Evaluation"); this kind opens the classic runs table
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def _quiet_store_errors() -> None:
    """MLflow logs every failed write with a traceback (one per metric batch: hundreds on a full
    disk); the logger reports a store failure itself, in one line, so those records are dropped."""
    for name in ("mlflow.store.db.utils", "mlflow.utils.async_logging.async_logging_queue"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def heartbeat_age(run: Any) -> float | None:
    """Seconds since a RUNNING run's last heartbeat (None: not RUNNING, or from before heartbeats)."""
    beat = run.data.tags.get(HEARTBEAT_TAG)
    return None if run.info.status != "RUNNING" or beat is None else time.time() - float(beat)


def finished_objective(uri: str | None, run_id: str, names: list[str] | None = None) -> float | list[float] | None:
    """The objective of a run that already ended FINISHED (a requeued trial whose first job finished
    it as the time limit's signal came), else None: the trial still has training left. `names`: the
    metrics of several objectives, whose values it returns in that order."""
    from mlflow import MlflowClient

    if uri is None:
        return None
    run = MlflowClient(uri).get_run(run_id)
    if run.info.status != "FINISHED":
        return None
    if names is None:
        return run.data.metrics.get("objective")
    values = [run.data.metrics.get(n) for n in names]
    return None if None in values else values


def fail_runs(uri: str, run_ids: list[str], reason: str) -> None:
    """Mark FAILED the runs that are RUNNING or FINISHED: trials that failed elsewhere (a sweep's
    study says so: their process died, or their result was never told)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri)
    for run_id in run_ids:
        try:
            status = client.get_run(run_id).info.status
        except MlflowException:  # deleted meanwhile: nothing to make agree
            continue
        if status in ("RUNNING", "FINISHED"):
            _end(client, run_id, "FAILED", reason)


def _end(client: Any, run_id: str, status: str, reason: str) -> None:
    """End a run that is not this process's own: the reason as a tag, then the status."""
    client.set_tag(run_id, "failure_reason", reason)
    client.set_terminated(run_id, status=status)


def _root_cause(e: BaseException) -> str:
    """The innermost exception's first line: '[Errno 111] Connection refused', 'timed out', ..."""
    while (e.__cause__ or e.__context__) is not None and not isinstance(e.__cause__ or e.__context__, UserError):
        e = e.__cause__ or e.__context__  # (not into the error a failure happened while handling)
    return (str(e).splitlines() or [type(e).__name__])[0]


def flatten(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as dotted keys: {'data.bptt': 8, 'model.n_hidden': 512, ...}."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def default_run_name(cfg: DictConfig) -> str:
    """e.g. lstm-h512-bptt8 or resnet2-16x32x64x128x256: the model and what sweeps vary most."""
    name = cfg.model.kind if "kind" in cfg.model else cfg.model._target_.rsplit(".", 1)[-1].lower()
    if "n_hidden" in cfg.model:
        name += f"-h{cfg.model.n_hidden}"
    if "layers" in cfg.model:
        name += "-" + "x".join(str(w) for w in cfg.model.layers)
    if "bptt" in cfg.data:
        name += f"-bptt{cfg.data.bptt}"
    return name


def git_tags() -> dict[str, str]:
    """Commit and dirty flag of the project's checkout (empty when it is not a git checkout)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=PROJECT_DIR, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit, "git_dirty": str(dirty).lower(), "mlflow.source.git.commit": commit}


@contextmanager
def quiet_downloads() -> Iterator[None]:
    """No MLflow progress bar on stderr while downloading artifacts (one bar per file, even tiny ones)."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before
