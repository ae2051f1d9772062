"""CIFAR-10 for the lesson-7 models: read any of three source formats (formats.py), cache them as
one .npz (cache.py), serve device-resident batches (batches.py) that are normalised and augmented
on the device (augment.py). `data._target_: lesson7_sweeps.data.cifar.CifarData` builds it all.
"""

from lesson7_sweeps.data.cifar.augment import (
    LESSON_MEAN,
    LESSON_STD,
    channel_stats,
    normalise,
    random_crop,
    random_flip,
    translate,
    tta_views,
)
from lesson7_sweeps.data.cifar.batches import CifarData, DeviceBatches
from lesson7_sweeps.data.cifar.cache import CifarArrays, load_cifar, source_fingerprint
from lesson7_sweeps.data.cifar.formats import IMAGE_SUFFIXES, read_torchvision_batches, torchvision_dir

__all__ = [
    "IMAGE_SUFFIXES", "LESSON_MEAN", "LESSON_STD", "CifarArrays", "CifarData", "DeviceBatches", "channel_stats",
    "load_cifar", "normalise", "random_crop", "random_flip", "read_torchvision_batches", "source_fingerprint",
    "torchvision_dir", "translate", "tta_views",
]
