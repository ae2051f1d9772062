"""Shared fixtures: a tiny real English text, and the real config composed by Hydra for tests."""

from __future__ import annotations

import atexit
import functools
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from lesson7_sweeps.train import CONF_DIR

SENTENCES = [
    "the cat sat on the mat.", "the dog ate the bone.", "a bird sang in the tree.",
    "the sun is warm today.", "we walked to the old mill.", "she reads a book at night.",
]


def make_text(n_chars: int, seed: int = 0) -> str:
    """Real (if simple) English prose: learnable structure, built by the test, never from shared data."""
    rng = random.Random(seed)
    out: list[str] = []
    while sum(map(len, out)) < n_chars:
        out.append(rng.choice(SENTENCES) + (" " if rng.random() < 0.8 else "\n"))
    return "".join(out)[:n_chars]


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread; two threads on a busy 2-core machine can be 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.txt"
    path.write_text(make_text(6000), encoding="utf-8")
    return path


@functools.cache
def _empty_store() -> Path:
    """An empty MLflow sqlite store, created by MLflow itself once per test session. Creating one runs
    every schema migration (~3 s on the CI machine), so tests start from a copy of this one instead."""
    from mlflow import MlflowClient

    folder = Path(tempfile.mkdtemp(prefix="lesson7-empty-store-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    MlflowClient(f"sqlite:///{folder}/mlflow.db").search_experiments()
    return folder / "mlflow.db"


def seed_store(db: Path) -> None:
    """Put an empty, fully migrated store at `db` unless one is there."""
    if not db.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_empty_store(), db)


def tiny_overrides(tmp_path: Path, text: Path, tracking: bool = True, fresh_store: bool = False) -> list[str]:
    """A small, CPU-only, fast run that writes into tmp_path (or tracks nothing). The store starts as a
    copy of an empty one; `fresh_store` leaves it to the run to create (tests of when it is created)."""
    if tracking and not fresh_store:
        seed_store(tmp_path / "mlflow.db")
    store = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_location={tmp_path}/artifacts",
             "tracking.experiment=test", "tracking.log_model=false"]
    return [*(store if tracking else ["tracking=none"]),
        "data=text", f"data.path={text}", "data.bs=8", "data.bptt=8", f"data.cache_dir={tmp_path}/cache",
        "model=lstm", "model.n_fac=8", "model.n_hidden=32", "model.n_layers=1", "model.dropout=0.0",
        "optim.lr=1e-2", "schedule=constant", "trainer.epochs=2", "trainer.device=cpu", "trainer.threads=1",
        "trainer.progress=off", "trainer.log_every=10", "trainer.sample.chars=20",
    ]


@pytest.fixture
def make_cfg(tmp_path: Path, text_file: Path):
    """Compose the real config (conf/) with tiny-run overrides plus the test's own."""

    def _make(*overrides: str, tracking: bool = True, fresh_store: bool = False) -> DictConfig:
        fresh_store |= any(o.startswith(("tracking.uri=", "tracking=")) for o in overrides)  # a store elsewhere
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose("train", overrides=[*tiny_overrides(tmp_path, text_file, tracking, fresh_store),
                                               *overrides])

    return _make


def run_cli(monkeypatch, capsys, tmp_path: Path, argv: list[str]) -> tuple[int, list[str], str]:
    """`lesson7-train ARGV` in this process (what the console script calls), from tmp_path: (exit
    code, stderr lines, stdout). It saves a subprocess's start (~10 s of CPU: torch, MLflow, Hydra)."""
    from lesson7_sweeps.train import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lesson7-train", *argv])
    capsys.readouterr()  # what the test's own setup printed
    code = 0
    try:
        cli()
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, err.strip().splitlines(), out


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 3 MB file system that can fill up (a tmpfs; needs root), with an MLflow store on it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(disk)]).returncode:
        pytest.skip("needs root to mount a tiny tmpfs that can fill up")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "--lazy", str(disk)])  # this process's sqlite engine may hold the file


@pytest.fixture(autouse=True)
def _restore_logging():
    """A test that runs the CLI in-process lets Hydra point the root logger at pytest's captured
    streams, which are closed after the test: later tests would print 'Logging error' to stderr."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
