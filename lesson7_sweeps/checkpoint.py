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

from lesson7_sweeps.errors import CheckpointError


class Interrupted(KeyboardInterrupt):
    """Training stopped on a signal: at a step boundary after saving a checkpoint (`saved`), or at
    once on a second signal. `marked`: the run was then ended KILLED in the store."""

    def __init__(self, signum: int, saved: bool = True) -> None:
        self.signum, self.saved, self.marked = signum, saved, False
        super().__init__(signal.Signals(signum).name)


def interrupt_signal(e: KeyboardInterrupt) -> tuple[str, int]:
    """The signal that stopped training, and the conventional exit code for it (128 + number)."""
    signum = getattr(e, "signum", signal.SIGINT)  # Interrupted, or a sweep stopped between trials
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


CHECKPOINT_KEYS = ("model", "optimizer", "config", "epoch", "batch", "step", "smooth", "first_bad", "metrics",
                   "loader", "hidden", "rng")


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(path, map_location=map_location, weights_only=True)


class _Requests(list):
    """The signals received while a run is open; `shielded`: a further one is only recorded."""

    shielded = False


_active: _Requests | None = None  # the requests of the open run (stop_requests nests)


# SIGTERM: what SLURM sends before it kills a job (scancel, preemption, requeue); SIGUSR2: what
# submitit asks SLURM to send `signal_delay_s` before the time limit
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


@contextmanager
def stop_requests() -> Iterator[list[int]]:
    """While active, SIGINT, SIGTERM and SIGUSR2 (STOP_SIGNALS) only *ask* the training loop to
    stop: it saves a checkpoint at the next step boundary, where every state is
    consistent (`stopping`). A second signal interrupts at once, unless the run is already on its
    way out (`stopping` was called, or `shielded()`: closing the run), where every further signal
    is only recorded, so that no signal can leave a run RUNNING. Nested uses share one list; yields
    the signals received."""
    global _active
    if _active is not None or threading.current_thread() is not threading.main_thread():
        yield _active if _active is not None else _Requests()  # signals only reach the main thread
        return
    received = _Requests()

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        if len(received) > 1 and not received.shielded:
            received.shielded = True
            raise Interrupted(signum, saved=False)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    _active = received
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _active = None
        _pass_on_requeue(received, previous[signal.SIGUSR2])


def _pass_on_requeue(received: list[int], before: Any) -> None:
    """A SIGUSR2 that a submitit job got while training: once our checkpoint is saved and the run
    ended, hand it to submitit's own handler, which requeues the job (up to max_num_timeout times
    after a time limit) and exits; the job's next start continues the run."""
    if signal.SIGUSR2 in received and callable(before):
        before(signal.SIGUSR2, None)


def stopping(signals: list[int], saved: bool) -> Interrupted:
    """The exception that stops training on the first signal received; from here on signals are
    only recorded (raise what this returns)."""
    if isinstance(signals, _Requests):
        signals.shielded = True
    return Interrupted(signals[0], saved)


@contextmanager
def shielded() -> Iterator[None]:
    """Signals during this block are only recorded (e.g. while a run is being ended)."""
    requests = _active
    if requests is None:
        yield
        return
    before, requests.shielded = requests.shielded, True
    try:
        yield
    finally:
        requests.shielded = before


def load_verified(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """`load`, with one plain reason when the file is not a checkpoint this code wrote: truncated,
    corrupt, or holding objects `weights_only` refuses (never load those: they may run code)."""
    try:
        state = load(path, map_location)
    except Exception as e:  # zip, pickle and torch errors share no base class
        raise CheckpointError(f"{path.name} is damaged or untrusted ({type(e).__name__}): it is not a checkpoint "
                              f"this code wrote") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path.name} lacks {', '.join(missing)}: it is not a checkpoint this code wrote")
    return state
