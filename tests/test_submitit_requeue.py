"""A trial whose job runs a second time (SLURM requeued it) continues its own MLflow run."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from mlflow import MlflowClient
from omegaconf import open_dict
from optuna.distributions import FloatDistribution

from lesson7_sweeps.sweeps.optuna_trial import RUN_ID, run_to_continue
from lesson7_sweeps.train import CONF_DIR, main, train_run

from .conftest import tiny_overrides


@pytest.fixture
def trial_job(tmp_path: Path, text_file: Path):
    """The config of job 0 of an Optuna sweep, set as Hydra's (as the launcher does), and its trial."""
    url = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="requeue", storage=url)
    trial = study.ask({"optim.lr": FloatDistribution(1e-3, 1e-1)})
    trial.set_user_attr(RUN_ID, None)  # as the sweeper does
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*tiny_overrides(tmp_path, text_file), "trainer.epochs=1",
                                          "hydra/sweeper=optuna", f"hydra.sweeper.storage={url}",
                                          "hydra.sweeper.study_name=requeue"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode, cfg.hydra.job.num = RunMode.MULTIRUN, trial.number
        cfg.hydra.runtime.output_dir = str(tmp_path / "job0")
    (tmp_path / "job0" / ".hydra").mkdir(parents=True)  # the run logs it, as in a launched job
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra
    yield cfg, study, trial
    HydraConfig.instance().cfg = None


def test_a_requeued_trial_finds_the_run_its_first_attempt_started(trial_job, tmp_path: Path):
    cfg, study, trial = trial_job
    assert run_to_continue() is None  # first attempt: a new run
    outcome = train_run(cfg)
    assert study.trials[0].user_attrs[RUN_ID] == outcome.run_id
    assert run_to_continue() == outcome.run_id  # second attempt: continue that run (resume=RUN_ID)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_run(outcome.run_id).data.metrics["val_loss"] == study.trials[0].intermediate_values[
        max(study.trials[0].intermediate_values)]


def test_outside_an_optuna_sweep_nothing_is_continued():
    assert not HydraConfig.initialized() and run_to_continue() is None


def test_a_requeue_of_a_trial_whose_run_already_finished_returns_its_objective(trial_job, tmp_path: Path):
    # SLURM's time-limit signal can reach a job as it exits: the requeued job finds its run FINISHED
    cfg, study, trial = trial_job
    outcome = train_run(cfg)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    steps = [m.step for m in client.get_metric_history(outcome.run_id, "train_loss")]
    objective = client.get_run(outcome.run_id).data.metrics["objective"]
    assert main.__wrapped__(cfg) == objective  # the job again, as SLURM's requeue starts it
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(outcome.run_id, "train_loss")] == steps  # nothing retrained
    assert len(client.search_runs([run.info.experiment_id])) == 1  # and no second run


def test_a_job_whose_trial_another_sweeper_ended_trains_nothing(trial_job, tmp_path: Path, monkeypatch):
    """Its sweeper died; a sweeper resuming the study failed the trial (and will cancel the job it
    finds recorded). A job of that trial that starts before (queued on SLURM) or while that happens
    stops in one line: it records itself on the trial first, then checks the trial, so that either the
    sweeper sees the job or the job sees the trial ended."""
    from lesson7_sweeps.errors import UserError
    from lesson7_sweeps.sweeps.optuna_trial import SLURM_JOB, reporter_for_job

    cfg, study, trial = trial_job
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert run_to_continue() is None and study.trials[0].user_attrs[SLURM_JOB] == "4242"  # seen by a sweeper
    study.tell(trial, state=optuna.trial.TrialState.FAIL)  # what the resuming sweeper does
    with pytest.raises(UserError, match="trial 0 already ended \\(FAIL\\)"):
        run_to_continue()
    with pytest.raises(UserError, match="trial 0 was ended by another sweeper as this job started"):
        reporter_for_job("some-run")  # failed between the job's check and its run's record
