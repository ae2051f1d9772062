"""An 8-trial CPU-sized LSTM grid: Hydra's basic launcher (one trial after another) vs the joblib
launcher with 2 trials at once on the 2 cores. Wall time, the ratio, each trial's objective on both
sides, and the per-trial overhead.

Per-trial overhead = (wall time x trials at once - the trials' own run time) / trials: the
worker-seconds a sweep spends outside its trials' MLflow runs (process start, imports, data and
model building, the parent run and its summary), per trial. A trial's own time is its MLflow run's
start-to-end time.

    python benchmarks/bench_sweep.py [--text ../shared/data/nietzsche.txt] [--steps 150]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared/data/nietzsche.txt"
GRID = ["data.bptt=8,16", "model.n_hidden=64,128", "optim.lr=1e-3,3e-3"]


def sweep(root: Path, text: Path, steps: int, launcher: list[str]) -> tuple[float, dict[str, float], float]:
    """Run the grid once; (wall seconds, objective per trial name, sum of the trials' run seconds)."""
    store = f"sqlite:///{root}/mlflow.db"
    cmd = [sys.executable, "-m", "lesson7_sweeps.train", "-m", *GRID, *launcher, "data=text", f"data.path={text}",
           "data.bs=32", "model.n_layers=1", "model.n_fac=32", "trainer.epochs=1", f"trainer.max_steps={steps}",
           "trainer.progress=off", "trainer.sample.chars=0", "schedule=constant", "trainer.device=cpu",
           f"tracking.uri={store}", "tracking.experiment=bench", f"hydra.sweep.dir={root}/multirun"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("bench").experiment_id], "tags.run_type = 'train'")
    objectives = {r.info.run_name.split(" ", 1)[1]: r.data.metrics["objective"] for r in runs}
    own = sum((r.info.end_time - r.info.start_time) / 1000 for r in runs)
    return wall, objectives, own


def run_sides(sides: list[tuple[str, list[str], int]], text: Path, steps: int) -> dict[str, tuple[float, dict]]:
    """The grid once per (name, launcher overrides, trials at once), each in a fresh folder: wall
    seconds and objective per trial name; prints the wall time, the trials' own time and the overhead."""
    results = {}
    for name, launcher, at_once in sides:
        with tempfile.TemporaryDirectory(prefix=f"bench-sweep-{name}-") as tmp:
            wall, objectives, own = sweep(Path(tmp), text, steps, launcher)
        overhead = (wall * at_once - own) / len(objectives)
        results[name] = (wall, objectives)
        print(f"{name:6s}: {len(objectives)} trials, wall {wall:.1f} s, trials' own time {own:.1f} s, "
              f"per-trial overhead {overhead:.2f} s", flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    p.add_argument("--steps", type=int, default=150, help="training steps per trial")
    args = p.parse_args()
    sides = [("basic", [], 1), ("joblib", ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], 2)]
    results = run_sides(sides, args.text.resolve(), args.steps)
    (basic_wall, basic), (joblib_wall, joblib) = results["basic"], results["joblib"]
    diff = max(abs(basic[k] - joblib[k]) for k in basic)
    print(f"wall time basic / joblib: {basic_wall / joblib_wall:.2f}x")
    print(f"objectives: largest |basic - joblib| over the 8 trials = {diff:.2e}")
    for k in sorted(basic):
        print(f"  {k:32s} basic {basic[k]:.6f}  joblib {joblib[k]:.6f}")


if __name__ == "__main__":
    main()
