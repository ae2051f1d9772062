"""Issue 9, items 2, 3 and 5: no run is ever left RUNNING, resume says what it does, results cannot
be silently wrong. Real training into a real sqlite store; real signals, sent by the logger at the
moment a test needs (the stand-in for a user's Ctrl-C or a scheduler's SIGTERM at that moment)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from omegaconf import OmegaConf

from lesson7_sweeps import resume
from lesson7_sweeps.checkpoint import Interrupted
from lesson7_sweeps.errors import CheckpointError, ConfigError, DataError, UserError
from lesson7_sweeps.tracking import HEARTBEAT_TAG, MlflowLogger
from lesson7_sweeps.train import train, train_run

from .conftest import make_text

HERE = f"{__name__}.SignalAt"


pytestmark = pytest.mark.usefixtures("one_thread")


class Terminated(BaseException):
    """What SIGTERM does to a process when nobody handles it (here: without killing pytest)."""


@pytest.fixture(autouse=True)
def sigterm_is_fatal():
    def die(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, die)
    yield
    signal.signal(signal.SIGTERM, previous)


class SignalAt(MlflowLogger):
    """The real MLflow logger, which also sends this process a signal at planned moments:
    `plan` holds (event, test, signal); each fires once, when test(payload) holds for its event."""

    plan: list = []

    def _fire(self, event: str, payload) -> None:
        for item in list(SignalAt.plan):
            if item[0] == event and item[1](payload):
                SignalAt.plan.remove(item)
                os.kill(os.getpid(), item[2])
                time.sleep(0.05)  # the handler runs here

    def log_metrics(self, metrics, step):
        self._fire("metrics", metrics)
        super().log_metrics(metrics, step)

    def log_text(self, text, artifact_file):
        self._fire("text", artifact_file)
        super().log_text(text, artifact_file)

    def close(self, status, reason=None):
        self._fire("close", status)
        return super().close(status, reason)


@pytest.fixture
def signalled(make_cfg, monkeypatch):
    def _make(plan, *overrides):
        monkeypatch.setattr(SignalAt, "plan", list(plan))
        return make_cfg(f"tracking._target_={HERE}", *overrides)

    return _make


def only_run(uri: str):
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    return client, run


def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/mlflow.db"


def always(_):
    return True


# --- item 2: every way out ends the run ---------------------------------------------------------


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_while_the_run_is_ended_still_ends_it_killed(signalled, tmp_path: Path, second: int):
    cfg = signalled([("metrics", always, signal.SIGINT), ("close", always, second)])
    with pytest.raises(Interrupted) as stopped:
        train(cfg)
    assert stopped.value.saved and stopped.value.marked
    client, run = only_run(store(tmp_path))
    assert run.info.status == "KILLED" and run.data.tags["failure_reason"] == "interrupted (SIGINT)"


def test_sigterm_during_the_lr_finder_ends_the_run_killed(signalled, tmp_path: Path):
    cfg = signalled([("metrics", lambda m: "lr_find_loss" in m, signal.SIGTERM)], "+lr_find=true")
    with pytest.raises(Interrupted) as stopped:
        train(cfg)
    assert stopped.value.marked and not stopped.value.saved
    assert only_run(store(tmp_path))[1].info.status == "KILLED"


def test_sigterm_during_the_sample_ends_the_run_killed_and_resume_finishes_it(signalled, tmp_path: Path):
    cfg = signalled([("text", lambda name: name == "sample.txt", signal.SIGTERM)])
    with pytest.raises(Interrupted):
        train(cfg)
    client, run = only_run(store(tmp_path))
    assert run.info.status == "KILLED"
    epochs = client.get_metric_history(run.info.run_id, "epoch")
    train_run(cfg, resume=run.info.run_id)  # training was done: resume only samples again
    client, resumed = only_run(store(tmp_path))
    assert resumed.info.status == "FINISHED"
    assert client.get_metric_history(run.info.run_id, "epoch") == epochs  # no epoch trained twice


def test_sigterm_during_the_last_evaluation_is_not_swallowed(signalled, tmp_path: Path):
    last = lambda m: m.get("epoch") == 2  # noqa: E731 -- logged right after the last evaluation
    with pytest.raises(Interrupted):
        train(signalled([("metrics", last, signal.SIGTERM)]))
    assert only_run(store(tmp_path))[1].info.status == "KILLED"


class StoreAtCheckpoint(MlflowLogger):
    """The real MLflow logger, which also reads the store back each time a checkpoint is stored:
    `seen` holds, per checkpoint, the steps logged so far that the store does not hold yet."""

    seen: list = []

    def log_metrics(self, metrics, step):
        self.__dict__.setdefault("sent", set()).update((k, step) for k in metrics)
        super().log_metrics(metrics, step)

    def log_artifact(self, path, artifact_path=None):
        if artifact_path == "checkpoints":
            client = MlflowClient(self.uri)
            stored = {(k, m.step) for k in {k for k, _ in self.sent} for m in client.get_metric_history(self.run_id, k)}
            StoreAtCheckpoint.seen.append(self.sent - stored)
        super().log_artifact(path, artifact_path)


def test_a_checkpoint_is_stored_only_after_every_metric_before_it(make_cfg, monkeypatch):
    """A resumed run replays only the steps after its checkpoint: were the checkpoint stored while
    MLflow's async pool still held metrics of earlier steps, a SIGKILL then would lose them for good
    (seen in CI: one train_loss step missing from a run resumed after a SIGKILL)."""
    monkeypatch.setattr(StoreAtCheckpoint, "seen", [])
    train(make_cfg(f"tracking._target_={__name__}.StoreAtCheckpoint", "trainer.epochs=3", "trainer.log_every=1"))
    assert len(StoreAtCheckpoint.seen) == 3  # last.pt after epochs 1 and 2, final.pt
    assert StoreAtCheckpoint.seen == [set()] * 3


class NotATensor:
    """Something only a pickle of arbitrary objects holds: weights_only refuses it."""


@pytest.mark.parametrize("damage", ["truncated", "untrusted"])
def test_resume_checks_the_checkpoint_before_marking_the_run_running(make_cfg, tmp_path: Path, damage: str):
    cfg = make_cfg("trainer.epochs=1")
    run_id = train_run(cfg).run_id
    client = MlflowClient(store(tmp_path))
    final = Path(client.download_artifacts(run_id, "checkpoints/final.pt", str(tmp_path / "dl")))
    bad = tmp_path / "bad" / "final.pt"
    bad.parent.mkdir()
    if damage == "truncated":
        bad.write_bytes(final.read_bytes()[: final.stat().st_size // 2])
    else:
        torch.save({"model": NotATensor()}, bad)
    client.log_artifact(run_id, str(bad), "checkpoints")
    cfg.trainer.epochs = 2  # extend the FINISHED run
    with pytest.raises(CheckpointError) as err:
        train_run(cfg, resume=run_id, checkpoint="final.pt")
    msg = str(err.value)
    assert msg.startswith("final.pt is damaged or untrusted") and "weights_only" not in msg and "\n" not in msg
    assert client.get_run(run_id).info.status == "FINISHED"  # as it was


# --- item 3: resume refuses a live run, a finished one, and overrides it cannot apply ------------


def stored_run(make_cfg, tmp_path: Path, status: str, heartbeat_age_s: float | None, *overrides: str) -> str:
    """A run as the store holds it after training (config.yaml, status, heartbeat), without training."""
    cfg = make_cfg(*overrides)
    client = MlflowClient(store(tmp_path))
    exp = client.get_experiment_by_name("test") or client.get_experiment(
        client.create_experiment("test", artifact_location=str(tmp_path / "artifacts")))
    tags = {} if heartbeat_age_s is None else {HEARTBEAT_TAG: str(int(time.time() - heartbeat_age_s))}
    run_id = client.create_run(exp.experiment_id, tags=tags).info.run_id
    client.log_text(run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    client.set_terminated(run_id, status) if status != "RUNNING" else None
    return run_id


def resume_cfg(make_cfg, run_id: str, *overrides: str):
    return make_cfg(f"resume={run_id}", *overrides)


def test_resume_refuses_a_live_run_unless_forced(make_cfg, tmp_path: Path):
    live = stored_run(make_cfg, tmp_path, "RUNNING", heartbeat_age_s=5)
    with pytest.raises(UserError, match=r"the run is still training elsewhere \(its heartbeat is \d+ s old"):
        resume.plan(resume_cfg(make_cfg, live), [])
    assert resume.plan(resume_cfg(make_cfg, live, "force_resume=true"), []).checkpoint == "last.pt"
    stale = stored_run(make_cfg, tmp_path, "RUNNING", heartbeat_age_s=3600)  # its process died long ago
    assert resume.plan(resume_cfg(make_cfg, stale), []).checkpoint == "last.pt"


def test_resume_of_a_finished_run_needs_more_epochs_and_then_extends_it(make_cfg, tmp_path: Path):
    done = stored_run(make_cfg, tmp_path, "FINISHED", None)
    with pytest.raises(UserError, match=r"the run FINISHED its 2 epochs; to train it further, raise trainer.epochs"):
        resume.plan(resume_cfg(make_cfg, done), [])
    plan = resume.plan(resume_cfg(make_cfg, done, "trainer.epochs=5"), ["trainer.epochs=5"])
    assert (plan.checkpoint, plan.cfg.trainer.epochs, plan.overrides) == ("final.pt", 5, ["trainer.epochs=5"])


def test_resume_applies_safe_overrides_and_refuses_the_rest_in_one_line(make_cfg, tmp_path: Path):
    killed = stored_run(make_cfg, tmp_path, "KILLED", None)
    safe = ["trainer.max_steps=7", "trainer.log_every=3", "trainer.device=cpu", "data.bptt=8", "model=lstm",
            "schedule=sgdr", "schedule=constant"]  # given twice, the last counts: the run's own
    plan = resume.plan(resume_cfg(make_cfg, killed, *safe), safe)
    assert (plan.cfg.trainer.max_steps, plan.cfg.trainer.log_every) == (7, 3)
    assert plan.overrides == ["trainer.max_steps=7", "trainer.log_every=3"]  # the others change nothing
    for bad in ("model.n_hidden=64", "data.bptt=16", "optim=sgd", "seed=7"):
        with pytest.raises(ConfigError) as err:
            resume.plan(resume_cfg(make_cfg, killed, bad), [bad])
        msg = str(err.value)
        assert msg.startswith(f"{bad}: resume continues the run with its own config; only trainer.epochs") and (
            f"lesson7-rerun {killed} {bad}" in msg) and "\n" not in msg


# --- item 5: results that cannot be silently wrong ------------------------------------------------


def test_a_vocabulary_of_only_unk_is_refused(make_cfg):
    with pytest.raises(DataError, match=r"data.min_freq=1000000000 leaves 0 characters .* lower data.min_freq"):
        train(make_cfg("data.min_freq=1000000000"))


def test_a_text_that_is_mostly_unk_is_tagged(make_cfg, tmp_path: Path):
    train(make_cfg("data.min_freq=300", "trainer.max_steps=5", "trainer.epochs=1"))
    _, run = only_run(store(tmp_path))
    assert float(run.data.params["dataset.unk_frac"]) > 0.05
    assert run.data.tags["data_warning"].endswith("of the text is <unk> (data.min_freq=300); val_loss and "
                                                  "val_accuracy then flatter the model: lower data.min_freq")


def test_a_model_too_big_for_memory_is_one_line_before_any_run(make_cfg, tmp_path: Path):
    with pytest.raises(ConfigError, match=r"^the model does not fit: its [\d,]+ parameters need about"):
        train(make_cfg("model.n_hidden=10000000", fresh_store=True))
    assert not (tmp_path / "mlflow.db").exists()  # checked before the store was even created


def test_data_warnings_do_not_fire_on_ordinary_text(tmp_path: Path):
    from lesson7_sweeps.data.text import TextData

    path = tmp_path / "t.txt"
    path.write_text(make_text(6000))
    data = TextData(path=str(path), url=None, cache_dir=str(tmp_path), lower=True, min_freq=1, valid_frac=0.2,
                    valid_from_line=None, bs=4, bptt=8, random_bptt=False, loader="plain", vocab="sorted",
                    val_average="samples", max_bytes=2**20)
    assert data.warnings == [] and data.unk_frac < 0.01
