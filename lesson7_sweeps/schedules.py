"""Learning-rate schedules as pure functions of the training position, composed into phases.

The position is measured in epochs (epoch + batch / batches in that epoch), so cycles end exactly
at epoch boundaries even when the number of batches varies from epoch to epoch (random BPTT
lengths). Each kind maps a position (counted from the start of its phase) to a multiplier of the
base lr. A schedule is a list of phases, like the notebook's sequence of `fit` calls: e.g. 2
constant epochs, then SGDR for 15 epochs, then SGDR again for 63. The last phase continues past
its end if training runs longer.

Two rules come from fastai 0.7's `fit`, which the phases replay: CosAnneal's warm-up (lr/100 while
`iteration < nb/20`) counts batches from the start of the `fit` call, so it covers the first 1/20 of
the phase's first cycle only (warmup="phase"; warmup="cycle" repeats it in every cycle); and each
`learn.fit` builds a new optimizer, so a phase with reset_optimizer restarts momentum / Adam moments.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

EPS = 1e-9  # positions are sums of fractions: compare with a little slack


def constant(pos: float) -> float:
    return 1.0


def sgdr_cycle(pos: float, cycle_len: float, cycle_mult: float) -> tuple[float, float]:
    """(start, length) in epochs of the SGDR cycle that holds `pos`; cycle k lasts cycle_len * mult^k."""
    start, length = 0.0, cycle_len
    while pos >= start + length - EPS:
        start += length
        length *= cycle_mult
    return start, length


def sgdr(pos: float, cycle_len: float, cycle_mult: float, warmup_frac: float, warmup: str) -> float:
    """The lesson's CosAnneal: the cosine from lr to 0 over each cycle, each cycle cycle_mult times
    longer than the one before, at lr/100 during the warm-up. warmup="phase" (the lesson's): while the
    position in the phase is below warmup_frac of the current cycle's length (`iteration < nb/20`,
    with iteration never reset: in effect the start of the first cycle only); "cycle": the first
    warmup_frac of every cycle."""
    start, length = sgdr_cycle(pos, cycle_len, cycle_mult)
    elapsed = pos if warmup == "phase" else pos - start
    if elapsed < warmup_frac * length - EPS:
        return 0.01
    return 0.5 * (1 + math.cos(math.pi * (pos - start) / length))


def onecycle(pos: float, length: float, pct_start: float, div: float, final_div: float) -> float:
    """Cosine warm-up from lr/div to lr over pct_start of the phase, then cosine down to lr/final_div."""
    up = pct_start * length
    if pos < up:
        lo, hi, frac = 1 / div, 1.0, pos / up
    else:
        lo, hi, frac = 1.0, 1 / final_div, min(1.0, (pos - up) / (length - up))
    return hi + (lo - hi) * 0.5 * (1 + math.cos(math.pi * frac))


@dataclass
class Phase:
    start: float  # epoch position where the phase begins
    fn: Callable[[float], float]
    lr_mult: float
    reset_optimizer: bool  # the notebook's fit() here builds a new optimizer


class Schedule:
    """lr multiplier at an epoch position, and the positions where an SGDR cycle ends."""

    def __init__(self, phases: Sequence[Any], total_epochs: float) -> None:
        self.phases: list[Phase] = []
        self.cycle_ends: list[float] = []
        start = 0.0
        for i, p in enumerate(phases):
            last = i == len(phases) - 1
            length = total_epochs - start if p.epochs is None else float(p.epochs)
            if p.kind == "constant":
                fn: Callable[[float], float] = constant
            elif p.kind == "sgdr":
                fn = partial(sgdr, cycle_len=p.cycle_len, cycle_mult=p.cycle_mult, warmup_frac=p.warmup_frac,
                             warmup=p.warmup)
                stop = total_epochs if last else min(start + length, total_epochs)  # the last phase runs on
                end = start
                while True:
                    cycle_start, cycle_len = sgdr_cycle(end - start, p.cycle_len, p.cycle_mult)
                    end = start + cycle_start + cycle_len
                    if end > stop + EPS:
                        break
                    self.cycle_ends.append(end)
            else:
                fn = partial(onecycle, length=length, pct_start=p.pct_start, div=p.div, final_div=p.final_div)
            self.phases.append(Phase(start, fn, p.lr_mult, p.reset_optimizer))
            start += length
            if start >= total_epochs - EPS:
                break

    def __call__(self, pos: float) -> float:
        phase = next(p for p in reversed(self.phases) if pos >= p.start - EPS)
        return phase.lr_mult * phase.fn(max(0.0, pos - phase.start))

    def cycles_ended(self, before: float, after: float) -> list[int]:
        """1-based numbers of the cycles that end in (before, after]: a step moved past them."""
        return [k + 1 for k, end in enumerate(self.cycle_ends) if before + EPS < end <= after + EPS]

    def resets_optimizer(self, before: float, after: float) -> bool:
        """Whether a phase that restarts the optimizer begins in (before, after]: the step that
        moved there is the last one of the previous phase (the first phase gets a new one anyway)."""
        return any(p.reset_optimizer and before + EPS < p.start <= after + EPS for p in self.phases[1:])
