"""End to end: the real config through Hydra's compose, train(cfg), a real sqlite MLflow store."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from lesson7_sweeps.models.rnn import CharRNN
from lesson7_sweeps.runner import TrainingDiverged
from lesson7_sweeps.train import train

from .conftest import SENTENCES


def only_run(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, path)}


def test_train_logs_a_complete_run(make_cfg, tmp_path: Path):
    objective = train(make_cfg())
    client, run = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "lstm-h32-bptt8" and run.data.tags["run_type"] == "train"
    assert "mlflow.parentRunId" not in run.data.tags  # a single run stays top-level
    p = run.data.params
    assert (p["data.bptt"], p["model.n_hidden"], p["optim.lr"], p["trainer.epochs"]) == ("8", "32", "0.01", "2")
    assert p["dataset.vocab_size"] == str(len(set("".join(SENTENCES))) + 2)  # chars + newline + <unk>
    for tag in ("device", "torch", "cuda"):
        assert tag in run.data.tags
    assert {"train_loss", "lr", "val_loss", "val_bpc", "val_accuracy", "epoch"} <= set(run.data.metrics)
    assert objective == run.data.metrics["val_loss"] == run.data.metrics["objective"]
    assert p["objective"] == "val_loss"
    assert run.data.metrics["val_bpc"] == pytest.approx(objective / math.log(2))
    val_steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]
    assert len(val_steps) == 2 and val_steps[0] < val_steps[1]  # one evaluation per epoch
    assert {"config.yaml", "vocab.json", "sample.txt", "checkpoints"} <= artifacts(client, run.info.run_id)
    config = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text()
    assert "n_hidden: 32" in config
    sample = Path(client.download_artifacts(run.info.run_id, "sample.txt", str(tmp_path))).read_text()
    assert sample.startswith("for those ") and len(sample) == len("for those ") + 20


def test_loss_falls_on_a_learnable_text(make_cfg, tmp_path: Path):
    train(make_cfg("trainer.epochs=4"))
    client, run = only_run(tmp_path)
    history = [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")]
    vocab = int(run.data.params["dataset.vocab_size"])
    assert history[0] > 0.8 * math.log(vocab)  # starts near chance
    assert run.data.metrics["val_loss"] < 0.6 * math.log(vocab)  # the sentences are very predictable
    assert run.data.metrics["val_accuracy"] > 0.4


def test_sgdr_saves_a_loadable_checkpoint_at_each_cycle_end(make_cfg, tmp_path: Path):
    train(make_cfg("schedule=sgdr", "trainer.epochs=3", "trainer.keep_cycle_checkpoints=true"))  # cycles: 1, 2 epochs
    client, run = only_run(tmp_path)
    assert artifacts(client, run.info.run_id, "checkpoints") == {  # last.pt went when the run FINISHED
        "checkpoints/cycle_1.pt", "checkpoints/cycle_2.pt", "checkpoints/final.pt"}
    path = client.download_artifacts(run.info.run_id, "checkpoints/cycle_2.pt", str(tmp_path))
    ckpt = torch.load(path, weights_only=True)
    model = CharRNN(vocab_size=int(run.data.params["dataset.vocab_size"]), **{
        k: v for k, v in ckpt["config"]["model"].items() if k != "_target_"})
    model.load_state_dict(ckpt["model"])
    assert ckpt["step"] == max(m.step for m in client.get_metric_history(run.info.run_id, "val_loss"))


def test_max_steps_stops_early_and_still_evaluates(make_cfg, tmp_path: Path):
    train(make_cfg("trainer.max_steps=7", "trainer.log_every=5"))
    client, run = only_run(tmp_path)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [7]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [5]


def test_nan_loss_marks_the_run_failed_with_the_reason(make_cfg, tmp_path: Path):
    with pytest.raises(TrainingDiverged, match=r"loss became NaN or infinite at step \d+"):
        train(make_cfg("optim=sgd", "optim.lr=1e20", "optim.momentum=0", "trainer.log_every=1"))
    _, run = only_run(tmp_path)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"].startswith("loss became NaN or infinite at step")


def test_deterministic_reruns_are_bit_identical(make_cfg, tmp_path: Path):
    cfg = make_cfg("trainer.deterministic=true", tracking=False)
    assert train(cfg) == train(cfg)


def test_lr_finder_logs_its_plot(make_cfg, tmp_path: Path):
    suggestion = train(make_cfg("+lr_find=true", "trainer.lr_finder.num_steps=60"))
    client, run = only_run(tmp_path)
    assert run.info.run_name == "lr-find lstm-h32-bptt8" and run.data.tags["run_type"] == "lr_find"
    client, run = only_run(tmp_path)
    assert "lr_find.png" in artifacts(client, run.info.run_id)
    lrs = [m.value for m in client.get_metric_history(run.info.run_id, "lr_find_lr")]
    assert lrs[0] == pytest.approx(1e-5) and all(b > a for a, b in zip(lrs, lrs[1:]))
    assert 1e-6 <= suggestion <= 1.0
    png = Path(client.download_artifacts(run.info.run_id, "lr_find.png", str(tmp_path))).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("model", ["rnn", "gru"])
def test_other_models_and_loop_cells_train(make_cfg, tmp_path: Path, model: str):
    assert math.isfinite(train(make_cfg(f"model={model}", "model.cell=loop", "trainer.epochs=1",
                                        tracking=False)))


def test_divergence_keeps_the_last_good_checkpoint(make_cfg, tmp_path: Path):
    phases = ("[{kind: constant, epochs: 1, lr_mult: 1.0, reset_optimizer: false},"
              " {kind: constant, epochs: null, lr_mult: 1e20, reset_optimizer: false}]")
    with pytest.raises(TrainingDiverged):  # epoch 1 trains well, then the lr explodes
        train(make_cfg("optim=sgd", "optim.lr=0.5", "optim.momentum=0", f"schedule.phases={phases}",
                       "trainer.epochs=3", "trainer.log_every=1"))
    client, run = only_run(tmp_path)
    assert run.info.status == "FAILED"
    assert artifacts(client, run.info.run_id, "checkpoints") == {"checkpoints/last.pt"}
    ckpt = torch.load(client.download_artifacts(run.info.run_id, "checkpoints/last.pt", str(tmp_path)),
                      weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["batch"] == 0  # saved at the end of the good epoch
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_the_model_is_logged_as_an_mlflow_model_and_artifacts_go_beside_the_sqlite_store(make_cfg, tmp_path: Path):
    import mlflow.pytorch

    train(make_cfg("tracking.log_model=true", "tracking.artifact_location=null", "trainer.checkpoints=true"))
    client, run = only_run(tmp_path)
    stored = {p.relative_to(tmp_path / "mlartifacts").parts[0] for p in (tmp_path / "mlartifacts").rglob("*.pt")}
    assert stored == {run.info.run_id}  # checkpoints beside mlflow.db, once
    assert not (tmp_path / "artifacts").exists()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    assert isinstance(model, CharRNN)
    x = torch.randint(0, model.decoder.out_features, (8, 4))
    assert model.eval()(x).shape == (8 * 4, model.decoder.out_features)


def test_system_metrics_are_logged_when_asked(make_cfg, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # MLflow's default is 10 s
    train(make_cfg("tracking.system_metrics=true"))
    _, run = only_run(tmp_path)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
