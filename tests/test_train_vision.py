"""End to end on images: real PNG files written by the test, the real config, a real sqlite store."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient
from PIL import Image

from lesson7_sweeps.train import CONF_DIR, train

CLASSES = ["blue", "green", "red"]


def write_colour_classes(root: Path, n_train: int = 48, n_test: int = 12) -> Path:
    """Noisy images whose class is their dominant colour channel: learnable in a few steps."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for label, cls in enumerate(CLASSES):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                image = rng.integers(0, 120, (32, 32, 3), dtype=np.uint8)
                image[..., 2 - label] += 120  # blue, green, red: channel 2, 1, 0
                Image.fromarray(image).save(root / split / cls / f"{i:04d}.png")
    return root


@pytest.fixture
def vision_cfg(tmp_path: Path):
    root = write_colour_classes(tmp_path / "cifar")

    def _make(*overrides: str, tracking: bool = True):
        store = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_location={tmp_path}/art",
                 "tracking.experiment=vision"] if tracking else ["tracking=none"]
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose("train", overrides=[
                *store, "data=cifar10", f"data.root={root}", f"data.cache_dir={tmp_path}/cache", "data.bs=16",
                "optim=sgd", "optim.lr=0.05", "schedule=constant", "trainer.epochs=2", "trainer.device=cpu",
                "trainer.progress=off", "trainer.log_every=3", *overrides])

    return _make


def test_vision_run_logs_accuracy_with_tta(vision_cfg, tmp_path: Path):
    objective = train(vision_cfg("model=convbnnet", "model.layers=[8,16]", "trainer.epochs=3"))
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("vision").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "convbnnet-8x16"
    m = run.data.metrics
    assert {"train_loss", "lr", "val_loss", "val_accuracy", "val_accuracy_tta", "throughput"} <= set(m)
    assert "val_bpc" not in m
    assert objective == m["val_loss"] < math.log(3)  # better than chance
    assert m["val_accuracy"] > 0.6 and 0 <= m["val_accuracy_tta"] <= 1
    p = run.data.params
    assert (p["dataset.num_classes"], p["dataset.n_train"], p["dataset.format"]) == ("3", "144", "folder")
    assert p["model.layers"] == "[8, 16]"


@pytest.mark.parametrize("model", ["simplenet", "convnet", "convnet2", "convbnnet", "convbnnet2", "resnet",
                                   "resnet2", "resnet_full", "preact_resnet"])
def test_every_lesson7_model_trains_from_its_config(vision_cfg, model: str):
    assert math.isfinite(train(vision_cfg(f"model={model}", "trainer.epochs=1", "data.tta=none", tracking=False)))


def test_lesson7_presets_compose_with_the_lesson_settings():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=lesson7_resnet2"])
    assert cfg.model._target_.endswith("Resnet2") and cfg.model.layers == [16, 32, 64, 128, 256]
    assert (cfg.data.bs, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.momentum) == (256, 1e-2, 1e-6, 0.9)
    assert [p.epochs for p in cfg.schedule.phases] == [2, 7, 32] and cfg.trainer.epochs == 41
    assert not cfg.model.running_stats  # the lesson's BnLayer: eval with the last training batch's statistics


def test_eval_limit_evaluates_the_first_batches_tta_included(vision_cfg, tmp_path: Path):
    """data.eval_limit=N on images: every metric, TTA's too, is that of the first N validation
    batches alone (the same as evaluating a validation set cut to them), and the run is tagged."""
    import itertools

    import torch

    from lesson7_sweeps.runner import Precision, evaluate
    from lesson7_sweeps.train import build, build_data

    cfg = vision_cfg("model=convbnnet", "model.layers=[8,16]", "data.eval_limit=1", "data.bs=8")
    data = build_data(cfg, "cpu")
    torch.manual_seed(0)
    model = build(cfg.model, **data.model_args())
    prec = Precision.choose(cfg.trainer, torch.device("cpu"), image=True)
    n_valid = len(data.valid)
    assert n_valid > 1 and data.tta != "none"
    limited = evaluate(model, data, prec, cfg.data.eval_limit)
    whole = evaluate(model, data, prec)
    first = list(itertools.islice(data.valid, 1))
    data.valid = first  # the validation set cut to its first batch
    assert evaluate(model, data, prec) == limited != whole
    assert {"val_loss", "val_accuracy", "val_accuracy_tta"} == set(limited)
    assert (limited["val_accuracy_tta"] * len(first[0][1])).is_integer()  # a count over that batch's images

    train(cfg)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("vision").experiment_id])
    assert run.data.tags["eval_limit"] == f"first 1 of {n_valid} validation batches"
    assert "val_accuracy_tta" in run.data.metrics
