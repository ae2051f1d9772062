"""Normalisation and augmentation: plain tensor functions that run on whatever device x is on."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# The lesson's stats tuple for lossless CIFAR-10 (pixel/255, train split).
LESSON_MEAN = (0.4914, 0.48216, 0.44653)
LESSON_STD = (0.24703, 0.24349, 0.26159)
TTA_SHIFT = 2  # px: the translated test-time views, small enough to keep the object in frame


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images [N, H, W, 3], in pixel/255 units.

    From a 256-bin histogram per channel: exact, and in chunks, so no float copy of the whole set.
    """
    pixels = x.reshape(-1, x.shape[-1])
    counts = np.zeros((pixels.shape[1], 256), dtype=np.int64)
    for chunk in np.array_split(pixels, max(1, len(pixels) // 2**20)):
        for c in range(pixels.shape[1]):
            counts[c] += np.bincount(chunk[:, c], minlength=256)
    p = counts / len(pixels)
    values = np.arange(256) / 255
    means = p @ values
    stds = np.sqrt((p * (values - means[:, None]) ** 2).sum(1))
    return tuple(means.tolist()), tuple(stds.tolist())


def normalise(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 NCHW -> float32 (x/255 - mean) / std; mean and std are [1, 3, 1, 1] on x's device."""
    return (x.float() / 255 - mean) / std


def pad_images(x: Tensor, pad: int, mode: str) -> Tensor:
    """Pad H and W by `pad` on each side. reflect: torch's, the edge pixel not repeated (dcb|abcd|cba);
    symmetric: the edge pixel repeated (cba|abcd|dcb), OpenCV's BORDER_REFLECT that fastai 0.7 pads with."""
    if mode == "reflect":
        return F.pad(x, (pad, pad, pad, pad), mode="reflect")
    x = torch.cat([x[..., :pad].flip(-1), x, x[..., -pad:].flip(-1)], -1)
    return torch.cat([x[..., :pad, :].flip(-2), x, x[..., -pad:, :].flip(-2)], -2)


def random_crop(x: Tensor, pad: int, generator: torch.Generator, pad_mode: str = "reflect",
                offsets: str = "all") -> Tensor:
    """Pad by `pad` (pad_mode), then cut a random HxW window per image (one gather, no loop over images).

    offsets: all = every window of the padded image, 0..2*pad per axis; lesson = fastai 0.7's
    RandomCrop, floor(U * 2*pad), so 0..2*pad-1 (the window flush with the bottom/right edge never comes).
    """
    n, c, h, w = x.shape
    padded = pad_images(x, pad, pad_mode)
    if offsets == "lesson":
        dy, dx = (torch.rand((2, n, 1), generator=generator, device=x.device) * (2 * pad)).floor().long()
    else:
        dy, dx = torch.randint(0, 2 * pad + 1, (2, n, 1), generator=generator, device=x.device)
    rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]  # [n, 1, h, 1]
    cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]  # [n, 1, 1, w]
    images = torch.arange(n, device=x.device)[:, None, None, None]
    channels = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[images, channels, rows, cols]


def random_flip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def translate(x: Tensor, dy: int, dx: int) -> Tensor:
    """The HxW window at offset (dy, dx) of the reflect-padded batch: content moves by (-dy, -dx)."""
    p = max(abs(dy), abs(dx))
    h, w = x.shape[-2:]
    return F.pad(x, (p, p, p, p), mode="reflect")[..., p + dy : p + dy + h, p + dx : p + dx + w]


def tta_views(x: Tensor, identity_only: bool = False) -> list[Tensor]:
    """Test-time-augmentation views of a normalised eval batch; the caller averages probabilities.

    Views: identity, flip, and the two diagonal `TTA_SHIFT`-pixel translations with and without flip
    (6 in all, identity first). identity_only=True gives just [x]: the baseline that TTA is compared with.
    """
    if identity_only:
        return [x]
    shifted = [translate(x, d, d) for d in (TTA_SHIFT, -TTA_SHIFT)]
    return [view for v in (x, *shifted) for view in (v, v.flip(3))]
