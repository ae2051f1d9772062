from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from lesson7_sweeps.errors import ConfigError
from lesson7_sweeps.models.rnn import CharRNN
from lesson7_sweeps.optim import build_optimizer


def rnn() -> CharRNN:
    return CharRNN(vocab_size=10, kind="gru", n_fac=4, n_hidden=8, n_layers=1, dropout=0.0, cell="cudnn",
                   stateful=True, reset_hidden=True)


def adam(lr, wd) -> OmegaConf:
    return OmegaConf.create({"_target_": "torch.optim.Adam", "_partial_": True, "lr": lr, "weight_decay": wd,
                             "betas": [0.9, 0.99], "eps": 1e-8})


def test_layer_groups_get_their_own_lr_and_weight_decay():
    m = rnn()
    opt = build_optimizer(adam([1e-4, 1e-3, 1e-2], [0.0, 1e-5, 1e-4]), m)
    assert isinstance(opt, torch.optim.Adam)
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 1e-3, 1e-2]
    assert [g["base_lr"] for g in opt.param_groups] == [1e-4, 1e-3, 1e-2]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 1e-5, 1e-4]
    assert opt.param_groups[0]["params"] == [m.emb.weight]
    assert opt.param_groups[2]["params"] == [m.decoder.weight, m.decoder.bias]
    assert opt.defaults["betas"] == (0.9, 0.99)


def test_one_value_broadcasts_to_every_group():
    opt = build_optimizer(adam(3e-3, 1e-5), rnn())
    assert [g["lr"] for g in opt.param_groups] == [3e-3] * 3
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-5] * 3


def test_a_list_of_the_wrong_length_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"optim.lr has 2 values but the model has 3 layer groups"):
        build_optimizer(adam([1e-3, 1e-2], 0.0), rnn())


def test_differential_lr_really_moves_groups_differently():
    m = rnn()
    before = [p.detach().clone() for p in (m.emb.weight, m.decoder.weight)]
    opt = build_optimizer(adam([1e-6, 1e-6, 1e-1], 0.0), m)
    m(torch.randint(0, 10, (5, 2))).mean().backward()
    opt.step()
    moved = [(p - b).abs().max().item() for p, b in zip((m.emb.weight, m.decoder.weight), before)]
    assert moved[0] < 1e-5 < 1e-2 < moved[1]
