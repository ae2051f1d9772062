"""The presets against fastai 0.7 and the lesson notebooks, each rule written out here from the
lesson's source (fastai/sgdr.py, learner.py, model.py, nlp.py, transforms.py, torchtext's Vocab, the
BnLayer of lesson7-cifar10.ipynb, the notebook's trn/ split), never by calling the code under test for
the expected value.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
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
from lesson7_sweeps.data.cifar import CifarData, random_crop
from lesson7_sweeps.data.cifar.augment import pad_images
from lesson7_sweeps.data.text import PAD, UNK, TextData, Vocab, read_splits
from lesson7_sweeps.errors import ConfigError, DataError
from lesson7_sweeps.models.conv import BnLayer, ScratchBatchNorm2d
from lesson7_sweeps.models.rnn import CharRNN
from lesson7_sweeps.runner import Precision, evaluate
from lesson7_sweeps.schedules import Schedule
from lesson7_sweeps.train import CONF_DIR, train

from .conftest import make_text
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
    # lesson6-rnn.ipynb, the published run: fit(m, md, 2, lo.opt); CosAnneal(lo, len(md.trn_dl),
    # cycle_mult=2) for 2**6-1 epochs; the notebook today also has a 2**4-1-epoch fit between them
    "lesson6_lstm": [(1e-2, 2, None, 1), (1e-2, 63, 1, 2)],
    "lesson6_lstm_80": [(1e-2, 2, None, 1), (1e-2, 15, 1, 2), (1e-2, 63, 1, 2)],
    # lesson7-cifar10.ipynb, "BatchNorm": learn.fit(3e-2, 2); learn.fit(1e-1, 4, cycle_len=1)
    "lesson7_convbnnet": [(3e-2, 2, None, 1), (1e-1, 4, 1, 1)],
    # "Resnet 2": fit(1e-2, 2); fit(1e-2, 3, cycle_len=1, cycle_mult=2); fit(1e-2, 8, cycle_len=4)
    "lesson7_resnet2": [(1e-2, 2, None, 1), (1e-2, 7, 1, 2), (1e-2, 32, 4, 1)],
    "lesson7_simplenet": [(1e-2, 2, None, 1), (1e-2, 2, 1, 1)],
}


@pytest.mark.parametrize("name", sorted(NOTEBOOK_FITS))
@pytest.mark.parametrize("nb_per_epoch", [45, 196])  # 45: nb/20 is fractional (2.25 -> 3 batches)
def test_preset_lr_at_every_batch_is_fastais(name: str, nb_per_epoch: int):
    if name.startswith("lesson6_lstm") and nb_per_epoch == 196:
        nb_per_epoch = 23  # 65 or 80 epochs: keep it quick
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
                     pad=4, crop=True, flip=True, tta="lesson", pad_mode="reflect", crop_offsets="all", drop_last=True,
                     val_average="samples", max_bytes=2**30, seed=3)


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
    for name in ("lesson6_rnn", "lesson6_gru", "lesson6_lstm", "lesson6_lstm_80"):  # one opt throughout
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
# 5. The text split: the notebook's trn/ is the first 7,998 lines of nietzsche.txt
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


LESSON6 = ("lesson6_rnn", "lesson6_gru", "lesson6_lstm", "lesson6_lstm_80")


def test_lesson6_presets_split_where_the_notebook_did():
    for name in (*LESSON6, "lesson6_lstm_fast"):
        assert preset(name).data.valid_from_line == 7999, name


def lesson_corpus() -> str:
    """The shared copy has 8 characters of mojibake more than the lesson's ("Ã¤" for "ä", ...)."""
    text = NIETZSCHE.read_text(encoding="utf-8")
    return re.sub("Ã(.)", lambda m: (b"\xc3" + m.group(1).encode("cp1252")).decode("utf-8"), text)


@pytest.mark.skipif(not NIETZSCHE.exists(), reason=f"needs the shared corpus at {NIETZSCHE}")
def test_the_notebooks_trn_is_lines_1_to_7998():
    """The notebook prints len(md.trn_ds[0].text) = 493,747 of the corpus' 600,893 characters: fastai's
    ConcatTextDataset appends '<eos>' (one token) after each file's text, so trn.txt holds 493,746
    characters: lines 1-7,998 with their newlines, the corpus decoded back from the shared copy's
    mojibake. Lines 7,999 (empty) and 8,000 ("58", aphorism 58) begin the rest."""
    train, valid = read_splits(NIETZSCHE, 0.2, 7999, 2**30)
    notebook = lesson_corpus()
    assert len(notebook) == 600_893
    trn_tokens = list("".join(line + "\n" for line in notebook.split("\n")[:7998])) + ["<eos>"]
    assert len(trn_tokens) == 493_747
    assert train + valid == NIETZSCHE.read_text(encoding="utf-8") and valid.startswith("\n58\n")
    assert len(train) == 493_746 + train.count("Ã")  # 7 of the 8 mojibake pairs fall in trn/


# ---------------------------------------------------------------------------------------------
# 6. CIFAR augmentation: AddPadding(4, cv2.BORDER_REFLECT) -> RandomFlip -> RandomCrop(32)
# ---------------------------------------------------------------------------------------------


def border_reflect(i: int, n: int) -> int:
    """OpenCV's borderInterpolate for BORDER_REFLECT (fedcba|abcdefgh|hgfedcb): the edge pixel repeated."""
    return -i - 1 if i < 0 else 2 * n - i - 1 if i >= n else i


def fastai_augment(image: np.ndarray, do_flip: bool, rand_r: float, rand_c: float, pad: int) -> np.ndarray:
    """fastai 0.7's training transforms of lesson 7 on one HWC image, from transforms.py: image_gen puts
    AddPadding before the aug_tfms ([RandomFlip()]) and Transforms puts RandomCrop after them; RandomCrop
    starts at np.floor(rand * (r - sz)) with rand = random.uniform(0, 1)."""
    r, c = image.shape[0] + 2 * pad, image.shape[1] + 2 * pad
    rows = [border_reflect(i - pad, image.shape[0]) for i in range(r)]
    cols = [border_reflect(j - pad, image.shape[1]) for j in range(c)]
    x = image[rows][:, cols]  # cv2.copyMakeBorder(im, pad, pad, pad, pad, cv2.BORDER_REFLECT)
    if do_flip:
        x = np.fliplr(x)
    sz = image.shape[0]
    start_r, start_c = int(np.floor(rand_r * (r - sz))), int(np.floor(rand_c * (c - sz)))
    return x[start_r : start_r + sz, start_c : start_c + sz]


@pytest.fixture
def lesson7_data(tmp_path: Path) -> CifarData:
    write_layout(tmp_path / "cifar", n_train=8, n_test=2)  # 24 training images
    aug = {k: v for k, v in preset("lesson7_simplenet").data.items() if k in ("pad", "pad_mode", "crop_offsets",
                                                                           "drop_last", "val_average")}
    assert aug == {"pad": 4, "pad_mode": "symmetric", "crop_offsets": "lesson", "drop_last": False,
                   "val_average": "batches"}
    return CifarData(root=tmp_path / "cifar", cache_dir=tmp_path / "cache", download=False, bs=10, stats="lesson",
                     crop=True, flip=True, tta="lesson", max_bytes=2**30, seed=3, **aug)


def test_lesson_augmentation_is_fastais_pad_flip_crop(lesson7_data: CifarData):
    """Our draws (flip, then the crop's two uniforms, from one generator) fed to fastai's rule."""
    x = torch.randn(64, 3, 32, 32)
    got = lesson7_data._augment(x, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    flips = (torch.rand(64, generator=g) < 0.5).tolist()
    rand_r, rand_c = torch.rand((2, 64, 1), generator=g).view(2, 64).tolist()
    for i in range(64):
        want = fastai_augment(x[i].permute(1, 2, 0).numpy(), flips[i], rand_r[i], rand_c[i], pad=4)
        np.testing.assert_array_equal(got[i].permute(1, 2, 0).numpy(), want)
    assert max(int(u * 8) for u in rand_r + rand_c) <= 7  # offsets 0-7: the last window never comes


def test_padding_modes_and_crop_offsets():
    """symmetric is OpenCV's BORDER_REFLECT (the rule above), reflect torch's; crop_offsets=all cuts
    windows at offsets 0-8, lesson at 0-7 (read back from where each crop's centre pixel came from)."""
    x = torch.randn(2, 3, 32, 32)
    rule = [border_reflect(i - 4, 32) for i in range(40)]
    assert torch.equal(pad_images(x, 4, "symmetric"), x[..., rule, :][..., rule])
    np.testing.assert_array_equal(pad_images(x, 4, "reflect").numpy(),
                                  np.pad(x.numpy(), ((0, 0), (0, 0), (4, 4), (4, 4)), mode="reflect"))
    image = x[:1, :1].expand(3000, 1, 32, 32)
    for offsets, want in (("all", set(range(9))), ("lesson", set(range(8)))):
        crops = random_crop(image, 4, torch.Generator().manual_seed(1), "symmetric", offsets)
        where = (crops[:, 0, 16, 16, None, None] == image[0, 0]).nonzero()[:, 1:] - 12  # centre = x[dy+12, dx+12]
        assert len(where) == 3000
        assert set(where[:, 0].tolist()) == want and set(where[:, 1].tolist()) == want, offsets


# ---------------------------------------------------------------------------------------------
# 7. Batches: fastai's DataLoader keeps the last partial batch (196 a CIFAR epoch, the last of 80)
# ---------------------------------------------------------------------------------------------


def fastai_batch_sizes(n: int, bs: int) -> list[int]:
    """fastai 0.7's DataLoader: a BatchSampler with drop_last=False, so len = ceil(n / bs)."""
    return [min(bs, n - i) for i in range(0, n, bs)]


def test_lesson7_presets_keep_the_last_partial_batch(lesson7_data: CifarData):
    assert fastai_batch_sizes(50_000, 256)[-1] == 80 and len(fastai_batch_sizes(50_000, 256)) == 196
    assert [len(y) for _, y in lesson7_data.train] == fastai_batch_sizes(24, 10) == [10, 10, 4]
    assert len(lesson7_data.train) == 3
    # the scratch BnLayer evaluates with the statistics of the last batch it trained on: those 4 images
    layer = BnLayer(3, 4, bn="scratch", running_stats=False)
    for xb, _ in lesson7_data.train:
        layer(xb)
    last = F.relu(layer.conv(xb)).transpose(0, 1).reshape(4, -1)
    assert len(xb) == 4
    layer.eval()
    probe = torch.randn(2, 3, 32, 32)
    want = (F.relu(layer.conv(probe)) - last.mean(1)[:, None, None]) / last.std(1)[:, None, None]
    torch.testing.assert_close(layer(probe), want * layer.norm.m + layer.norm.a)
    for name in ("lesson7_simplenet", "lesson7_resnet2"):
        assert not preset(name).data.drop_last, name
    assert preset("lesson7_resnet2_fast").data.drop_last  # a recipe: one compiled batch shape


def test_warm_up_lengths_with_196_batches_are_fastais():
    """fastai warms up while iteration < nb/20: 10 batches of a 1-epoch cycle, 40 of a 4-epoch one at
    196 batches an epoch (ours, dropping the last batch, had 195: 10 and 39)."""
    cfg = preset("lesson7_resnet2")
    schedule = Schedule(cfg.schedule.phases, cfg.trainer.epochs)
    # phase 2 (cycles of 1, 2, 4 epochs) starts at epoch 2, phase 3 (cycles of 4) at epoch 9
    for start, batches, want in ((2, 196, 10), (9, 784, 40)):
        warm = [schedule(start + b / 196) == pytest.approx(0.01) for b in range(batches)]
        assert warm == [True] * want + [False] * (batches - want), start
    for nb, want in ((196, 40), (195, 39)):
        assert fastai_fit_lrs(1e-2, 4, nb, 4, 1).count(1e-4) == want


# ---------------------------------------------------------------------------------------------
# 8. Text: fastai 0.7's LanguageModelLoader, torchtext's vocabulary, validate(), no reset()
# ---------------------------------------------------------------------------------------------


def fastai_sections(data: torch.Tensor, bptt: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(start, length) of every batch of one pass of nlp.py's LanguageModelLoader (np.random -> rng):
        __len__: self.n // self.bptt - 1
        __next__: if self.i >= self.n-1 or self.iter>=len(self): raise StopIteration
                  bptt = self.bptt if np.random.random() < 0.95 else self.bptt / 2.
                  seq_len = max(5, int(np.random.normal(bptt, 5)))
                  res = self.get_batch(self.i, seq_len)  # seq_len = min(seq_len, len(source) - 1 - i)
                  self.i += seq_len; self.iter += 1"""
    n, i, it, out = data.size(0), 0, 0, []
    while not (i >= n - 1 or it >= n // bptt - 1):
        mean = bptt if rng.random() < 0.95 else bptt / 2.0
        seq_len = max(5, int(rng.normal(mean, 5)))
        out.append((i, min(seq_len, n - 1 - i)))
        i, it = i + seq_len, it + 1
    return out


def ours(loader) -> list[tuple[int, int]]:
    sections, i = [], 0
    for x, y in loader:
        assert torch.equal(x, loader.data[i : i + len(x)])
        assert torch.equal(y, loader.data[i + 1 : i + 1 + len(x)].view(-1))
        sections.append((i, len(x)))
        i += len(x)
    return sections


def lesson_text(tmp_path: Path, chars: int = 12000, **overrides) -> TextData:
    path = tmp_path / "t.txt"
    path.write_text(make_text(chars), encoding="utf-8")
    args = dict(path=str(path), url=None, cache_dir=str(tmp_path), lower=True, min_freq=3, valid_frac=0.2,
                valid_from_line=None, bs=4, bptt=16, random_bptt=True, loader="lesson", vocab="lesson",
                val_average="batches", max_bytes=2**20, seed=7)
    return TextData(**(args | overrides))


def test_lesson_loader_is_fastais_for_training_and_validation(tmp_path: Path):
    """One np.random stream for both loaders, as fastai's global one: train, validate, train again.
    At bptt 16 a random section averages ~15 characters, so the n // bptt - 1 cap ends passes early."""
    data = lesson_text(tmp_path)
    rng = np.random.default_rng(7)
    for loader in (data.train, data.valid, data.train):
        assert ours(loader) == fastai_sections(loader.data, 16, rng)
    capped = [sum(n for _, n in ours(loader)) < loader.data.size(0) - 1 for loader in (data.train, data.valid)]
    assert any(capped)  # the cap mattered in this test
    plain = lesson_text(tmp_path, loader="plain")
    assert {n for _, n in ours(plain.valid)[:-1]} == {16}  # fixed lengths, every section to the text's end
    assert sum(n for _, n in ours(plain.train)) == plain.train.data.size(0) - 1
    fixed = lesson_text(tmp_path, random_bptt=False)  # the same structure with fixed lengths: the cap binds
    assert [n for _, n in ours(fixed.valid)] == [16] * (fixed.valid.data.size(0) // 16 - 1)
    for name in LESSON6:
        assert (preset(name).data.loader, preset(name).data.vocab, preset(name).data.val_average) == (
            "lesson", "lesson", "batches"), name


def torchtext_itos(text: str, min_freq: int) -> list[str]:
    """torchtext's Vocab (the Field fastai 0.7 builds): specials first, then by falling frequency with
    ties in sorted order (sorted by token, then a stable sort by count), stopping below min_freq."""
    itos = ["<unk>", "<pad>"]
    words_and_frequencies = sorted(Counter(text).items(), key=lambda tup: tup[0])
    words_and_frequencies.sort(key=lambda tup: tup[1], reverse=True)
    for word, freq in words_and_frequencies:
        if freq < min_freq:
            break
        itos.append(word)
    return itos


def test_lesson_vocabulary_is_torchtexts():
    text = "the quick brown fox jumps over the lazy dog\n" * 3 + "zzq"
    assert Vocab.build(text, 3, "lesson").itos == torchtext_itos(text, 3)
    assert Vocab.build(text, 3, "sorted").itos == [UNK, *sorted(c for c in set(text) if text.count(c) >= 3)]
    assert Vocab.build(text, 3, "lesson").itos[:2] == [UNK, PAD]


@pytest.mark.skipif(not NIETZSCHE.exists(), reason=f"needs the shared corpus at {NIETZSCHE}")
def test_lesson_vocabulary_of_the_notebook_has_56_tokens():
    train = "".join(line + "\n" for line in lesson_corpus().split("\n")[:7998]).lower()
    assert len(torchtext_itos(train, 3)) == len(Vocab.build(train, 3, "lesson")) == 56


def test_validation_loss_is_the_mean_of_batch_means_as_fastais_validate(tmp_path: Path):
    """model.py's validate: loss.append(to_np(l)) per batch, then np.mean(loss); each l is the mean
    over that batch's seq_len x bs targets. The hidden state goes through validation unreset (the
    lesson's model has no reset(), so stepper.reset(False) leaves it) and carries on afterwards."""
    data = lesson_text(tmp_path, chars=3000, bptt=8)
    torch.manual_seed(0)
    model = CharRNN(len(data.vocab), "lstm", 4, 8, 1, 0.0, "cudnn", stateful=True, reset_hidden=False)
    x, _ = next(iter(data.train))
    model(x)
    carried = tuple(h.clone() for h in model.h)
    state = data.train.rng.bit_generator.state
    got = evaluate(model, data, Precision(None, False))
    data.train.rng.bit_generator.state = state  # the same validation lengths again
    lesson = CharRNN(len(data.vocab), "lstm", 4, 8, 1, 0.0, "cudnn", stateful=True, reset_hidden=False)
    lesson.load_state_dict(model.state_dict())
    lesson.eval()
    lesson.h = carried
    losses, sizes = [], set()
    with torch.no_grad():
        for xb, yb in data.valid:
            losses.append(F.nll_loss(lesson(xb), yb).item())
            sizes.add(len(xb))
    assert len(sizes) > 1  # random lengths: a mean over batches is no mean over characters
    assert got["val_loss"] == pytest.approx(np.mean(losses), rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(model.h, lesson.h))  # carried out of validation too
    model.reset_hidden = True
    evaluate(model, data, Precision(None, False))
    assert model.h is None  # reset_hidden=true: a fresh state after (and before) evaluation
