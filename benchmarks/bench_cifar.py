"""Runner vs a plain PyTorch loop with a torchvision DataLoader on a lesson-7 CIFAR-10 model: images/s, and the ratio.

Both sides train the same model, built from the same composed config (`experiment=lesson7_<model>`,
by default lesson7_resnet2: Resnet2([16, 32, 64, 128, 256]), the lesson's scratch batch norm without
running statistics, dropout 0.2), with the same optimizer (SGD lr 1e-2, momentum 0.9, wd 1e-6) and
batch size (256), on the same decoded uint8 images, for the same number of steps, in one process,
alternating, several times; we print the median of each and the median ratio.
The runner side is the real thing: `train(cfg)`, the training set on the device and augmented there
in batches, MLflow logging to a temporary sqlite store, throughput read back from the run (timed
over the training steps only, from the first batch's creation to the device sync after the last).
The plain side is the usual torchvision recipe: a Dataset over the same arrays, PIL transforms per
image (reflect-pad 4 + random crop, random flip, ToTensor, Normalize with the lesson's stats), a
DataLoader with `--workers` worker processes (pinned memory on CUDA), timed from the first batch
(worker start-up, a per-epoch cost a full epoch amortises, is left out) to a device sync after the
last step. On CUDA the plain side stays in fp32 as a minimal loop would; the runner uses its
defaults (trainer.precision=auto and trainer.channels_last=auto: bf16 autocast + channels_last).

    python benchmarks/bench_cifar.py --steps 20 --repeats 3 [--model simplenet] [--device cuda] [--root PATH]
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import compare, runner_throughput, write_json  # benchmarks/common.py
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from lesson7_sweeps.data.cifar import LESSON_MEAN, LESSON_STD, load_cifar
from lesson7_sweeps.train import CONF_DIR

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpg.tar.gz"
DEFAULT_CACHE = Path.home() / ".cache/lesson7_sweeps"  # never beside the shared (read-only) data


class ArrayCifar(Dataset):
    """uint8 HWC images + labels, one PIL-transformed image per item (as torchvision's CIFAR10 serves them)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, transform: transforms.Compose) -> None:
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.x[i]), int(self.y[i])


def config(args: argparse.Namespace, seed: int, store: str | None = None) -> DictConfig:
    """The runner's config (MLflow in `store`, or no tracking); the plain side reads its model,
    optimizer, batch size and padding from it too."""
    tracking = ["tracking=none"] if store is None else [
        f"tracking.uri=sqlite:///{store}/mlflow.db", f"tracking.artifact_location={store}/artifacts",
        "tracking.experiment=bench"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=[
            f"experiment=lesson7_{args.model}", f"data.root={args.root}", f"data.cache_dir={args.cache_dir}",
            "data.tta=none", f"seed={seed}", f"trainer.device={args.device}", "trainer.epochs=1",
            f"trainer.max_steps={args.steps}", "trainer.checkpoints=false", "trainer.progress=off",
            f"trainer.compile={args.compile}", *args.override, *tracking])


def plain(args: argparse.Namespace, seed: int) -> float:
    """Images per second of a minimal loop: same model and optimizer, a torchvision DataLoader."""
    cfg = config(args, seed)
    torch.manual_seed(seed)
    arrays = load_cifar(args.root, args.cache_dir, max_bytes=2**30)
    augment = transforms.Compose([
        transforms.ToPILImage(),
        transforms.RandomCrop(32, padding=cfg.data.pad, padding_mode="reflect"),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(LESSON_MEAN, LESSON_STD),
    ])
    cuda = args.device.startswith("cuda")
    loader = DataLoader(ArrayCifar(arrays.train_x, arrays.train_y, augment), batch_size=cfg.data.bs, shuffle=True,
                        drop_last=True, num_workers=args.workers, pin_memory=cuda)
    model = instantiate(cfg.model, num_classes=len(arrays.classes)).to(args.device)
    opt = instantiate(cfg.optim)(model.parameters())  # SGD with the preset's lr, momentum, weight decay
    batches = iter(loader)
    first = next(batches)  # the workers start and fill their queues: not timed
    n, start = 0, time.perf_counter()
    for i, (x, y) in enumerate(itertools.chain([first], batches)):
        x, y = x.to(args.device, non_blocking=cuda), y.to(args.device, non_blocking=cuda)
        loss = F.nll_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += y.numel()
        if i + 1 == args.steps:
            break
    loss.item()  # wait for the device
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps per side, at most one epoch (195); default 20 on CPU, 150 on CUDA")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="resnet2", help="a lesson-7 preset: experiment=lesson7_<model>")
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers (plain side)")
    ap.add_argument("--compile", default="off", help="trainer.compile of the runner side (off | default | ...)")
    ap.add_argument("--override", action="append", default=[], help="another Hydra override (both sides' config)")
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    if args.steps is None:  # 20 resnet2 steps: ~5 minutes in all on 2 quiet CPU cores
        args.steps = 150 if cuda else 20
    if not (Path(CONF_DIR) / f"experiment/lesson7_{args.model}.yaml").is_file():
        ap.error(f"--model {args.model}: no preset conf/experiment/lesson7_{args.model}.yaml")
    bs = config(args, seed=0).data.bs
    n_batches = len(load_cifar(args.root, args.cache_dir, max_bytes=2**30).train_y) // bs  # decodes once into the cache
    if not 1 <= args.steps <= n_batches:
        ap.error(f"--steps must be between 1 and {n_batches} (one epoch at bs {bs})")
    def runner(seed: int) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            return runner_throughput(config(args, seed, tmp))

    name = torch.cuda.get_device_name() if cuda else f"cpu x{torch.get_num_threads()}"
    print(f"lesson7_{args.model} bs {bs}, {args.steps} steps x {args.repeats}, {name}, torch {torch.__version__}; "
          f"plain side: DataLoader {args.workers} workers{', pinned, fp32' if cuda else ''}"
          f"{'; runner: trainer.precision=auto (bf16 autocast + channels_last)' if cuda else ''}"
          f"; runner trainer.compile={args.compile}")
    result = compare(args.repeats, runner, lambda seed: plain(args, seed), "images/s")
    write_json(args.json, bench="cifar", device=name, model=args.model, compile=args.compile, steps=args.steps,
               unit="images/s", **result)

if __name__ == "__main__":
    main()
