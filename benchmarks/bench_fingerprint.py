"""The CIFAR-10 content fingerprint (sha256 of the source's bytes) vs loading the decoded cache it guards.

Every `data=cifar10` run hashes its source before it may use the cache, so the hash must stay
small next to the cache load (the whole point of the cache). Measures the .tar.gz and, extracted
into a temporary folder, the folder layout (60,000 small files); medians of --repeats.

    python benchmarks/bench_fingerprint.py [--root PATH] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

from lesson7_sweeps.data.cifar.cache import _cache_path, _read_cache, load_cifar, source_fingerprint

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpg.tar.gz"
DEFAULT_CACHE = Path.home() / ".cache/lesson7_sweeps"


def median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    arrays = load_cifar(args.root, DEFAULT_CACHE, max_bytes=2**30)  # builds the cache once if needed
    fp = arrays.fingerprint
    hash_s = median_s(lambda: source_fingerprint(args.root), args.repeats)
    load_s = median_s(lambda: _read_cache(_cache_path(args.root, DEFAULT_CACHE), fp, 2**30), args.repeats)
    size_mb = args.root.stat().st_size / 1e6
    print(f"archive {args.root.name} ({size_mb:.0f} MB): fingerprint {hash_s:.3f} s, cache load {load_s:.3f} s, "
          f"ratio {hash_s / load_s:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(args.root) as tar:
            tar.extractall(tmp, filter="data")
        folder = next(Path(tmp).rglob("train")).parent
        n = sum(1 for f in folder.rglob("*") if f.is_file())
        folder_s = median_s(lambda: source_fingerprint(folder), args.repeats)
        print(f"folder layout ({n} files): fingerprint {folder_s:.3f} s, "
              f"ratio to the cache load {folder_s / load_s:.2f}")


if __name__ == "__main__":
    main()
