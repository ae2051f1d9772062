"""Device-resident batches of CIFAR-10: the whole set on the training device, indexed, normalised
and augmented there in batches, with no DataLoader workers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lesson7_sweeps.data.cifar.augment import (
    LESSON_MEAN,
    LESSON_STD,
    channel_stats,
    normalise,
    random_crop,
    random_flip,
    tta_views,
)
from lesson7_sweeps.data.cifar.cache import load_cifar
from lesson7_sweeps.errors import ConfigError

TTA_PASSES = 4  # the lesson's TTA: learn.TTA(n_aug=4) adds 4 augmented passes to the original


class DeviceBatches:
    """Batches from a uint8 NCHW set that already lives on the device: index, normalise, augment there.

    With `generator`, every pass draws a new order (so epochs differ, yet the sequence is fixed by
    the seed); without it, batches come in storage order. state_dict / load_state_dict resume a
    checkpointed run mid-epoch with the very batches it would have seen.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        bs: int,
        mean: Tensor,
        std: Tensor,
        drop_last: bool,
        generator: torch.Generator | None = None,
        augment: Callable[[Tensor], Tensor] | None = None,
    ):
        self.x, self.y, self.bs, self.mean, self.std = x, y, bs, mean, std
        self.drop_last, self.generator, self.augment = drop_last, generator, augment
        self._order: Tensor | None = None  # the order of the epoch being iterated
        self._resume: tuple[Tensor, int] | None = None  # (order, first batch) set by load_state_dict

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.bs if self.drop_last else -(-n // self.bs)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.y)
        if self._resume is not None:
            (order, start), self._resume = self._resume, None
        elif self.generator is None:
            order, start = torch.arange(n, device=self.y.device), 0
        else:
            order, start = torch.randperm(n, generator=self.generator, device=self.y.device), 0
        self._order = order
        for i in range(start, len(self)):
            idx = order[i * self.bs : (i + 1) * self.bs]
            xb = normalise(self.x[idx], self.mean, self.std)
            yield (xb if self.augment is None else self.augment(xb)), self.y[idx]

    def state_dict(self) -> dict[str, Any]:
        """The generator (it drives later orders and augmentations) and this epoch's order, on the CPU."""
        return {
            "generator": None if self.generator is None else self.generator.get_state(),
            "order": None if self._order is None else self._order.cpu(),
        }

    def load_state_dict(self, state: dict[str, Any], batch: int) -> None:
        """Continue as the checkpointed loader would: mid-epoch (batch > 0) in that epoch's order."""
        order = state["order"]
        if batch > 0 and not (isinstance(order, Tensor) and order.dtype == torch.int64 and order.shape == self.y.shape
                              and torch.equal(order.sort().values, torch.arange(len(self.y)))):
            raise ValueError("loader order is not an order of this data's images")
        if self.generator is not None:
            self.generator.set_state(state["generator"])
        self._resume = (order.to(self.y.device), batch) if batch > 0 else None


class CifarData:
    """CIFAR-10 held on `device` as uint8 tensors; `train` / `valid` are small batch iterables.

    stats: "lesson" uses the lesson's mean/std tuple; "compute" measures them on this train split.
    pad / crop: pad by `pad` px (pad_mode: reflect | symmetric, see pad_images) then take a random
    32x32 window per image (crop with pad=0 is a no-op); crop_offsets: all | lesson (see random_crop).
    flip: random horizontal flip. tta: the views the runner averages for val_accuracy_tta
    (lesson | views | none, see tta_views). drop_last: train without the last partial batch.
    val_average: samples | batches, how the runner averages val_loss and val_accuracy.
    """

    kind = "image"

    def __init__(
        self,
        *,
        root: str | Path,
        cache_dir: str | Path | None,
        download: bool,
        bs: int,
        stats: str,
        pad: int,
        crop: bool,
        flip: bool,
        tta: str,
        pad_mode: str,
        crop_offsets: str,
        drop_last: bool,
        val_average: str,
        max_bytes: int,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ):
        if stats not in ("lesson", "compute"):
            raise ConfigError(f"data.stats={stats!r} is not one of lesson|compute; pick one")
        if pad < 0 or (pad > 0 and not crop):
            raise ConfigError(
                f"data.pad={pad} with data.crop={crop}: padding only feeds the random crop; "
                "set data.crop=true with data.pad>0, or data.pad=0"
            )
        arrays = load_cifar(root, cache_dir, download, max_bytes=max_bytes)
        n_train = len(arrays.train_y)
        if not 1 <= bs <= n_train:
            raise ConfigError(f"data.bs={bs} must be between 1 and the {n_train} training images; change data.bs")
        self.classes = arrays.classes
        self.num_classes = len(arrays.classes)
        self.fingerprint = arrays.fingerprint
        self.warnings: list[str] = []  # nothing to warn about yet; text data has its <unk> share
        self.pad, self.crop, self.flip, self.tta, self.seed = pad, crop, flip, tta, seed
        self.pad_mode, self.crop_offsets, self.val_average = pad_mode, crop_offsets, val_average
        self.device = torch.device(device)
        self._facts: dict[str, str | int] = {
            "source": str(arrays.source),
            "format": arrays.source_format,
            "n_train": n_train,
            "n_test": len(arrays.test_y),
            "num_classes": self.num_classes,
            "fingerprint": self.fingerprint,
        }
        self.mean, self.std = (LESSON_MEAN, LESSON_STD) if stats == "lesson" else channel_stats(arrays.train_x)

        def to_device(x: np.ndarray, y: np.ndarray) -> tuple[Tensor, Tensor]:
            # HWC -> CHW after the copy, so the permute runs on the device
            x_dev = torch.from_numpy(x).to(self.device).permute(0, 3, 1, 2).contiguous()
            return x_dev, torch.from_numpy(y).to(self.device)

        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        self._generator = torch.Generator(device=self.device).manual_seed(seed)
        # drop_last: every step then sees bs images (batch statistics in BnLayer, lr per batch
        # comparable), and reshuffling means no image is always left out; fastai 0.7 kept the last
        # partial batch (drop_last=false), whose statistics a scratch BnLayer then evaluates with.
        # Valid keeps it: every test image counts in the metrics.
        train_x, train_y = to_device(arrays.train_x, arrays.train_y)
        self.train = DeviceBatches(
            train_x, train_y, bs, mean, std, drop_last=drop_last, generator=self._generator, augment=self._augment
        )
        self.valid = DeviceBatches(*to_device(arrays.test_x, arrays.test_y), bs, mean, std, drop_last=False)

    def _augment(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The training augmentation, drawn from the training generator unless given another."""
        generator = self._generator if generator is None else generator
        # fastai 0.7 flips before its RandomCrop; with offsets 0..2*pad-1 the order changes which windows
        # a flipped image can get (padding commutes with the flip, so flipping first is the same)
        flip_first = self.crop_offsets == "lesson"
        if self.flip and flip_first:
            x = random_flip(x, generator)
        if self.crop and self.pad:
            x = random_crop(x, self.pad, generator, self.pad_mode, self.crop_offsets)
        if self.flip and not flip_first:
            x = random_flip(x, generator)
        return x

    def tta_generator(self) -> torch.Generator:
        """A fresh generator for the lesson's TTA draws: every evaluation (and every rerun with this
        seed) sees the same augmented views, and the training generator is left untouched."""
        return torch.Generator(device=self.device).manual_seed(self.seed)

    def tta_views(self, x: Tensor, generator: torch.Generator) -> list[Tensor]:
        """The normalised eval batch x and its test-time views (x first); the runner averages the
        probabilities. tta=lesson: x plus TTA_PASSES draws of the training augmentation, as fastai
        0.7's learn.TTA() (the original + n_aug=4 passes of aug_dl); tta=views: the fixed views of
        tta_views() (identity, flip, 2-pixel shifts); tta=none: [x]."""
        if self.tta == "lesson":
            return [x, *(self._augment(x, generator) for _ in range(TTA_PASSES))]
        return tta_views(x, identity_only=self.tta == "none")

    def model_args(self) -> dict[str, int]:
        """What the model needs to know about the data: instantiate(cfg.model, **data.model_args())."""
        return {"num_classes": self.num_classes}

    def describe(self) -> dict[str, str | int]:
        """A few facts for the run log."""
        return dict(self._facts)
