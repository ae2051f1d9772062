"""`lesson7-train --help` (our own page: groups and their options, presets, resume / rerun / lr-find,
where runs go; Hydra's internals stay hidden) and `lesson7-train
--mark-failed RUN_ID...` (end runs that were left RUNNING)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lesson7_sweeps.config import CONF_DIR
from lesson7_sweeps.errors import ConfigError, UserError

PROG = "lesson7-train"
GROUPS = ("data", "model", "optim", "schedule", "trainer", "tracking", "experiment", "sweep")


def options(group: str) -> list[str]:
    """A group's choices in conf/: presets meant to be picked (bases that others build on are not)."""
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml") if not p.stem.endswith("_base"))


def usage() -> str:
    groups = "\n".join(f"  {g:<11} {', '.join(options(g))}" for g in GROUPS)
    return f"""usage: {PROG} [GROUP=OPTION ...] [KEY=VALUE ...] [-m] [--cfg job]

Train one of fast.ai lesson 6-7's models, logged to MLflow; -m runs a sweep (a parent run, one child run per trial).

config groups (defaults in conf/train.yaml; `{PROG} --cfg job` prints the composed config):
{groups}

examples:
  {PROG}                                       the lesson's 512x2 LSTM on Nietzsche
  {PROG} experiment=lesson7_resnet2            replay a notebook (a preset from the experiment group)
  {PROG} -m data.bptt=8,16 model.n_hidden=128,256   a sweep: one MLflow run per combination, under a parent
  {PROG} -m sweep=lstm_bptt_hidden hydra/launcher=joblib   a preset sweep, two trials at once
  {PROG} -m sweep=lstm_bptt_hidden_optuna          an Optuna search with pruning (hydra/sweeper=optuna)
  lesson7-compare [PARENT_RUN_ID]                    a sweep's trials, best first (default: the latest sweep)
  {PROG} model=gru optim.lr=3e-3 trainer.device=cpu trainer.max_steps=200
  lesson7-lr-find model=lstm                      the lr finder (= {PROG} +lr_find=true)

runs, rerun and resume:
  Every run goes to tracking.uri (default: MLFLOW_TRACKING_URI, else sqlite:///outputs/mlflow.db with
  artifacts in outputs/mlartifacts; Hydra's logs in outputs/runs/ and outputs/multirun/).
  {PROG} resume=RUN_ID [trainer.epochs=N ...]    continue a stopped or crashed run from its last
      checkpoint, in the same MLflow run (trainer.epochs, max_steps, device, log_every, progress may
      change; raising trainer.epochs extends a FINISHED run; force_resume=true takes over a run whose
      heartbeat is fresh but whose process is gone)
  lesson7-rerun RUN_ID [KEY=VALUE ...]             train a run's exact config again and compare the metrics
  {PROG} --mark-failed RUN_ID... [--tracking-uri URI] end runs left RUNNING (their process died while
      the store was unreachable) as FAILED

Ctrl-C, SIGTERM or SIGHUP saves a checkpoint and marks the run KILLED (exit 128+signal); bad input is one line
and exit code 2. Hydra's own options: {PROG} --hydra-help"""


def lr_find_usage() -> str:
    return f"""usage: lesson7-lr-find [GROUP=OPTION ...] [KEY=VALUE ...]

The lesson's learning-rate finder (= {PROG} +lr_find=true): lr grows exponentially from
trainer.lr_finder.start_lr to end_lr over num_steps optimizer steps (each layer group keeps its ratio
to the last), stopping once the smoothed loss exceeds stop_factor x the lowest. The loss-vs-lr plot
(lr_find.png) and the metrics lr_find_loss / lr_find_lr go to an MLflow run named `lr-find ...`
(run_type=lr_find); the suggested lr (a tenth of the lr at the lowest loss) is printed.

examples:
  lesson7-lr-find model=lstm                       the lesson-6 LSTM on Nietzsche
  lesson7-lr-find data=cifar10 model=resnet2 trainer.lr_finder.end_lr=1
  lesson7-lr-find model=gru trainer.lr_finder.num_steps=100 trainer.device=cpu

Every group and key of `{PROG} --help` applies."""


def check_commands(argv: list[str]) -> None:
    """Hydra runs one command at a time (-m, --cfg, --info, ...) and says so with a traceback."""
    from hydra._internal.utils import get_args_parser  # Hydra's own parser: the same flags, spelled alike

    args, _ = get_args_parser().parse_known_args(argv)
    given = [flag for flag, on in (("-m", args.multirun), ("--run", args.run), ("--cfg", args.cfg is not None),
                                   ("--info", args.info is not None), ("--shell-completion", args.shell_completion))
             if on]
    if len(given) > 1:
        hint = (f"; a sweep's trial config: drop -m and give one value of each swept key ({PROG} data.bptt=8 "
                f"--cfg job)" if "-m" in given and "--cfg" in given else "")
        raise ConfigError(f"{' and '.join(given)} cannot be combined: Hydra runs one of them at a time{hint}")


def mark_failed_cli(argv: list[str]) -> int:
    """`lesson7-train --mark-failed RUN_ID [RUN_ID ...] [--tracking-uri URI] [--force]`; the exit code."""
    from lesson7_sweeps.stored import store_logger

    p = argparse.ArgumentParser(prog=f"{PROG} --mark-failed", description="End a run left RUNNING as FAILED.")
    p.add_argument("run_ids", nargs="+", metavar="RUN_ID")
    p.add_argument("--tracking-uri", help="the run's store (default: MLFLOW_TRACKING_URI, else lesson7-train's)")
    p.add_argument("--force", action="store_true", help="even if its heartbeat is fresh (its process is gone)")
    args = p.parse_args(argv)
    try:
        logger = store_logger(args.tracking_uri)
        for run_id in args.run_ids:
            logger.mark_failed(run_id, args.force)
            print(f"{PROG}: run {run_id} marked FAILED in {logger.uri}")
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0
