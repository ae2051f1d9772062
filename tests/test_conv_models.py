"""The lesson-7 CIFAR model family: shapes, log-probabilities, layer groups, learning, batch norm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lesson7_sweeps.errors import ConfigError
from lesson7_sweeps.models.conv import (
    BnLayer,
    ConvBnNet,
    ConvBnNet2,
    ConvNet,
    ConvNet2,
    PreactResnet,
    Resnet,
    Resnet2,
    ResnetFull,
    ResnetLayer,
    ScratchBatchNorm2d,
    SimpleNet,
)

SMALL = {  # narrow widths keep the suite fast; the lesson's widths are checked separately
    "simplenet": lambda: SimpleNet(10, layers=[16]),
    "convnet": lambda: ConvNet(10, layers=[8, 16, 32]),
    "convnet2": lambda: ConvNet2(10, layers=[8, 16, 32]),
    "convbnnet": lambda: ConvBnNet(10, layers=[4, 8, 16, 32, 64], bn="scratch", running_stats=True),
    "convbnnet2-torch": lambda: ConvBnNet2(10, layers=[4, 8, 16, 32, 64], bn="torch", running_stats=True),
    "resnet-batchstats": lambda: Resnet(10, layers=[4, 8, 16, 32, 64], bn="scratch", running_stats=False),
    "resnet2": lambda: Resnet2(10, layers=[4, 8, 16, 32, 64], bn="scratch", running_stats=True, dropout=0.2),
    "resnetfull": lambda: ResnetFull(10, layers=[8, 16, 32], blocks=2, bn="scratch", running_stats=True, dropout=0.0),
    "preactresnet-torch": lambda: PreactResnet(
        10, layers=[8, 16, 32], blocks=2, bn="torch", running_stats=True, dropout=0.1
    ),
}

LESSON = {  # the lesson's widths (and conf defaults) must fit 32x32 inputs
    "simplenet": lambda: SimpleNet(10, layers=[40]),
    "convnet": lambda: ConvNet(10, layers=[32, 64, 128]),
    "convnet2": lambda: ConvNet2(10, layers=[32, 64, 128]),
    "convbnnet": lambda: ConvBnNet(10, layers=[10, 20, 40, 80, 160], bn="scratch", running_stats=True),
    "convbnnet2": lambda: ConvBnNet2(10, layers=[10, 20, 40, 80, 160], bn="scratch", running_stats=True),
    "resnet": lambda: Resnet(10, layers=[10, 20, 40, 80, 160], bn="scratch", running_stats=True),
    "resnet2": lambda: Resnet2(10, layers=[16, 32, 64, 128, 256], bn="scratch", running_stats=True, dropout=0.2),
    "resnetfull": lambda: ResnetFull(
        10, layers=[16, 32, 64, 128, 256], blocks=2, bn="scratch", running_stats=True, dropout=0.0
    ),
    "preactresnet": lambda: PreactResnet(
        10, layers=[16, 32, 64, 128, 256], blocks=2, bn="scratch", running_stats=True, dropout=0.0
    ),
}


def batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("name", SMALL)
def test_log_probabilities_of_the_right_shape(name):
    torch.manual_seed(0)
    model = SMALL[name]()
    x, _ = batch(4)
    for mode in (model.train, model.eval):
        mode()
        out = model(x)
        assert out.shape == (4, 10)
        torch.testing.assert_close(out.exp().sum(-1), torch.ones(4))
        assert (out <= 0).all()


@pytest.mark.parametrize("name", LESSON)
def test_lesson_widths_fit_32x32(name):
    model = LESSON[name]()
    assert model(batch(2)[0]).shape == (2, 10)


@pytest.mark.parametrize("name", SMALL)
def test_layer_groups_cover_every_parameter_once(name):
    model = SMALL[name]()
    grouped = [p for group in model.layer_groups() for p in group.parameters()]
    assert len(grouped) == len({id(p) for p in grouped})
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters()}
    assert len(model.layer_groups()) >= 2
    assert model.layer_groups()[-1] is model.head


@pytest.mark.parametrize("name", SMALL)
def test_a_few_adam_steps_lower_the_loss(name):
    torch.manual_seed(0)
    model = SMALL[name]()
    x, y = batch(8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        loss = F.nll_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


# ---------------------------------------------------------------------------------------------
# BatchNorm from scratch
# ---------------------------------------------------------------------------------------------


def bn_layer(running_stats: bool, bn: str = "scratch") -> BnLayer:
    torch.manual_seed(0)
    return BnLayer(3, 8, bn=bn, running_stats=running_stats)


def test_training_output_is_standardised_per_channel():
    layer = bn_layer(running_stats=True)  # m = 1, a = 0 at init
    out = layer(batch()[0])
    assert out.shape == (16, 8, 16, 16)  # stride 2
    var, mean = torch.var_mean(out, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(var, torch.ones(8), atol=1e-3, rtol=0)


def test_scale_and_shift_apply_per_channel():
    layer = bn_layer(running_stats=True)
    with torch.no_grad():
        layer.norm.m.fill_(2.0)
        layer.norm.a.copy_(torch.arange(8.0).view(8, 1, 1))
    var, mean = torch.var_mean(layer(batch()[0]), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, torch.arange(8.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(var, torch.full((8,), 4.0), atol=4e-3, rtol=0)


def test_eval_uses_running_statistics():
    layer = bn_layer(running_stats=True)
    x = batch()[0]
    layer(x)  # one training step: running = 0.9 * init + 0.1 * batch
    hidden = F.relu(layer.conv(x))
    var, mean = torch.var_mean(hidden, dim=(0, 2, 3), correction=1)  # unbiased, as the lesson's std
    torch.testing.assert_close(layer.norm.running_mean, 0.1 * mean)
    torch.testing.assert_close(layer.norm.running_var, 0.9 + 0.1 * var)

    layer.eval()
    with torch.no_grad():
        out = layer(x)
        rm, rv = layer.norm.running_mean[:, None, None], layer.norm.running_var[:, None, None]
        manual = (hidden - rm) / torch.sqrt(rv) * layer.norm.m + layer.norm.a  # no eps
        torch.testing.assert_close(out, manual)
        assert not torch.allclose(out, layer.train()(x), atol=1e-2)  # batch statistics differ


def test_without_running_stats_eval_uses_the_last_training_batch():
    layer = bn_layer(running_stats=False)  # the lesson's BnLayer: it kept self.means / self.stds
    x1, x2 = batch()[0], batch()[0] * 2 + 1
    with torch.no_grad():
        layer(x1)  # training: normalises with x1's statistics and stores them
        layer(x1 * 3)
        layer(x1)  # only the last training batch counts
        h = F.relu(layer.conv(x1))
        mean, std = h.mean((0, 2, 3)), h.std((0, 2, 3))
        out = layer.eval()(x2)
        h2 = F.relu(layer.conv(x2))
    manual = (h2 - mean[:, None, None]) / std[:, None, None]
    torch.testing.assert_close(out, manual)
    assert not torch.allclose(out, layer.train()(x2), atol=1e-2)  # x2's own statistics differ


def test_scratch_keeps_the_running_statistics_torch_keeps():
    x = torch.randn(16, 8, 6, 6) * 3 + 1
    scratch, reference = ScratchBatchNorm2d(8, running_stats=True), nn.BatchNorm2d(8)
    out, ref = scratch(x), reference(x)
    torch.testing.assert_close(scratch.running_mean, reference.running_mean)
    torch.testing.assert_close(scratch.running_var, reference.running_var)  # both unbiased
    # the outputs differ only in the divisor: the unbiased std (lesson) vs sqrt(biased var + eps) (torch)
    var_b = x.var((0, 2, 3), correction=0)[:, None, None]
    torch.testing.assert_close(out, ref * torch.sqrt(var_b + reference.eps) / x.std((0, 2, 3))[:, None, None])


def test_bn_torch_swaps_in_nn_batchnorm2d():
    layer = bn_layer(running_stats=True, bn="torch")
    assert isinstance(layer.norm, nn.BatchNorm2d) and layer.norm.affine
    model = ConvBnNet(10, layers=[4, 8, 16], bn="torch", running_stats=False)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 2 and not norms[0].track_running_stats
    assert not any(isinstance(m, ScratchBatchNorm2d) for m in model.modules())
    scratch = ConvBnNet(10, layers=[4, 8, 16], bn="scratch", running_stats=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in scratch.modules())


def test_unknown_bn_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model\.bn='group' is not one of scratch\|torch"):
        BnLayer(3, 8, bn="group", running_stats=True)


def test_resnet_layer_adds_its_input():
    torch.manual_seed(0)
    layer = ResnetLayer(8, 8, stride=1, bn="scratch", running_stats=True).eval()
    x = torch.randn(4, 8, 8, 8)
    torch.testing.assert_close(layer(x), x + BnLayer.forward(layer, x))
