"""lesson7-prepare-cifar: the lesson's shell steps that arrange CIFAR-10 into class folders.

lesson7-prepare-cifar flat SRC DEST [--move]
    SRC holds `<id>_<class>.png` files (the fast.ai / pjreddie download's train/ or test/ folder);
    each goes to DEST/<class>/<id>_<class>.png. Run it once per split.
lesson7-prepare-cifar torchvision SRC DEST
    SRC is torchvision's cifar-10-batches-py (or the folder holding it); writes the lesson's layout
    DEST/train/<class>/00000.png and DEST/test/<class>/00000.png.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from lesson7_sweeps.data.cifar import IMAGE_SUFFIXES, read_torchvision_batches, torchvision_dir
from lesson7_sweeps.errors import DataError

PROG = "lesson7-prepare-cifar"


def sort_flat(src: Path, dest: Path, move: bool) -> Counter[str]:
    """Copy (or move) `<id>_<class>.<ext>` files from `src` into `dest/<class>/`; returns counts per class."""
    if not src.is_dir():
        raise DataError(f"{src} is not a folder; pass the folder that holds the <id>_<class>.png files")
    files = sorted(f for f in src.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{src} holds no .png/.jpg files; pass the folder that holds the <id>_<class>.png files")
    targets = []
    for f in files:  # check every name before touching anything, so a bad name leaves SRC intact
        _, sep, cls = f.stem.partition("_")
        # the class becomes a folder name: "..", "." or a hidden name would land outside DEST or be skipped
        if not sep or not cls or cls.startswith(".") or "/" in cls or "\\" in cls:
            raise DataError(f"{f} is not named <id>_<class>{f.suffix} with a plain class name; rename it or move "
                            f"it out of {src}")
        targets.append(dest / cls / f.name)
    transfer = shutil.move if move else shutil.copy2
    for f, target in zip(files, targets):
        target.parent.mkdir(parents=True, exist_ok=True)
        transfer(f, target)
    return Counter(t.parent.name for t in targets)


def export_torchvision(src: Path, dest: Path) -> dict[str, int]:
    """Write torchvision's pickled batches as PNG class folders; returns image counts per split."""
    folder = torchvision_dir(src)
    if folder is None:
        raise DataError(f"{src} holds no cifar-10-batches-py/batches.meta; pass torchvision's CIFAR-10 folder")
    train_x, train_y, test_x, test_y, classes = read_torchvision_batches(folder)
    counts = {}
    for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        for cls in classes:
            (dest / split / cls).mkdir(parents=True, exist_ok=True)
        # numbered per split in batch order, so names are stable and sort like the batches
        for i, (image, label) in enumerate(zip(x, y)):
            Image.fromarray(image).save(dest / split / classes[label] / f"{i:05d}.png")
        counts[split] = len(y)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (2 for an error the user can fix)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    flat = commands.add_parser("flat", help="sort <id>_<class>.png files into DEST/<class>/")
    flat.add_argument("src", type=Path, help="folder of <id>_<class>.png files")
    flat.add_argument("dest", type=Path, help="folder to receive one sub-folder per class")
    flat.add_argument("--move", action="store_true", help="move the files instead of copying them")
    tv = commands.add_parser("torchvision", help="torchvision's pickled batches -> DEST/{train,test}/<class>/")
    tv.add_argument("src", type=Path, help="cifar-10-batches-py, or the folder holding it")
    tv.add_argument("dest", type=Path, help="folder to receive train/ and test/")
    args = parser.parse_args(argv)
    try:
        if args.command == "flat":
            counts = sort_flat(args.src, args.dest, args.move)
            verb = "moved" if args.move else "copied"
            per_class = ", ".join(f"{cls}={n}" for cls, n in sorted(counts.items()))
            print(f"{PROG}: {verb} {sum(counts.values())} images under {args.dest} ({per_class})")
        else:
            splits = export_torchvision(args.src, args.dest)
            summary = ", ".join(f"{split}={n}" for split, n in splits.items())
            print(f"{PROG}: wrote {summary} PNG images under {args.dest}")
    except (DataError, OSError) as e:  # OSError: e.g. DEST not writable; its message names the file
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
