"""Schedules by value, without a model. Positions are in epochs (epoch + batch / batches)."""

from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf

from lesson7_sweeps.schedules import Schedule, constant, onecycle, sgdr, sgdr_cycle

SGDR = {"kind": "sgdr", "epochs": None, "lr_mult": 1.0, "reset_optimizer": False, "cycle_len": 1, "cycle_mult": 2,
        "warmup_frac": 0.05, "warmup": "phase"}
CONSTANT = {"kind": "constant", "lr_mult": 1.0, "reset_optimizer": False}


def phases(*ps: dict) -> list:
    return OmegaConf.create(list(ps))


def test_constant():
    assert constant(0) == constant(10**6) == 1.0


def test_sgdr_cycle_warmup_is_lr_over_100_for_the_first_twentieth_of_each_cycle():
    # warmup="cycle" (the option): one-epoch cycles of 100 batches, batches 0..4 at lr/100 in every cycle
    assert [sgdr(b / 100, 1, 1, 0.05, "cycle") for b in range(5)] == [0.01] * 5
    assert sgdr(0.05, 1, 1, 0.05, "cycle") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.05)))
    assert sgdr(0.5, 1, 1, 0.05, "cycle") == pytest.approx(0.5)
    assert sgdr(0.99, 1, 1, 0.05, "cycle") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.99)))
    assert sgdr(1.0, 1, 1, 0.05, "cycle") == 0.01  # restart: warm-up again
    assert sgdr(1.0, 1, 1, 0.05, "phase") == 1.0  # the lesson's rule: no warm-up after the first cycle


def test_sgdr_cycle_mult_lengthens_each_cycle():
    assert [sgdr_cycle(p, 1, 2) for p in (0, 0.9, 1, 2.9, 3, 6.9, 7)] == [
        (0, 1), (0, 1), (1, 2), (1, 2), (3, 4), (3, 4), (7, 8)]
    assert sgdr(5, 1, 2, 0.05, "phase") == pytest.approx(0.5)  # the middle of the third cycle (3..7)
    assert sgdr(3.1, 1, 2, 0.05, "cycle") == 0.01  # within the first 1/20 of a 4-epoch cycle
    assert sgdr(3.1, 1, 2, 0.05, "phase") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.1 / 4)))


def test_onecycle_endpoints():
    assert onecycle(0, 4, 0.25, 25, 1e4) == pytest.approx(1 / 25)
    assert onecycle(1, 4, 0.25, 25, 1e4) == pytest.approx(1.0)
    assert onecycle(4, 4, 0.25, 25, 1e4) == pytest.approx(1e-4)
    values = [onecycle(p / 100, 4, 0.25, 25, 1e4) for p in range(401)]
    assert values.index(max(values)) == 100


def test_schedule_cycle_ends_follow_cycle_mult():
    sched = Schedule(phases(SGDR), total_epochs=15)  # cycles of 1, 2, 4, 8 epochs
    assert sched.cycle_ends == [1, 3, 7, 15]
    assert sched(0) == 0.01 and sched(1) == sched(3) == 1.0  # warm-up at the phase start only
    assert sched.cycles_ended(2.9, 3.0) == [2] and sched.cycles_ended(3.0, 3.1) == []


def test_phases_replay_a_sequence_of_fits():
    # lesson 6 RNN: 4 epochs at 1e-3, then 4 at 1e-4
    sched = Schedule(phases({**CONSTANT, "epochs": 4}, {**CONSTANT, "epochs": 4, "lr_mult": 0.1}), 8)
    assert [sched(p) for p in (0, 3.99, 4, 7.99)] == [1.0, 1.0, 0.1, 0.1]
    # lesson 6 LSTM: 2 constant epochs, then SGDR over 15 (cycles 1+2+4+8), then SGDR over 63 again
    sched = Schedule(phases({**CONSTANT, "epochs": 2}, {**SGDR, "epochs": 15},
                            {**SGDR, "epochs": 63}), 80)
    assert sched(1.99) == 1.0 and sched(2) == 0.01  # SGDR (warm-up) starts after 2 epochs
    assert sched.cycle_ends == [3, 5, 9, 17, 18, 20, 24, 32, 48, 80]
    assert sched(17) == 0.01 and sched(17.5) == pytest.approx(0.5)  # the second SGDR restarts at 1 epoch


def test_the_last_phase_runs_on_and_training_may_stop_early():
    sched = Schedule(phases({**SGDR, "epochs": 1}), 3)  # training runs longer than the phase
    assert sched.cycle_ends == [1, 3]
    short = Schedule(phases({**CONSTANT, "epochs": 2}, {**SGDR, "epochs": 3}), 1.5)
    assert short.cycle_ends == [] and short(1.4) == 1.0


def test_fractional_epochs_do_not_drift():
    sched = Schedule(phases(SGDR), 7)
    n = 37  # batches per epoch that do not divide evenly
    ended = [c for e in range(7) for b in range(n) for c in sched.cycles_ended(e + b / n, e + (b + 1) / n)]
    assert ended == [1, 2, 3]
