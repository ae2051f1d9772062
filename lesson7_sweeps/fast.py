"""trainer.compile: the training step's forward + loss compiled by torch.compile (its backward is the
compiled graph's own), and the random BPTT lengths of text padded up to a few bucket lengths so that
a handful of graphs serve every length.

Padding leaves the training unchanged: padded targets carry IGNORE, so the mean loss (and every
gradient) is over the real targets only, and the recurrence holds its state over padded steps (the
model gets the real length as a tensor, so one graph serves every length of its bucket). The state
handed to the next batch is the one after the last real step, exactly as in the eager run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE = -100  # cross_entropy's ignore_index: a padded target
LossFn = Callable[[nn.Module, Tensor, Tensor, Tensor | None, float], Tensor]


def bucket(n: int, width: int) -> int:
    """The padded length of a section of n steps: the next multiple of `width`. Lengths 1..width
    share one graph, width+1..2*width the next, and so on (width 1: no padding)."""
    return -(-n // width) * width


def pad_section(x: Tensor, y: Tensor, length: int) -> tuple[Tensor, Tensor, Tensor]:
    """A BPTT section x [n, bs] (targets y [n * bs]) padded with steps up to `length`: token 0 in,
    IGNORE as target. Returns (x, y, n as a 0-d tensor on x's device: the model's real length)."""
    n, bs = x.shape
    steps = torch.full((), n, device=x.device)  # a fill kernel: no copy from the host to wait for
    return F.pad(x, (0, 0, 0, length - n)), F.pad(y, (0, (length - n) * bs), value=IGNORE), steps


def model_loss(model: nn.Module, x: Tensor, y: Tensor, steps: Tensor | None, label_smoothing: float) -> Tensor:
    """Forward and loss: the models return log-probabilities, so cross_entropy on them is the NLL
    (plus label smoothing); padded targets (IGNORE) count for nothing, not even in the mean."""
    out = model(x) if steps is None else model(x, steps)
    return F.cross_entropy(out, y, label_smoothing=label_smoothing, ignore_index=IGNORE)


def bucket_width(model: nn.Module, shaped: bool, width: int) -> int | None:
    """How a step whose graphs are specialised to shapes (`shaped`: compiled or captured) pads text
    sections: to multiples of `width` when the model's recurrence can hold its state over padded
    steps (loop cells: `model.pads`), else not at all (None)."""
    return width if shaped and getattr(model, "pads", False) else None


def loss_function(mode: str, bucketed: bool) -> LossFn:
    """model_loss, eager (mode off) or compiled in that torch.compile mode. Bucketed text steps get
    graphs specialised to their few shapes; otherwise a second shape (a cuDNN cell's next length)
    makes torch.compile build one shape-generic graph rather than one per length."""
    if mode == "off":
        return model_loss
    compiled = torch.compile(model_loss, mode=mode, dynamic=False if bucketed else None)

    def step(model: nn.Module, x: Tensor, y: Tensor, steps: Tensor | None, label_smoothing: float) -> Tensor:
        torch.compiler.cudagraph_mark_step_begin()  # reduce-overhead: the last step's outputs are read
        if getattr(model, "stateful", False) and model.h is None:  # zeros made here: no second graph for them
            model.h = model.init_hidden(x.size(1), x.device)
        loss = compiled(model, x, y, steps, label_smoothing)
        # a stateful model's new state is an output of the graph, which its next replay overwrites
        if getattr(model, "h", None) is not None:
            model.h = tuple(t.clone() for t in model.h) if isinstance(model.h, tuple) else model.h.clone()
        return loss

    return step



class Readback:
    """Values logged from the device without making the host wait: each is copied to (pinned) host
    memory asynchronously when recorded, and read once its copy has landed, which an event tells
    without waiting. On the CPU a copy lands at once. `landed(wait=True)` waits for the rest."""

    def __init__(self) -> None:
        self._pending: list[tuple[tuple, Tensor, torch.cuda.Event | None]] = []

    def record(self, key: tuple, values: Tensor) -> None:
        """`values` (a 1-d device tensor) will come back with `key` (host data: step, lr, ...)."""
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=values.is_cuda)  # pinned: no wait
        host.copy_(values, non_blocking=True)
        event = None
        if values.is_cuda:
            event = torch.cuda.Event()
            event.record()
        self._pending.append((key, host, event))

    def landed(self, wait: bool = False) -> list[tuple[tuple, list[float]]]:
        """(key, values) of the copies that have landed, oldest first."""
        out = []
        while self._pending and (wait or self._pending[0][2] is None or self._pending[0][2].query()):
            key, host, event = self._pending.pop(0)
            if event is not None:
                event.synchronize()  # done already unless `wait`
            out.append((key, host.tolist()))
        return out
