"""Issue 9, item 1: a config read back from a tracking store is data. Every route that made
`lesson7-rerun` or `resume=RUN_ID` run code, and others of the same classes, is refused in one line
before anything is built; a planted file would prove that code ran."""

from __future__ import annotations

import ast
import functools
import http.server
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient
from omegaconf import OmegaConf

from lesson7_sweeps.config import CONF_DIR
from lesson7_sweeps.data.cifar import read_torchvision_batches
from lesson7_sweeps.data.text import TextData
from lesson7_sweeps.errors import ConfigError, DataError
from lesson7_sweeps.rerun import main as rerun_main
from lesson7_sweeps.stored import parse_stored_config, rebuild_config

from .conftest import make_text

PACKAGE = Path(__file__).resolve().parents[1] / "lesson7_sweeps"


pytestmark = pytest.mark.usefixtures("one_thread")


class Plant:
    """What a hostile config would make Hydra call: a function of our own package (the old allow-list
    let it through) that downloads a URL into a folder of the attacker's choice."""

    def __init__(self, tmp_path: Path) -> None:
        self.file = tmp_path / "pwned"
        self.node = {"_target_": "lesson7_sweeps.data.text.resolve_path", "path": str(self.file),
                     "url": "http://127.0.0.1:9/x.pth", "cache_dir": str(tmp_path)}


def doctored(make_cfg, key: str, value) -> str:
    tree = OmegaConf.to_container(make_cfg(), resolve=True)
    OmegaConf.update(cfg := OmegaConf.create(tree), key, value, force_add=True)
    return OmegaConf.to_yaml(cfg)


# A node with its own _target_ where the schema has a scalar (Any-typed fields before this issue),
# in a list item, under a nested node, or at the top level.
NESTED = ["data.url", "data.cache_dir", "tracking.run_name", "tracking.artifact_location", "optim.lr",
          "optim.weight_decay", "trainer.max_steps", "trainer.clip_grad_norm", "schedule.phases.0.epochs",
          "trainer.sample", "trainer.sample.prompt", "seed", "objective", "resume"]


@pytest.mark.parametrize("key", NESTED)
def test_a_node_with_a_target_where_a_value_belongs_is_refused(make_cfg, tmp_path: Path, key: str):
    plant = Plant(tmp_path)
    with pytest.raises(ConfigError) as err:
        rebuild_config(parse_stored_config(doctored(make_cfg, key, plant.node)), tags={}, force=True)
    assert "\n" not in str(err.value) and key.split(".")[0] in str(err.value)
    assert not plant.file.exists()


@pytest.mark.parametrize(("key", "target"), [
    ("data._target_", "lesson7_sweeps.data.text.resolve_path"),  # downloads any URL into any folder
    ("data._target_", "lesson7_sweeps.prepare_cifar.main"),  # loads pickles, copies files
    ("model._target_", "lesson7_sweeps.train.cli"),
    ("optim._target_", "torch.optim.lr_scheduler.LambdaLR"),  # in torch.optim, the old allow-list
    ("tracking._target_", "lesson7_sweeps.tracking.NullLogger.mark_failed"),
])
def test_an_allowed_package_callable_is_no_option_and_is_refused(make_cfg, key: str, target: str):
    with pytest.raises(ConfigError, match=r"is refused: a config read back from a tracking store may only choose"):
        rebuild_config(parse_stored_config(doctored(make_cfg, key, target)), tags={}, force=True)


@pytest.mark.parametrize(("key", "value"), [
    ("optim._partial_", False), ("model._recursive_", True), ("model._convert_", "all"),
    ("model._args_", ["x"]), ("schedule.phases.0._target_", "os.system"), ("trainer._target_", "os.system"),
])
def test_hydra_keys_outside_the_options_are_refused(make_cfg, key: str, value):
    with pytest.raises(ConfigError, match=r"is refused"):
        rebuild_config(parse_stored_config(doctored(make_cfg, key, value)), tags={}, force=True)


@pytest.mark.parametrize(("value", "message"), [({"_target_": "os.system"}, "is refused"),
                                                ({"path": "x"}, "may only hold a plain value")])
def test_a_plus_appended_key_may_only_hold_a_plain_value(make_cfg, value, message: str):
    text = doctored(make_cfg, "lr_find", value)
    with pytest.raises(ConfigError, match=rf"^lr_find.*{message}"):
        rebuild_config(parse_stored_config(text), tags={"hydra_overrides": "+lr_find=true"})


@pytest.mark.parametrize("text", [
    "seed: ${oc.env:HOME}",
    "tracking: {experiment: '${abspath:/etc}'}",
    "seed: !!python/object/apply:os.system ['touch PWNED']",
    "!!python/object/apply:os.system ['touch PWNED']",
    "- a list",
])
def test_resolvers_interpolations_and_yaml_tags_are_refused(tmp_path: Path, monkeypatch, text: str):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        parse_stored_config(text)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "PWNED").exists()


def test_a_stored_config_still_rebuilds_exactly(make_cfg):
    cfg = make_cfg("optim=sgd", "optim.lr=[0.1,0.2,0.3]", "trainer.max_steps=30", "trainer.clip_grad_norm=1.0")
    text = OmegaConf.to_yaml(cfg, resolve=True)
    rebuilt, notes = rebuild_config(parse_stored_config(text), tags={})
    assert OmegaConf.to_yaml(rebuilt) == text and notes == []


# --- CIFAR-10 pickles ----------------------------------------------------------------------------


class Exploit:
    """A pickle that runs `os.system` when loaded: what a hostile batches.meta holds."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.path}",)


def malicious_batches(folder: Path, planted: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [Exploit(planted)]}, protocol=2))
    return folder


def test_a_malicious_cifar_pickle_runs_nothing_and_is_one_line(tmp_path: Path):
    planted = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Exploit(planted)))  # the exploit is real: unrestricted pickle runs it
    assert planted.exists()
    planted.unlink()
    folder = malicious_batches(tmp_path / "cifar-10-batches-py", planted)
    with pytest.raises(DataError) as err:
        read_torchvision_batches(folder)
    assert not planted.exists()
    msg = str(err.value)
    assert "\n" not in msg and "batches.meta is not a CIFAR-10 pickle (it asks for posix.system" in msg


def test_real_cifar_pickles_of_numpy_arrays_still_load(tmp_path: Path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    x = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        for protocol in (2,):  # the published batches are Python 2 pickles
            (folder / name).write_bytes(pickle.dumps({b"data": x, b"labels": [0, 1]}, protocol=protocol))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a", b"b"]}, protocol=2))
    train_x, train_y, test_x, _, classes = read_torchvision_batches(folder)
    assert classes == ["a", "b"] and train_x.shape == (10, 32, 32, 3) and train_y.tolist() == [0, 1] * 5


def test_rerun_of_a_config_pointing_at_malicious_pickles_runs_nothing(tmp_path: Path, capsys):
    """The route of the issue: values only (no _target_ at all), data.root at a hostile folder."""
    planted = tmp_path / "pwned"
    malicious_batches(tmp_path / "evil" / "cifar-10-batches-py", planted)
    store = f"sqlite:///{tmp_path}/mlflow.db"
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["data=cifar10", f"data.root={tmp_path}/evil", "model=simplenet",
                                          f"data.cache_dir={tmp_path}/cache", "trainer.device=cpu",
                                          f"tracking.uri={store}", "tracking.experiment=test"])
    client = MlflowClient(store)
    run = client.create_run(client.create_experiment("test", artifact_location=str(tmp_path / "artifacts")))
    client.log_text(run.info.run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    assert rerun_main([run.info.run_id, "--tracking-uri", store, "--force"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lesson7-rerun: error: ") and "is not a CIFAR-10 pickle" in err
    assert not planted.exists()


# --- the text download -----------------------------------------------------------------------------


def test_a_download_cannot_plant_a_file_python_runs(tmp_path: Path):
    """data.url ending in .pth into a site-packages-like folder: the copy is named by us (.txt)."""
    served = tmp_path / "served"
    served.mkdir()
    (served / "evil.pth").write_text(make_text(3000))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    site = tmp_path / "site-packages"
    try:
        data = TextData(path=str(tmp_path / "missing.txt"), url=f"http://127.0.0.1:{server.server_port}/evil.pth",
                        cache_dir=str(site), lower=True, min_freq=1, valid_frac=0.2, valid_from_line=None, bs=4, bptt=8,
                        random_bptt=False, loader="plain", vocab="sorted", val_average="samples",
                        max_bytes=2**20)
    finally:
        server.shutdown()
    assert [p.suffix for p in site.iterdir()] == [".txt"] and data.path.parent == site
    assert not list(site.glob("*.pth"))


# --- the dependency direction ----------------------------------------------------------------------


def test_package_imports_run_one_way():
    """No import cycle inside lesson7_sweeps (train.py and rerun.py imported each other)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lesson7_sweeps"):
                imported |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names if a.name.startswith("lesson7_sweeps")}
        graph[name] = imported
    graph = {k: {m for m in v if m in graph and m != k} for k, v in graph.items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(m == goal or (m not in seen and reaches(m, goal, seen | {m})) for m in graph[start])

    cycles = sorted(k for k in graph if reaches(k, k, {k}))
    assert cycles == [], cycles
    assert "lesson7_sweeps.rerun" not in graph["lesson7_sweeps.train"]

