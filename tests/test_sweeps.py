"""A sweep as one unit: its parent run, readable trials, the summary, lesson7-compare, parallel trials.

Real subprocess multiruns (Hydra's basic sweeper, the joblib launcher) into a real sqlite store.
"""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient
from omegaconf import OmegaConf

from lesson7_sweeps.sweeps import parent as sweep
from lesson7_sweeps.sweeps.callbacks import SweepParentRun
from lesson7_sweeps.sweeps.compare import main as compare
from lesson7_sweeps.sweeps.names import format_value, short_names
from lesson7_sweeps.sweeps.summary import Summary, plots
from lesson7_sweeps.train import CONF_DIR

from .conftest import make_text, tiny_overrides


def hydra_node(task: list[str], params: dict | None = None, **sweeper: str) -> OmegaConf:
    return OmegaConf.create({"overrides": {"task": task}, "sweeper": {"params": params, **sweeper},
                             "sweep": {"dir": "multirun/x"}})


# --- the sweep's definition, names -------------------------------------------------------------


def test_the_swept_keys_come_from_the_command_line_and_the_presets_params():
    spec = sweep.sweep_spec(hydra_node(
        ["data.bptt=8,16", "model=gru,lstm", "trainer.epochs=2", "optim.lr=tag(log, interval(1e-4, 1e-2))",
         "model.n_hidden=64"], params={"model.n_hidden": "128,256", "data.bs": "32,64", "seed": "1"}))
    assert spec.swept == {"data.bptt": "8,16", "model": "gru,lstm", "optim.lr": "tag(log, interval(1e-4, 1e-2))",
                          "data.bs": "32,64"}
    assert spec.fixed == {"trainer.epochs": "2", "model.n_hidden": "64", "seed": "1"}  # the command line wins
    assert spec.short == {"data.bptt": "bptt", "model": "model", "optim.lr": "lr", "data.bs": "bs"}


def test_short_names_keep_the_full_key_where_two_would_look_alike():
    assert short_names(["data.bptt", "optim.lr", "schedule.lr"]) == {
        "data.bptt": "bptt", "optim.lr": "optim.lr", "schedule.lr": "schedule.lr"}
    assert [format_value(v) for v in (0.001, 3e-4, 16, [16, 32], "gru")] == ["0.001", "0.0003", "16",
                                                                                   "[16,32]", "gru"]


def test_trials_of_one_sweep_share_a_key_and_a_study_keeps_its_key_across_sweep_folders():
    a, b = hydra_node([]), hydra_node([])
    b.sweep.dir = "multirun/y"
    assert sweep.sweep_key(a) == sweep.sweep_key(hydra_node([])) != sweep.sweep_key(b)
    s1 = hydra_node([], storage="sqlite:///o.db", study_name="s")
    s2 = hydra_node([], storage="sqlite:///o.db", study_name="s")
    s2.sweep.dir = "multirun/y"
    assert sweep.sweep_key(s1) == sweep.sweep_key(s2) and "o.db" not in sweep.sweep_key(s1)


def compose_sweep(tmp_path: Path, text: Path, *overrides: str, tracking: bool = True, fresh_store: bool = False):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=[*tiny_overrides(tmp_path, text, tracking, fresh_store),
                                           f"hydra.sweep.dir={tmp_path}/multirun", *overrides],
                       return_hydra_config=True)


@pytest.mark.parametrize("tracking", [True, False])
def test_the_callback_creates_the_store_and_the_parent_before_any_job(tmp_path: Path, text_file: Path,
                                                                      tracking: bool):
    cfg = compose_sweep(tmp_path, text_file, tracking=tracking, fresh_store=True)
    SweepParentRun().on_multirun_start(cfg)
    assert (tmp_path / "mlflow.db").exists() == tracking
    if not tracking:
        assert sweep.current() is None
        return
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert run.info.status == "RUNNING" and run.data.tags["run_type"] == "sweep"
    assert sweep.current().run_id == run.info.run_id
    SweepParentRun().on_multirun_end(cfg)
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["n_trials"] == 0 and sweep.current() is None


def test_plots_draw_numeric_and_categorical_parameters(tmp_path: Path):
    import pandas as pd

    table = pd.DataFrame({"model": ["gru", "lstm", "rnn", "lstm"], "bptt": [8, 16, 8, None],
                          "objective": [1.5, 1.2, 1.9, None], "status": ["FINISHED"] * 3 + ["FAILED"]})
    paths = plots(Summary("p", "t", table, ["model", "bptt"], "minimize"), tmp_path)
    assert [p.name for p in paths] == ["objective_vs_params.png", "parallel_coordinates.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") and p.stat().st_size > 10_000 for p in paths)


def test_plots_of_a_sweep_with_one_finished_trial_lay_out_without_warnings(tmp_path: Path):
    import warnings

    import pandas as pd

    table = pd.DataFrame({"seed": [13, 14], "objective": [None, 1.7], "status": ["FAILED", "FINISHED"]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns when the layout collapses
        paths = plots(Summary("p", "t", table, ["seed"], "minimize"), tmp_path)
    assert len(paths) == 2 and all(p.stat().st_size > 10_000 for p in paths)


# --- real multiruns ----------------------------------------------------------------------------


def launch(tmp_path: Path, text: Path, *overrides: str, **kwargs) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lesson7_sweeps.train", "-m", *tiny_overrides(tmp_path, text),
           f"hydra.sweep.dir={tmp_path}/multirun", "trainer.epochs=1", *overrides]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, **kwargs)


def finished(proc: subprocess.Popen, code: int = 0) -> tuple[str, str]:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == code, err[-3000:]
    return out, err


def all_runs(tmp_path: Path) -> list:
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("test")
    return [] if exp is None else client.search_runs([exp.experiment_id])


def split(runs: list) -> tuple:
    parents = [r for r in runs if r.data.tags.get("run_type") == "sweep"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return parents[0], sorted(children, key=lambda r: int(r.data.tags["trial"]))


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> tuple[Path, str]:
    """A 2x2 grid (bptt x lr) where the two trials at lr 1e20 diverge: one sweep, shared by the tests below."""
    tmp_path = tmp_path_factory.mktemp("grid")
    text = tmp_path / "tiny.txt"
    text.write_text(make_text(6000), encoding="utf-8")
    out, err = finished(launch(tmp_path, text, "optim=sgd", "optim.momentum=0", "data.bptt=6,8",
                               "optim.lr=0.5,1e20", "tracking.log_model=true"))
    return tmp_path, out


@pytest.mark.slow
def test_a_grid_is_one_parent_with_one_readable_child_per_trial(grid):
    tmp_path, out = grid
    runs = all_runs(tmp_path)
    parent, children = split(runs)
    assert len(runs) == 5 and parent.info.status == "FINISHED"  # two trials failed: the sweep still finished
    assert parent.info.run_name == f"sweep bptt×lr {parent.data.tags['sweep_id']}"  # two such sweeps differ
    assert parent.data.params["sweep.data.bptt"] == "6,8" and parent.data.params["sweep.optim.lr"] == "0.5,1e20"
    assert parent.data.params["fixed.optim"] == "sgd" and parent.data.tags["swept"] == "data.bptt,optim.lr"
    assert [c.info.run_name for c in children] == ["#0 bptt=6 lr=0.5", "#1 bptt=6 lr=1e+20", "#2 bptt=8 lr=0.5",
                                                   "#3 bptt=8 lr=1e+20"]
    assert {c.data.tags["sweep_id"] for c in children} == {parent.data.tags["sweep_id"]}
    assert [c.info.status for c in children] == ["FINISHED", "FAILED", "FINISHED", "FAILED"]
    assert all(c.data.tags["run_type"] == "train" for c in children)
    # every checkpoint once: in the store, none in Hydra's job folders
    assert not list((tmp_path / "multirun").rglob("*.pt"))
    kept = [sorted(p.name for p in (tmp_path / "artifacts" / c.info.run_id / "artifacts").glob("checkpoints/*"))
            for c in children]
    assert kept == [["final.pt"], [], ["final.pt"], []]  # last.pt served only a resume; a failed trial is final


@pytest.mark.slow
def test_the_summary_names_the_best_trial_and_counts_the_failed_ones(grid):
    tmp_path, out = grid
    parent, children = split(all_runs(tmp_path))
    good = [c for c in children if c.info.status == "FINISHED"]
    best = min(good, key=lambda c: c.data.metrics["objective"])
    assert all(c.data.metrics["objective"] == c.data.metrics["val_loss"] for c in good)
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert float(parent.data.tags["best_value"]) == best.data.metrics["objective"]
    assert [c.data.tags.get("best") for c in children] == ["true" if c is best else None for c in children]
    m = parent.data.metrics
    assert (m["n_trials"], m["n_finished"], m["n_failed"], m["n_pruned"], m["n_killed"]) == (4, 2, 2, 0, 0)
    assert "4 trials: 2 finished, 0 pruned, 2 failed, 0 killed" in out
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.csv", "summary.html", "objective_vs_params.png", "parallel_coordinates.png"} <= names
    text = Path(client.download_artifacts(parent.info.run_id, "summary.csv", str(tmp_path))).read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["run_id"] for r in rows][0] == best.info.run_id  # best first
    assert [(r["bptt"], r["lr"], r["status"]) for r in rows[2:]] == [("6", "1e+20", "FAILED"),
                                                                      ("8", "1e+20", "FAILED")]
    assert {r["trial"] for r in rows} == {"0", "1", "2", "3"} and all(r["steps"] for r in rows[:2])
    assert f"best run: {best.info.run_id} ({best.info.run_name})" in out  # printed at the end


@pytest.mark.slow
def test_lesson7_compare_reads_a_sweep_without_importing_torch(grid):
    """Its default store comes from conf/ composed without the training code: a table in ~2 s, not 4-17."""
    tmp_path, _ = grid
    code = ("import sys; from lesson7_sweeps.sweeps.compare import main; assert main([]) == 0; "
            "print([m for m in ('torch', 'lesson7_sweeps.train') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"})
    assert proc.returncode == 0, proc.stderr
    *table, imported = proc.stdout.strip().splitlines()
    assert imported == "[]" and any("bptt" in line for line in table)


@pytest.mark.slow
def test_lesson7_compare_prints_the_latest_sweep_and_csv(grid, capsys):
    tmp_path, _ = grid
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent, children = split(all_runs(tmp_path))
    assert compare(["--tracking-uri", uri]) == 0
    table = capsys.readouterr().out
    assert parent.info.run_id in table and "bptt" in table and "objective" in table
    ids = [c.info.run_id for c in children]
    order = sorted(ids, key=table.index)
    assert order[0] == parent.data.tags["best_run_id"]  # best first
    assert compare(["--tracking-uri", uri, parent.info.run_id, "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["run_id"] for r in rows] == order and {r["sweep"] for r in rows} == {parent.info.run_id}
    assert compare(["--tracking-uri", uri, "--experiment", "test", "--csv"]) == 0
    assert len(list(csv.DictReader(io.StringIO(capsys.readouterr().out)))) == 4
    for argv, message in [([ids[0]], f"run {ids[0]} is not a sweep's parent run"),
                          (["f" * 32], f"no run '{'f' * 32}' in {uri}"),
                          (["--experiment", "nope"], "no sweep in experiment 'nope'"),
                          (["--tracking-uri", f"sqlite:///{tmp_path}/none.db"], "no MLflow store at")]:
        assert compare(["--tracking-uri", uri, *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"lesson7-compare: error: {message}") and err.count("\n") == 1


@pytest.mark.slow
def test_a_sweep_whose_every_trial_fails_ends_failed(tmp_path: Path, text_file: Path):
    _, err = finished(launch(tmp_path, text_file, "optim=sgd", "optim.momentum=0", "optim.lr=1e20,2e20"), code=2)
    parent, children = split(all_runs(tmp_path))
    assert parent.info.status == "FAILED" and parent.data.tags["failure_reason"] == "every trial failed"
    assert err.strip().splitlines()[-1] == (f"lesson7-train: error: every one of the 2 trials of sweep "
                                            f"{parent.data.tags['sweep_id']} failed; see their runs' failure_reason "
                                            f"tag (lesson7-compare {parent.info.run_id})")
    assert [c.info.status for c in children] == ["FAILED", "FAILED"]


@pytest.mark.slow
def test_a_trial_that_fails_before_training_is_a_failed_run_with_its_params_and_reason(tmp_path: Path,
                                                                                       text_file: Path):
    """A width too big for any machine fails its trial before its run would begin: the trial is still a
    run (FAILED, its params, the reason), counted by the summary; it used to be missing from both."""
    out, _ = finished(launch(tmp_path, text_file, "model.n_hidden=32,3000000"))
    parent, children = split(all_runs(tmp_path))
    assert [(c.info.run_name, c.info.status) for c in children] == [("#0 n_hidden=32", "FINISHED"),
                                                                    ("#1 n_hidden=3000000", "FAILED")]
    failed = children[1].data
    assert failed.params["model.n_hidden"] == "3000000" and failed.tags["run_type"] == "train"
    assert failed.tags["failure_reason"].startswith("the model does not fit: its ")
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_trials"] == 2
    assert "2 trials: 1 finished, 0 pruned, 1 failed, 0 killed" in out


@pytest.mark.slow
def test_a_sweep_whose_every_trial_fails_before_training_ends_failed(tmp_path: Path, text_file: Path):
    _, err = finished(launch(tmp_path, text_file, "model.n_hidden=3000000,4000000"), code=2)
    parent, children = split(all_runs(tmp_path))  # it ended FINISHED, "0 trials", exit 0
    assert [c.info.status for c in children] == ["FAILED", "FAILED"]
    assert parent.info.status == "FAILED" and parent.data.tags["failure_reason"] == "every trial failed"
    assert err.strip().splitlines()[-1].startswith("lesson7-train: error: every one of the 2 trials of sweep")


@pytest.mark.slow
def test_parallel_trials_share_the_cores_and_write_every_metric_once_into_one_sqlite_store(tmp_path: Path,
                                                                                          text_file: Path):
    """8 trials, 4 at once in the joblib launcher's worker processes, every step logged into one sqlite store."""
    _, err = finished(launch(tmp_path, text_file, "hydra/launcher=joblib", "hydra.launcher.n_jobs=4",
                             "seed=0,1,2,3,4,5,6,7", "trainer.log_every=1", "trainer.max_steps=30",
                             "trainer.threads=auto"))
    assert "database is locked" not in err
    parent, children = split(all_runs(tmp_path))
    assert parent.info.status == "FINISHED" and parent.data.tags["launcher"].endswith("JoblibLauncher")
    assert parent.data.metrics["n_finished"] == 8
    per_trial = str(max(1, len(os.sched_getaffinity(0)) // 4))  # trainer.threads=auto: the cores shared by 4
    assert len(children) == 8
    assert all(c.info.status == "FINISHED" and c.data.tags["torch_threads"] == per_trial for c in children)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for c in children:
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "train_loss")]
        assert steps == list(range(1, 31))  # every step, once
    # never more than four at once (whether they overlap depends on how fast each worker starts:
    # on a loaded machine one worker can finish tiny trials before another has imported torch)
    events = sorted([(c.info.start_time, 1) for c in children] + [(c.info.end_time, -1) for c in children])
    running = [sum(e for _, e in events[: i + 1]) for i in range(len(events))]
    assert max(running) <= 4


@pytest.mark.slow
def test_ctrl_c_stops_the_sweep_and_leaves_nothing_running(tmp_path: Path, text_file: Path):
    proc = launch(tmp_path, text_file, "trainer.epochs=1000", "trainer.log_every=1", "seed=0,1,2")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    deadline = time.time() + 180
    while time.time() < deadline:  # wait until the first trial is really training
        trials = [r for r in all_runs(tmp_path) if r.data.tags.get("run_type") == "train"] \
            if (tmp_path / "mlflow.db").exists() else []
        if trials and client.get_metric_history(trials[0].info.run_id, "train_loss"):
            break
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = finished(proc, 128 + signal.SIGINT)
    parent, children = split(all_runs(tmp_path))
    assert err.strip().splitlines()[-1] == (f"lesson7-train: interrupted by SIGINT; the sweep "
                                            f"{parent.data.tags['sweep_id']} and its unfinished trials were "
                                            f"marked KILLED; the running trial's checkpoint was saved")
    assert parent.info.status == "KILLED" and [c.info.status for c in children] == ["KILLED"]
    m = parent.data.metrics  # the trial was marked KILLED before the summary counted it
    assert (m["n_trials"], m["n_finished"], m["n_failed"], m["n_pruned"], m["n_killed"]) == (1, 0, 0, 0, 1)
    assert not [r for r in all_runs(tmp_path) if r.info.status == "RUNNING"]


def test_a_sweep_preset_sets_the_swept_params_and_the_command_line_narrows_it():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["sweep=lstm_bptt_hidden", "model.n_hidden=64"], return_hydra_config=True)
    spec = sweep.sweep_spec(cfg.hydra)
    assert spec.swept == {"data.bptt": "8,16,32"} and spec.fixed["model.n_hidden"] == "64"
    assert spec.fixed["sweep"] == "lstm_bptt_hidden"


def test_preflight_composes_every_value_of_a_presets_params():
    from lesson7_sweeps.preflight import _sweeper_params

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        assert _sweeper_params("train", ["sweep=lstm_bptt_hidden", "data.bptt=4"]) == ["model.n_hidden=128,256,512"]
        assert _sweeper_params("train", ["sweep=cifar_widths"]) == [
            "model.layers=[8,16,32,64,128],[16,32,64,128,256],[32,64,128,256,512]"]
