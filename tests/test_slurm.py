"""Sweeps on a real one-node SLURM cluster: trials are SLURM jobs submitted by Hydra's submitit launcher.

`.ci/run` starts the cluster (`.ci/slurm`: munged, slurmdbd, slurmctld, slurmd) and exports SLURM_CONF;
locally:
    eval "$(.ci/slurm)"   # then run this file; `.ci/slurm stop $LESSON7_TEST_SLURM_DIR`
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from .test_optuna_sweeper import grid_sweep, metric, mlflow_runs, run, study
from .test_sweeps import all_runs, finished, launch, split


def _cluster_up() -> bool:
    if shutil.which("sinfo") is None or "SLURM_CONF" not in os.environ:
        return False
    return subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.strip() == "idle"


pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not _cluster_up(), reason='no SLURM cluster: set SLURM_CONF to an idle one (eval "$(.ci/slurm)" starts one)')]

# one CPU and no GPU per trial; the time limit is the README's knob (minutes)
SLURM = ["hydra/launcher=submitit_slurm", "hydra.launcher.gpus_per_task=null", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.timeout_min=10"]


def queue_empty(tmp_path: Path) -> bool:
    """None of the sweep's SLURM jobs (submitit's folders, one per job) is queued or running any more
    (other tests' jobs may be)."""
    ours = {p.name for p in (tmp_path / "multirun" / ".submitit").iterdir() if p.is_dir()}
    assert ours
    queued = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout.split()
    return not ours & set(queued)


def test_an_optuna_sweep_with_pruning_runs_its_trials_as_slurm_jobs(tmp_path: Path):
    run(grid_sweep(tmp_path, "optim.lr=choice(0.5,0.3,0.0001,0.00005)", 0, 4, "optim=sgd", "optim.momentum=0",
                   "hydra.sweeper.n_jobs=2", "hydra.sweeper.median.n_startup_trials=1", *SLURM), tmp_path)
    found = study(f"sqlite:///{tmp_path}/multirun/optuna.db").trials
    client, runs = mlflow_runs(tmp_path, found)  # one parent, one run per trial
    assert len(found) == 4 and {t.state for t in found} <= {TrialState.COMPLETE, TrialState.PRUNED}
    for t in found:
        r = runs[t.number]
        assert r.info.status == "FINISHED" and t.intermediate_values == metric(client, r.info.run_id, "val_loss")
        assert r.data.tags.get("trial_state") == ("PRUNED" if t.state == TrialState.PRUNED else None)
    jobs = {p.name for p in (tmp_path / "multirun" / ".submitit").iterdir() if p.name.isdigit()}
    assert len(jobs) == 4  # one SLURM job per trial
    (parent,) = [r for r in client.search_runs([r.info.experiment_id]) if r.data.tags["run_type"] == "sweep"]
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_trials"] == 4
    assert "summary.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert queue_empty(tmp_path)


def test_a_grid_sweep_runs_its_jobs_on_the_cluster_and_a_cancelled_one_fails_alone(tmp_path: Path, text_file: Path):
    # trial 1 trains long enough to be cancelled while it trains; Hydra's launcher ended the sweep then
    proc = launch(tmp_path, text_file, "trainer.epochs=1,300,1", "trainer.log_every=1", *SLURM)
    job = training_run(tmp_path, 1, 1, proc).data.tags["slurm_job_id"]
    subprocess.run(["scancel", job], check=True)
    out, err = finished(proc)
    assert f"trial 1 failed, objective +inf: its SLURM job {job}" in out
    parent, children = split(all_runs(tmp_path))
    assert parent.info.status == "FINISHED" and parent.data.tags["launcher"].endswith("SlurmLauncher")
    assert [c.info.status for c in children] == ["FINISHED", "KILLED", "FINISHED"]
    assert children[1].data.tags["failure_reason"] == "interrupted (SIGTERM)"
    assert parent.data.metrics["n_finished"] == 2
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert "summary.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert job_states(job) == ["CANCELLED by 0"] and queue_empty(tmp_path)


def test_ctrl_c_of_a_grid_sweep_cancels_its_jobs_and_leaves_nothing_running(tmp_path: Path, text_file: Path):
    proc = launch(tmp_path, text_file, "trainer.epochs=300", "trainer.log_every=1", "seed=1,2,3", *SLURM)
    training = training_runs(tmp_path, 2, proc)  # any two of the three jobs
    jobs = [r.data.tags["slurm_job_id"] for r in training]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "cancelled the sweep's SLURM jobs still in flight" in out
    parent, children = split(all_runs(tmp_path))
    # the two seen training were stopped; on a loaded machine a third may have started (or one trained
    # to its end before another's job started): nothing is left RUNNING
    status = {c.info.run_id: c.info.status for c in children}
    assert parent.info.status == "KILLED", out[-3000:] + err[-3000:]
    assert all(status[r.info.run_id] == "KILLED" for r in training), status
    assert set(status.values()) <= {"KILLED", "FINISHED"}, status
    assert all(job_states(j) == ["CANCELLED by 0"] for j in jobs) and queue_empty(tmp_path)


def sweep_cmd_on_slurm(tmp_path: Path, n_trials: int, epochs: int, *extra: str) -> list[str]:
    """A random-sampled Optuna sweep of `n_trials` tiny trials of `epochs` epochs (about 19 steps
    each) on the cluster, two at once, checkpointing every epoch, no pruning."""
    return grid_sweep(tmp_path, "optim.lr=choice(0.01,0.02,0.03,0.04)", 0, n_trials, "hydra.sweeper.n_jobs=2",
                      "hydra.sweeper.pruner=none", f"trainer.epochs={epochs}", "trainer.checkpoints=true",
                      "trainer.log_every=1", *SLURM, *extra)


def training_run(tmp_path: Path, trial: int, min_epochs: int, proc: subprocess.Popen) -> object:
    """The MLflow run of `trial` once it has evaluated `min_epochs` epochs (so it has a checkpoint)."""
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    deadline = time.time() + 240
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        runs = [r for r in all_runs(tmp_path) if r.data.tags.get("trial") == str(trial)] \
            if (tmp_path / "mlflow.db").exists() else []
        if runs and len(client.get_metric_history(runs[0].info.run_id, "val_loss")) >= min_epochs:
            return runs[0]
        time.sleep(0.5)
    raise AssertionError(f"trial {trial} did not train {min_epochs} epochs in time")


def training_runs(tmp_path: Path, n: int, proc: subprocess.Popen) -> list:
    """The MLflow runs of the first `n` trials seen training (one epoch evaluated: a checkpoint; not
    yet ended: on a loaded machine one trial may train to its end before another's job starts)."""
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    deadline = time.time() + 240
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        runs = [r for r in all_runs(tmp_path) if "trial" in r.data.tags and r.info.status == "RUNNING"] \
            if (tmp_path / "mlflow.db").exists() else []
        training = [r for r in runs if client.get_metric_history(r.info.run_id, "val_loss")]
        if len(training) >= n:
            return training[:n]
        time.sleep(0.5)
    raise AssertionError(f"{n} trials did not train an epoch in time")


def job_states(job_id: str, settle_s: float = 30) -> list[str]:
    """Every record of the job in SLURM's accounting, oldest first (a requeue adds one: REQUEUED). The
    accounting daemon records a job's end a moment after it: wait until the last record is final."""
    deadline = time.time() + settle_s
    while True:
        states = subprocess.run(["sacct", "-X", "-D", "-n", "-P", "-j", job_id, "-o", "State"], capture_output=True,
                                text=True, check=True).stdout.splitlines()
        if (states and states[-1] not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING")) or time.time() > deadline:
            return states
        time.sleep(1)


def assert_steps_once(client: MlflowClient, run_id: str, epochs: int) -> None:
    """Every step of the run logged once, up to the last epoch: nothing lost or repeated across jobs."""
    val = [m.step for m in client.get_metric_history(run_id, "val_loss")]
    train = [m.step for m in client.get_metric_history(run_id, "train_loss")]
    assert len(val) == epochs and len(set(val)) == len(val), (len(val), len(set(val)))
    want = list(range(1, max(val) + 1))  # a short message: CI prints a full diff of lists
    assert sorted(train) == want, ("missing", sorted(set(want) - set(train))[:5], "twice",
                                   sorted({s for s in train if train.count(s) > 1})[:5])


def test_a_requeued_trial_saves_a_checkpoint_and_its_next_job_continues_the_same_run(tmp_path: Path):
    proc = subprocess.Popen(sweep_cmd_on_slurm(tmp_path, 2, 80), cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = training_run(tmp_path, 0, 3, proc)
    job = first.data.tags["slurm_job_id"]
    subprocess.run(["scontrol", "requeue", job], check=True)  # what preemption with PreemptMode=REQUEUE does
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    found = study(f"sqlite:///{tmp_path}/multirun/optuna.db").trials
    client, runs = mlflow_runs(tmp_path, found)  # one parent, one run per trial: the requeue made none
    assert [t.state for t in found] == [TrialState.COMPLETE] * 2
    assert runs[0].info.run_id == first.info.run_id and runs[0].info.status == "FINISHED"
    assert "failure_reason" not in runs[0].data.tags
    assert job_states(job)[0] == "REQUEUED" and job_states(job)[-1] == "COMPLETED"
    log = (tmp_path / "multirun" / "0" / "train.log").read_text()  # the job's two starts, in Hydra's job log
    assert f"resuming MLflow run {first.info.run_id} from checkpoints/last.pt" in log
    assert_steps_once(client, first.info.run_id, 80)
    assert found[0].value == runs[0].data.metrics["val_loss"] == metric(client, first.info.run_id, "val_loss")[
        max(found[0].intermediate_values)]
    assert queue_empty(tmp_path)


def test_a_cancelled_trial_fails_with_its_run_killed_and_the_sweep_goes_on(tmp_path: Path):
    proc = subprocess.Popen(sweep_cmd_on_slurm(tmp_path, 3, 150, "hydra.sweeper.max_failure_rate=0.5"), cwd=tmp_path,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    job = training_run(tmp_path, 0, 1, proc).data.tags["slurm_job_id"]
    subprocess.run(["scancel", job], check=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert f"trial 0 failed: its SLURM job {job} ended without a result (CANCELLED by 0)" in out
    found = study(f"sqlite:///{tmp_path}/multirun/optuna.db").trials
    _, runs = mlflow_runs(tmp_path, found)
    assert [t.state for t in found] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert runs[0].info.status == "KILLED" and runs[0].data.tags["failure_reason"] == "interrupted (SIGTERM)"
    parent, _ = split(all_runs(tmp_path))
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_finished"] == 2
    assert job_states(job) == ["CANCELLED by 0"] and queue_empty(tmp_path)


def test_cancelling_every_job_ends_the_sweep_killed_in_one_line(tmp_path: Path):
    proc = subprocess.Popen(sweep_cmd_on_slurm(tmp_path, 4, 500), cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    jobs = [training_run(tmp_path, trial, 1, proc).data.tags["slurm_job_id"] for trial in (0, 1)]
    subprocess.run(["scancel", *jobs], check=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-2000:] + err[-3000:]
    assert err.strip().splitlines()[-1] == ("lesson7-train: error: the sweep was cancelled: the SLURM jobs of its "
                                            "2 running trials were cancelled (scancel)")
    assert [t.state for t in study(f"sqlite:///{tmp_path}/multirun/optuna.db").trials] == [TrialState.FAIL] * 2
    parent, children = split(all_runs(tmp_path))
    assert parent.info.status == "KILLED" and parent.data.tags["failure_reason"].startswith("the sweep was cancelled")
    assert [c.info.status for c in children] == ["KILLED", "KILLED"]
    assert queue_empty(tmp_path)


def test_a_trial_longer_than_its_time_limit_finishes_across_several_jobs_in_one_run(tmp_path: Path):
    # SLURM's limits are whole minutes and it checks them every 30 s: with a 1-minute limit, submitit's
    # signal (50 s before it) comes 10 to 40 s into each job, before this trial's 50+ s of training end
    # (0.044 s an epoch on a quiet 2-core machine, 0.1 s on a loaded one)
    epochs = 1200
    run(sweep_cmd_on_slurm(tmp_path, 1, epochs, "hydra.sweeper.n_jobs=1", "trainer.log_every=25",
                           "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=50",
                           "hydra.launcher.max_num_timeout=30"), tmp_path)
    found = study(f"sqlite:///{tmp_path}/multirun/optuna.db").trials
    client, runs = mlflow_runs(tmp_path, found)  # one run for the trial, whatever the number of jobs
    assert [t.state for t in found] == [TrialState.COMPLETE] and runs[0].info.status == "FINISHED"
    (job,) = {p.name for p in (tmp_path / "multirun" / ".submitit").iterdir() if p.is_dir()}
    states = job_states(job)
    # the last job may show FAILED: the time limit's signal can reach it as it exits after writing its result
    assert len(states) >= 2 and set(states[:-1]) == {"REQUEUED"} and states[-1] in ("COMPLETED", "FAILED")
    log = next((tmp_path / "multirun" / ".submitit" / job).glob("*_log.err")).read_text()
    assert log.count("this job is timed-out") >= len(states) - 1  # submitit's handler, after our checkpoint
    # a job whose signal came while it was starting is requeued by submitit before it could resume the run
    assert 1 <= (tmp_path / "multirun" / "0" / "train.log").read_text().count("resuming MLflow run") < len(states)
    val = [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_loss")]
    assert len(val) == epochs == len(set(val))  # every epoch evaluated once across the jobs
    assert queue_empty(tmp_path)


def test_a_rerun_after_the_sweeper_was_killed_cancels_its_orphan_jobs_and_completes_the_study(tmp_path: Path):
    # three at once on two CPU slots (the test cluster's partition "two"): two trials train, the third
    # waits in the queue when the sweeper dies (long enough that the two training when it dies are still
    # training when the rerun starts)
    cmd = sweep_cmd_on_slurm(tmp_path, 3, 300, "hydra.sweeper.n_jobs=3", "trainer.log_every=25",
                             "hydra.launcher.partition=two", f"hydra.sweeper.storage=sqlite:///{tmp_path}/study.db",
                             "hydra.sweeper.study_name=killed")
    proc = subprocess.Popen(cmd, cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    training = training_runs(tmp_path, 2, proc)  # any two: which jobs SLURM starts first is its own choice
    proc.kill()  # SIGKILL: no handler runs, the study keeps its trials in flight RUNNING
    proc.communicate()
    # the orphans: trials still RUNNING when it died (one seen training may have ended just before)
    at_kill = study(f"sqlite:///{tmp_path}/study.db", "killed").trials
    alive = {t.number for t in at_kill if t.state == TrialState.RUNNING}
    orphans = [r for r in training if int(r.data.tags["trial"]) in alive]
    assert orphans, f"both trials seen training ended before the sweeper was killed: {alive}"
    ours = {p.name for p in (tmp_path / "multirun" / ".submitit").iterdir() if p.is_dir()}
    pending = subprocess.run(["squeue", "-h", "-t", "PD", "-o", "%i"], capture_output=True, text=True).stdout.split()
    queued = ours & set(pending)
    assert queued, "the third job did not wait in the queue"
    run(cmd, tmp_path)
    found = study(f"sqlite:///{tmp_path}/study.db", "killed").trials
    dead = [t for t in found if t.state == TrialState.FAIL]
    assert {t.number for t in dead} >= {int(r.data.tags["trial"]) for r in orphans} and len(dead) <= 3
    assert len(found) == 3 + len(dead) and all(t.state == TrialState.COMPLETE for t in found if t not in dead)
    parent, children = split(all_runs(tmp_path))  # one parent, continued by the rerun
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_finished"] == 3
    assert not [r for r in all_runs(tmp_path) if r.info.status == "RUNNING"]
    # their jobs were cancelled: they saved a checkpoint and stopped (on a loaded machine one may have
    # trained to its end before the rerun was up: its trial is failed and retried all the same)
    ended = [job_states(r.data.tags["slurm_job_id"]) for r in orphans]
    assert ["CANCELLED by 0"] in ended and all(s in (["CANCELLED by 0"], ["COMPLETED"]) for s in ended), ended
    deadline = time.time() + 60  # a job still queued when the sweeper died starts, finds its trial ended, stops
    while not queue_empty(tmp_path) and time.time() < deadline:
        time.sleep(1)
    assert queue_empty(tmp_path) and all(job_states(j)[-1] in ("COMPLETED", "CANCELLED by 0") for j in queued)
    trained = {c.data.tags["trial"] for c in children}
    assert trained == {str(t.number) for t in found if t.user_attrs.get("mlflow_run_id")}  # no run without a trial
