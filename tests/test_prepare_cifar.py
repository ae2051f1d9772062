"""lesson7-prepare-cifar: flat <id>_<class>.png folders and torchvision batches -> class folders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lesson7_sweeps.data.cifar import load_cifar
from lesson7_sweeps.prepare_cifar import main
from tests.test_cifar_data import CLASSES, blocky_images, write_torchvision

FLAT = ["1_frog.png", "2_cat.png", "3_frog.png", "10_dog.png"]


def write_flat(src: Path) -> None:
    src.mkdir(parents=True)
    for name, image in zip(FLAT, blocky_images(len(FLAT), seed=0)):
        Image.fromarray(image).save(src / name)
    (src / "labels.txt").write_text("\n".join(CLASSES))  # not an image: ignored


def test_flat_copies_into_class_folders(tmp_path, capsys):
    write_flat(tmp_path / "train")
    assert main(["flat", str(tmp_path / "train"), str(tmp_path / "sorted" / "train")]) == 0
    dest = tmp_path / "sorted" / "train"
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*.png")) == [
        "cat/2_cat.png",
        "dog/10_dog.png",
        "frog/1_frog.png",
        "frog/3_frog.png",
    ]
    assert (dest / "frog" / "1_frog.png").read_bytes() == (tmp_path / "train" / "1_frog.png").read_bytes()
    assert len(list((tmp_path / "train").glob("*.png"))) == 4  # copied, not moved
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and f"copied 4 images under {dest} (cat=1, dog=1, frog=2)" in out


def test_flat_move_empties_the_source(tmp_path, capsys):
    write_flat(tmp_path / "train")
    assert main(["flat", "--move", str(tmp_path / "train"), str(tmp_path / "sorted")]) == 0
    assert not list((tmp_path / "train").glob("*.png"))
    assert len(list((tmp_path / "sorted").rglob("*.png"))) == 4
    assert "moved 4 images" in capsys.readouterr().out


def test_torchvision_export_round_trips_through_the_loader(tmp_path, capsys):
    expected = write_torchvision(tmp_path / "cifar-10-batches-py")
    assert main(["torchvision", str(tmp_path), str(tmp_path / "cifar10")]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and f"wrote train=15, test=3 PNG images under {tmp_path / 'cifar10'}" in out
    arrays = load_cifar(tmp_path / "cifar10", cache_dir=tmp_path / "cache", max_bytes=2**30)
    assert arrays.source_format == "folder" and arrays.classes == CLASSES
    for split, x, y in (("train", arrays.train_x, arrays.train_y), ("test", arrays.test_x, arrays.test_y)):
        ex, ey = expected[split]
        order = np.argsort(ey, kind="stable")  # the loader lists class by class, in file-name order
        np.testing.assert_array_equal(x, ex[order])
        np.testing.assert_array_equal(y, ey[order])


def test_bad_file_name_is_a_one_line_error_and_touches_nothing(tmp_path, capsys):
    write_flat(tmp_path / "train")
    Image.fromarray(blocky_images(1, seed=1)[0]).save(tmp_path / "train" / "frog.png")
    assert main(["flat", "--move", str(tmp_path / "train"), str(tmp_path / "sorted")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(
        f"lesson7-prepare-cifar: error: {tmp_path / 'train' / 'frog.png'} is not named <id>_<class>.png"
    )
    assert len(list((tmp_path / "train").glob("*.png"))) == 5 and not (tmp_path / "sorted").exists()


@pytest.mark.parametrize("name", ["1_...jpg", "1_..png", "2_.hidden.png"])
def test_a_class_name_that_is_no_plain_folder_name_is_refused(tmp_path, capsys, name: str):
    """`1_...jpg` has the class `..`: it was copied to DEST/../1_...jpg, outside DEST."""
    write_flat(tmp_path / "src" / "train")
    Image.fromarray(blocky_images(1, seed=1)[0]).save(tmp_path / "src" / "train" / name, format="PNG")
    dest = tmp_path / "src" / "sorted"
    assert main(["flat", str(tmp_path / "src" / "train"), str(dest)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "with a plain class name" in err
    assert sorted(p.name for p in (tmp_path / "src").iterdir()) == ["train"]  # nothing written anywhere


def test_torchvision_without_batches_is_a_one_line_error(tmp_path, capsys):
    assert main(["torchvision", str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"lesson7-prepare-cifar: error: {tmp_path} holds no cifar-10-batches-py/batches.meta; " + (
        "pass torchvision's CIFAR-10 folder\n"
    )


def test_module_exits_2_with_one_stderr_line(tmp_path):
    missing = tmp_path / "nowhere"
    result = subprocess.run(
        [sys.executable, "-m", "lesson7_sweeps.prepare_cifar", "flat", str(missing), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"lesson7-prepare-cifar: error: {missing} is not a folder; "
        + ("pass the folder that holds the <id>_<class>.png files")
    ]
