"""Data files read bounded: regular files only, and at most `data.max_bytes` of them, checked before
anything is read. `data.path` / `data.root` may come from a config read back from a store, so they
can name /dev/zero (an endless read), a FIFO (a read that blocks forever) or a huge file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lesson7_sweeps.errors import DataError


def _kind(mode: int) -> str:
    kinds = {stat.S_ISFIFO: "FIFO", stat.S_ISCHR: "character device", stat.S_ISBLK: "block device",
             stat.S_ISSOCK: "socket"}
    return next((name for test, name in kinds.items() if test(mode)), "special file")


def data_files(path: Path, max_bytes: int, key: str) -> list[Path]:
    """`path` (a regular file) or every file under it (a folder), in order; DataError, naming the
    setting `key`, for anything but regular files (symbolic links are followed) or more than
    `max_bytes` in all."""
    files = sorted(f for f in path.rglob("*") if not f.is_dir()) if path.is_dir() else [path]
    total = 0
    for f in files:
        try:
            mode, size = (st := f.stat()).st_mode, st.st_size
        except OSError as e:
            raise DataError(f"{key}={path}: {f} cannot be read ({e.strerror}); fix or remove it") from None
        if not stat.S_ISREG(mode):
            raise DataError(f"{key}={path}: {f} is a {_kind(mode)}, not a regular file; point {key} at regular "
                            f"files (or a folder of them)")
        total += size
    if total > max_bytes:
        raise DataError(f"{key}={path} holds {total:,} bytes, more than data.max_bytes={max_bytes:,}; raise "
                        f"data.max_bytes if that much data is meant")
    return files


def read_bytes(path: Path, max_bytes: int) -> bytes:
    """The bytes of the regular file `path`, refused (DataError) past `max_bytes`; never blocks, even
    if the file was swapped for a FIFO after `data_files` checked it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise DataError(f"{path} is a {_kind(mode)}, not a regular file; point the data at regular files")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise DataError(f"{path} holds more than data.max_bytes={max_bytes:,} bytes; raise data.max_bytes if that "
                        f"much data is meant")
    return data
