r"""Runs logged by the released versions before bfd5977 (ee16b29, 8bb25d1) rerun through the upgrade
table in stored.py, and only their exact old shapes are upgraded.

tests/data/legacy/*.yaml are the config.yaml artifacts that the real old code wrote; runs.json holds
those runs' tags (the command line of each is its `hydra_overrides` tag), their dataset.fingerprint
and final metrics. They were produced once, with the shared virtualenv, like this:

    git worktree add --detach /tmp/old-8bb25d1 8bb25d1      # and ee16b29 the same way
    mkdir -p /tmp/legacy-gen/run-8bb25d1                    # then, in this checkout:
    PYTHONPATH=. python -c "from tests.conftest import make_text as m
    open('/tmp/legacy-gen/run-8bb25d1/tiny.txt', 'w').write(m(6000))"
    cd /tmp/legacy-gen/run-8bb25d1
    P='[{kind:constant,epochs:1,lr_mult:1.0},{kind:sgdr,epochs:3,lr_mult:1.0,cycle_len:1,cycle_mult:2,warmup_frac:0.05}]'
    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/old-8bb25d1 python -m lesson7_sweeps.train experiment=lesson6_lstm \
        data.path=tiny.txt data.bs=16 data.bptt=8 model.n_fac=8 model.n_hidden=32 model.n_layers=1 \
        model.dropout=0.0 "schedule.phases=$P" trainer.epochs=4 trainer.device=cpu trainer.deterministic=true \
        trainer.progress=off trainer.sample.chars=20 tracking.uri=sqlite:///mlflow.db tracking.experiment=legacy
    cp outputs/mlartifacts/<run id>/artifacts/config.yaml <this checkout>/tests/data/legacy/8bb25d1-lstm-sgdr.yaml

ee16b29-gru-constant: the same with /tmp/old-ee16b29, experiment=lesson6_gru, model.n_fac=8
model.n_hidden=32, two constant phases of one epoch (lr_mult 1.0, 0.1), trainer.epochs=2. The CIFAR
ones (8bb25d1): experiment=lesson7_convbnnet model.layers=[4,8] (tta true by default) and
experiment=lesson7_simplenet model.layers=[8] data.tta=false, data.bs=8, on data.root = a folder of
36 random 32x32 PNGs in train/ and test/ class folders.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient
from omegaconf import OmegaConf

from lesson7_sweeps.errors import ConfigError
from lesson7_sweeps.rerun import main
from lesson7_sweeps.stored import parse_stored_config, rebuild_config

from .conftest import make_text, seed_store

LEGACY = Path(__file__).parent / "data" / "legacy"
RUNS = json.loads((LEGACY / "runs.json").read_text())
TWO_PHASES = ("schedule.phases[0].reset_optimizer, schedule.phases[1].reset_optimizer -> false "
              "(the old code kept one optimizer for all phases)")
CYCLE = "schedule.phases[1].warmup -> cycle (the old per-cycle warm-up)"
SPLIT = "data.valid_from_line -> null (the valid_frac cut, the old code's only split)"
EAGER = "trainer.compile=false -> off (eager, as compile=false)"

# per file: what the upgrade must set, and the note that must say so. The lstm run's tags name
# experiment=lesson6_lstm, whose preset today splits at line 8000: the run keeps its valid_frac cut.
UPGRADES = {
    "8bb25d1-lstm-sgdr": ({"data.valid_from_line": None, "schedule.phases[1].warmup": "cycle"},
                          [SPLIT, TWO_PHASES, CYCLE, EAGER]),
    "ee16b29-gru-constant": ({"data.valid_from_line": None}, [SPLIT, TWO_PHASES, EAGER]),
    "8bb25d1-convbnnet-tta": ({"data.tta": "views", "schedule.phases[1].warmup": "cycle"},
                              ["data.tta=true -> views (identity, flip, 2-pixel shifts: what tta=true averaged)",
                               TWO_PHASES, CYCLE, EAGER]),
    "8bb25d1-simplenet-notta": ({"data.tta": "none", "schedule.phases[1].warmup": "cycle"},
                                ["data.tta=false -> none (no val_accuracy_tta, as tta=false)", TWO_PHASES, CYCLE,
                                 EAGER]),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def legacy_text(name: str) -> str:
    return (LEGACY / f"{name}.yaml").read_text(encoding="utf-8")


def rebuilt(text: str, name: str = "8bb25d1-lstm-sgdr"):
    return rebuild_config(parse_stored_config(text), RUNS[name]["tags"])


@pytest.mark.parametrize("name", list(UPGRADES))
def test_a_legacy_config_rebuilds_with_the_old_behaviour_and_says_so(name: str):
    cfg, notes = rebuilt(legacy_text(name), name)
    upgraded, lines = UPGRADES[name]
    assert notes[0] == f"upgraded from an older version: {'; '.join(lines)}"
    (defaulted,) = [n for n in notes[1:] if n.startswith("settings new since the run take today's defaults: ")]
    assert "trainer.threads" in defaulted and not any(k in defaulted for k in ("tta", "valid_from_line", "phases"))
    for key, value in upgraded.items():
        assert OmegaConf.select(cfg, key) == value, key
    assert [p.reset_optimizer for p in cfg.schedule.phases] == [False, False]
    # every value the run stored is kept as it was
    stored = OmegaConf.create(legacy_text(name))
    if "tta" in stored.data:
        stored.data.tta = upgraded["data.tta"]
    stored.trainer.compile = "off"
    for key in ("data", "model", "optim", "trainer", "tracking"):
        mine = OmegaConf.to_container(cfg[key])
        assert {k: mine[k] for k in stored[key]} == OmegaConf.to_container(stored[key]), key
    old_phases = OmegaConf.to_container(stored.schedule.phases)
    assert [{k: p[k] for k in old} for p, old in zip(cfg.schedule.phases, old_phases)] == old_phases
    assert (cfg.seed, cfg.objective, cfg.resume) == (stored.seed, stored.objective, stored.resume)


def test_a_legacy_run_reruns_end_to_end_to_its_own_final_metrics(tmp_path: Path, monkeypatch, capsys):
    """The old run in a real store: its config.yaml, tags, data fingerprint and final metrics as the
    old code logged them. The rerun trains its upgraded config on the same text (data.path is the
    relative tiny.txt) and must land on the old run's metrics: per-phase warm-up instead of the old
    per-cycle one, or an optimizer reset, moves val_loss by ~6%."""
    record = RUNS["8bb25d1-lstm-sgdr"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.txt").write_text(make_text(6000), encoding="utf-8")
    seed_store(tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("legacy", artifact_location=str(tmp_path / "artifacts"))
    old = client.create_run(experiment, tags=record["tags"]).info.run_id
    for key, value in record["params"].items():
        client.log_param(old, key, value)
    for key, value in record["metrics"].items():
        client.log_metric(old, key, value, step=150)
    client.log_text(old, legacy_text("8bb25d1-lstm-sgdr"), "config.yaml")
    client.set_terminated(old)

    assert main([old, "--tracking-uri", uri, "tracking.log_model=false"]) == 0
    err = capsys.readouterr().err
    warning = "lesson7-rerun: warning: upgraded from an older version: "
    (line,) = [w for w in err.splitlines() if w.startswith(warning)]
    assert CYCLE in line and TWO_PHASES in line and SPLIT in line

    (new,) = [r for r in client.search_runs([experiment]) if r.info.run_id != old]
    assert new.info.status == "FINISHED" and new.data.tags["rerun_of"] == old
    assert new.data.tags["config_notes"].startswith(line.removeprefix("lesson7-rerun: warning: ") + " / ")
    config = OmegaConf.load(client.download_artifacts(new.info.run_id, "config.yaml", str(tmp_path)))
    assert [(p.reset_optimizer, p.warmup) for p in config.schedule.phases] == [(False, None), (False, "cycle")]
    # on a CPU with other kernels the last bits may differ; a wrong rule moves them by percents
    for name in ("train_loss", "val_loss", "val_accuracy", "val_bpc"):
        assert new.data.metrics[name] == pytest.approx(record["metrics"][name], rel=1e-6), name


def phase_target(text: str) -> str:
    return text.replace("  - kind: sgdr\n", "  - kind: sgdr\n    _target_: os.system\n")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.replace("tta: true", "tta: ${oc.env:HOME}"), r"^data\.tta='\$\{oc\.env:HOME\}': a stored config"),
    (phase_target, r"^schedule\.phases\[1\]\._target_='os\.system' is refused"),
    (lambda t: t.replace("tta: true", "tta: {_target_: os.system}"), r"^data\.tta\._target_='os\.system' is refused"),
    (lambda t: t.replace("    warmup_frac: 0.05\n", "    warmup_frac: 0.05\n    warmup: {_target_: os.system}\n"),
     r"^schedule\.phases\[1\]\.warmup\._target_='os\.system' is refused"),
])
def test_a_tampered_legacy_config_is_still_refused_in_one_line(edit, message: str):
    text = edit(legacy_text("8bb25d1-convbnnet-tta"))
    with pytest.raises(ConfigError, match=message) as err:
        rebuilt(text, "8bb25d1-convbnnet-tta")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("old", "new", "message"), [
    ("tta: true", "tta: 3", r"data\.tta='3' is invalid: use one of lesson\|views\|none"),
    ("tta: true", "tta: 1", r"data\.tta='1' is invalid"),  # 1 == True in Python, but it is no old shape
    ("tta: true", "tta: 'true'", r"data\.tta='true' is invalid"),
    ("    warmup_frac: 0.05\n", "    warmup_frac: 0.05\n    warmup: true\n",
     r"schedule\.phases\.warmup='True' is invalid"),
])
def test_an_unknown_legacy_shape_is_still_refused_in_one_line(old: str, new: str, message: str):
    text = legacy_text("8bb25d1-convbnnet-tta")
    assert old in text
    with pytest.raises(ConfigError, match=message) as err:
        rebuilt(text.replace(old, new), "8bb25d1-convbnnet-tta")
    assert "\n" not in str(err.value)
