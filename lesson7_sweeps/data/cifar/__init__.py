"""CIFAR-10 for the lesson-7 models: read any of three source formats, cache them as one .npz, serve
device-resident batches that are normalised and augmented on the device.

Sources `load_cifar` tells apart by itself:
  torchvision  `cifar-10-batches-py/` (pickled data_batch_1..5, test_batch, batches.meta), the public
               download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz that
               `torchvision.datasets.CIFAR10(root, download=True)` fetches (data.download=true does that);
  folder       the lesson's layout `train/<class>/*.png|jpg` and `test/<class>/...` (or `valid/`);
  tar          a .tar.gz/.tgz/.tar of that layout, read member by member without unpacking to disk.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import stat
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from lesson7_sweeps.data.files import data_files
from lesson7_sweeps.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# The lesson's stats tuple for lossless CIFAR-10 (pixel/255, train split).
LESSON_MEAN = (0.4914, 0.48216, 0.44653)
LESSON_STD = (0.24703, 0.24349, 0.26159)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TEST_SPLIT_NAMES = ("test", "valid")
TTA_SHIFT = 2  # px: the translated test-time views, small enough to keep the object in frame
TTA_PASSES = 4  # the lesson's TTA: learn.TTA(n_aug=4) adds 4 augmented passes to the original
CACHE_VERSION = 1  # bump when the cache layout or the decoding changes
_ARRAY_FIELDS = ("train_x", "train_y", "test_x", "test_y")
_DECODE_CHUNK = 2500  # images per pool task: large enough that pickling overhead stays small

# (train_x, train_y, test_x, test_y, classes) as a decoder returns them
Decoded = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]
ImageItem = tuple[str, str | bytes]  # (name for messages, file path or encoded bytes)


@dataclass
class CifarArrays:
    """Decoded CIFAR-10: images uint8 [N, 32, 32, 3] (HWC, as stored), labels int64 [N]."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]
    source: Path
    source_format: str  # "torchvision" | "folder" | "tar"
    fingerprint: str  # sha256 of the source's bytes, so a run can log which data it saw
    cache_path: Path


# ---------------------------------------------------------------------------------------------
# Loading: find the source, fingerprint it, read the cache or decode and write the cache
# ---------------------------------------------------------------------------------------------


def load_cifar(root: str | Path, cache_dir: str | Path | None = None, download: bool = False, *,
               max_bytes: int) -> CifarArrays:
    """Load CIFAR-10 from `root` (any supported format), decoding once into an .npz cache.

    The cache lives in `cache_dir`, by default `.lesson7_cache/` beside the source, or
    `~/.cache/lesson7_sweeps` when that folder is not writable. It is re-decoded when the source's
    fingerprint changes.
    """
    source, source_format = _find_source(Path(root).expanduser(), download)
    data_files(source, max_bytes, "data.root")  # regular files, bounded: before anything is read
    fingerprint = source_fingerprint(source)
    cache_path = _cache_path(source, cache_dir)
    cached = _read_cache(cache_path, fingerprint, max_bytes)
    if cached is None:
        log.info("decoding CIFAR-10 from %s into the cache %s (once; later runs load it in about a second)",
                 source, cache_path)
        decoded = _read_tar(source, max_bytes) if source_format == "tar" else _DECODERS[source_format](source)
        _write_cache(cache_path, decoded, fingerprint)
    else:
        decoded = cached
    train_x, train_y, test_x, test_y, classes = decoded
    return CifarArrays(train_x, train_y, test_x, test_y, classes, source, source_format, fingerprint, cache_path)


def _find_source(root: Path, download: bool) -> tuple[Path, str]:
    if root.is_file():
        if root.name.endswith((".tar.gz", ".tgz", ".tar")):
            return root, "tar"
        raise DataError(
            f"data.root={root} is a file but not a .tar.gz/.tgz/.tar archive; "
            "point data.root at a CIFAR-10 folder or a .tar.gz of one"
        )
    batches = torchvision_dir(root)
    if batches is not None:
        return batches, "torchvision"
    if (root / "train").is_dir():
        return root, "folder"
    if download:
        return _download(root), "torchvision"
    if not root.exists():
        raise DataError(
            f"data.root={root} does not exist; point data.root at a CIFAR-10 folder (train/<class>/, "
            "test/<class>/), a .tar.gz of one, or torchvision's cifar-10-batches-py (data.download=true fetches it)"
        )
    raise DataError(
        f"data.root={root} holds no CIFAR-10 data (no train/ folder, no cifar-10-batches-py/); "
        "point data.root at the folder that holds train/ and test/, or set data.download=true"
    )


def _download(root: Path) -> Path:
    import torchvision  # only this path needs it

    # one archive holds both splits; torchvision checks its md5 and unpacks cifar-10-batches-py/
    torchvision.datasets.CIFAR10(str(root), train=True, download=True)
    return root / "cifar-10-batches-py"


def source_fingerprint(source: Path) -> str:
    """sha256 of the source's content: the archive's bytes, or every file's relative path and bytes.

    Content, not size and mtime: `cp -p`, `rsync -a` or a re-extracted archive keep both while the
    pixels change. Hashing runs at disk speed (BENCHMARKS.md: the 130 MB archive in ~0.3 s)."""
    h = hashlib.sha256()
    files = [source] if source.is_file() else sorted(
        Path(folder, name) for folder, _, names in os.walk(source) for name in names)
    for f in files:
        if f != source:
            h.update(f"{f.relative_to(source).as_posix()}\0{f.stat().st_size}\0".encode())
        with f.open("rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest() if f == source else fh.read())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Cache: one uncompressed .npz, written atomically
# ---------------------------------------------------------------------------------------------


def _cache_path(source: Path, cache_dir: str | Path | None) -> Path:
    # The resolved source path is in the name so that one shared cache folder can hold several sources.
    name = f"{source.name}-{hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:8]}.npz"
    if cache_dir is not None:
        folder = Path(cache_dir).expanduser()
        if not _writable(folder):
            raise DataError(
                f"data.cache_dir={folder} is not writable; point data.cache_dir at a writable folder or set it to null"
            )
        return folder / name
    beside = source.resolve().parent / ".lesson7_cache"
    if _writable(beside):
        return beside / name
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lesson7_sweeps"
    return user_cache / name


def _writable(folder: Path) -> bool:
    """Whether `folder` exists or can be created, and may be written to.

    A folder without any write permission bit counts as read-only even for root, so that shared
    read-only data folders (chmod a-w) never collect caches.
    """
    existing = folder
    while not existing.exists():
        existing = existing.parent
    mode = existing.stat().st_mode
    return (
        existing.is_dir()
        and bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        and os.access(existing, os.W_OK | os.X_OK)
    )


def _read_cache(path: Path, fingerprint: str, max_bytes: int) -> Decoded | None:
    if not path.is_file():
        return None
    try:
        with zipfile.ZipFile(path) as z:  # np.savez stores; a compressed or huge record is no cache of ours
            records = z.infolist()
        if any(r.compress_type != zipfile.ZIP_STORED for r in records) or sum(r.file_size for r in records) > max_bytes:
            return None
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != CACHE_VERSION or str(z["fingerprint"]) != fingerprint:
                return None
            return (*(z[k] for k in _ARRAY_FIELDS), z["classes"].tolist())
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # a truncated or foreign file: decode again
        return None


def _write_cache(path: Path, decoded: Decoded, fingerprint: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    *arrays, classes = decoded
    # Temp file + os.replace: a concurrent reader (parallel sweep jobs) never sees half a cache.
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as f:
        np.savez(
            f,
            **dict(zip(_ARRAY_FIELDS, arrays)),
            classes=np.array(classes),
            fingerprint=np.array(fingerprint),
            version=np.array(CACHE_VERSION),
        )
    os.chmod(f.name, 0o644)  # the temp file is private; the cache may be shared
    os.replace(f.name, path)


# ---------------------------------------------------------------------------------------------
# Decoders, one per source format
# ---------------------------------------------------------------------------------------------


def torchvision_dir(root: Path) -> Path | None:
    """The `cifar-10-batches-py` folder at or inside `root`, or None."""
    for folder in (root / "cifar-10-batches-py", root):
        if (folder / "batches.meta").is_file():
            return folder
    return None


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and numpy arrays, and nothing else: a pickle is a program, and
    data.root may name a folder anyone could write (or a stored config could choose)."""

    ALLOWED = frozenset({("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                         ("numpy._core.multiarray", "_reconstruct"), ("_codecs", "encode")})

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which CIFAR-10 batches never contain")
        return super().find_class(module, name)


def read_torchvision_batches(folder: Path) -> Decoded:
    """Read torchvision's pickled batches with numpy (no torchvision needed), through `_ArrayUnpickler`."""

    def unpickle(name: str) -> dict:
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path} is missing; restore it or delete {folder} and set data.download=true")
        try:
            with path.open("rb") as f:
                batch = _ArrayUnpickler(f, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
            raise DataError(f"{path} is not a CIFAR-10 pickle ({_first_line(e)}); delete {folder} and set "
                            f"data.download=true") from None
        if not isinstance(batch, dict):
            raise DataError(f"{path} is not a CIFAR-10 pickle (a {type(batch).__name__}, not a dict); delete "
                            f"{folder} and set data.download=true")
        return batch

    def split(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        batches = [unpickle(n) for n in names]
        # rows are 3072 bytes: 1024 red, then green, then blue (CHW) -> HWC
        x = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        y = np.concatenate([np.asarray(b[b"labels"], dtype=np.int64) for b in batches])
        return np.ascontiguousarray(x, dtype=np.uint8), y

    classes = [name.decode() for name in unpickle("batches.meta")[b"label_names"]]
    train_x, train_y = split([f"data_batch_{i}" for i in range(1, 6)])
    test_x, test_y = split(["test_batch"])
    return train_x, train_y, test_x, test_y, classes


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


@dataclass
class _Split:
    where: str  # the split folder, for messages
    files: dict[str, list[ImageItem]]  # class -> images


def _read_folder(root: Path) -> Decoded:
    test_dir = next((root / n for n in TEST_SPLIT_NAMES if (root / n).is_dir()), None)
    if test_dir is None:
        raise DataError(f"{root} has train/ but no test/ (or valid/) folder; add {root}/test/<class>/ images")

    def split(folder: Path) -> _Split:
        files = {
            d.name: [(str(f), str(f)) for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
            for d in sorted(folder.iterdir())
            if d.is_dir() and not d.name.startswith(".")  # e.g. .ipynb_checkpoints is no class
        }
        return _Split(str(folder), files)

    return _decode_splits(split(root / "train"), split(test_dir))


def _read_tar(path: Path, max_bytes: int) -> Decoded:
    # layout prefix (the folders above train/) -> split name -> class -> images
    found: dict[tuple[str, ...], dict[str, dict[str, list[ImageItem]]]] = {}
    split_names = ("train", *TEST_SPLIT_NAMES)
    unpacked = 0  # a small .tar.gz can unpack to any size
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts
                if member.isdir() and len(parts) >= 2 and parts[-2] in split_names:  # a class folder
                    found.setdefault(parts[:-2], {}).setdefault(parts[-2], {}).setdefault(parts[-1], [])
                elif (
                    member.isfile()
                    and len(parts) >= 3
                    and parts[-3] in split_names
                    and parts[-1].lower().endswith(IMAGE_SUFFIXES)
                ):
                    unpacked += member.size
                    if unpacked > max_bytes:
                        raise DataError(f"{path} unpacks to more than data.max_bytes={max_bytes:,} bytes of images; "
                                        f"raise data.max_bytes if that much data is meant")
                    images = found.setdefault(parts[:-3], {}).setdefault(parts[-3], {}).setdefault(parts[-2], [])
                    images.append((f"{member.name} in {path}", tar.extractfile(member).read()))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot read archive {path} ({e}); re-create or re-download it") from e
    layouts = {prefix: splits for prefix, splits in found.items() if "train" in splits}
    if not layouts:
        raise DataError(f"{path} holds no train/<class>/ images; expected members like cifar10/train/cat/0001.png")
    if len(layouts) > 1:
        where = ", ".join("/".join((*p, "train")) for p in sorted(layouts))
        raise DataError(f"{path} holds several CIFAR layouts ({where}); pack only one")
    prefix, splits = next(iter(layouts.items()))
    base = "/".join(prefix)
    test_name = next((n for n in TEST_SPLIT_NAMES if n in splits), None)
    if test_name is None:
        raise DataError(f"{path} has {base}/train/ but no {base}/test/ (or valid/) images; add the test split")

    def split(name: str) -> _Split:
        files = {cls: sorted(splits[name][cls]) for cls in sorted(splits[name])}
        return _Split(f"{base}/{name} in {path}", files)

    return _decode_splits(split("train"), split(test_name))


def _decode_splits(train: _Split, test: _Split) -> Decoded:
    """Check the class folders of both splits, then decode every image with labels = sorted class index."""
    if not train.files:
        raise DataError(f"no class folders in {train.where}; expected {train.where}/<class>/*.png")
    if set(train.files) != set(test.files):
        only_train = sorted(set(train.files) - set(test.files))
        only_test = sorted(set(test.files) - set(train.files))
        raise DataError(
            f"train and test class folders differ: only in {train.where}: {only_train}, "
            f"only in {test.where}: {only_test}; give both splits the same class folders"
        )
    classes = sorted(train.files)
    arrays = []
    for split in (train, test):
        for cls in classes:
            if not split.files[cls]:
                raise DataError(f"class folder {split.where}/{cls} holds no .png/.jpg images; add images or remove it")
        items = [item for cls in classes for item in split.files[cls]]
        labels = np.repeat(np.arange(len(classes), dtype=np.int64), [len(split.files[c]) for c in classes])
        arrays += [_decode_images(items), labels]
    return (*arrays, classes)


def _decode_images(items: list[ImageItem]) -> np.ndarray:
    """Decode in a process pool: 60k tiny JPEGs take ~5 s on one core, PIL's per-image cost is Python-bound."""
    chunks = [items[i : i + _DECODE_CHUNK] for i in range(0, len(items), _DECODE_CHUNK)]
    workers = min(len(chunks), os.cpu_count() or 1)
    if workers <= 1:
        return _decode_chunk(items)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return np.concatenate(list(pool.map(_decode_chunk, chunks)))


def _decode_chunk(items: list[ImageItem]) -> np.ndarray:
    out = np.empty((len(items), 32, 32, 3), dtype=np.uint8)
    for i, (name, src) in enumerate(items):
        try:
            with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
                if im.size != (32, 32):
                    raise DataError(f"image {name} is {im.size[0]}x{im.size[1]}, expected 32x32; resize or remove it")
                out[i] = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
        except (UnidentifiedImageError, OSError, SyntaxError) as e:  # PIL raises all three for broken files
            raise DataError(f"cannot decode image {name} ({type(e).__name__}); replace or remove the file") from e
    return out


_DECODERS: dict[str, Callable[[Path], Decoded]] = {
    "torchvision": read_torchvision_batches,
    "folder": _read_folder,
}


# ---------------------------------------------------------------------------------------------
# Normalisation and augmentation: plain tensor functions that run on whatever device x is on
# ---------------------------------------------------------------------------------------------


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


def random_crop(x: Tensor, pad: int, generator: torch.Generator) -> Tensor:
    """Reflect-pad by `pad`, then cut a random HxW window per image (one gather, no loop over images)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
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


# ---------------------------------------------------------------------------------------------
# Device-resident batches
# ---------------------------------------------------------------------------------------------


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
    pad / crop: reflect-pad by `pad` px then take a random 32x32 window per image (crop with pad=0 is
    a no-op). flip: random horizontal flip. tta: the views the runner averages for val_accuracy_tta
    (lesson | views | none, see tta_views).
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
        # Train drops the last partial batch: every step then sees bs images (batch statistics in
        # BnLayer, lr per batch comparable), and reshuffling means no image is always left out.
        # Valid keeps it: every test image counts in the metrics.
        train_x, train_y = to_device(arrays.train_x, arrays.train_y)
        self.train = DeviceBatches(
            train_x, train_y, bs, mean, std, drop_last=True, generator=self._generator, augment=self._augment
        )
        self.valid = DeviceBatches(*to_device(arrays.test_x, arrays.test_y), bs, mean, std, drop_last=False)

    def _augment(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The training augmentation, drawn from the training generator unless given another."""
        generator = self._generator if generator is None else generator
        if self.crop and self.pad:
            x = random_crop(x, self.pad, generator)
        if self.flip:
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
