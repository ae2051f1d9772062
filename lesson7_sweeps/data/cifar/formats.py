"""CIFAR-10's source formats: find which one `data.root` holds, and decode it to uint8 arrays.

  torchvision  `cifar-10-batches-py/` (pickled data_batch_1..5, test_batch, batches.meta), the public
               download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz that
               `torchvision.datasets.CIFAR10(root, download=True)` fetches (data.download=true does that);
  folder       the lesson's layout `train/<class>/*.png|jpg` and `test/<class>/...` (or `valid/`);
  tar          a .tar.gz/.tgz/.tar of that layout, read member by member without unpacking to disk.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from lesson7_sweeps.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TEST_SPLIT_NAMES = ("test", "valid")
_DECODE_CHUNK = 2500  # images per pool task: large enough that pickling overhead stays small

# (train_x, train_y, test_x, test_y, classes) as a decoder returns them
Decoded = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]
ImageItem = tuple[str, str | bytes]  # (name for messages, file path or encoded bytes)


def find_source(root: Path, download: bool) -> tuple[Path, str]:
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

def decode(source: Path, source_format: str, max_bytes: int) -> Decoded:
    """Every image and label of `source`, in the format find_source named."""
    return _read_tar(source, max_bytes) if source_format == "tar" else _DECODERS[source_format](source)


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

