"""Issue 15, class 5: races and the scale of the checks. Two resumes of one run: one takes it, the
other is refused in one line; the pre-flight composes a few configs at any sweep size; lesson7-compare
reads a store it cannot write."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from lesson7_sweeps import preflight as preflight_module
from lesson7_sweeps.config import CONF_DIR
from lesson7_sweeps.errors import UserError
from lesson7_sweeps.sweeps.compare import main as compare_main
from lesson7_sweeps.tracking import LEASE_TAG, MlflowLogger
from lesson7_sweeps.train import resume_run

from .test_hardening_runs import stored_run

pytestmark = pytest.mark.usefixtures("one_thread")


def logger(tmp_path: Path) -> MlflowLogger:
    return MlflowLogger(f"sqlite:///{tmp_path}/mlflow.db", "test", None, None, heartbeat_s=30, stale_after_s=300)


def test_two_resumes_at_the_same_moment_take_the_run_once(make_cfg, tmp_path: Path):
    run_id = stored_run(make_cfg, tmp_path, "KILLED", None)
    contenders = [logger(tmp_path) for _ in range(2)]
    for c in contenders:
        c.prepare()
    run = contenders[0].client.get_run(run_id)  # both read the run before either writes its lease
    start, outcomes = threading.Barrier(2), []

    def resume(c: MlflowLogger) -> None:
        start.wait()
        try:
            c.take_lease(run, force=False)
            outcomes.append("took it")
        except Exception as e:
            outcomes.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=resume, args=(c,)) for c in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes, key=len) == ["took it", f"UserError: resume={run_id}: another process took this run over "
                                                    f"at the same moment; it continues the run"]


def test_a_resume_while_another_takes_the_run_over_is_one_line(make_cfg, tmp_path: Path):
    small = ("trainer.epochs=1", "trainer.max_steps=2", "trainer.sample.chars=0")
    run_id = stored_run(make_cfg, tmp_path, "KILLED", None, *small)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    client.set_tag(run_id, LEASE_TAG, f"0123abcd {time.time()}")  # a resume began since the run was KILLED
    with pytest.raises(UserError) as err:
        resume_run(make_cfg(f"resume={run_id}", *small))
    assert re.fullmatch(rf"resume={run_id}: another process is taking this run over \(its resume began \d+ s ago\); "
                        r"let it, or add force_resume=true if that process is gone", str(err.value))
    assert client.get_run(run_id).info.status == "KILLED"  # untouched
    resume_run(make_cfg(f"resume={run_id}", "force_resume=true", *small))
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.parametrize("argv", [
    ["-m", "data.bptt=range(1,10001)", "model.n_hidden=range(8,10008)", "seed=1,2,3,4,5,6,7,8,9,10,11,12"],
    ["-m", "hydra/sweeper=optuna", "model.n_hidden=range(8,408)", "data.bptt=choice(4,8,16,32,64)"],
])
def test_the_preflight_composes_a_few_configs_at_any_sweep_size(monkeypatch, tmp_path: Path, argv: list[str]):
    (tmp_path / "x.txt").write_text("some text")  # the pre-flight checks the data is there
    monkeypatch.chdir(tmp_path)
    calls = []
    compose = preflight_module.compose

    def counted(*args, **kwargs):
        calls.append(kwargs.get("overrides"))
        assert len(calls) <= 10, "the pre-flight composes every value of the sweep"
        return compose(*args, **kwargs)

    monkeypatch.setattr(preflight_module, "compose", counted)
    preflight_module.preflight([*argv, "data=text", "data.path=x.txt"], CONF_DIR, "train")
    assert len(calls) <= 8
    composed = " ".join(o for overrides in calls for o in overrides)
    if "data.bptt=range(1,10001)" in argv:  # each range by its two ends, each type of number by its extremes
        assert {"data.bptt=1", "data.bptt=10000", "model.n_hidden=10007", "seed=12"} <= set(composed.split())


def test_lesson7_compare_reads_a_store_it_cannot_write(make_cfg, tmp_path: Path, capsys):
    source = tmp_path / "store"
    run_id = stored_run(make_cfg, tmp_path, "FINISHED", None)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    client.set_tag(run_id, "run_type", "sweep")
    client.set_tag(run_id, "swept", "seed")
    source.mkdir()
    os.replace(tmp_path / "mlflow.db", source / "mlflow.db")
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    if os.geteuid() == 0:  # root writes anywhere, except on a read-only mount
        mounted = subprocess.run(["mount", "--bind", str(source), str(readonly)]).returncode == 0 and subprocess.run(
            ["mount", "-o", "remount,bind,ro", str(readonly)]).returncode == 0
        if not mounted:
            pytest.skip("running as root without permission to mount a read-only bind mount")
    else:
        os.rmdir(readonly)
        source.rename(readonly)
        (readonly / "mlflow.db").chmod(0o444)
        readonly.chmod(0o555)
    try:
        code = compare_main([run_id, "--tracking-uri", f"sqlite:///{readonly}/mlflow.db"])
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "--lazy", str(readonly)])  # MLflow's cached sqlite engine holds the file
    out, err = capsys.readouterr()
    assert code == 0 and run_id in out and "not writable" not in err, err
