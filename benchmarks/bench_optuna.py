"""A 16-trial LSTM search over bptt x n_hidden x lr: Hydra's basic sweeper over the grid, one trial
at a time, vs our Optuna sweeper over the same grid with the median pruner and 2 trials at once.

Both sides are the real CLI (`lesson7-train -m ...`) in subprocesses, on the same slice of the
Nietzsche text, tracked into their own sqlite stores under a temporary directory. We print wall
time, trials per hour and the best objective (final val_loss) of each, and the ratios.
Target: >= 3x less wall time for the Optuna side, best objective within 0.01.

    python benchmarks/bench_optuna.py [--chars 60000] [--epochs 4] [--text PATH]

Parallel trials on the CPU: the Optuna side's 2 jobs each get one torch thread (OMP_NUM_THREADS=1,
cores / jobs on this 2-core machine); the basic side runs one trial with torch's default threads.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from mlflow import MlflowClient

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared/data/nietzsche.txt"
GRID = {"data.bptt": "8,16", "model.n_hidden": "64,128", "optim.lr": "1e-3,3e-3,1e-2,3e-2"}


def sweep(root: Path, side: str, text: Path, epochs: int) -> tuple[float, float, int]:
    """Run one side; (wall seconds, best final val_loss, trials that ran to the end)."""
    out = root / side
    fixed = [f"tracking.uri=sqlite:///{out}/mlflow.db", "tracking.experiment=bench", "data=text", f"data.path={text}",
             f"data.cache_dir={root}/cache", "model=lstm", "model.n_fac=42", "model.n_layers=1", "schedule=constant",
             f"trainer.epochs={epochs}", "trainer.device=cpu", "trainer.progress=off", "trainer.sample.chars=0",
             "trainer.checkpoints=false", f"hydra.sweep.dir={out}/multirun"]
    env = dict(os.environ)
    if side == "basic":
        space = [f"{k}={v}" for k, v in GRID.items()]
    else:
        space = [f"{k}=choice({v})" for k, v in GRID.items()] + [
            "hydra/sweeper=optuna", "hydra.sweeper.sampler=grid", "hydra.sweeper.seed=0", "hydra.sweeper.n_trials=16",
            "hydra.sweeper.n_jobs=2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
        env["OMP_NUM_THREADS"] = "1"  # 2 trials on 2 cores: one thread each
    started = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).with_name("lesson7-train")), "-m", *fixed, *space], env=env,
                          cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench_optuna: the {side} sweep failed: {proc.stderr[-1000:]}")
    wall = time.perf_counter() - started
    if side == "basic":
        client = MlflowClient(f"sqlite:///{out}/mlflow.db")
        runs = client.search_runs([client.get_experiment_by_name("bench").experiment_id])
        values = [r.data.metrics["val_loss"] for r in runs if r.info.status == "FINISHED"]
        return wall, min(values), len(values)
    study = optuna.load_study(study_name="optuna", storage=f"sqlite:///{out}/multirun/optuna.db")
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    return wall, study.best_value, len(done)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--chars", type=int, default=60000, help="first N characters of the text")
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    if not args.text.exists():
        sys.exit(f"bench_optuna: no text at {args.text}: give --text PATH")
    with tempfile.TemporaryDirectory(prefix="bench-optuna-") as tmp:
        root = Path(tmp)
        text = root / "text.txt"
        text.write_text(args.text.read_text(encoding="utf-8")[: args.chars], encoding="utf-8")
        results = {}
        for side in ("optuna", "basic"):
            results[side] = sweep(root, side, text, args.epochs)
            wall, best, full = results[side]
            print(f"{side:6s}: {wall:7.1f} s, {16 * 3600 / wall:6.1f} trials/h, best val_loss {best:.4f}, "
                  f"{full} of 16 trials ran to the end", flush=True)
    (b_wall, b_best, _), (o_wall, o_best, _) = results["basic"], results["optuna"]
    print(f"wall time basic/optuna: {b_wall / o_wall:.2f}x (target >= 3); "
          f"best objective optuna - basic: {o_best - b_best:+.4f} (target <= 0.01)")


if __name__ == "__main__":
    main()
