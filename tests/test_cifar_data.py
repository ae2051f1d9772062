"""CIFAR-10 loading (three formats, cache, errors), device batches, augmentation and TTA views.

Every test writes its own tiny data set of real PNG/JPEG files, pickles or tar.gz archives.
"""

from __future__ import annotations

import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lesson7_sweeps.data.cifar as cifar
import lesson7_sweeps.data.cifar.formats as formats
from lesson7_sweeps.data.cifar import (
    LESSON_MEAN,
    LESSON_STD,
    CifarData,
    channel_stats,
    load_cifar,
    normalise,
    random_crop,
    random_flip,
    translate,
    tta_views,
)
from lesson7_sweeps.errors import ConfigError, DataError
from lesson7_sweeps.models.conv import ConvNet2

CLASSES = ["cat", "dog", "frog"]
REAL_TAR = Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpg.tar.gz"


# ---------------------------------------------------------------------------------------------
# Writers of tiny real data sets (also used by test_prepare_cifar.py)
# ---------------------------------------------------------------------------------------------


def blocky_images(n: int, seed: int) -> np.ndarray:
    """uint8 [n, 32, 32, 3] made of constant 8x8 blocks, which JPEG keeps almost exactly."""
    grid = np.random.default_rng(seed).integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    return np.kron(grid, np.ones((1, 8, 8, 1), dtype=np.uint8))


def write_layout(
    root: Path, ext: str = "png", n_train: int = 4, n_test: int = 2, test_name: str = "test"
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """root/train/<class>/NNNN.<ext> and root/<test_name>/<class>/...; returns the expected (x, y) per split."""
    options = {} if ext == "png" else {"quality": 95, "subsampling": 0}  # no chroma subsampling: ~exact
    expected = {}
    for seed, (split, n) in enumerate((("train", n_train), (test_name, n_test))):
        images = blocky_images(n * len(CLASSES), seed)
        for label, cls in enumerate(CLASSES):
            (root / split / cls).mkdir(parents=True)
            for i, image in enumerate(images[label * n : (label + 1) * n]):
                Image.fromarray(image).save(root / split / cls / f"{i:04d}.{ext}", **options)
        expected[split] = (images, np.repeat(np.arange(len(CLASSES)), n))
    return expected


def write_torchvision(folder: Path, n_per_batch: int = 3) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """torchvision's cifar-10-batches-py format: pickled dicts with bytes keys, rows of 3072 CHW bytes."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def dump(name: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, len(CLASSES), n)
        batch = {b"batch_label": name.encode(), b"labels": y.tolist(), b"data": x.transpose(0, 3, 1, 2).reshape(n, -1)}
        with (folder / name).open("wb") as f:
            pickle.dump(batch, f)
        return x, y

    train = [dump(f"data_batch_{i}", n_per_batch) for i in range(1, 6)]
    test = dump("test_batch", n_per_batch)
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072}, f)
    return {"train": tuple(np.concatenate(a) for a in zip(*train)), "test": test}


def write_tar(path: Path, folder: Path, arcname: str) -> Path:
    with tarfile.open(path, "w" if path.suffix == ".tar" else "w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return path


def assert_loaded(arrays: cifar.CifarArrays, expected: dict, test_name: str = "test", atol: int = 0) -> None:
    assert arrays.classes == CLASSES
    for x, y, (ex, ey) in (
        (arrays.train_x, arrays.train_y, expected["train"]),
        (arrays.test_x, arrays.test_y, expected[test_name]),
    ):
        assert x.dtype == np.uint8 and x.shape == ex.shape and x.shape[1:] == (32, 32, 3)
        assert y.dtype == np.int64
        np.testing.assert_array_equal(y, ey)
        assert np.abs(x.astype(int) - ex.astype(int)).max() <= atol


# ---------------------------------------------------------------------------------------------
# The three formats
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("test_name", ["test", "valid"])
def test_folder_layout_loads_exact_pixels(tmp_path, test_name):
    expected = write_layout(tmp_path / "cifar", test_name=test_name)
    arrays = load_cifar(tmp_path / "cifar", cache_dir=tmp_path / "cache", max_bytes=2**30)
    assert_loaded(arrays, expected, test_name)
    assert arrays.source_format == "folder"


def test_jpeg_folder_loads(tmp_path):
    expected = write_layout(tmp_path / "cifar", ext="jpg")
    assert_loaded(load_cifar(tmp_path / "cifar", cache_dir=tmp_path / "cache", max_bytes=2**30), expected, atol=2)


@pytest.mark.parametrize("name", ["cifar.tgz", "cifar.tar"])
def test_tar_loads_at_any_depth(tmp_path, name):
    expected = write_layout(tmp_path / "cifar")
    tar = write_tar(tmp_path / name, tmp_path / "cifar", arcname="data/cifar10")
    arrays = load_cifar(tar, cache_dir=tmp_path / "cache", max_bytes=2**30)
    assert_loaded(arrays, expected)
    assert arrays.source_format == "tar"


def test_jpeg_tar_gz_loads(tmp_path):
    expected = write_layout(tmp_path / "cifar", ext="jpeg")
    tar = write_tar(tmp_path / "cifar10-jpg.tar.gz", tmp_path / "cifar", arcname="cifar10")
    assert_loaded(load_cifar(tar, cache_dir=tmp_path / "cache", max_bytes=2**30), expected, atol=2)


@pytest.mark.parametrize("point_at", ["parent", "batches_dir"])
def test_torchvision_pickles_load(tmp_path, point_at):
    expected = write_torchvision(tmp_path / "data" / "cifar-10-batches-py")
    root = tmp_path / "data" if point_at == "parent" else tmp_path / "data" / "cifar-10-batches-py"
    arrays = load_cifar(root, cache_dir=tmp_path / "cache", max_bytes=2**30)
    assert_loaded(arrays, expected)
    assert arrays.source_format == "torchvision"
    assert arrays.train_x.shape == (15, 32, 32, 3)


def test_process_pool_decodes_like_one_process(tmp_path, monkeypatch):
    expected = write_layout(tmp_path / "cifar")
    monkeypatch.setattr(formats, "_DECODE_CHUNK", 5)  # 12 train images -> 3 pool tasks
    assert_loaded(load_cifar(tmp_path / "cifar", cache_dir=tmp_path / "cache", max_bytes=2**30), expected)


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


def forbid_decoding(monkeypatch):
    def fail(items):
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(formats, "_decode_images", fail)


def test_second_load_reads_the_cache(tmp_path, monkeypatch):
    expected = write_layout(tmp_path / "cifar")
    first = load_cifar(tmp_path / "cifar", cache_dir=tmp_path / "cache", max_bytes=2**30)
    assert first.cache_path.parent == tmp_path / "cache" and first.cache_path.suffix == ".npz"
    written = first.cache_path.stat().st_mtime_ns
    forbid_decoding(monkeypatch)
    second = load_cifar(tmp_path / "cifar", cache_dir=tmp_path / "cache", max_bytes=2**30)
    assert_loaded(second, expected)
    assert second.fingerprint == first.fingerprint
    assert second.cache_path.stat().st_mtime_ns == written
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.cache_path.name]  # no temp file left


def test_changed_image_is_decoded_again(tmp_path):
    write_layout(tmp_path / "cifar")
    first = load_cifar(tmp_path / "cifar", cache_dir=tmp_path / "cache", max_bytes=2**30)
    changed = tmp_path / "cifar" / "train" / "cat" / "0000.png"
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(changed)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    second = load_cifar(tmp_path / "cifar", cache_dir=tmp_path / "cache", max_bytes=2**30)
    assert second.fingerprint != first.fingerprint
    assert (second.train_x[0] == 7).all() and not (first.train_x[0] == 7).all()


def test_building_the_cache_is_said_once_with_where(tmp_path, caplog):
    write_layout(tmp_path / "cifar")
    with caplog.at_level("INFO", logger="lesson7_sweeps.data.cifar"):
        first = load_cifar(tmp_path / "cifar", cache_dir=tmp_path / "cache", max_bytes=2**30)
        load_cifar(tmp_path / "cifar", cache_dir=tmp_path / "cache", max_bytes=2**30)
    said = [r.getMessage() for r in caplog.records if "cache" in r.getMessage()]
    assert said == [f"decoding CIFAR-10 from {tmp_path / 'cifar'} into the cache {first.cache_path} (once; later "
                    f"runs load it in about a second)"]


def test_touched_tar_keeps_its_cache(tmp_path, monkeypatch):
    write_layout(tmp_path / "cifar")
    tar = write_tar(tmp_path / "cifar.tar.gz", tmp_path / "cifar", arcname="cifar10")
    first = load_cifar(tar, cache_dir=tmp_path / "cache", max_bytes=2**30)
    os.utime(tar, ns=(tar.stat().st_atime_ns, tar.stat().st_mtime_ns + 10**9))
    forbid_decoding(monkeypatch)
    assert load_cifar(tar, cache_dir=tmp_path / "cache", max_bytes=2**30).fingerprint == first.fingerprint


def replace_keeping_size_and_mtime(path: Path, image: np.ndarray) -> None:
    """What `cp -p` / `rsync -a` / a re-extracted archive can do: new pixels, same size and mtime
    (uncompressed PNGs of one shape all have the same size)."""
    st = path.stat()
    Image.fromarray(image).save(path, compress_level=0)
    assert path.stat().st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("packed", [False, True])
def test_content_changed_with_size_and_mtime_kept_is_decoded_again(tmp_path, packed: bool):
    """The cache (and a rerun's data check) follow the bytes, not size and mtime."""
    write_layout(tmp_path / "cifar")
    image = tmp_path / "cifar" / "train" / "cat" / "0000.png"
    Image.open(image).save(image, compress_level=0)
    source = write_tar(tmp_path / "cifar.tar", tmp_path / "cifar", "cifar10") if packed else tmp_path / "cifar"
    first = load_cifar(source, cache_dir=tmp_path / "cache", max_bytes=2**30)
    replace_keeping_size_and_mtime(image, np.full((32, 32, 3), 7, np.uint8))
    if packed:  # the same members, same sizes and mtimes: a tar of the same size, given the old mtime
        st = source.stat()
        write_tar(source, tmp_path / "cifar", "cifar10")
        assert source.stat().st_size == st.st_size
        os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = load_cifar(source, cache_dir=tmp_path / "cache", max_bytes=2**30)
    assert second.fingerprint != first.fingerprint
    assert (second.train_x[0] == 7).all() and not (first.train_x[0] == 7).all()


def test_default_cache_beside_source_else_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user_cache"))
    write_layout(tmp_path / "shared" / "cifar")
    arrays = load_cifar(tmp_path / "shared" / "cifar", max_bytes=2**30)
    assert arrays.cache_path.parent == tmp_path / "shared" / ".lesson7_cache"

    write_layout(tmp_path / "readonly" / "cifar")
    (tmp_path / "readonly").chmod(0o555)  # no write bit: read-only even for root
    try:
        arrays = load_cifar(tmp_path / "readonly" / "cifar", max_bytes=2**30)
    finally:
        (tmp_path / "readonly").chmod(0o755)
    assert arrays.cache_path.parent == tmp_path / "user_cache" / "lesson7_sweeps"
    assert not (tmp_path / "readonly" / ".lesson7_cache").exists()


# ---------------------------------------------------------------------------------------------
# One-line errors that name the path
# ---------------------------------------------------------------------------------------------


def no_class_folders(root: Path) -> tuple[Path, str]:
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    return root, f"no class folders in {root / 'train'}"


def different_classes(root: Path) -> tuple[Path, str]:
    write_layout(root)
    (root / "test" / "dog").rename(root / "test" / "horse")
    return root, "only in " + str(root / "train") + ": ['dog'], only in " + str(root / "test") + ": ['horse']"


def undecodable_image(root: Path) -> tuple[Path, str]:
    write_layout(root)
    (root / "test" / "dog" / "0001.png").write_bytes(b"not a png")
    return root, f"cannot decode image {root / 'test' / 'dog' / '0001.png'}"


def empty_class_folder(root: Path) -> tuple[Path, str]:
    write_layout(root)
    for f in (root / "train" / "frog").iterdir():
        f.unlink()
    return root, f"class folder {root / 'train'}/frog holds no .png/.jpg images"


def wrong_size(root: Path) -> tuple[Path, str]:
    write_layout(root)
    Image.new("RGB", (33, 32)).save(root / "train" / "cat" / "0002.png")
    return root, f"image {root / 'train' / 'cat' / '0002.png'} is 33x32, expected 32x32"


def broken_image_in_tar(root: Path) -> tuple[Path, str]:
    write_layout(root)
    (root / "train" / "cat" / "0002.png").write_bytes(b"\x89PNG broken")
    tar = write_tar(root.parent / "broken.tgz", root, arcname="cifar10")
    return tar, f"cannot decode image cifar10/train/cat/0002.png in {tar}"


def tar_without_train(root: Path) -> tuple[Path, str]:
    write_layout(root)
    tar = write_tar(root.parent / "empty.tar.gz", root / "test", arcname="cifar10/test")
    return tar, f"{tar} holds no train/<class>/ images"


def no_test_split(root: Path) -> tuple[Path, str]:
    write_layout(root)
    (root / "test").rename(root / "holdout")
    return root, f"{root} has train/ but no test/ (or valid/) folder"


def missing_pickle(root: Path) -> tuple[Path, str]:
    write_torchvision(root / "cifar-10-batches-py")
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    return root, f"{root / 'cifar-10-batches-py' / 'data_batch_3'} is missing"


def not_an_archive(root: Path) -> tuple[Path, str]:
    root.parent.mkdir(parents=True, exist_ok=True)
    (root.parent / "cifar.zip").write_bytes(b"zip")
    return root.parent / "cifar.zip", f"data.root={root.parent / 'cifar.zip'} is a file but not a .tar.gz"


@pytest.mark.parametrize(
    "make",
    [
        no_class_folders,
        different_classes,
        undecodable_image,
        empty_class_folder,
        wrong_size,
        broken_image_in_tar,
        tar_without_train,
        no_test_split,
        missing_pickle,
        not_an_archive,
    ],
)
def test_user_errors_are_one_line_and_name_the_path(tmp_path, make):
    root, needle = make(tmp_path / "cifar")
    with pytest.raises(DataError) as error:
        load_cifar(root, cache_dir=tmp_path / "cache", max_bytes=2**30)
    message = str(error.value)
    assert "\n" not in message
    assert needle in message


def test_missing_root_says_how_to_fix(tmp_path):
    with pytest.raises(DataError, match=r"^data\.root=\S+/nowhere does not exist; point data\.root at ") as error:
        load_cifar(tmp_path / "nowhere", max_bytes=2**30)
    assert "\n" not in str(error.value)


def test_unwritable_cache_dir(tmp_path):
    write_layout(tmp_path / "cifar")
    (tmp_path / "locked").mkdir(mode=0o555)
    with pytest.raises(DataError, match=f"data.cache_dir={tmp_path / 'locked'} is not writable"):
        load_cifar(tmp_path / "cifar", cache_dir=tmp_path / "locked", max_bytes=2**30)


# ---------------------------------------------------------------------------------------------
# Statistics, augmentation, TTA views: plain functions
# ---------------------------------------------------------------------------------------------


def test_channel_stats_match_numpy():
    x = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    mean, std = channel_stats(x)
    np.testing.assert_allclose(mean, (x / 255).mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(std, (x / 255).std(axis=(0, 1, 2)), rtol=1e-12)


def test_random_crop_takes_windows_of_the_reflect_padded_image():
    x = torch.randn(32, 3, 16, 16)
    out = random_crop(x, 4, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    offsets = []
    for i in range(len(x)):
        windows = [(dy, dx) for dy in range(9) for dx in range(9)]
        matches = [(dy, dx) for dy, dx in windows if torch.equal(out[i], padded[i, :, dy : dy + 16, dx : dx + 16])]
        assert len(matches) == 1
        offsets += matches
    assert len(set(offsets)) > 10  # the window moves per image
    assert torch.equal(random_crop(x, 0, torch.Generator()), x)


def test_random_flip_mirrors_some_rows_and_keeps_the_rest():
    x = torch.randn(32, 3, 8, 8)
    out = random_flip(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, torch.flip(r, dims=[2])) for o, r in zip(out, x)]
    kept = [torch.equal(o, r) for o, r in zip(out, x)]
    assert all(f != k for f, k in zip(flipped, kept))
    assert any(flipped) and any(kept)
    assert torch.equal(random_flip(x, torch.Generator().manual_seed(0)), out)  # the generator decides


def test_tta_views():
    x = torch.randn(4, 3, 8, 8)
    views = tta_views(x)
    assert len(views) == 6 and views[0] is x
    assert torch.equal(views[1], torch.flip(x, dims=[3]))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    assert torch.equal(views[2], padded[..., 4:, 4:]) and torch.equal(views[4], padded[..., :8, :8])
    assert torch.equal(views[3], torch.flip(views[2], dims=[3]))
    assert torch.equal(translate(x, 0, 0), x)
    assert tta_views(x, identity_only=True) == [x]


def test_tta_with_identity_only_equals_plain_evaluation():
    torch.manual_seed(0)
    model = ConvNet2(3, layers=[8, 16]).eval()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
        averaged = torch.stack([model(v).exp() for v in tta_views(x, identity_only=True)]).mean(0).log()
        full = torch.stack([model(v).exp() for v in tta_views(x)]).mean(0).log()
    torch.testing.assert_close(averaged, plain)
    assert not torch.allclose(full, plain)


# ---------------------------------------------------------------------------------------------
# CifarData: device batches
# ---------------------------------------------------------------------------------------------


def make_data(tmp_path: Path, **overrides) -> CifarData:
    root = tmp_path / "cifar"
    if not root.exists():
        write_layout(root, n_train=8, n_test=3)  # 24 train, 9 test images
    kwargs = dict(root=root, cache_dir=tmp_path / "cache", download=False, bs=8, stats="lesson")
    kwargs |= dict(pad=0, crop=False, flip=False, tta="none", pad_mode="reflect", crop_offsets="all", drop_last=True,
                  val_average="samples", max_bytes=2**30, seed=0) | overrides
    return CifarData(**kwargs)


def normalised(x: np.ndarray, mean=LESSON_MEAN, std=LESSON_STD) -> torch.Tensor:
    return normalise(
        torch.from_numpy(x).permute(0, 3, 1, 2), torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    )


def test_without_augmentation_batches_are_the_normalised_originals(tmp_path):
    data = make_data(tmp_path, bs=5)
    arrays = load_cifar(tmp_path / "cifar", cache_dir=tmp_path / "cache", max_bytes=2**30)
    assert len(data.train) == 4 and len(data.valid) == 2  # 24 // 5 (partial dropped), ceil(9 / 5)

    valid = list(data.valid)
    assert [len(y) for _, y in valid] == [5, 4]
    torch.testing.assert_close(torch.cat([x for x, _ in valid]), normalised(arrays.test_x), rtol=0, atol=0)
    assert torch.equal(torch.cat([y for _, y in valid]), torch.from_numpy(arrays.test_y))

    originals = normalised(arrays.train_x)
    seen = []
    for x, y in data.train:
        assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
        for image, label in zip(x, y):
            (index,) = [i for i in range(len(originals)) if torch.equal(originals[i], image)]
            assert arrays.train_y[index] == label
            seen.append(index)
    assert len(set(seen)) == 20  # shuffled, no repeats


def test_augmentation_moves_and_mirrors_train_images_only(tmp_path):
    data = make_data(tmp_path, pad=4, crop=True, flip=True)
    arrays = load_cifar(tmp_path / "cifar", cache_dir=tmp_path / "cache", max_bytes=2**30)
    originals = normalised(arrays.train_x)
    batch = torch.cat([x for x, _ in data.train])
    assert batch.shape == originals.shape
    unchanged = sum(any(torch.equal(o, image) for o in originals) for image in batch)
    assert unchanged < len(batch) // 2
    torch.testing.assert_close(torch.cat([x for x, _ in data.valid]), normalised(arrays.test_x), rtol=0, atol=0)


def two_epochs(tmp_path: Path, **overrides) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = make_data(tmp_path, **overrides)
    return [tuple(torch.cat(parts) for parts in zip(*data.train)) for _ in range(2)]


def test_same_seed_same_batches(tmp_path):
    augmented = {"pad": 2, "crop": True, "flip": True}
    runs = [two_epochs(tmp_path, seed=3, **augmented) for _ in range(2)]
    for (x_a, y_a), (x_b, y_b) in zip(*runs):
        assert torch.equal(x_a, x_b) and torch.equal(y_a, y_b)
    (x_other, _), _ = two_epochs(tmp_path, seed=4, **augmented)
    assert not torch.equal(x_other, runs[0][0][0])


def test_each_epoch_reshuffles(tmp_path):
    (x1, _), (x2, _) = two_epochs(tmp_path, seed=3)
    assert not torch.equal(x1, x2)
    # the same images, in another order
    assert torch.equal(x1.flatten(1).sum(1).sort().values, x2.flatten(1).sum(1).sort().values)


def test_resume_mid_epoch_gives_the_batches_of_an_uninterrupted_run(tmp_path):
    augmented = {"pad": 2, "crop": True, "flip": True, "seed": 5}
    data = make_data(tmp_path, **augmented)
    list(data.train)  # epoch 1
    batches = iter(data.train)  # epoch 2 ...
    next(batches)
    state = data.train.state_dict()  # ... checkpointed after its first batch
    reference = [*batches, *data.train]  # the rest of epoch 2, then epoch 3

    resumed = make_data(tmp_path, **augmented)
    resumed.train.load_state_dict(state, batch=1)
    replay = [*resumed.train, *resumed.train]
    assert len(replay) == len(reference) == 2 * len(data.train) - 1
    for (x_a, y_a), (x_b, y_b) in zip(reference, replay):
        assert torch.equal(x_a, x_b) and torch.equal(y_a, y_b)


def test_stats_compute_uses_the_train_split(tmp_path):
    data = make_data(tmp_path, stats="compute")
    arrays = load_cifar(tmp_path / "cifar", cache_dir=tmp_path / "cache", max_bytes=2**30)
    assert data.mean == channel_stats(arrays.train_x)[0] and data.std == channel_stats(arrays.train_x)[1]
    x, _ = next(iter(data.valid))
    torch.testing.assert_close(x, normalised(arrays.test_x[:8], data.mean, data.std))


def test_facts_for_the_runner(tmp_path):
    data = make_data(tmp_path, tta="views")
    assert data.classes == CLASSES and data.num_classes == 3 and data.tta == "views"
    assert data.kind == "image" and data.model_args() == {"num_classes": 3}
    assert data.describe() == {
        "source": str(tmp_path / "cifar"),
        "format": "folder",
        "n_train": 24,
        "n_test": 9,
        "num_classes": 3,
        "fingerprint": data.fingerprint,
    }
    assert len(data.fingerprint) == 16
    assert [len(v) for v in data.tta_views(torch.zeros(2, 3, 32, 32), data.tta_generator())] == [2] * 6


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"stats": "imagenet"}, "data.stats='imagenet' is not one of lesson|compute"),
        ({"pad": 4}, "data.pad=4 with data.crop=False"),
        ({"bs": 25}, "data.bs=25 must be between 1 and the 24 training images"),
    ],
)
def test_config_errors(tmp_path, overrides, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("|", r"\|")):
        make_data(tmp_path, **overrides)


# ---------------------------------------------------------------------------------------------
# The real data (slow)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not REAL_TAR.is_file(), reason=f"real CIFAR-10 archive not found at {REAL_TAR}")
def test_real_cifar10_jpeg_archive(tmp_path):
    arrays = load_cifar(REAL_TAR, cache_dir=tmp_path, max_bytes=2**30)
    assert arrays.train_x.shape == (50000, 32, 32, 3) and arrays.test_x.shape == (10000, 32, 32, 3)
    assert arrays.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert np.bincount(arrays.train_y).tolist() == [5000] * 10 and np.bincount(arrays.test_y).tolist() == [1000] * 10
    mean, _ = channel_stats(arrays.train_x)
    np.testing.assert_allclose(mean, (0.4913, 0.4821, 0.4465), atol=1e-3)
