"""Issue 15, class 1: what is read back from a store or a path is bounded. A checkpoint is checked
record by record, key by key and field by field before anything is materialised and before its run
is marked RUNNING; data paths accept regular files only, up to data.max_bytes, checked before reading."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from omegaconf import OmegaConf

from lesson7_sweeps.checkpoint import load_verified
from lesson7_sweeps.errors import CheckpointError, DataError
from lesson7_sweeps.rerun import main as rerun_main
from lesson7_sweeps.train import train, train_run

from .conftest import make_text

pytestmark = pytest.mark.usefixtures("one_thread")
MARK = 1234577  # the numel of a marker tensor, found in the pickle and replaced by the bomb's


def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/mlflow.db"


def finished_run(make_cfg, tmp_path: Path) -> tuple[MlflowClient, str, dict]:
    """A 1-epoch FINISHED run and its final checkpoint, loaded."""
    run_id = train_run(make_cfg("trainer.epochs=1", "trainer.max_steps=3", "trainer.sample.chars=0")).run_id
    client = MlflowClient(store(tmp_path))
    final = client.download_artifacts(run_id, "checkpoints/final.pt", str(tmp_path / "dl"))
    return client, run_id, torch.load(final, weights_only=True)


def bomb(state: dict, path: Path, unpacked: int) -> Path:
    """`state` plus an extra tensor of `unpacked` zero bytes, saved as torch does and then zipped
    again with every record deflated: a file of ~2 MB that unpacks to `unpacked` bytes."""
    plain = path.with_suffix(".plain")
    torch.save({**state, "extra": torch.zeros(MARK, dtype=torch.uint8)}, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as dst:
        pickle_name = next(n for n in src.namelist() if n.endswith("/data.pkl"))
        pickled = src.read(pickle_name)
        assert pickled.count(struct.pack("<i", MARK)) == 2  # the storage's size and the tensor's shape
        for info in src.infolist():
            data = src.read(info)
            if info.filename == pickle_name:
                data = pickled.replace(struct.pack("<i", MARK), struct.pack("<i", unpacked))
            if len(data) == MARK:  # the marker's storage becomes `unpacked` zeros, streamed
                zeros = bytes(2**20)
                with dst.open(info.filename, "w", force_zip64=True) as out:
                    for _ in range(unpacked // len(zeros)):
                        out.write(zeros)
                continue
            dst.writestr(info.filename, data)
    plain.unlink()
    return path


PEAK = """
import resource, sys
from pathlib import Path
from lesson7_sweeps.checkpoint import load_verified
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_verified(Path(sys.argv[1]))
    print("loaded")
except Exception as e:
    print(f"{type(e).__name__}: {e}")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_a_checkpoint_bomb_is_refused_before_it_is_unpacked(make_cfg, tmp_path: Path):
    """The issue's bomb, at 256 MiB: the old code loaded it (extra key and all) and grew by 256 MiB."""
    client, run_id, state = finished_run(make_cfg, tmp_path)
    path = bomb(state, tmp_path / "final.pt", 256 * 2**20)
    assert path.stat().st_size < 2 * 2**20
    proc = subprocess.run([sys.executable, "-c", PEAK, str(path)], capture_output=True, text=True, timeout=120)
    said, grew_mib = proc.stdout.strip().splitlines()
    assert said.startswith("CheckpointError: final.pt holds a compressed record") and "not a checkpoint this code " \
        "wrote" in said, proc.stdout + proc.stderr
    assert int(grew_mib) < 64  # nothing was unpacked
    real = Path(client.download_artifacts(run_id, "checkpoints/final.pt", str(tmp_path / "again")))
    assert set(load_verified(real)) >= {"model", "optimizer", "rng"}  # while the real checkpoint loads


def test_extra_keys_and_inner_fields_are_refused_before_the_run_is_running(make_cfg, tmp_path: Path):
    client, run_id, state = finished_run(make_cfg, tmp_path)
    opt_state = state["optimizer"]["state"]
    damages = {  # field -> (doctored checkpoint, what the one line says)
        "extra key": ({**state, "extra": torch.zeros(3)}, "holds extra besides a checkpoint's keys"),
        "empty optimizer": ({**state, "optimizer": {}}, "optimizer is not an optimizer state"),
        "optimizer moment shape": ({**state, "optimizer": {**state["optimizer"], "state": {
            **opt_state, 0: {**opt_state[0], "exp_avg": torch.zeros(2)}}}}, "optimizer state 0.exp_avg does not fit"),
        "model tensor": ({**state, "model": {**state["model"], "decoder.bias": torch.zeros(1)}}, "model decoder.bias"),
        "5-byte rng": ({**state, "rng": {**state["rng"], "torch": torch.zeros(5, dtype=torch.uint8)}}, "does not fit"),
        "loader": ({**state, "batch": 2, "epoch": 0, "loader": {"rng": None, "lengths": ["x"]}},
                   "loader lengths are not section lengths of this text"),
        "epoch 10**12": ({**state, "epoch": 10**12}, "epoch=1000000000000 is outside [0, 2]"),
        "hidden": ({**state, "hidden": torch.zeros(7)}, "hidden does not fit"),
    }
    for damage, (doctored, message) in damages.items():
        bad = tmp_path / damage.replace(" ", "_") / "final.pt"
        bad.parent.mkdir()
        torch.save(doctored, bad)
        client.log_artifact(run_id, str(bad), "checkpoints")
        cfg = make_cfg("trainer.epochs=2", "trainer.max_steps=3", "trainer.sample.chars=0")
        with pytest.raises(CheckpointError) as err:
            train_run(cfg, resume=run_id, checkpoint="final.pt")
        msg = str(err.value)
        assert message in msg and "\n" not in msg, (damage, msg)
        assert client.get_run(run_id).info.status == "FINISHED", damage  # as it was: never RUNNING


# --- data paths ------------------------------------------------------------------------------------


@pytest.fixture
def specials(tmp_path: Path) -> dict[str, Path]:
    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)
    folder = tmp_path / "folder"
    for split in ("train", "valid"):
        (folder / split).mkdir(parents=True)
        (folder / split / "a.txt").write_text(make_text(3000))
    (folder / "train" / "b.txt").symlink_to("/dev/zero")
    big = tmp_path / "big.txt"
    big.write_text(make_text(5000))
    return {"/dev/zero": Path("/dev/zero"), "fifo": fifo, "folder with a link to /dev/zero": folder, "big": big}


@pytest.mark.parametrize(("name", "message"), [
    ("/dev/zero", "data.path=/dev/zero: /dev/zero is a character device, not a regular file; point data.path at "
                  "regular files"),
    ("fifo", "fifo.txt is a FIFO, not a regular file"),
    ("folder with a link to /dev/zero", "train/b.txt is a character device, not a regular file"),
    ("big", "holds 5,000 bytes, more than data.max_bytes=4,096; raise data.max_bytes"),
])
def test_special_files_and_too_much_data_are_refused_before_reading(make_cfg, specials, name: str, message: str):
    cfg = make_cfg(f"data.path={specials[name]}", "data.max_bytes=4096")
    with pytest.raises(DataError) as err:
        train(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_stored_config_pointing_at_dev_zero_is_refused_by_rerun(make_cfg, tmp_path: Path, capsys):
    """The rerun route: a tampered config.yaml (values only) whose data.path is /dev/zero."""
    cfg = make_cfg("data.path=/dev/zero")
    client = MlflowClient(store(tmp_path))
    exp = client.get_experiment_by_name("test") or client.get_experiment(
        client.create_experiment("test", artifact_location=str(tmp_path / "artifacts")))
    run_id = client.create_run(exp.experiment_id).info.run_id
    client.log_text(run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    assert rerun_main([run_id, "--tracking-uri", store(tmp_path), "--force"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("lesson7-rerun: error: data.path=/dev/zero: /dev/zero is a character device, not a regular file; "
                   "point data.path at regular files (or a folder of them)")


def test_a_cifar_archive_that_unpacks_past_max_bytes_is_refused(tmp_path: Path):
    import io
    import tarfile

    from lesson7_sweeps.data.cifar import load_cifar

    tar = tmp_path / "cifar.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        for i in range(3):  # 3 "images" of 2 MiB of zeros: a few kB packed
            info = tarfile.TarInfo(f"cifar/train/cat/{i}.png")
            info.size = 2 * 2**20
            t.addfile(info, io.BytesIO(bytes(info.size)))
    assert tar.stat().st_size < 2**20
    with pytest.raises(DataError, match=r"cifar.tar.gz unpacks to more than data.max_bytes=4,194,304 bytes"):
        load_cifar(tar, tmp_path / "cache", max_bytes=4 * 2**20)
