"""`lesson7-train`: validate the config -> build data, model, optimizer, schedule -> fit -> objective.

    lesson7-train                                   # the lesson's LSTM on Nietzsche
    lesson7-train experiment=lesson6_lstm           # replay the notebook
    lesson7-train -m data.bptt=8,16,32 model.n_hidden=128,256
    lesson7-lr-find model=gru                       # = lesson7-train +lr_find=true
"""

from __future__ import annotations

import logging
import os
import platform
import random
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lesson7_sweeps import checkpoint as ckpt
from lesson7_sweeps import runner
from lesson7_sweeps.checkpoint import Interrupted
from lesson7_sweeps.config import register_schemas, validate
from lesson7_sweeps.errors import ConfigError, DataError, UserError
from lesson7_sweeps.optim import build_optimizer
from lesson7_sweeps.schedules import Schedule
from lesson7_sweeps.sweeps.optuna_trial import reporter_for_job, run_to_continue
from lesson7_sweeps.tracking import default_run_name, flatten, git_tags

log = logging.getLogger(__name__)
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
PROG = "lesson7-train"

register_schemas()
OmegaConf.register_new_resolver("abspath", lambda p: os.path.abspath(os.path.expanduser(p)), replace=True)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed python, numpy and torch (every device); optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
    torch.use_deterministic_algorithms(deterministic)  # set either way: jobs of a multirun share a process
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name} but no CUDA device is available; use trainer.device=auto or cpu")
    return torch.device(name)


def build(node: DictConfig, **runtime: object) -> object:
    """Hydra's instantiate; a UserError raised by the target surfaces as itself, not wrapped."""
    try:
        return instantiate(node, **runtime)
    except InstantiationException as e:
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise


def run_tags(device: torch.device) -> dict[str, str]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    tags = {**git_tags(), "device": str(device), "device_name": name, "torch": torch.__version__,
            "cuda": str(torch.version.cuda)}
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        tags["hydra_overrides"] = " ".join(hc.overrides.task)
        tags.update({f"choice.{k}": str(v) for k, v in hc.runtime.choices.items() if not k.startswith("hydra")})
    return tags


class Outcome(NamedTuple):
    objective: float  # the final value of cfg.objective (lr finder: the suggested lr)
    run_id: str | None  # the MLflow run (None with tracking=none)


def train(cfg: DictConfig) -> float:
    """Build everything from `cfg`, fit, and return the objective (what sweepers minimise)."""
    return train_run(cfg).objective


def train_run(cfg: DictConfig, tags: dict[str, str] | None = None, expect_data: str | None = None,
              resume: str | None = None) -> Outcome:
    """Build everything from `cfg`, fit, and return the objective and the MLflow run.

    `tags` are added to the run's; `expect_data` is a data fingerprint the data must match (reruns);
    `resume` is the id of a run to continue from its last checkpoint (in the same MLflow run).
    Raises UserError (before any MLflow run exists) for bad config or data, and
    runner.TrainingDiverged (after marking the run FAILED) when the loss becomes NaN."""
    validate(cfg)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    device = pick_device(cfg.trainer.device)
    logger = build(cfg.tracking)
    logger.check()  # an unreachable tracking server fails here, before any data or model work
    data = build(cfg.data, device=device, seed=cfg.seed)
    if expect_data is not None and data.fingerprint != expect_data:
        raise DataError(f"the data at {data.describe()['source']} is not the data of the original run "
                        f"(fingerprint {data.fingerprint[:12]} != {expect_data[:12]}); use --force to train anyway")
    model = build(cfg.model, **data.model_args()).to(device)
    if cfg.trainer.compile:
        model.compile()  # in place: the module (and its reset()/hidden state) stays the same object
    optimizer = build_optimizer(cfg.optim, model)
    schedule = Schedule(cfg.schedule.phases, cfg.trainer.epochs)

    hydra_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None
    with tempfile.TemporaryDirectory(prefix="lesson7-") as tmp:
        out_dir, start = hydra_dir or Path(tmp), None
        if resume is not None:
            path = logger.resume(resume, Path(tmp))
            start = ckpt.load(path, device) if path is not None else None
        else:
            params = {**flatten(cfg), **{f"dataset.{k}": v for k, v in data.describe().items()},
                      "dataset.fingerprint": data.fingerprint,
                      "model.n_params": sum(p.numel() for p in model.parameters())}
            logger.start(default_run_name(cfg), params, {**run_tags(device), **(tags or {})})
        try:
            if resume is None:
                logger.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
                if hydra_dir is not None:
                    logger.log_artifact(hydra_dir / ".hydra", ".hydra")
                if data.kind == "text":
                    logger.log_text(data.vocab.to_json(), "vocab.json")
            if "lr_find" in cfg and cfg.lr_find:  # appended by +lr_find=true, so it has no default
                result = runner.lr_find(cfg, model, data, optimizer, logger, out_dir)
            else:
                report = reporter_for_job(logger.run_id)  # an Optuna trial: report evaluations, stop if pruned
                result = runner.fit(cfg, model, data, optimizer, schedule, logger, out_dir, start,
                                    report)[cfg.objective]
                if report is not None and report.pruned:
                    logger.set_tags({"trial_state": "PRUNED"})
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM from a scheduler (after saving a checkpoint)
            logger.close("KILLED", f"interrupted ({e if isinstance(e, Interrupted) else 'SIGINT'})")
            raise
        except BaseException as e:
            logger.close("FAILED", str(e).splitlines()[0] if str(e) else type(e).__name__)
            raise
        logger.close("FINISHED")
    return Outcome(result, logger.run_id)


def resume_run(cfg: DictConfig) -> float:
    """`lesson7-train resume=RUN_ID`: continue that run in the store at tracking.uri, with the run's
    own config (rebuilt from its artifacts, `_target_`s allow-listed), from its last checkpoint."""
    from lesson7_sweeps.rerun import read_run, rebuild_config  # rerun imports this module

    if "uri" not in cfg.tracking:
        raise ConfigError(f"resume={cfg.resume} needs the MLflow store the run is in; drop tracking=none")
    _, run, stored = read_run(cfg.tracking.uri, cfg.resume)
    run_cfg, notes = rebuild_config(stored, run.data.tags)
    for note in notes:
        log.warning(note)
    run_cfg.tracking.uri = cfg.tracking.uri
    return train_run(run_cfg, resume=cfg.resume).objective


def _is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    """The Hydra task. A failed trial of a multirun returns +inf so the sweep goes on."""
    try:
        cfg.resume = cfg.resume or run_to_continue()  # an Optuna trial that SLURM requeued continues its run
        return resume_run(cfg) if cfg.resume is not None else train(cfg)
    except (UserError, runner.TrainingDiverged) as e:
        if _is_multirun():
            log.error("trial failed, objective +inf: %s", e)
            return float("inf")
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UserError) else 1)


def cli() -> None:
    """Console entry: check every composed config before Hydra starts any job."""
    from lesson7_sweeps.preflight import preflight

    try:
        preflight(sys.argv[1:], CONF_DIR, "train")
        main()
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        name, code = ckpt.interrupt_signal(e)
        saved = "; its checkpoint was saved" if isinstance(e, Interrupted) else ""
        print(f"{PROG}: interrupted by {name}; the run was marked KILLED{saved}", file=sys.stderr)
        sys.exit(code)


def lr_find_cli() -> None:
    """`lesson7-lr-find ...` = `lesson7-train +lr_find=true ...`."""
    sys.argv.append("+lr_find=true")
    cli()


if __name__ == "__main__":
    cli()
