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
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lesson7_sweeps import checkpoint as ckpt
from lesson7_sweeps import runner
from lesson7_sweeps.checkpoint import Interrupted
from lesson7_sweeps.config import (
    CONF_DIR,
    compile_mode,
    is_multi_objective,
    objective_names,
    register_schemas,
    validate,
)
from lesson7_sweeps.errors import CheckpointError, ConfigError, DataError, UserError
from lesson7_sweeps.memory import check_fits
from lesson7_sweeps.optim import build_optimizer
from lesson7_sweeps.schedules import Schedule
from lesson7_sweeps.sweeps import parent as sweep
from lesson7_sweeps.sweeps.optuna_trial import reporter_for_job, run_to_continue
from lesson7_sweeps.tracking import MlflowLogger, default_run_name, finished_objective, flatten, git_tags

log = logging.getLogger(__name__)
PROG = "lesson7-train"

register_schemas()


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


def trials_at_once() -> int:
    """How many trials of this multirun run at the same time (1 outside a parallel sweep): the
    joblib launcher's n_jobs, else a sweeper's n_jobs (-1 = one per core)."""
    if not sweep.is_multirun():
        return 1
    hc = HydraConfig.get()
    n = hc.launcher.get("n_jobs") or hc.sweeper.get("n_jobs") or 1
    return os.cpu_count() or 1 if n < 0 else n


def set_threads(setting: str) -> int:
    """torch's CPU threads: `auto` gives each of N parallel trials cores / N (OpenMP threads of two
    processes on the same cores stall each other: a 1-step run took 47 s instead of 5 s)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if setting != "auto":
        torch.set_num_threads(int(setting))
    elif trials_at_once() > 1:
        torch.set_num_threads(max(1, cores // trials_at_once()))
    return torch.get_num_threads()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        if trials_at_once() > 1 and torch.cuda.device_count() > 1:  # parallel trials: spread over the GPUs
            return torch.device(f"cuda:{HydraConfig.get().job.num % torch.cuda.device_count()}")
        return torch.device("cuda")
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


def build_data(cfg: DictConfig, device: torch.device | str) -> object:
    """The data of `cfg`; data.eval_limit is not the data's to take but the runner's (how much of
    the validation set it evaluates)."""
    return build(OmegaConf.masked_copy(cfg.data, [k for k in cfg.data if k != "eval_limit"]), device=device,
                 seed=cfg.seed)


def run_tags(device: torch.device) -> dict[str, str]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    tags = {**git_tags(), "device": str(device), "device_name": name, "torch": torch.__version__,
            "cuda": str(torch.version.cuda)}
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        tags["hydra_overrides"] = " ".join(hc.overrides.task)
        tags.update({f"choice.{k}": str(v) for k, v in hc.runtime.choices.items() if not k.startswith("hydra")})
    if "SLURM_JOB_ID" in os.environ:  # a trial on a SLURM cluster: the job to scancel, requeue or look up
        tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    return tags


class Outcome(NamedTuple):
    # the final value of cfg.objective, one per objective when it is a list (lr finder: the suggested lr)
    objective: float | list[float]
    run_id: str | None  # the MLflow run (None with tracking=none)


def train(cfg: DictConfig) -> float | list[float]:
    """Build everything from `cfg`, fit, and return the objective (what sweepers minimise)."""
    return train_run(cfg).objective


def record_unstarted_trial(cfg: DictConfig, error: Exception) -> None:
    """A sweep's trial that failed before its MLflow run began (a value its data or model cannot take,
    a model too big for the device) gets a run all the same: FAILED, with its params and the reason,
    so that the MLflow UI and the summary count every trial the sweep launched, and a sweep whose
    every trial failed so ends FAILED. A warning instead when the store cannot take it either."""
    if not sweep.is_multirun():
        return
    try:
        logger = instantiate(cfg.tracking)
        if not isinstance(logger, MlflowLogger):
            return
        logger.check()
        name, tags = sweep.trial_identity(cfg, logger)
        logger.start(name or f"#{HydraConfig.get().job.num}", flatten(cfg), {**tags, "run_type": "train"})
        try:
            reporter_for_job(logger.run_id)  # an Optuna trial records its run, as a trial that trained does
        finally:
            logger.close("FAILED", (str(error).splitlines() or [type(error).__name__])[0])
    except Exception as e:
        log.warning("this trial's failure is not recorded in MLflow (%s: %s)", type(e).__name__,
                    (str(e).splitlines() or [""])[0])


def train_run(cfg: DictConfig, tags: dict[str, str] | None = None, expect_data: str | None = None,
              resume: str | None = None, checkpoint: str = "last.pt") -> Outcome:
    """Build everything from `cfg`, fit, and return the objective and the MLflow run.

    `tags` are added to the run's; `expect_data` is a data fingerprint the data must match (reruns);
    `resume` is the id of a run to continue (in the same MLflow run) from its `checkpoint`; it is
    loaded and checked before the run is marked RUNNING again.
    Raises UserError (before any MLflow run exists; a sweep's trial records a FAILED one) for bad
    config or data, and runner.TrainingDiverged (after marking the run FAILED) when the loss becomes NaN."""
    try:  # everything the run needs, before the run exists
        validate(cfg)
        seed_everything(cfg.seed, cfg.trainer.deterministic)
        threads = set_threads(cfg.trainer.threads)
        device = pick_device(cfg.trainer.device)
        logger = build(cfg.tracking)
        logger.check()  # an unreachable tracking server fails here, before any data or model work
        data = build_data(cfg, device)
        if expect_data is not None and data.fingerprint != expect_data:
            raise DataError(f"the data at {data.describe()['source']} is not the data of the original run "
                            f"(fingerprint {data.fingerprint[:12]} != {expect_data[:12]}); use --force to train anyway")
        check_fits(lambda: build(cfg.model, **data.model_args()), device)
        model = build(cfg.model, **data.model_args()).to(device)
        # compiled or captured steps (runner.Step) pair with torch's fused optimizer: one kernel for all parameters
        fused = compile_mode(cfg.trainer.compile) != "off" or cfg.trainer.cuda_graph
        optimizer = build_optimizer(cfg.optim, model, fused=fused)
        schedule = Schedule(cfg.schedule.phases, cfg.trainer.epochs)
    except Exception as e:
        if resume is None:  # a sweep's trial that could not start still shows in MLflow: FAILED, saying why
            record_unstarted_trial(cfg, e)
        raise

    def load(path: Path | None) -> dict | None:  # before the run is marked RUNNING again
        if path is None and checkpoint == "final.pt":
            raise CheckpointError(f"resume={resume}: the run kept no final checkpoint (trainer.checkpoints=false), "
                                  f"so it cannot be extended")
        if path is None:
            return None
        state = ckpt.load_verified(path)
        ckpt.restore(state, f"checkpoints/{path.name}", model, optimizer, data.train, cfg.trainer.epochs, device)
        return state

    hydra_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None
    lr_finding = "lr_find" in cfg and cfg.lr_find  # appended by +lr_find=true, so it has no default
    run_type = "lr_find" if lr_finding else "rerun" if tags and "rerun_of" in tags else "train"
    # From here to the end of the run, SIGINT/SIGTERM only ask training to stop, and none can
    # interrupt ending the run: every way out leaves it FINISHED, FAILED or KILLED (checkpoint.py).
    with tempfile.TemporaryDirectory(prefix="lesson7-") as tmp, ckpt.stop_requests():
        start = None
        try:
            if resume is not None:
                start = logger.resume(resume, Path(tmp), checkpoint, load, cfg.force_resume)
                if tags:  # overrides or a config upgrade a resume applied: config.yaml says what it trains now
                    logger.set_tags(tags)
                    logger.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
            else:
                params = {**flatten(cfg), **{f"dataset.{k}": v for k, v in data.describe().items()},
                          "dataset.fingerprint": data.fingerprint,
                          "model.n_params": sum(p.numel() for p in model.parameters())}
                warnings = {"data_warning": " / ".join(data.warnings)} if data.warnings else {}
                if cfg.data.eval_limit is not None:  # its val_* metrics are not the whole set's: say so
                    warnings["eval_limit"] = f"first {cfg.data.eval_limit} of {len(data.valid)} validation batches"
                trial_name, trial_tags = sweep.trial_identity(cfg, logger)
                name = OmegaConf.select(cfg, "tracking.run_name") or trial_name or default_run_name(cfg)
                name = {"lr_find": f"lr-find {name}", "rerun": f"rerun {name}"}.get(run_type, name)
                logger.start(name, params, {**run_tags(device), "run_type": run_type, "torch_threads": str(threads),
                                            **warnings, **trial_tags, **(tags or {})})
                logger.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
                if hydra_dir is not None:
                    logger.log_artifact(hydra_dir / ".hydra", ".hydra")
                if data.kind == "text":
                    logger.log_text(data.vocab.to_json(), "vocab.json")
            # checkpoints are stored once: in the MLflow run when there is one, else in Hydra's run folder
            out_dir = Path(tmp) if logger.run_id is not None or hydra_dir is None else hydra_dir
            pruned = False
            if lr_finding:
                result = runner.lr_find(cfg, model, data, optimizer, logger, out_dir)
            else:
                report = reporter_for_job(logger.run_id)  # an Optuna trial: report evaluations, stop if pruned
                # Optuna prunes single-objective studies only (trial.report refuses several objectives)
                multi = is_multi_objective(cfg.objective)
                metrics = runner.fit(cfg, model, data, optimizer, schedule, logger, out_dir, start,
                                     None if multi else report)
                result = [metrics[m] for m in objective_names(cfg.objective)] if multi else metrics[cfg.objective]
                pruned = report is not None and report.pruned
                if pruned:
                    sweep.mark_pruned(logger)
                logger.log_model(model)
            ckpt.drop_unneeded(logger, out_dir, "FINISHED", final=pruned)  # a pruned trial is final
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM from a scheduler (after saving a checkpoint)
            with ckpt.shielded():
                marked = logger.close("KILLED", f"interrupted ({e if isinstance(e, Interrupted) else 'SIGINT'})")
            if isinstance(e, Interrupted):
                e.marked = marked and logger.run_id is not None
            raise
        except BaseException as e:
            with ckpt.shielded():
                if sweep.is_multirun() and logger.run_id is not None:  # a failed trial is final: no checkpoint
                    ckpt.drop_unneeded(logger, Path(tmp), "FAILED", final=True)
                logger.close("FAILED", str(e).splitlines()[0] if str(e) else type(e).__name__)
            raise
        with ckpt.shielded():
            logger.close("FINISHED")
    return Outcome(result, logger.run_id)


def resume_run(cfg: DictConfig, tags: dict[str, str] | None = None) -> float | list[float]:
    """`lesson7-train resume=RUN_ID [SAFE OVERRIDES]`: continue that run in the store at tracking.uri,
    with the run's own config (rebuilt from its artifacts as data), from its last checkpoint; `tags`
    are set on it."""
    from lesson7_sweeps.resume import plan  # MLflow's import: only when resuming
    from lesson7_sweeps.stored import notes_tag

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    run_cfg, checkpoint, changed, notes = plan(cfg, overrides)
    tags = {**(tags or {}), **({"resume_overrides": " ".join(changed)} if changed else {}), **notes_tag(notes)} or None
    return train_run(run_cfg, tags=tags, resume=cfg.resume, checkpoint=checkpoint).objective


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | list[float]:
    """The Hydra task. A failed trial of a multirun returns +inf so the sweep goes on."""
    try:
        continued = None if cfg.resume is not None else run_to_continue()  # an Optuna trial SLURM requeued
        if continued is not None:  # continues its run; the attempt before it is gone (SLURM ended it first)
            several = objective_names(cfg.objective) if is_multi_objective(cfg.objective) else None
            done = finished_objective(cfg.tracking.get("uri"), continued, several)
            if done is not None:  # the time limit's signal reached the job as it exited: nothing left to train
                return done
            cfg.resume, cfg.force_resume = continued, True
            # the trial whose result it now is (a retry of a stopped trial has a number of its own)
            return resume_run(cfg, {"trial": str(HydraConfig.get().job.num)})
        return resume_run(cfg) if cfg.resume is not None else train(cfg)
    except (UserError, runner.TrainingDiverged) as e:
        if sweep.is_multirun():
            log.error("trial failed, objective +inf: %s", e)
            return float("inf")
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UserError) else 1)
    except Exception as e:  # a bug or the device (CUDA OOM): this trial failed (its run FAILED), not the sweep
        if not sweep.is_multirun():
            raise
        log.error("trial failed, objective +inf: %s: %s", type(e).__name__, (str(e).splitlines() or [""])[0])
        return float("inf")


def cli() -> None:
    """Console entry: check every composed config before Hydra starts any job. A sweep that stops
    early (Ctrl-C, SIGTERM, an error) ends its parent run KILLED or FAILED here."""
    from lesson7_sweeps.preflight import preflight
    from lesson7_sweeps.usage import check_commands, lr_find_usage, mark_failed_cli, usage

    if sys.argv[1:2] == ["--mark-failed"]:
        sys.exit(mark_failed_cli(sys.argv[2:]))
    if {"--help", "-h"} & set(sys.argv[1:]):
        print(lr_find_usage() if "+lr_find=true" in sys.argv else usage())
        return
    try:
        check_commands(sys.argv[1:])
        preflight(sys.argv[1:], CONF_DIR, "train")
        main()
        sweep.raise_unended()  # a sweep whose store failed: its runs left RUNNING, said in one line
    except UserError as e:
        sweep.finish("FAILED", str(e))
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        name, code = ckpt.interrupt_signal(e)
        swept = sweep.current()
        sweep.finish("KILLED", f"interrupted ({name})")
        unended = sweep.pop_unended()  # the store would not let it end every run: said instead
        marked = isinstance(e, Interrupted) and e.marked
        ended = getattr(e, "ended", None)  # a signal while a completed sweep was being ended
        what = (f"; {unended}" if unended
                else f"; the sweep {swept.sweep_id} and its unfinished trials were marked KILLED"
                if swept and not swept.handed_over
                else f"; the sweep {e.sweep_id} had ended {ended}, its summary written" if ended
                else "; the run was marked KILLED" if marked else "")
        whose = "the running trial's" if swept else "its"
        saved = f"; {whose} checkpoint was saved" if isinstance(e, Interrupted) and e.saved else ""
        print(f"{PROG}: interrupted by {name}{what}{saved}", file=sys.stderr)
        sys.exit(code)
    except BaseException as e:  # Hydra's own error exit (SystemExit), or a bug: never leave a sweep RUNNING
        if not (isinstance(e, SystemExit) and e.code in (0, None)):
            sweep.finish("FAILED", f"the sweeping process stopped: {type(e).__name__} {e}".strip())
        raise


def lr_find_cli() -> None:
    """`lesson7-lr-find ...` = `lesson7-train +lr_find=true ...`."""
    sys.argv.append("+lr_find=true")
    cli()


if __name__ == "__main__":
    # run the cli of the module imported under its own name: parallel launchers (joblib, submitit)
    # pickle the task function, by reference only if it does not live in __main__
    from lesson7_sweeps.train import cli as imported_cli

    imported_cli()
