"""trainer.cuda_graph: the whole training step (forward, loss, backward, clip, optimizer step)
captured with torch.cuda.graph once per shape (one BPTT length bucket, or one length for cuDNN
cells) and replayed, so a launch-bound step (the char LSTM at bs 64 / bptt 8) costs one launch.

A graph replays fixed kernels on fixed memory, so everything it reads lives in static buffers:
before a replay the batch (padded to its bucket, fast.pad_section), its real length, the incoming
hidden state and the learning rates (0-d tensors: a float would be baked into the graph) are
copied in; after it, the loss and the outgoing state are copied out (the next replay overwrites
them) and the state is handed to the model, detached as in eager training. Parameters, gradients
and the optimizer's state (fused, capturable) stay where they were at capture.

Capturing needs warm-up steps first (the optimizer's lazy state, library handles), which must not
train: they run inside `undone`, which puts parameters, buffers, optimizer state and the random
generators back in place afterwards, so training is step for step the eager one.

On the CPU nothing is captured: the 'graph' is the same update called on the same static buffers
(after the same undone warm-up), so the CPU tests check the copy-in, the hand-off and the undo.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lesson7_sweeps import fast

Update = Callable[[Tensor, Tensor, Tensor | None], Tensor]  # (x, y, real length) -> loss: one eager step
WARMUP = 2  # eager steps before a capture (PyTorch's examples use 3 for DDP, which we do not use)


def _clone(state: Tensor | tuple | None) -> Tensor | tuple | None:
    return tuple(t.clone() for t in state) if isinstance(state, tuple) else None if state is None else state.clone()


def copy_state(static: Tensor | tuple, state: Tensor | tuple | None) -> None:
    """The incoming hidden state into its static buffer; None (a fresh state) is zeros, as the
    models' init_hidden makes it."""
    bufs = static if isinstance(static, tuple) else (static,)
    for i, buf in enumerate(bufs):
        buf.zero_() if state is None else buf.copy_(state[i] if isinstance(state, tuple) else state)


@contextmanager
def lr_tensors(optimizer: Optimizer, lrs: list[Tensor], capturable: bool) -> Iterator[None]:
    """While inside, each param group's lr is its 0-d tensor (the fused kernels read it when they
    run: a replay reads the value filled in before it) and, with `capturable`, Adam's capturable
    flag is on (step() checks it under capture). The schedule's floats and the flags are put back
    after: only a capture (or the CPU's call) reads them."""
    saved = [dict(g) for g in optimizer.param_groups]
    for g, t in zip(optimizer.param_groups, lrs):
        g["lr"] = t
        if capturable and "capturable" in g:  # SGD has no such flag
            g["capturable"] = True
    try:
        yield
    finally:
        for g, old in zip(optimizer.param_groups, saved):
            g["lr"] = old["lr"]
            if "capturable" in g:
                g["capturable"] = old["capturable"]


@contextmanager
def undone(model: nn.Module, optimizer: Optimizer) -> Iterator[None]:
    """Whatever trains inside is undone, in place (a graph holds these tensors): parameters and
    buffers, the optimizer's state (state created inside is zeroed: for Adam and SGD without
    dampening a zero state steps exactly as a fresh one), the model's hidden state and the random
    generators (dropout draws the masks eager training would)."""
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = {p: {k: v.clone() for k, v in s.items() if isinstance(v, Tensor)} for p, s in optimizer.state.items()}
    hidden = getattr(model, "h", None)
    cuda = next(model.parameters()).device if next(model.parameters()).is_cuda else None
    rng = torch.get_rng_state(), torch.cuda.get_rng_state(cuda) if cuda else None
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(weights[k])
            for p, s in optimizer.state.items():
                for k, v in s.items():
                    if isinstance(v, Tensor):
                        v.copy_(state[p][k]) if p in state else v.zero_()
        if hasattr(model, "h"):
            model.h = hidden
        torch.set_rng_state(rng[0])
        if cuda:
            torch.cuda.set_rng_state(rng[1], cuda)


class Graph:
    """One captured step: its static buffers (batch, real length, incoming state) and outputs."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, steps: Tensor | None) -> None:
        self.x, self.y = torch.empty_like(x), torch.empty_like(y)
        self.steps = None if steps is None else torch.empty_like(steps)
        self.h_in = _clone(model.init_hidden(x.size(1), x.device)) if getattr(model, "stateful", False) else None
        self.cuda: torch.cuda.CUDAGraph | None = None  # None on the CPU: the update is called instead
        self.out: tuple[Tensor, object] | None = None  # the captured loss and outgoing state

    def copy_in(self, model: nn.Module, x: Tensor, y: Tensor, steps: Tensor | None) -> None:
        self.x.copy_(x)
        self.y.copy_(y)
        if steps is not None:
            self.steps.copy_(steps)
        if self.h_in is not None:
            h = model.h
            fresh = h is None or (h[0] if isinstance(h, tuple) else h).size(1) != self.x.size(1)  # as the model does
            copy_state(self.h_in, None if fresh else h)

    def run(self, model: nn.Module, update: Update) -> tuple[Tensor, object]:
        """The step on the static buffers: what a graph captures, and what the CPU calls."""
        if self.h_in is not None:
            model.h = self.h_in
        loss = update(self.x, self.y, self.steps)
        return loss, getattr(model, "h", None)

    def warm_up(self, model: nn.Module, optimizer: Optimizer, update: Update) -> None:
        """Steps on the buffers that train nothing (undone): they make the optimizer's lazy state
        and the libraries' handles, which a capture must find made."""
        with undone(model, optimizer):
            for _ in range(WARMUP):
                self.run(model, update)

    def capture(self, model: nn.Module, optimizer: Optimizer, update: Update) -> None:
        """The warm-up on a side stream (as PyTorch asks), then the capture; the batch is in the
        buffers already. A capture runs nothing: the caller replays."""
        device = self.x.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            self.warm_up(model, optimizer, update)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.cuda = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.cuda):  # the update sets grads to None first: the graph's own, from its pool
            self.out = self.run(model, update)


def reset_optimizer(optimizer: Optimizer, captured: bool) -> None:
    """A fresh optimizer state (SGDR's restarts): cleared, or where graphs hold it, zeroed in place
    (a zero state steps as a fresh one, see `undone`)."""
    if not captured:
        optimizer.state.clear()
        return
    for s in optimizer.state.values():
        for v in s.values():
            if isinstance(v, Tensor):
                v.zero_()


class GraphedStep:
    """train_step for trainer.cuda_graph: one Graph per padded batch shape, captured on first use
    (`capture`: on CUDA; otherwise the same step runs uncaptured, as on the CPU)."""

    def __init__(self, width: int | None, capture: bool) -> None:
        self.width = width  # fast.bucket's width, or None: one graph per length (cuDNN cells)
        self.capture = capture
        self.graphs: dict[tuple, Graph] = {}
        self.lrs: list[Tensor] = []

    def __call__(self, model: nn.Module, optimizer: Optimizer, x: Tensor, y: Tensor, update: Update) -> Tensor:
        """One training step; returns the loss, on the device."""
        steps = None
        if self.width is not None:
            x, y, steps = fast.pad_section(x, y, fast.bucket(x.size(0), self.width))
        if not self.lrs:
            self.lrs = [torch.zeros((), device=x.device) for _ in optimizer.param_groups]
        for t, g in zip(self.lrs, optimizer.param_groups):
            t.fill_(g["lr"])  # a fill kernel with the value as its argument: no wait
        graph = self.graphs.get((*x.shape, y.numel()))
        new = graph is None
        if new:
            graph = self.graphs[(*x.shape, y.numel())] = Graph(model, x, y, steps)
        graph.copy_in(model, x, y, steps)
        if self.capture:
            if new:
                with lr_tensors(optimizer, self.lrs, capturable=True):
                    graph.capture(model, optimizer, update)
            graph.cuda.replay()
            loss, h = graph.out
        else:  # the CPU's 'graph': the warm-up, undone, then the same update on the same buffers
            with lr_tensors(optimizer, self.lrs, capturable=False):
                if new:
                    graph.warm_up(model, optimizer, update)
                loss, h = graph.run(model, update)
        if h is not None:
            model.h = _clone(h)  # the next replay overwrites the graph's own
        return loss.clone()
