"""The rough edges of a sweep a new user met: counters that add up, names that tell sweeps and pruned
trials apart, width lists plotted in order, readable numbers in the printed table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from mlflow import MlflowClient

from lesson7_sweeps.sweeps import parent as sweep
from lesson7_sweeps.sweeps.summary import Summary, _axis, render
from lesson7_sweeps.tracking import MlflowLogger

from .conftest import seed_store


def summary(statuses: list[str], **columns: list) -> Summary:
    n = len(statuses)
    table = pd.DataFrame({"trial": range(n), "run_id": [f"r{i}" for i in range(n)], "run_name": ["x"] * n,
                          **columns, "objective": [1.0] * n, "status": statuses})
    return Summary("p", "t", table, list(columns), "minimize")


def test_the_counters_add_up_to_n_trials_killed_trials_included(capsys):
    s = summary(["FINISHED", "PRUNED", "FAILED", "KILLED", "FINISHED", "RUNNING"])
    assert s.counts == {"n_trials": 6, "n_finished": 2, "n_pruned": 1, "n_failed": 1, "n_killed": 2}
    s.print()
    assert "6 trials: 2 finished, 1 pruned, 1 failed, 2 killed" in capsys.readouterr().out


def test_width_lists_are_plotted_in_the_order_of_their_numbers():
    x, ticks = _axis(pd.Series(["[16, 32, 64]", "[8, 16, 32]", "[128, 256]", "[8, 16]"]))
    assert ticks == ["[8, 16]", "[8, 16, 32]", "[16, 32, 64]", "[128, 256]"]  # as text: 128 < 16 < 8
    assert x == [2.0, 1.0, 3.0, 0.0]
    assert _axis(pd.Series(["lstm", "gru"]))[1] == ["gru", "lstm"]  # anything else: by its text


def test_the_printed_table_rounds_long_decimals_and_keeps_ids(capsys):
    s = summary(["FINISHED"], lr=["0.00012345678901234567"], bptt=["16"])
    s.table.loc[0, "run_id"] = "1234567890123456789e12345678901"  # an id that reads as a number stays whole
    render(s.table, "t")
    out = capsys.readouterr().out
    assert "0.0001235" in out and "0.000123456789" not in out and "1234567890123456789e12345678901" in out


def test_a_pruned_trial_is_marked_in_its_run_name_once(tmp_path: Path):
    seed_store(tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logger = MlflowLogger(uri, "test", None, None, heartbeat_s=60, stale_after_s=300)
    logger.start("#3 bptt=16", {}, {})
    sweep.mark_pruned(logger)
    sweep.mark_pruned(logger)  # a resumed pruned trial: still one mark
    run = MlflowClient(uri).get_run(logger.run_id)
    assert run.info.run_name == "#3 bptt=16 ✂" and run.data.tags["trial_state"] == "PRUNED"


# --- disk: what a run keeps once it ended ------------------------------------------------------


def test_a_finished_run_keeps_final_pt_alone(make_cfg, tmp_path: Path, one_thread):
    """(trainer.keep_cycle_checkpoints=true keeps cycle_N.pt too: tests/test_train.py)"""
    from lesson7_sweeps.train import train_run

    run_id = train_run(make_cfg("schedule=sgdr", "trainer.sample.chars=0")).run_id  # 2 epochs: a cycle ends
    kept = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").list_artifacts(run_id, "checkpoints")
    assert [a.path for a in kept] == ["checkpoints/final.pt"]  # last.pt was there while a resume needed it


def test_an_ended_trial_keeps_what_a_resume_needs(tmp_path: Path):
    from lesson7_sweeps.checkpoint import drop_unneeded

    seed_store(tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    names = ["last.pt", "final.pt", "cycle_1.pt"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")

    def after(status: str, final: bool) -> list[str]:
        logger = MlflowLogger(uri, "test", str(tmp_path / "artifacts"), None, heartbeat_s=60, stale_after_s=300)
        logger.start("r", {}, {})
        for name in names:
            logger.log_artifact(tmp_path / name, "checkpoints")
        drop_unneeded(logger, tmp_path / "none", status, final)
        return sorted(a.path.split("/")[1] for a in logger.client.list_artifacts(logger.run_id, "checkpoints"))

    assert after("FINISHED", final=False) == ["cycle_1.pt", "final.pt"]
    assert after("FINISHED", final=True) == []  # pruned
    assert after("FAILED", final=True) == []  # a sweep's failed trial
    assert after("KILLED", final=False) == sorted(names)  # resume=RUN continues it
    assert after("FAILED", final=False) == sorted(names)  # a single run: resumed once its cause is fixed


# --- a quick sweep: evaluations inside an epoch, on a fixed part of the validation set -----------


def history(tmp_path: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(run_id, key)]


def test_eval_every_evaluates_inside_the_epoch_without_changing_training(make_cfg, tmp_path: Path, one_thread):
    from lesson7_sweeps.train import train_run

    common = ("trainer.epochs=1", "trainer.max_steps=8", "trainer.log_every=1", "trainer.sample.chars=0")
    plain = train_run(make_cfg(*common)).run_id
    quick = train_run(make_cfg(*common, "trainer.eval_every=3", "data.eval_limit=2")).run_id
    # the hidden state training carries is put back after each evaluation: the same steps, bit for bit
    assert history(tmp_path, quick, "train_loss") == history(tmp_path, plain, "train_loss")
    assert [s for s, _ in history(tmp_path, quick, "val_loss")] == [3, 6, 8]  # and the epoch's end
    assert [s for s, _ in history(tmp_path, quick, "epoch")] == [8]
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(quick)
    assert run.data.tags["eval_limit"].startswith("first 2 of ") and "eval_limit" not in \
        MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(plain).data.tags
    assert history(tmp_path, quick, "val_loss")[-1][1] != history(tmp_path, plain, "val_loss")[-1][1]  # a subset


def test_a_trial_pruned_inside_an_epoch_stops_there_marked_and_without_checkpoints(make_cfg, tmp_path: Path,
                                                                                    monkeypatch, one_thread):
    from lesson7_sweeps import train as train_module

    class Pruner:  # Optuna's side of the hook (tests/test_optuna_sweeper.py runs the real one)
        pruned, seen = False, []

        def __call__(self, step: int, value: float, may_prune: bool) -> bool:
            self.seen.append(step)
            self.pruned = may_prune and step >= 4
            return self.pruned

    pruner = Pruner()
    monkeypatch.setattr(train_module, "reporter_for_job", lambda run_id: pruner)
    cfg = make_cfg("trainer.epochs=1", "trainer.eval_every=2", "data.eval_limit=1", "trainer.sample.chars=0")
    run_id = train_module.train_run(cfg).run_id
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(run_id)
    assert pruner.seen == [2, 4] and [s for s, _ in history(tmp_path, run_id, "val_loss")] == [2, 4]
    assert [s for s, _ in history(tmp_path, run_id, "epoch")] == [4]  # stopped at step 4, evaluated once there
    assert run.info.status == "FINISHED" and run.info.run_name.endswith(" ✂")
    assert client.list_artifacts(run_id, "checkpoints") == []  # a pruned trial is final


def test_a_trial_is_never_pruned_at_its_last_evaluation(make_cfg, tmp_path: Path, monkeypatch, one_thread):
    """Its last evaluation is reported (Optuna's intermediate values match MLflow's) but cannot prune
    it: a trial that trained to its end is complete, its value counts (CI saw a median pruner prune a
    2-epoch trial at its second and last epoch)."""
    from lesson7_sweeps import train as train_module
    from lesson7_sweeps.sweeps.optuna_trial import Reporter

    calls = []

    class Trial:  # the sweeper's trial, whose pruner always says prune
        pruned = False

        def report(self, step: int, value: float) -> None:
            calls.append(step)

        def should_prune(self) -> bool:
            self.pruned = True
            return True

    monkeypatch.setattr(train_module, "reporter_for_job", lambda run_id: Reporter(Trial()))
    run_id = train_module.train_run(make_cfg("trainer.epochs=2", "trainer.sample.chars=0")).run_id
    epochs = [s for s, _ in history(tmp_path, run_id, "epoch")]
    assert calls == epochs[:1]  # pruned at the first epoch's end, reported there
    run_id = train_module.train_run(make_cfg("trainer.epochs=1", "trainer.sample.chars=0")).run_id
    epochs = [s for s, _ in history(tmp_path, run_id, "epoch")]
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id)
    assert calls[1:] == epochs and not run.info.run_name.endswith(" ✂") and "trial_state" not in run.data.tags
