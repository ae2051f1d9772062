"""Checkpoints that a run can continue from exactly, and stopping cleanly on SIGINT / SIGTERM.

A checkpoint holds the model and optimizer states, the resolved config, where training stands
(epoch, batch within the epoch, step), the smoothed-loss state, the data loader's position and
random state, the stateful hidden state, and every RNG (python, numpy, torch, CUDA). It is
written atomically and read back with `torch.load(weights_only=True)`: plain tensors and
containers only, nothing that could run code.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch


class Interrupted(KeyboardInterrupt):
    """Training stopped on a signal after saving a checkpoint."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def interrupt_signal(e: KeyboardInterrupt) -> tuple[str, int]:
    """The signal that stopped training, and the conventional exit code for it (128 + number)."""
    signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
    return signal.Signals(signum).name, 128 + signum


def rng_states() -> dict[str, Any]:
    state = np.random.get_state()
    return {"python": random.getstate(), "numpy": (state[0], torch.from_numpy(state[1].copy()), *state[2:]),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save(path: Path, state: dict[str, Any]) -> Path:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(path, map_location=map_location, weights_only=True)


@contextmanager
def stop_requests() -> Iterator[list[int]]:
    """While active, SIGINT and SIGTERM (what SLURM sends before it kills a job) only *ask* the
    training loop to stop: it saves a checkpoint at the next step boundary, where every state is
    consistent. A second signal interrupts at once. Yields the list of signals received."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        yield received
        return

    def handler(signum: int, frame: Any) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
