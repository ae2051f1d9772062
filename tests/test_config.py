from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from lesson7_sweeps.config import validate
from lesson7_sweeps.errors import ConfigError
from lesson7_sweeps.preflight import preflight, variants
from lesson7_sweeps.train import CONF_DIR

PRESETS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml") if not p.stem.endswith("_base"))


def composed(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("preset", [None, *PRESETS])
def test_default_config_and_every_preset_compose_and_validate(preset: str | None):
    cfg = composed(*([f"experiment={preset}"] if preset else []))
    validate(cfg)
    if preset == "lesson6_lstm":
        assert (cfg.model.n_hidden, cfg.model.n_layers, cfg.model.dropout) == (512, 2, 0.5)
        assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.trainer.epochs) == (1e-2, 1e-5, 65)
        assert [p.epochs for p in cfg.schedule.phases] == [2, 63]  # the published run; lesson6_lstm_80: 2, 15, 63


@pytest.mark.parametrize(("override", "key"), [
    ("optim.lr=0", "optim.lr"), ("optim.lr=-1e-3", "optim.lr"), ("optim.lr=[1e-3,-1]", "optim.lr"),
    ("data.bptt=0", "data.bptt"), ("data.bs=0", "data.bs"), ("model.dropout=1.0", "model.dropout"),
    ("model.dropout=-0.1", "model.dropout"), ("model.n_layers=0", "model.n_layers"),
    ("model.kind=transformer", "model.kind"), ("trainer.device=tpu", "trainer.device"),
    ("objective=accuracy", "objective"), ("schedule.phases.0.cycle_mult=0.5", "schedule.phases.cycle_mult"),
])
def test_impossible_values_are_one_line_errors_naming_the_key(override: str, key: str):
    with pytest.raises(ConfigError) as err:
        validate(composed(override))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{key}=")


def test_a_missing_setting_inside_a_group_is_named_once():
    cfg = composed("schedule=sgdr")
    cfg.schedule.phases[0].reset_optimizer = "???"  # OmegaConf's MISSING, as a stored config without the key
    with pytest.raises(ConfigError, match=r"^schedule\.phases\[0\]\.reset_optimizer: .*missing mandatory value"):
        validate(cfg)


@pytest.mark.parametrize(("argv", "fragments"), [
    (["model.foo=1"], ["model.foo", "Key 'foo' not in"]),
    (["model=nosuch"], ["model/nosuch", "choose one of convbnnet, convbnnet2, convnet, convnet2, gru, lstm, "
                         "preact_resnet, resnet, resnet2, resnet_full, rnn, simplenet"]),
    (["model.n_hidden=abc"], ["model.n_hidden", "could not be converted to Integer"]),
    (["data.bs=1.5"], ["data.bs"]),
    (["-m", "optim.lr=1e-3,-1"], ["optim.lr=-1"]),  # the second value of a sweep is checked too
    (["-m", "data.bptt=8,16", "model.n_layers=1,0"], ["model.n_layers=0"]),
    (["data.bptt=[1"], ["data.bptt=[1: ", "no viable alternative"]),  # an override Hydra cannot parse
])
def test_preflight_turns_hydra_errors_into_one_line(argv: list[str], fragments: list[str]):
    with pytest.raises(ConfigError) as err:
        preflight(argv, CONF_DIR, "train")
    msg = str(err.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg


def test_preflight_accepts_good_sweeps_and_expands_each_value():
    preflight(["-m", "data.bptt=8,16,32", "model.n_hidden=128,256"], CONF_DIR, "train")
    assert variants(["data.bptt=8,16", "model.n_hidden=128,256", "seed=1"]) == [
        ["data.bptt=8", "model.n_hidden=128", "seed=1"],
        ["data.bptt=16", "model.n_hidden=128", "seed=1"],
        ["data.bptt=8", "model.n_hidden=256", "seed=1"],
    ]


@pytest.mark.parametrize(("args", "expected"), [
    (["model.dropout=1.5"], "lesson7-train: error: model.dropout=1.5 is invalid: must be in [0, 1)"),
    (["data=text", "data.path=missing.txt"],
     "lesson7-train: error: data.path=missing.txt does not exist; pass data.path=/path/to/text.txt"),
])
def test_cli_bad_input_exits_2_with_one_line_and_creates_no_run(tmp_path: Path, args: list[str], expected: str):
    db = tmp_path / "mlflow.db"
    proc = subprocess.run([sys.executable, "-m", "lesson7_sweeps.train", *args, f"tracking.uri=sqlite:///{db}"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [expected]
    assert not db.exists()  # nothing was started, so no store and no RUNNING run


BAD_CONFIGS = [  # (argv, the key the one-line error must name)
    (["model=transformer"], "model/transformer"), (["model.n_hiden=64"], "model.n_hiden"),
    (["model.n_hidden=big"], "model.n_hidden"), (["optim.lr=0"], "optim.lr"), (["optim.lr=-0.1"], "optim.lr"),
    (["data.bptt=0"], "data.bptt"), (["data.bs=0"], "data.bs"), (["model=resnet2", "model.layers=[]"], "model.layers"),
    (["model.n_layers=0"], "model.n_layers"), (["model.dropout=1"], "model.dropout"),
    (["model.dropout=-0.5"], "model.dropout"), (["trainer.epochs=0"], "trainer.epochs"),
    (["-m", "data.bptt=8,0"], "data.bptt"), (["schedule=cosine"], "schedule/cosine"),
]


@pytest.mark.parametrize(("argv", "key"), BAD_CONFIGS)
def test_every_bad_config_is_one_line_exit_2_and_no_run(monkeypatch, capsys, tmp_path: Path, argv, key):
    from lesson7_sweeps.train import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lesson7-train", *argv, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    with pytest.raises(SystemExit) as exit_:
        cli()
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lesson7-train: error: ") and key in err[0], err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(("argv", "expected"), [
    (["data=text", "data.path=empty.txt"], "empty.txt is empty; point data.path at a text file with content"),
    (["data=text", "data.path=missing.txt"], "data.path=missing.txt does not exist; pass data.path=/path/to/text.txt"),
    (["data=cifar10", "model=simplenet", "data.root=nowhere"], "data.root=nowhere does not exist; point data.root"),
])
def test_a_sweep_over_missing_or_empty_data_is_one_line_before_any_trial(monkeypatch, capsys, tmp_path: Path, argv,
                                                                          expected):
    """Checked in the pre-flight, without reading the data: not every trial failing on it in turn."""
    from lesson7_sweeps.train import cli

    (tmp_path / "empty.txt").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lesson7-train", "-m", *argv, "seed=1,2",
                                      f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    with pytest.raises(SystemExit) as exit_:
        cli()
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lesson7-train: error: {expected}"), err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "outputs").exists()
