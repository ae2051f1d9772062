"""The decoded CIFAR-10 cache: one uncompressed .npz per source, keyed by the source's content."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lesson7_sweeps.data.cifar.formats import Decoded, decode, find_source
from lesson7_sweeps.data.files import data_files
from lesson7_sweeps.errors import DataError

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the cache layout or the decoding changes
_ARRAY_FIELDS = ("train_x", "train_y", "test_x", "test_y")


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



def load_cifar(root: str | Path, cache_dir: str | Path | None = None, download: bool = False, *,
               max_bytes: int) -> CifarArrays:
    """Load CIFAR-10 from `root` (any supported format), decoding once into an .npz cache.

    The cache lives in `cache_dir`, by default `.lesson7_cache/` beside the source, or
    `~/.cache/lesson7_sweeps` when that folder is not writable. It is re-decoded when the source's
    fingerprint changes.
    """
    source, source_format = find_source(Path(root).expanduser(), download)
    data_files(source, max_bytes, "data.root")  # regular files, bounded: before anything is read
    fingerprint = source_fingerprint(source)
    cache_path = _cache_path(source, cache_dir)
    cached = _read_cache(cache_path, fingerprint, max_bytes)
    if cached is None:
        log.info("decoding CIFAR-10 from %s into the cache %s (once; later runs load it in about a second)",
                 source, cache_path)
        decoded = decode(source, source_format, max_bytes)
        _write_cache(cache_path, decoded, fingerprint)
    else:
        decoded = cached
    train_x, train_y, test_x, test_y, classes = decoded
    return CifarArrays(train_x, train_y, test_x, test_y, classes, source, source_format, fingerprint, cache_path)


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
