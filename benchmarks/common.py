"""What the benchmarks share: the runner's own throughput metric, and the alternating comparison."""

from __future__ import annotations

import statistics
from collections.abc import Callable

from mlflow import MlflowClient
from omegaconf import DictConfig

from lesson7_sweeps.train import train_run


def runner_throughput(cfg: DictConfig) -> float:
    """Train through the real train_run (MLflow on) and read back the run's `throughput` metric,
    which the runner times over the training steps only."""
    outcome = train_run(cfg)
    return MlflowClient(cfg.tracking.uri).get_run(outcome.run_id).data.metrics["throughput"]


def compare(repeats: int, runner: Callable[[int], float], plain: Callable[[int], float], unit: str) -> list[float]:
    """Both sides `repeats` times (seed = repeat), alternating which goes first so that drift on a
    noisy machine hits both; prints every value and the medians; returns the ratios runner/plain."""
    ours, ref = [], []
    for r in range(repeats):
        sides = [(ours, runner, "runner"), (ref, plain, "plain")]
        for out, fn, name in sides if r % 2 == 0 else sides[::-1]:
            out.append(fn(r))
            print(f"  repeat {r}: {name:6s} {out[-1]:,.0f} {unit}", flush=True)
    ratios = [a / b for a, b in zip(ours, ref)]
    print(f"runner (MLflow on): {statistics.median(ours):,.0f} {unit} (median)")
    print(f"plain PyTorch loop: {statistics.median(ref):,.0f} {unit} (median)")
    print(f"ratio runner/plain: {statistics.median(ratios):.3f} (median; per repeat "
          f"{', '.join(f'{x:.3f}' for x in ratios)})")
    return ratios
