"""A 16-trial CPU-sized LSTM grid on the local SLURM cluster (each trial a job of one CPU, two at once
on the 2 cores) vs the joblib launcher with 2 trials at once on the same machine: wall time, the
ratio, and the per-trial overhead (as in bench_sweep.py). Then the time from `scontrol requeue` of a
training trial to its job training again (its MLflow run RUNNING again, resumed from its checkpoint).

    eval "$(.ci/slurm)"
    python benchmarks/bench_slurm.py [--text ../shared/data/nietzsche.txt] [--steps 100]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_sweep import DEFAULT_TEXT, run_sides
from mlflow import MlflowClient

SLURM = ["hydra/launcher=submitit_slurm", "hydra.launcher.gpus_per_task=null", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.timeout_min=30", "trainer.threads=1"]
JOBLIB = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]


def requeue_to_training(root: Path, text: Path) -> tuple[float, float]:
    """(seconds from `scontrol requeue` to the job running again, to the trial training again)."""
    store = f"sqlite:///{root}/mlflow.db"
    cmd = [sys.executable, "-m", "lesson7_sweeps.train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=1",
           "optim.lr=choice(1e-3)", *SLURM, "data=text", f"data.path={text}", "data.bs=32", "model.n_layers=1",
           "model.n_fac=32", "model.n_hidden=64", "trainer.epochs=100", "trainer.max_steps=100000",
           "trainer.progress=off", "trainer.sample.chars=0", "schedule=constant", "trainer.device=cpu",
           f"tracking.uri={store}", "tracking.experiment=bench", f"hydra.sweep.dir={root}/multirun"]
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = MlflowClient(store)
    while True:  # until the trial has trained 50 steps
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  "tags.run_type = 'train'") if (root / "mlflow.db").exists() else []
        if runs and len(client.get_metric_history(runs[0].info.run_id, "train_loss")) >= 2:
            break
        time.sleep(0.2)
    run_id, job = runs[0].info.run_id, runs[0].data.tags["slurm_job_id"]
    start = time.perf_counter()
    subprocess.run(["scontrol", "requeue", job], check=True)
    running = None
    while client.get_run(run_id).info.status == "RUNNING":  # the first attempt saves and ends its run
        time.sleep(0.1)
    while client.get_run(run_id).info.status != "RUNNING":
        if running is None and subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                                              text=True).stdout.strip() == "RUNNING":
            running = time.perf_counter() - start
        time.sleep(0.1)
    training = time.perf_counter() - start
    subprocess.run(["scancel", job], check=True)
    proc.wait()
    return running or training, training


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    p.add_argument("--steps", type=int, default=100, help="training steps per trial")
    args = p.parse_args()
    text = args.text.resolve()
    sides = [("joblib", [*JOBLIB, "seed=0,1"], 2), ("slurm", [*SLURM, "seed=0,1"], 2)]  # 8 x 2 seeds = 16 trials
    results = run_sides(sides, text, args.steps)
    (joblib_wall, joblib), (slurm_wall, slurm) = results["joblib"], results["slurm"]
    diff = max(abs(joblib[k] - slurm[k]) for k in joblib)
    print(f"slurm / joblib wall time: {slurm_wall / joblib_wall:.2f}x; largest objective difference {diff:.2g}")
    with tempfile.TemporaryDirectory(prefix="bench-slurm-requeue-") as tmp:
        running, training = requeue_to_training(Path(tmp), text)
    print(f"scontrol requeue -> job running again {running:.1f} s -> trial training again {training:.1f} s")


if __name__ == "__main__":
    main()
