"""The CIFAR-10 model family of fast.ai 2018 lesson 7 (lesson7-cifar10.ipynb), from an MLP to ResNets.

Conventions shared by every model:
- `num_classes` comes from the data; `layers` lists the widths a sweep varies: hidden units for
  SimpleNet, channels per stage for the conv nets (the 3 input channels and the class count are
  added here, so layers=[32, 64] means 3 -> 32 -> 64 -> classifier).
- `forward` returns log-probabilities [bs, num_classes].
- `layer_groups()` lists the stages in order (stem .. classifier) for per-group lr / weight decay.
- `bn="scratch"` uses the lesson's hand-written batch norm, `bn="torch"` nn.BatchNorm2d in the same
  place; `running_stats=False` normalises with batch statistics in eval too (the lesson's original).
Every hyper-parameter is a required argument: its default lives in conf/model/*.yaml.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lesson7_sweeps.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Batch norm from scratch, and the one helper that picks it or torch's
# ---------------------------------------------------------------------------------------------


class ScratchBatchNorm2d(nn.Module):
    """The lesson's batch norm: per-channel (x - mean) / std over (N, H, W), then scale `m` and shift `a`.

    Exactly the lesson's BnLayer formula: `std` is the unbiased standard deviation (`x_chan.std(1)`)
    and there is no eps; only a zero std (a channel constant over the batch, e.g. all zero after the
    ReLU) is replaced by 1, where the lesson would divide 0 by 0. Training normalises with the
    batch's statistics and stores them for evaluation: with running_stats=True as an EWMA (momentum
    0.1, as torch does); with running_stats=False only the last training batch's, as the lesson's
    BnLayer kept `self.means` / `self.stds`.
    """

    def __init__(self, nf: int, running_stats: bool, momentum: float = 0.1):
        super().__init__()
        self.m = nn.Parameter(torch.ones(nf, 1, 1))
        self.a = nn.Parameter(torch.zeros(nf, 1, 1))
        self.momentum = momentum if running_stats else 1.0  # 1.0: keep only the last batch
        self.register_buffer("running_mean", torch.zeros(nf))
        self.register_buffer("running_var", torch.ones(nf))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            # reduces over (N, H, W) in place: no transposed copy of x as in the lesson
            # in fp32 under bf16 autocast too: bf16 statistics are coarse, and the buffers are fp32
            var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=1)
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var, self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        # the guard is on the variance, before the sqrt: its gradient at 0 would be infinite
        std = torch.where(var > 0, var, torch.ones_like(var)).sqrt()
        # (x - mean) / std * m + a, folded into a per-channel scale and shift: one pass over x
        # (one fused kernel, forward and backward) instead of a chain of four
        scale = self.m / std[:, None, None]
        return torch.addcmul(self.a - mean[:, None, None] * scale, x, scale)


def batch_norm(nf: int, bn: str, running_stats: bool) -> nn.Module:
    """The normalisation `bn` names: "scratch" (the lesson's) or "torch" (nn.BatchNorm2d, affine)."""
    if bn == "scratch":
        return ScratchBatchNorm2d(nf, running_stats)
    if bn == "torch":
        return nn.BatchNorm2d(nf, track_running_stats=running_stats)
    raise ConfigError(f"model.bn={bn!r} is not one of scratch|torch; pick one")


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


class ConvLayer(nn.Module):
    """conv 3x3 stride 2 (padding 1 halves 32 -> 16 exactly) + ReLU."""

    def __init__(self, ni: int, nf: int):
        super().__init__()
        self.conv = nn.Conv2d(ni, nf, kernel_size=3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv(x))


class BnLayer(nn.Module):
    """The lesson's conv block: conv (no bias: the norm's shift replaces it), ReLU, then batch norm.

    BN after the ReLU is the lesson's order, kept for fidelity. So is padding 1 for every kernel
    size: Resnet2's 7x7 stem turns 32x32 images into 28x28 maps, as in the notebook.
    """

    def __init__(self, ni: int, nf: int, stride: int = 2, kernel_size: int = 3, *, bn: str, running_stats: bool):
        super().__init__()
        self.conv = nn.Conv2d(ni, nf, kernel_size, stride=stride, padding=1, bias=False)
        self.norm = batch_norm(nf, bn, running_stats)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(F.relu(self.conv(x)))


class ResnetLayer(BnLayer):
    """The lesson's residual layer: x + BnLayer(x) (stride 1, same width)."""

    def forward(self, x: Tensor) -> Tensor:
        return x + super().forward(x)


class BasicBlock(nn.Module):
    """He et al.'s basic block: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)).

    The shortcut is a 1x1 strided conv + bn where the shape changes, else the identity.
    """

    def __init__(self, ni: int, nf: int, stride: int, *, bn: str, running_stats: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(ni, nf, 3, stride=stride, padding=1, bias=False)
        self.norm1 = batch_norm(nf, bn, running_stats)
        self.conv2 = nn.Conv2d(nf, nf, 3, padding=1, bias=False)
        self.norm2 = batch_norm(nf, bn, running_stats)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and ni == nf
            else nn.Sequential(nn.Conv2d(ni, nf, 1, stride=stride, bias=False), batch_norm(nf, bn, running_stats))
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.norm2(self.conv2(F.relu(self.norm1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class PreactBlock(nn.Module):
    """He et al.'s pre-activation block: conv(relu(bn(conv(relu(bn(x)))))) + shortcut.

    Nothing touches the identity path; a projection (1x1 strided conv) reads the pre-activated input.
    """

    def __init__(self, ni: int, nf: int, stride: int, *, bn: str, running_stats: bool):
        super().__init__()
        self.norm1 = batch_norm(ni, bn, running_stats)
        self.conv1 = nn.Conv2d(ni, nf, 3, stride=stride, padding=1, bias=False)
        self.norm2 = batch_norm(nf, bn, running_stats)
        self.conv2 = nn.Conv2d(nf, nf, 3, padding=1, bias=False)
        self.projection = None if stride == 1 and ni == nf else nn.Conv2d(ni, nf, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.norm1(x))
        shortcut = x if self.projection is None else self.projection(pre)
        return self.conv2(F.relu(self.norm2(self.conv1(pre)))) + shortcut


# ---------------------------------------------------------------------------------------------
# Models: a stem, stages and a head; each class only builds those three
# ---------------------------------------------------------------------------------------------


class StagedNet(nn.Module):
    """stem -> stages -> head -> log_softmax; the stages are the layer groups."""

    def __init__(self, stem: nn.Module, stages: Sequence[nn.Module], head: nn.Module):
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return F.log_softmax(self.head(x), dim=-1)

    def layer_groups(self) -> list[nn.Module]:
        """Stem, each stage, head, in order; parameter-free parts (a Flatten stem) are left out."""
        return [g for g in (self.stem, *self.stages, self.head) if any(True for _ in g.parameters())]


def _classifier(ni: int, num_classes: int, pool: type[nn.Module], dropout: float = 0.0) -> nn.Sequential:
    """Global pool over the remaining spatial grid, [dropout], linear to the classes."""
    drop = [nn.Dropout(dropout)] if dropout else []
    return nn.Sequential(pool(1), nn.Flatten(), *drop, nn.Linear(ni, num_classes))


def _pairs(widths: Sequence[int]) -> list[tuple[int, int]]:
    return list(zip(widths[:-1], widths[1:]))


def _bn_stages(layers: Sequence[int], extra: type[BnLayer], n_extra: int, **norm) -> list[nn.Module]:
    """Per width step: a stride-2 BnLayer, then `n_extra` stride-1 layers of type `extra`."""
    return [
        nn.Sequential(BnLayer(ni, nf, **norm), *(extra(nf, nf, stride=1, **norm) for _ in range(n_extra)))
        for ni, nf in _pairs(layers)
    ]


class SimpleNet(StagedNet):
    """MLP on the flattened 3x32x32 image; `layers` are the hidden widths (lesson: [40])."""

    def __init__(self, num_classes: int, *, layers: Sequence[int]):
        widths = [3 * 32 * 32, *layers]
        stages = [nn.Sequential(nn.Linear(ni, nf), nn.ReLU()) for ni, nf in _pairs(widths)]
        super().__init__(nn.Flatten(), stages, nn.Linear(widths[-1], num_classes))


class ConvNet(StagedNet):
    """conv 3x3 stride 2 without padding + ReLU per width (32 -> 15 -> 7 -> 3), max pool, linear."""

    def __init__(self, num_classes: int, *, layers: Sequence[int]):
        stages = [nn.Sequential(nn.Conv2d(ni, nf, 3, stride=2), nn.ReLU()) for ni, nf in _pairs([3, *layers])]
        super().__init__(nn.Identity(), stages, _classifier(layers[-1], num_classes, nn.AdaptiveMaxPool2d))


class ConvNet2(StagedNet):
    """ConvNet with padded ConvLayers (32 -> 16 -> 8 -> 4)."""

    def __init__(self, num_classes: int, *, layers: Sequence[int]):
        stages = [ConvLayer(ni, nf) for ni, nf in _pairs([3, *layers])]
        super().__init__(nn.Identity(), stages, _classifier(layers[-1], num_classes, nn.AdaptiveMaxPool2d))


class ConvBnNet(StagedNet):
    """conv 5x5 stem (no ReLU, as in the lesson), then _bn_stages; ConvBnNet2 and Resnet differ only
    in the stride-1 layers each stage adds (`extra`, `n_extra`)."""

    extra: type[BnLayer] = BnLayer
    n_extra = 0

    def __init__(self, num_classes: int, *, layers: Sequence[int], bn: str, running_stats: bool):
        norm = {"bn": bn, "running_stats": running_stats}
        stem = nn.Conv2d(3, layers[0], kernel_size=5, stride=1, padding=2)
        stages = _bn_stages(layers, self.extra, self.n_extra, **norm)
        super().__init__(stem, stages, _classifier(layers[-1], num_classes, nn.AdaptiveMaxPool2d))


class ConvBnNet2(ConvBnNet):
    """ConvBnNet with a stride-1 BnLayer after each stride-2 one (twice as deep)."""

    n_extra = 1


class Resnet(ConvBnNet):
    """ConvBnNet with two ResnetLayers after each stride-2 BnLayer."""

    extra = ResnetLayer
    n_extra = 2


class Resnet2(StagedNet):
    """Resnet with a 7x7 BnLayer stem and dropout before the classifier (the lesson's best model)."""

    def __init__(self, num_classes: int, *, layers: Sequence[int], bn: str, running_stats: bool, dropout: float):
        norm = {"bn": bn, "running_stats": running_stats}
        stem = BnLayer(3, layers[0], stride=1, kernel_size=7, **norm)
        stages = _bn_stages(layers, ResnetLayer, 2, **norm)
        super().__init__(stem, stages, _classifier(layers[-1], num_classes, nn.AdaptiveMaxPool2d, dropout))


def _block_stages(block: type[nn.Module], layers: Sequence[int], blocks: int, **norm) -> list[nn.Module]:
    """Per width step: one stride-2 block that changes the width, then `blocks - 1` stride-1 blocks."""
    return [
        nn.Sequential(block(ni, nf, 2, **norm), *(block(nf, nf, 1, **norm) for _ in range(blocks - 1)))
        for ni, nf in _pairs(layers)
    ]


class ResnetFull(StagedNet):
    """A standard CIFAR ResNet of BasicBlocks: conv-bn-relu stem, `blocks` blocks per width step (the
    first strided), average pool, [dropout], linear."""

    def __init__(
        self, num_classes: int, *, layers: Sequence[int], blocks: int, bn: str, running_stats: bool, dropout: float
    ):
        norm = {"bn": bn, "running_stats": running_stats}
        stem = nn.Sequential(
            nn.Conv2d(3, layers[0], 3, padding=1, bias=False), batch_norm(layers[0], **norm), nn.ReLU()
        )
        stages = _block_stages(BasicBlock, layers, blocks, **norm)
        super().__init__(stem, stages, _classifier(layers[-1], num_classes, nn.AdaptiveAvgPool2d, dropout))


class PreactResnet(StagedNet):
    """Pre-activation ResNet: plain conv stem, PreactBlocks laid out as in ResnetFull, and a final
    bn-relu before the pool (the blocks' sums are not normalised)."""

    def __init__(
        self, num_classes: int, *, layers: Sequence[int], blocks: int, bn: str, running_stats: bool, dropout: float
    ):
        norm = {"bn": bn, "running_stats": running_stats}
        stem = nn.Conv2d(3, layers[0], 3, padding=1, bias=False)
        stages = _block_stages(PreactBlock, layers, blocks, **norm)
        head = nn.Sequential(
            batch_norm(layers[-1], **norm),
            nn.ReLU(),
            _classifier(layers[-1], num_classes, nn.AdaptiveAvgPool2d, dropout),
        )
        super().__init__(stem, stages, head)
