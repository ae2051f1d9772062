"""lesson7-rerun end to end: real training runs in a real sqlite MLflow store, main(argv) in-process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient
from omegaconf import OmegaConf

from lesson7_sweeps.config import SGDConfig
from lesson7_sweeps.errors import ConfigError
from lesson7_sweeps.rerun import main
from lesson7_sweeps.stored import parse_stored_config, rebuild_config
from lesson7_sweeps.train import CONF_DIR, train

from .conftest import make_text, seed_store

PREFIX = "lesson7-rerun: "


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def store(tmp_path: Path) -> str:
    """The store tiny_overrides() tracks to, in this test's tmp_path."""
    seed_store(tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path}/mlflow.db"


def runs(uri: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("test")
    return [] if exp is None else client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def original(make_cfg, uri: str, *overrides: str) -> str:
    """A tiny deterministic CPU run (one evaluation, at step 30); its run id."""
    train(make_cfg("trainer.deterministic=true", "trainer.max_steps=30", *overrides))
    (run,) = runs(uri)
    return run.info.run_id


def rerun(capsys, uri: str, *argv: str) -> tuple[int, str, str]:
    code = main([*argv, "--tracking-uri", uri])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    """The one error line; any line before it must be a one-line warning (e.g. a dirty checkout)."""
    *before, last = err.strip().splitlines()
    assert last.startswith(PREFIX + "error: "), err
    assert all(line.startswith(PREFIX + "warning: ") for line in before), err
    return last


def artifact_text(uri: str, run_id: str, path: str, dst: Path) -> str:
    return Path(MlflowClient(uri).download_artifacts(run_id, path, str(dst))).read_text()


def test_a_deterministic_cpu_rerun_reproduces_every_final_metric(make_cfg, store: str, tmp_path: Path, capsys):
    run_id = original(make_cfg, store)
    code, out, err = rerun(capsys, store, run_id)
    assert code == 0, err
    old, new = runs(store)
    assert old.info.run_id == run_id and new.info.status == "FINISHED"
    assert new.data.tags["rerun_of"] == run_id and new.data.tags["rerun_overrides"] == ""
    assert new.data.tags["run_type"] == "rerun" and new.info.run_name == f"rerun {old.info.run_name}"
    assert new.data.params == old.data.params  # the whole resolved config, and the data's fingerprint
    for name in ("config.yaml", "sample.txt"):
        assert artifact_text(store, run_id, name, tmp_path / "a") == artifact_text(store, new.info.run_id, name,
                                                                                     tmp_path / "b")
    assert set(new.data.metrics) == set(old.data.metrics) >= {"val_loss", "val_accuracy", "train_loss", "throughput"}
    timing = {"throughput", "train_time"}
    exact = {k: v for k, v in old.data.metrics.items() if k not in timing}
    assert {k: v for k, v in new.data.metrics.items() if k not in timing} == exact  # bit-identical floats

    assert f"new run {new.info.run_id}" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()}
    val_loss = repr(old.data.metrics["val_loss"])
    assert rows["metric"] == ["original", "rerun", "difference"]
    assert rows["val_loss"] == [val_loss, val_loss, "0"]
    assert rows["throughput"][-1] == "(timing)"
    assert f"all {len(exact)} final metrics are identical" in out


def test_changed_data_is_refused_unless_forced(make_cfg, store: str, text_file: Path, capsys):
    run_id = original(make_cfg, store)
    text_file.write_text(make_text(6000, seed=1), encoding="utf-8")
    code, _, err = rerun(capsys, store, run_id)
    assert code == 2
    assert error_line(err).startswith(f"{PREFIX}error: the data at {text_file} is not the data of the original run")
    assert len(runs(store)) == 1

    code, out, err = rerun(capsys, store, run_id, "--force")
    assert code == 0, err
    old, new = runs(store)
    assert new.data.params["dataset.fingerprint"] != old.data.params["dataset.fingerprint"]
    assert f"{PREFIX}warning: the rerun trained on other data than the run (--force)" in err.splitlines()
    assert f"new run {new.info.run_id}" in out


def test_another_commit_warns_and_strict_refuses(make_cfg, store: str, capsys):
    run_id = original(make_cfg, store)
    MlflowClient(store).set_tag(run_id, "git_commit", "0123456789ab" + "0" * 28)
    code, _, err = rerun(capsys, store, run_id, "--strict")
    assert code == 2
    line = error_line(err)
    assert "the code may differ from the run's: it ran at 0123456789ab" in line and line.endswith("(--strict)")
    assert len(runs(store)) == 1

    code, _, err = rerun(capsys, store, run_id)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "the code may differ" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"{PREFIX}warning: ") and "0123456789ab" in warnings[0]
    assert len(runs(store)) == 2


@pytest.mark.parametrize(("key", "target"), [
    ("model", "os.system"),
    ("tracking", "builtins.eval"),
    ("data", "lesson7_sweeps.tracking.subprocess.run"),  # our package's prefix, but subprocess.run
    ("trainer.sample", "subprocess.run"),  # never instantiated today: the whole config is checked
])
def test_a_planted_target_is_refused_before_anything_runs(make_cfg, store: str, tmp_path: Path, capsys,
                                                          key: str, target: str):
    pwned = tmp_path / "pwned"
    doctored = OmegaConf.create(OmegaConf.to_container(make_cfg(), resolve=True))
    # what each target would do if it were instantiated: os.system(command=...), subprocess.run(args=...)
    OmegaConf.update(doctored, key, {"_target_": target, "command": f"touch {pwned}", "args": ["touch", str(pwned)]})
    client = MlflowClient(store)
    run = client.create_run(client.create_experiment("test", artifact_location=str(tmp_path / "artifacts")))
    client.log_text(run.info.run_id, OmegaConf.to_yaml(doctored), "config.yaml")

    code, _, err = rerun(capsys, store, run.info.run_id, "--force")
    assert code == 2
    assert error_line(err) == (f"{PREFIX}error: {key}._target_={target!r} is refused: a config read back from a "
                               f"tracking store may only choose among the options in conf/ (of this checkout), and "
                               f"none has it")
    assert len(runs(store)) == 1 and not pwned.exists()


def test_user_mistakes_are_one_line_and_create_nothing(store: str, tmp_path: Path, capsys):
    client = MlflowClient(store)
    experiment = client.create_experiment("test", artifact_location=str(tmp_path / "artifacts"))
    bare = client.create_run(experiment).info.run_id
    missing = tmp_path / "nowhere" / "mlflow.db"
    cases = [
        (store, "0" * 32, f"no run '{'0' * 32}' in {store}"),
        (store, bare, f"run {bare} has no config.yaml artifact, so it cannot be rerun"),
        (f"sqlite:///{missing}", bare, f"no MLflow store at sqlite:///{missing} (no such file); give --tracking-uri "
                                       f"or set MLFLOW_TRACKING_URI"),
        ("http://127.0.0.1:1", bare, "the MLflow tracking server http://127.0.0.1:1 does not answer"),
    ]
    for uri, run_id, message in cases:
        code, out, err = rerun(capsys, uri, run_id)
        assert (code, out) == (2, "")
        assert err.startswith(f"{PREFIX}error: {message}") and err.count("\n") == 1, err
    assert not missing.parent.exists()
    assert len(runs(store)) == 1


def test_the_store_defaults_to_mlflow_tracking_uri(store: str, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert main(["0" * 32]) == 2
    assert capsys.readouterr().err == f"{PREFIX}error: no run '{'0' * 32}' in {store}\n"


def test_overrides_after_the_run_id_are_applied_and_recorded(make_cfg, store: str, capsys):
    run_id = original(make_cfg, store)
    for bad, message in [("trainer.epohcs=1", "trainer.epohcs=1: Key 'epohcs' not in 'TrainerConfig'"),
                         ("model=gru", "model=gru: a rerun takes single-value key=value overrides"),
                         ("trainer.epochs=0", "trainer.epochs=0 is invalid: must be >= 1")]:
        code, _, err = rerun(capsys, store, run_id, bad)
        assert code == 2 and error_line(err).startswith(f"{PREFIX}error: {message}")
    assert len(runs(store)) == 1

    code, _, err = rerun(capsys, store, run_id, "trainer.epochs=1", "data.bptt=6")
    assert code == 0, err
    old, new = runs(store)
    assert (old.data.params["trainer.epochs"], old.data.params["data.bptt"]) == ("2", "8")
    assert (new.data.params["trainer.epochs"], new.data.params["data.bptt"]) == ("1", "6")
    assert new.data.tags["rerun_overrides"] == "trainer.epochs=1 data.bptt=6"


# --- rebuilding a config, without training -----------------------------------------------------


def stored(cfg) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


@pytest.mark.parametrize("groups", [
    [],
    ["optim=sgd", "model=gru", "schedule=sgdr"],
    ["data=cifar10", "model=resnet2", "schedule=onecycle"],  # another family: not the default options' schemas
    ["experiment=lesson6_rnn"],
    ["tracking=none"],
])
def test_rebuild_without_tags_matches_the_stored_groups(groups: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=groups)
    rebuilt, notes = rebuild_config(parse_stored_config(stored(cfg)), tags={})
    assert stored(rebuilt) == stored(cfg) and notes == []
    for group in ("data", "model", "optim", "tracking"):
        assert OmegaConf.get_type(rebuilt[group]) is OmegaConf.get_type(cfg[group])


def test_a_wrong_choice_tag_cannot_pick_the_wrong_schema(make_cfg):
    cfg = make_cfg("optim=sgd")
    rebuilt, _ = rebuild_config(parse_stored_config(stored(cfg)), tags={"choice.optim": "adam"})
    assert OmegaConf.get_type(rebuilt.optim) is SGDConfig and stored(rebuilt) == stored(cfg)


def test_settings_the_code_no_longer_has_are_refused_unless_forced(make_cfg):
    tree = OmegaConf.to_container(make_cfg(), resolve=True)
    tree["model"]["old_knob"] = 3
    del tree["trainer"]["label_smoothing"]
    with pytest.raises(ConfigError, match=r"^model\.old_knob: not a setting of the current code .* use --force"):
        rebuild_config(parse_stored_config(OmegaConf.to_yaml(tree)), tags={})
    rebuilt, notes = rebuild_config(parse_stored_config(OmegaConf.to_yaml(tree)), tags={}, force=True)
    assert "old_knob" not in rebuilt.model and rebuilt.trainer.label_smoothing == 0.0
    assert notes == ["dropped settings the current code does not have: model.old_knob",
                     "settings new since the run take today's defaults: trainer.label_smoothing"]


def test_an_interpolation_in_a_stored_config_is_refused(make_cfg):
    text = stored(make_cfg()).replace("experiment: test", "experiment: ${oc.env:HOME}")
    with pytest.raises(ConfigError, match=r"^tracking\.experiment='\$\{oc\.env:HOME\}': a stored config is resolved"):
        parse_stored_config(text)


def test_the_console_entry_reports_an_unknown_run_in_one_line(store: str, tmp_path: Path):
    cmd = [sys.executable, "-m", "lesson7_sweeps.rerun", "f" * 32, "--tracking-uri", store]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == f"{PREFIX}error: no run '{'f' * 32}' in {store}\n"
    assert proc.stdout == ""
