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

log = logging.getLogger(__name__)
PROJECT_DIR = Path(__file__).resolve().parents[1]


class Logger(Protocol):
    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def close(self, status: str, reason: str | None = None) -> None: ...


class NullLogger:
    """tracking=none: the same interface, no MLflow."""

    run_id = None

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def close(self, status: str, reason: str | None = None) -> None:
        pass


class MlflowLogger:
    """One MLflow run. Metrics are logged asynchronously (MLflow's own queue) so a slow store or
    server never stalls the training loop; `close` waits for them before ending the run."""

    def __init__(self, uri: str, experiment: str, artifact_location: str | None, run_name: str | None) -> None:
        self.uri, self.experiment, self.artifact_location = uri, experiment, artifact_location
        self.run_name = run_name
        self.run_id: str | None = None
        self._pending: list[Any] = []

    def prepare(self) -> str:
        """Create the store and the experiment if needed (once, before parallel jobs); its id."""
        from mlflow import MlflowClient

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

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._pending.append(self.client.log_batch(self.run_id, metrics=batch, synchronous=False))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if Path(path).is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def close(self, status: str, reason: str | None = None) -> None:
        """End the run: FINISHED, FAILED (with the reason as a tag) or KILLED."""
        if self.run_id is None:
            return
        for op in self._pending:
            op.wait()
        self._pending.clear()
        if reason:
            self.client.set_tag(self.run_id, "failure_reason", reason)
        self.client.set_terminated(self.run_id, status=status)
        log.info("MLflow run %s ended %s", self.run_id, status)


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
    """e.g. lstm-h512-bptt8: the model and the hyper-parameters sweeps vary most."""
    name = cfg.model.get("kind") or cfg.model._target_.rsplit(".", 1)[-1].lower()
    if "n_hidden" in cfg.model:
        name += f"-h{cfg.model.n_hidden}"
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
