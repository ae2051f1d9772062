"""What the benchmarks share: the runner's own throughput metric, and the alternating comparison."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path

from mlflow import MlflowClient
from omegaconf import DictConfig

from lesson7_sweeps.train import train_run


def runner_throughput(cfg: DictConfig) -> float:
    """Train through the real train_run (MLflow on) and read back the run's `throughput` metric,
    which the runner times over the training steps only."""
    outcome = train_run(cfg)
    return MlflowClient(cfg.tracking.uri).get_run(outcome.run_id).data.metrics["throughput"]


def runner_losses(cfg: DictConfig) -> list[float]:
    """Train through train_run and read back the run's train_loss history, in step order."""
    outcome = train_run(cfg)
    history = MlflowClient(cfg.tracking.uri).get_metric_history(outcome.run_id, "train_loss")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def write_json(path: Path | None, **fields: object) -> None:
    """A benchmark's figures as JSON (benchmarks/gpu_check.sh collects them), when --json is given."""
    if path is not None:
        path.write_text(json.dumps(fields, indent=1) + "\n")


def compare(repeats: int, runner: Callable[[int], float], plain: Callable[[int], float],
            unit: str) -> dict[str, float]:
    """Both sides `repeats` times (seed = repeat), alternating which goes first so that drift on a
    noisy machine hits both; prints every value and the medians; returns the medians and the ratio."""
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
    return {"runner": statistics.median(ours), "plain": statistics.median(ref), "ratio": statistics.median(ratios)}
