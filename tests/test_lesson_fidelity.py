"""The presets against fastai 0.7 and the lesson notebooks, each rule written out here from the
lesson's source (fastai/sgdr.py, learner.py, the BnLayer of lesson7-cifar10.ipynb, the notebook's
trn/ split), never by calling the code under test for the expected value.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient
from omegaconf import OmegaConf
from torch import nn

from lesson7_sweeps import checkpoint as ckpt
from lesson7_sweeps.config import validate
from lesson7_sweeps.data.cifar import CifarData
from lesson7_sweeps.data.text import read_splits
from lesson7_sweeps.errors import ConfigError, DataError
from lesson7_sweeps.models.conv import BnLayer, ScratchBatchNorm2d
from lesson7_sweeps.runner import Precision, evaluate
from lesson7_sweeps.schedules import Schedule
from lesson7_sweeps.train import CONF_DIR, train

from .test_cifar_data import write_layout

NIETZSCHE = Path(__file__).resolve().parents[2] / "shared/data/nietzsche.txt"


@functools.cache  # composing takes ~1 s; the tests only read the configs
def preset(name: str, *overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=[f"experiment={name}", *overrides])


# ---------------------------------------------------------------------------------------------
# 1. SGDR warm-up: fastai's CosAnneal, batch by batch
# ---------------------------------------------------------------------------------------------


def fastai_fit_lrs(lr: float, epochs: int, nb_per_epoch: int, cycle_len: int | None, cycle_mult: int) -> list[float]:
    """The lr of every batch of one fastai 0.7 `fit` call. Without cycle_len the LossRecorder keeps lr
    constant; with it, CosAnneal(nb = len(trn_dl) * cycle_len): LR_Updater calls calc_lr before each
    batch (on_train_begin, then on_batch_end after `iteration += 1`), and calc_lr is, from sgdr.py:
        if iteration < nb/20: cycle_iter += 1; return lr/100
        cos_out = cos(pi * cycle_iter / nb) + 1; cycle_iter += 1
        if cycle_iter == nb: cycle_iter = 0; nb *= cycle_mult
        return lr / 2 * cos_out
    `iteration` starts at 0 in each fit call and is never reset at a cycle end."""
    if cycle_len is None:
        return [lr] * (epochs * nb_per_epoch)
    nb, cycle_iter, lrs = nb_per_epoch * cycle_len, 0, []
    for iteration in range(epochs * nb_per_epoch):
        if iteration < nb / 20:
            cycle_iter += 1
            lrs.append(lr / 100)
            continue
        cos_out = np.cos(np.pi * cycle_iter / nb) + 1
        cycle_iter += 1
        if cycle_iter == nb:
            cycle_iter, nb = 0, nb * cycle_mult
        lrs.append(lr / 2 * cos_out)
    return lrs


def our_lrs(cfg, nb_per_epoch: int) -> list[float]:
    schedule = Schedule(cfg.schedule.phases, cfg.trainer.epochs)
    epochs = range(cfg.trainer.epochs)
    return [cfg.optim.lr * schedule(e + b / nb_per_epoch) for e in epochs for b in range(nb_per_epoch)]


# The notebooks' fit calls: (lr, epochs, cycle_len, cycle_mult)
NOTEBOOK_FITS = {
    # lesson6-rnn.ipynb: fit(m, md, 2, lo.opt); CosAnneal(lo, len(md.trn_dl), cycle_mult=2) for 2**4-1,
    # then again for 2**6-1 epochs
    "lesson6_lstm": [(1e-2, 2, None, 1), (1e-2, 15, 1, 2), (1e-2, 63, 1, 2)],
    # lesson7-cifar10.ipynb, "BatchNorm": learn.fit(3e-2, 2); learn.fit(1e-1, 4, cycle_len=1)
    "lesson7_convbnnet": [(3e-2, 2, None, 1), (1e-1, 4, 1, 1)],
    # "Resnet 2": fit(1e-2, 2); fit(1e-2, 3, cycle_len=1, cycle_mult=2); fit(1e-2, 8, cycle_len=4)
    "lesson7_resnet2": [(1e-2, 2, None, 1), (1e-2, 7, 1, 2), (1e-2, 32, 4, 1)],
    "lesson7_simplenet": [(1e-2, 2, None, 1), (1e-2, 2, 1, 1)],
}


@pytest.mark.parametrize("name", sorted(NOTEBOOK_FITS))
@pytest.mark.parametrize("nb_per_epoch", [45, 196])  # 45: nb/20 is fractional (2.25 -> 3 batches)
def test_preset_lr_at_every_batch_is_fastais(name: str, nb_per_epoch: int):
    if name == "lesson6_lstm" and nb_per_epoch == 196:
        nb_per_epoch = 23  # 80 epochs: keep it quick
    want = [lr for fit in NOTEBOOK_FITS[name] for lr in fastai_fit_lrs(*fit[:2], nb_per_epoch, *fit[2:])]
    got = our_lrs(preset(name), nb_per_epoch)
    assert len(got) == len(want)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=0)


def test_two_cycle_phase_warms_up_only_at_its_start():
    """lr at every batch of one two-cycle SGDR phase (cycle_mult 2), 40 batches an epoch."""
    phase = {"kind": "sgdr", "epochs": 3, "lr_mult": 1.0, "reset_optimizer": False, "cycle_len": 1,
             "cycle_mult": 2, "warmup_frac": 0.05, "warmup": "phase"}
    schedule = Schedule(OmegaConf.create([phase]), 3)
    got = [schedule(e + b / 40) for e in range(3) for b in range(40)]
    assert got == pytest.approx(fastai_fit_lrs(1.0, 3, 40, 1, 2), rel=1e-12)
    assert got[:2] == [0.01, 0.01] and got[2] != 0.01 and got[40] == 1.0  # 2 = ceil(40/20); no restart warm-up
    per_cycle = Schedule(OmegaConf.create([{**phase, "warmup": "cycle"}]), 3)  # the option keeps the old rule
    cosine = pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 80)))
    assert [per_cycle(1 + b / 40) for b in range(5)] == [0.01] * 4 + [cosine]  # 4 = 80/20 batches again


# ---------------------------------------------------------------------------------------------
# 2. TTA: learn.TTA() = the original + 4 passes of the training augmentation, probabilities averaged
# ---------------------------------------------------------------------------------------------


def is_training_augmentation_of(view: np.ndarray, image: np.ndarray, pad: int) -> bool:
    """Whether `view` [C, H, W] is a 32x32 window of `image` reflect-padded by `pad`, possibly mirrored."""
    padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
    h, w = image.shape[1:]
    return any(np.allclose(view, win if not flip else win[..., ::-1], atol=1e-6)
               for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
               for win in [padded[:, dy : dy + h, dx : dx + w]] for flip in (False, True))


@pytest.fixture
def lesson_tta_data(tmp_path: Path) -> CifarData:
    write_layout(tmp_path / "cifar", n_train=8, n_test=6)
    return CifarData(root=tmp_path / "cifar", cache_dir=tmp_path / "cache", download=False, bs=6, stats="lesson",
                     pad=4, crop=True, flip=True, tta="lesson", max_bytes=2**30, seed=3)


def test_lesson_tta_views_are_the_original_and_four_training_augmentations(lesson_tta_data: CifarData):
    data = lesson_tta_data
    x, _ = next(iter(data.valid))
    views = data.tta_views(x, data.tta_generator())
    assert len(views) == 1 + 4 and torch.equal(views[0], x)
    for view in views[1:]:
        for i in range(len(x)):
            assert is_training_augmentation_of(view[i].numpy(), x[i].numpy(), pad=4)
    assert not all(torch.equal(views[1], v) for v in views[2:])  # 4 different draws
    again = data.tta_views(x, data.tta_generator())  # seeded: a rerun sees the same views
    assert all(torch.equal(a, b) for a, b in zip(views, again))


def test_lesson_tta_accuracy_averages_the_probabilities_of_the_five_passes(lesson_tta_data: CifarData):
    data = lesson_tta_data
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 5), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8, 3),
                          nn.LogSoftmax(-1))
    train_state = data._generator.get_state()
    metrics = evaluate(model, data, Precision(None, False))
    assert torch.equal(data._generator.get_state(), train_state)  # TTA draws leave training untouched
    # fastai: log_preds, y = learn.TTA(); preds = np.mean(np.exp(log_preds), 0); accuracy(preds, y)
    generator, correct, n = data.tta_generator(), 0, 0
    with torch.no_grad():
        for x, y in data.valid:
            preds = np.mean([np.exp(model(v).numpy()) for v in data.tta_views(x, generator)], axis=0)
            correct += int((preds.argmax(1) == y.numpy()).sum())
            n += len(y)
    assert metrics["val_accuracy_tta"] == correct / n
    assert evaluate(model, data, Precision(None, False)) == metrics  # and reruns agree


def test_tta_modes_are_checked():
    cfg = preset("lesson7_simplenet", "data.tta=views")
    validate(cfg)
    assert preset("lesson7_simplenet").data.tta == "lesson"
    with pytest.raises(ConfigError, match="data.tta"):
        validate(preset("lesson7_simplenet", "data.tta=flips"))


# ---------------------------------------------------------------------------------------------
# 3. Scratch BatchNorm: the lesson's BnLayer, x_chan.std(1) (unbiased), no eps
# ---------------------------------------------------------------------------------------------


class LessonBnLayer(nn.Module):
    """lesson7-cifar10.ipynb's BnLayer, as written there (only V() and the imports differ)."""

    def __init__(self, ni, nf, stride=2, kernel_size=3):
        super().__init__()
        self.conv = nn.Conv2d(ni, nf, kernel_size=kernel_size, stride=stride, bias=False, padding=1)
        self.a = nn.Parameter(torch.zeros(nf, 1, 1))
        self.m = nn.Parameter(torch.ones(nf, 1, 1))

    def forward(self, x):
        x = F.relu(self.conv(x))
        x_chan = x.transpose(0, 1).contiguous().view(x.size(1), -1)
        if self.training:
            self.means = x_chan.mean(1)[:, None, None]
            self.stds = x_chan.std(1)[:, None, None]
        return (x - self.means) / self.stds * self.m + self.a


def test_bn_layer_computes_the_lessons_formula_in_training_and_eval():
    torch.manual_seed(0)
    ours, lesson = BnLayer(3, 16, bn="scratch", running_stats=False), LessonBnLayer(3, 16)
    with torch.no_grad():
        lesson.conv.weight.copy_(ours.conv.weight)
        lesson.m.uniform_(0.5, 2)
        lesson.a.normal_()
        ours.norm.m.copy_(lesson.m)
        ours.norm.a.copy_(lesson.a)
    x1, x2 = torch.randn(64, 3, 32, 32), torch.randn(64, 3, 32, 32) * 2 + 1  # batch 64, as the issue measured
    torch.testing.assert_close(ours(x1), lesson(x1), rtol=1e-5, atol=1e-5)
    ours.eval(), lesson.eval()  # evaluation: the last training batch's means and stds
    torch.testing.assert_close(ours(x2), lesson(x2), rtol=1e-5, atol=1e-5)


def test_a_dead_channel_is_guarded_not_divided_by_zero():
    norm = ScratchBatchNorm2d(2, running_stats=False)
    with torch.no_grad():
        norm.a.copy_(torch.tensor([0.5, -1.0]).view(2, 1, 1))
    x = torch.randn(8, 2, 4, 4, requires_grad=True)
    dead = torch.cat([torch.zeros(8, 1, 4, 4), x[:, 1:]], 1)  # channel 0: all zero, as after a ReLU
    out = norm(dead)
    assert torch.equal(out[:, 0], torch.full((8, 4, 4), 0.5))  # (0 - 0) / 1 * m + a
    live = dead[:, 1]
    torch.testing.assert_close(out[:, 1], (live - live.mean()) / live.std() - 1.0)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(norm.m.grad).all()


# ---------------------------------------------------------------------------------------------
# 4. Optimizer restarts: each learn.fit builds a new optimizer (lesson 7), lesson 6 reuses one
# ---------------------------------------------------------------------------------------------


def test_presets_reset_the_optimizer_where_the_notebook_builds_a_new_one():
    for name in ("lesson7_simplenet", "lesson7_convnet", "lesson7_convnet2", "lesson7_convbnnet",
                 "lesson7_convbnnet2", "lesson7_resnet", "lesson7_resnet2"):  # learn.fit(...) each time
        assert all(p.reset_optimizer for p in preset(name).schedule.phases), name
    for name in ("lesson6_rnn", "lesson6_gru", "lesson6_lstm"):  # fit(m, md, n, opt) with one opt throughout
        assert not any(p.reset_optimizer for p in preset(name).schedule.phases), name


def test_schedule_names_the_step_before_each_reset():
    phases = OmegaConf.create([{"kind": "constant", "epochs": 2, "lr_mult": 1.0, "reset_optimizer": True},
                               {"kind": "constant", "epochs": 1, "lr_mult": 1.0, "reset_optimizer": False},
                               {"kind": "constant", "epochs": None, "lr_mult": 1.0, "reset_optimizer": True}])
    schedule = Schedule(phases, 5)
    steps = [(e + b / 10, e + (b + 1) / 10) for e in range(5) for b in range(10)]
    assert [after for before, after in steps if schedule.resets_optimizer(before, after)] == [3.0]


@pytest.mark.parametrize("reset", [True, False])
def test_a_new_phase_starts_with_a_fresh_optimizer_state(make_cfg, tmp_path: Path, reset: bool, monkeypatch):
    """SGD with momentum over two fits; the checkpoint at the phase boundary (what a resumed run
    continues from) holds the optimizer the next phase starts with: fastai's fresh one, or the
    same one (lesson 6)."""
    phases = (f"[{{kind: constant, epochs: 1, lr_mult: 1.0, reset_optimizer: {reset}}},"
              f" {{kind: constant, epochs: null, lr_mult: 0.5, reset_optimizer: {reset}}}]")
    monkeypatch.setattr(ckpt, "drop_unneeded", lambda *a, **k: None)  # keep last.pt (a FINISHED run drops it)
    train(make_cfg("optim=sgd", "optim.lr=0.1", "optim.momentum=0.9", f"schedule.phases={phases}"))
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    path = client.download_artifacts(run.info.run_id, "checkpoints/last.pt", str(tmp_path))
    state = torch.load(path, weights_only=True)
    assert (state["epoch"], state["batch"]) == (1, 0)
    fresh = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9).state_dict()["state"]
    assert (state["optimizer"]["state"] == fresh) == reset  # a new optimizer holds no momentum buffers


# ---------------------------------------------------------------------------------------------
# 5. The text split: the notebook's trn/ is the first 7,999 lines of nietzsche.txt
# ---------------------------------------------------------------------------------------------


def test_valid_from_line_cuts_between_lines(tmp_path: Path):
    path = tmp_path / "t.txt"
    path.write_text("one\ntwo\n\nfour\nfive", encoding="utf-8")
    with open(path, encoding="utf-8") as f:  # the lesson: a copy of the file, lines deleted in an editor
        lines = f.readlines()
    assert read_splits(path, 0.2, 4, 2**20) == ("".join(lines[:3]), "".join(lines[3:]))
    with pytest.raises(DataError, match="has 5 lines"):
        read_splits(path, 0.2, 6, 2**20)
    (tmp_path / "folder" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="valid_from_line=null"):
        read_splits(tmp_path / "folder", 0.2, 4, 2**20)
    with pytest.raises(ConfigError, match="data.valid_from_line"):
        validate(preset("lesson6_rnn", "data.valid_from_line=1"))


def test_lesson6_presets_split_where_the_notebook_did():
    for name in ("lesson6_rnn", "lesson6_gru", "lesson6_lstm"):
        assert preset(name).data.valid_from_line == 8000, name


@pytest.mark.skipif(not NIETZSCHE.exists(), reason=f"needs the shared corpus at {NIETZSCHE}")
def test_the_notebooks_trn_has_493747_characters():
    """The notebook prints len(md.trn_ds[0].text) = 493,747 of the corpus' 600,893 characters.
    The shared copy has 8 characters of mojibake more ("Ã¤" for "ä", ...); decoding them back gives
    the notebook's corpus, whose lines before aphorism 58 (line 8000) are exactly the notebook's trn/."""
    train, valid = read_splits(NIETZSCHE, 0.2, 8000, 2**30)
    notebook = NIETZSCHE.read_text(encoding="utf-8")
    notebook = re.sub("Ã(.)", lambda m: (b"\xc3" + m.group(1).encode("cp1252")).decode("utf-8"), notebook)
    assert len(notebook) == 600_893
    assert len("".join(notebook.split("\n", 7999)[:7999])) + 7999 == 493_747
    assert train + valid == NIETZSCHE.read_text(encoding="utf-8") and valid.startswith("58\n")
    assert len(train) == 493_747 + train.count("Ã")  # 7 of the 8 mojibake pairs fall in trn/
