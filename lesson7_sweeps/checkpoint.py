"""Checkpoints that a run can continue from exactly, and stopping cleanly on SIGINT / SIGTERM.

A checkpoint holds the model and optimizer states, the resolved config, where training stands
(epoch, batch within the epoch, step), the smoothed-loss state, the data loader's position and
random state, the stateful hidden state, and every RNG (python, numpy, torch, CUDA). It is
written atomically and read back with `torch.load(weights_only=True)`: plain tensors and
containers only, nothing that could run code. A checkpoint comes back from a store anyone with
write access could edit, so it is bounded before it is read (`load_verified`: stored zip records
only, a small pickle, tensors memory-mapped, exact keys) and every field is checked against the
run's model, optimizer, data loader and schedule (`restore`) before the run is marked RUNNING.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lesson7_sweeps.errors import CheckpointError

log = logging.getLogger(__name__)
# what stops a run: Ctrl-C, SIGTERM (what SLURM sends before it kills a job: scancel, preemption,
# requeue), SIGHUP (the terminal or ssh session closed) and SIGUSR2 (what submitit asks SLURM to send
# `signal_delay_s` before the time limit)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR2)


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


# The pickle of a checkpoint (config, positions, RNG states, a text epoch's section lengths) is a few
# kB to a few MB; each pickle byte can build an object of ~64 bytes, so its size bounds the memory.
MAX_PICKLE_BYTES = 32 * 2**20
_READ_ERRORS = (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError)


def load(path: Path) -> dict[str, Any]:
    """Tensors memory-mapped from the file (mmap=True): a tensor that is refused later costs no memory."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


class _Requests(list):
    """The signals received while a run is open; `shielded`: a further one is only recorded."""

    shielded = False


_active: _Requests | None = None  # the requests of the open run (stop_requests nests)


@contextmanager
def stop_requests() -> Iterator[list[int]]:
    """While active, the STOP_SIGNALS only *ask* the training loop to stop: it saves a checkpoint at
    the next step boundary, where every state is consistent (`stopping`). A second signal interrupts
    at once, unless the run is already on its way out (`stopping` was called, or `shielded()`:
    closing the run), where every further signal is only recorded, so that no signal can leave a run
    RUNNING. Nested uses share one list; yields the signals received."""
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


def drop_unneeded(logger: Any, out_dir: Path, status: str, final: bool) -> None:
    """Delete the checkpoints a run no longer needs as it ends `status`: FINISHED keeps final.pt
    alone (what extends it; last.pt only served a resume); a sweep's trial that ended for good
    (`final`: pruned, or FAILED: the sweeper has its verdict) keeps none. A KILLED run, or a single
    run that FAILED, keeps last.pt: `resume=RUN_ID` continues it. A failure here costs only disk."""
    pattern = "*.pt" if final else "last.pt" if status == "FINISHED" else None
    if pattern is None:
        return
    try:
        logger.delete_artifacts("checkpoints", pattern)  # the run's copies (tracking on)
        for path in out_dir.glob(pattern):  # Hydra's run folder (tracking=none)
            path.unlink()
    except Exception as e:  # the store's or the file system's errors share no base class
        log.warning("could not delete the checkpoints the run no longer needs (%s): %s", pattern,
                    (str(e).splitlines() or [type(e).__name__])[0])


def check_records(path: Path) -> None:
    """torch.save writes every record stored, uncompressed: a compressed one can inflate a small file
    into gigabytes (a "zip bomb"), so it is refused before torch reads anything, as is a large pickle."""
    try:
        with zipfile.ZipFile(path) as z:
            records = z.infolist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"{path.name} is damaged or untrusted ({type(e).__name__}): it is not a checkpoint "
                              f"this code wrote") from None
    for r in records:
        if r.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{path.name} holds a compressed record ({r.filename}, {r.file_size:,} bytes "
                                  f"unpacked): it is not a checkpoint this code wrote")
        if r.filename.endswith("/data.pkl") and r.file_size > MAX_PICKLE_BYTES:
            raise CheckpointError(f"{path.name}: its pickle is {r.file_size:,} bytes (at most {MAX_PICKLE_BYTES:,} "
                                  f"are read): it is not a checkpoint this code wrote")


def load_verified(path: Path) -> dict[str, Any]:
    """`load`, bounded (`check_records`), with one plain reason when the file is not a checkpoint this
    code wrote: truncated, corrupt, other keys, or holding objects `weights_only` refuses (never load
    those: they may run code)."""
    check_records(path)
    try:
        state = load(path)
    except Exception as e:  # zip, pickle and torch errors share no base class
        raise CheckpointError(f"{path.name} is damaged or untrusted ({type(e).__name__}): it is not a checkpoint "
                              f"this code wrote") from None
    keys = set(state) if isinstance(state, dict) else set()
    missing = [k for k in CHECKPOINT_KEYS if k not in keys]
    if missing:
        raise CheckpointError(f"{path.name} lacks {', '.join(missing)}: it is not a checkpoint this code wrote")
    extra = sorted(map(str, keys - set(CHECKPOINT_KEYS)))
    if extra:
        raise CheckpointError(f"{path.name} holds {', '.join(extra)} besides a checkpoint's keys: it is not a "
                              f"checkpoint this code wrote")
    return state


def _same_tensors(got: Any, want: dict[str, torch.Tensor], what: str) -> None:
    """`got` has exactly `want`'s keys, each a tensor of the same shape and dtype."""
    if not isinstance(got, dict) or set(got) != set(want):
        raise ValueError(f"{what} has other keys than this run's")
    for k, w in want.items():
        g = got[k]
        if not isinstance(g, torch.Tensor) or g.shape != w.shape or g.dtype != w.dtype:
            found = f"{tuple(g.shape)} {g.dtype}" if isinstance(g, torch.Tensor) else type(g).__name__
            raise ValueError(f"{what} {k} is {found}, not {tuple(w.shape)} {w.dtype}")


def _check_optimizer(state: Any, optimizer: torch.optim.Optimizer) -> None:
    """torch checks the parameter groups' sizes but not the shapes of the per-parameter state
    (momentum, Adam's moments), which would fail inside the first step."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict) or not isinstance(
            state.get("param_groups"), list) or not all(isinstance(g, dict) for g in state["param_groups"]):
        raise ValueError("optimizer is not an optimizer state")
    ids = [i for g in state["param_groups"] for i in g.get("params", [])]
    if len(ids) != len(params) or len(state["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(f"optimizer has {len(ids)} parameters in {len(state['param_groups'])} groups, this run "
                         f"{len(params)} in {len(optimizer.param_groups)}")
    shapes = dict(zip(ids, (p.shape for p in params)))
    for pid, entry in state["state"].items():
        if pid not in shapes or not isinstance(entry, dict):
            raise ValueError(f"optimizer state {pid} belongs to no parameter")
        for name, v in entry.items():
            plain = v is None or isinstance(v, (int, float))  # e.g. a step count kept as a number
            if not plain and (not isinstance(v, torch.Tensor) or not v.is_floating_point() or (
                    v.shape != shapes[pid] and v.numel() != 1)):
                raise ValueError(f"optimizer state {pid}.{name} does not fit its parameter {tuple(shapes[pid])}")
    optimizer.load_state_dict(state)


def _check_hidden(hidden: Any, model: torch.nn.Module, loader: Any, device: torch.device) -> Any:
    """None, or the stateful model's hidden state for this data's columns, moved to `device`."""
    if hidden is None:
        return None
    init = getattr(model, "init_hidden", None)
    columns = getattr(getattr(loader, "data", None), "shape", (0, 0))[1]
    want = init(columns, torch.device("cpu")) if init is not None else None
    got, ref = (hidden, want) if isinstance(want, tuple) else ((hidden,), (want,))
    if want is None or not isinstance(got, tuple) or len(got) != len(ref) or any(
            not isinstance(g, torch.Tensor) or g.shape != r.shape or not g.is_floating_point()
            for g, r in zip(got, ref)):
        raise ValueError("hidden does not fit this model's hidden state")
    moved = tuple(g.to(device) for g in got)
    return moved if isinstance(want, tuple) else moved[0]


def _count(value: Any, what: str, low: int, high: float = math.inf) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{what}={value!r} is outside [{low}, {high:g}]")
    return value


def restore(state: dict[str, Any], name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            loader: Any, epochs: int, device: torch.device) -> None:
    """Check every field of a loaded checkpoint by applying it to the run's own model, optimizer and
    training loader, and its positions against the schedule (`epochs`); CheckpointError naming the
    field. Run before the run is marked RUNNING, so a bad field never fails a run mid-fit."""
    try:
        _same_tensors(state["model"], model.state_dict(), "model")
        model.load_state_dict(state["model"])
        _check_optimizer(state["optimizer"], optimizer)
        epoch = _count(state["epoch"], "epoch", 0, epochs)
        batch = _count(state["batch"], "batch", 0, 0 if epoch == epochs else math.inf)
        _count(state["step"], "step", 0)
        _count(state["first_bad"], "first_bad", -1)
        if not isinstance(state["smooth"], float) or not math.isfinite(state["smooth"]):
            raise ValueError(f"smooth={state['smooth']!r} is not a finite number")
        if not isinstance(state["metrics"], dict) or not all(
                isinstance(k, str) and isinstance(v, float) for k, v in state["metrics"].items()):
            raise ValueError("metrics is not a mapping of names to numbers")
        if not isinstance(state["config"], dict):
            raise ValueError("config is not a mapping")
        if not isinstance(state["loader"], dict):
            raise ValueError("loader is not a loader state")
        loader.load_state_dict(state["loader"], batch)
        if batch and batch > len(loader):
            raise ValueError(f"batch={batch} is past the epoch's {len(loader)} batches")
        state["hidden"] = _check_hidden(state["hidden"], model, loader, device)
        set_rng_states(state["rng"])
    except _READ_ERRORS as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{name} does not fit this run ({reason}): it is not a checkpoint this run "
                              f"wrote") from None
