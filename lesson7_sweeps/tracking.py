"""Every MLflow call of the project lives here, behind a small logger interface.

The runner only sees `Logger`: `start`, `log_metrics(step)`, `log_artifact`, `log_text`, `close`.
`MlflowLogger` writes to any MLflow store (the default is one sqlite file under outputs/);
`NullLogger` (tracking=none) writes nothing and never imports MLflow.
"""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig, OmegaConf

from lesson7_sweeps.errors import UserError

log = logging.getLogger(__name__)
PROJECT_DIR = Path(__file__).resolve().parents[1]


class Logger(Protocol):
    def check(self) -> None: ...
    def prepare(self) -> object: ...
    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> None: ...
    def resume(self, run_id: str, dest: Path) -> Path | None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def close(self, status: str, reason: str | None = None) -> None: ...


class NullLogger:
    """tracking=none: the same interface, no MLflow."""

    run_id = None

    def check(self) -> None:
        pass

    def prepare(self) -> None:
        pass

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        pass

    def resume(self, run_id: str, dest: Path) -> Path | None:
        raise UserError(f"resume={run_id} needs a tracking store to find the run in; drop tracking=none")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def close(self, status: str, reason: str | None = None) -> None:
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

    def __init__(self, uri: str, experiment: str, artifact_location: str | None, run_name: str | None) -> None:
        self.uri, self.experiment, self.artifact_location = uri, experiment, artifact_location
        self.run_name = run_name
        self.run_id: str | None = None
        # resumed run: the steps each metric already has. A set, not the highest step: MLflow's async
        # queue writes batches from a thread pool, so a killed run can hold step 210 but not 205.
        self._logged: dict[str, set[int]] = {}
        self._pending: list[tuple[Any, list[Any]]] = []  # (MLflow's async operation, its metrics)

    def prepare(self) -> str:
        """Check the server answers, create the store and the experiment if needed (once, before
        parallel jobs); the experiment's id."""
        from mlflow import MlflowClient

        self.check()
        if self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(self.uri)
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        # artifact_location only makes sense for a local store; a server decides its own
        location = self.artifact_location if self.uri.startswith("sqlite:") else None
        try:
            return self.client.create_experiment(self.experiment, artifact_location=location)
        except Exception:  # another job created it between our lookup and create
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def check(self) -> None:
        """A server must answer one GET of its /health (with the user's MLflow credentials and TLS
        settings); a local store needs no check. Creates nothing."""
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request

        if not self.uri.startswith(("http://", "https://")):
            return
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
        run = self.client.create_run(experiment_id, run_name=self.run_name or run_name, tags=tags)
        self.run_id = run.info.run_id
        items = [Param(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + MAX_PARAMS_TAGS_PER_BATCH])
        log.info("MLflow run %s (%s) in %s", self.run_id, self.run_name or run_name, self.uri)

    def resume(self, run_id: str, dest: Path) -> Path | None:
        """Continue run `run_id`: mark it RUNNING again and download its latest checkpoint into
        `dest` (None if it died before its first one). A resumed run replays the steps after that
        checkpoint; values it had already logged for those steps are not logged twice."""
        from mlflow.exceptions import MlflowException

        self.prepare()
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            raise UserError(f"resume={run_id}: no such run in {self.uri}; check the run id and tracking.uri") from None
        self.run_id = run_id
        self._logged = {k: {m.step for m in self.client.get_metric_history(run_id, k)} for k in run.data.metrics}
        names = {a.path for a in self.client.list_artifacts(run_id, "checkpoints")}
        path = None
        if "checkpoints/last.pt" in names:
            path = Path(self.client.download_artifacts(run_id, "checkpoints/last.pt", str(dest)))
        self.client.update_run(run_id, status="RUNNING")
        log.info("resuming MLflow run %s from %s", run_id, "its last checkpoint" if path else "the start")
        return path

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if step not in self._logged.get(k, ())]
        if not batch:
            return
        self._pending.append((self.client.log_batch(self.run_id, metrics=batch, synchronous=False), batch))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if Path(path).is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def close(self, status: str, reason: str | None = None) -> None:
        """Wait for every metric, then end the run: FINISHED, FAILED (with the reason as a tag) or
        KILLED. If the server stayed away past MLflow's retry window, say what was lost; that is a
        UserError for a run that otherwise FINISHED, only an error log line for one that failed
        (so it does not hide the error that ended it)."""
        from mlflow.exceptions import MlflowException
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        if self.run_id is None:
            return
        dropped = []
        for op, batch in self._pending:
            try:
                op.wait()
            except MlflowException:
                dropped += batch
        self._pending.clear()
        # MLflow's async queue drops a batch whose HTTP retries ran out (it only logs an error), so
        # we send those once more, synchronously: a server back by now still gets every metric.
        lost, error = 0, None
        for i in range(0, len(dropped), MAX_METRICS_PER_BATCH):
            try:
                self.client.log_batch(self.run_id, metrics=dropped[i : i + MAX_METRICS_PER_BATCH])
            except MlflowException as e:
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
            except MlflowException as e:
                error = e
        if error is not None:
            msg = (f"MLflow at {self.uri} failed ({_root_cause(error)}): run {self.run_id} is left RUNNING "
                   f"instead of {status} and {lost} of its metric values were not written")
            if status != "FINISHED":
                log.error(msg)
                return
            raise UserError(msg)


def fail_orphan_run(uri: str, run_id: str, reason: str) -> None:
    """Mark FAILED a run that its process left RUNNING when it died (a trial of a killed sweep)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_tag(run_id, "failure_reason", reason)
        client.set_terminated(run_id, status="FAILED")


def _root_cause(e: BaseException) -> str:
    """The innermost exception's first line: '[Errno 111] Connection refused', 'timed out', ..."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
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
