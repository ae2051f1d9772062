"""A sweep's parent MLflow run: created once before any trial, found by every trial, ended with the sweep.

The sweeping process creates the parent in the experiment of the trials (a Hydra callback, so it
works with any sweeper and launcher). A trial finds it by the *sweep key*, which every job of the
sweep can compute from its own Hydra config, in any process and on any machine that shares the
sweep folder's path: the resolved `hydra.sweep.dir` (Hydra gives every job the same, timestamp
included), or the Optuna study (`hydra.sweeper.storage` + `study_name`) when the sweeper has one, so
that re-running a study's command finds the same parent again. MLFLOW_RUN_ID is not used: MLflow
would also take it as the run to write into.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lesson7_sweeps import checkpoint as ckpt
from lesson7_sweeps.config import OBJECTIVES, objective_names
from lesson7_sweeps.errors import UserError
from lesson7_sweeps.sweeps.names import format_value, short_names
from lesson7_sweeps.sweeps.ui import sweep_view_tag, sweep_view_url
from lesson7_sweeps.tracking import Logger, MlflowLogger, flatten, git_tags

log = logging.getLogger(__name__)


@dataclass
class SweepSpec:
    """What a multirun varies, read from its command line and `hydra.sweeper.params`."""

    swept: dict[str, str]  # key -> its values or search space as written: "8,16", "interval(1e-4, 1e-2)"
    fixed: dict[str, str]  # every other override of the command line

    @property
    def short(self) -> dict[str, str]:
        return short_names(list(self.swept))


def sweep_spec(hc: DictConfig) -> SweepSpec:
    """Swept and fixed overrides of the sweep whose Hydra config (the `hydra` node) is `hc`."""
    parser = OverridesParser.create()
    swept: dict[str, str] = {}
    fixed: dict[str, str] = {}
    for o in parser.parse_overrides(list(hc.overrides.task)):
        (swept if o.is_sweep_override() else fixed)[o.key_or_group] = o.input_line.split("=", 1)[1]
    for key, value in (hc.sweeper.params or {}).items() if "params" in hc.sweeper else ():
        if key not in swept and key not in fixed:  # the command line wins over a preset's params
            o = parser.parse_override(f"{key}={value}")
            (swept if o.is_sweep_override() else fixed)[key] = str(value)
    return SweepSpec(swept, fixed)


def is_study(hc: DictConfig) -> bool:
    """A sweeper with a persistent study (Optuna's storage, and its study_name) can be resumed."""
    return bool(hc.sweeper.get("storage"))


def sweep_key(hc: DictConfig) -> str:
    """The same string in every job of one sweep (a hash: a storage URL may hold a password)."""
    if is_study(hc):
        source = f"study\n{hc.sweeper.storage}\n{hc.sweeper.study_name}"
    else:
        source = f"dir\n{os.path.abspath(str(hc.sweep.dir))}"
    return hashlib.sha256(source.encode()).hexdigest()[:24]


def directions(objective: Any, hc: DictConfig | None = None) -> list[str]:
    """minimize or maximize, one per objective: the sweeper's `direction` when it has one set, else
    each objective's way."""
    chosen = hc.sweeper.get("direction") if hc is not None else None
    if chosen:
        return [str(d) for d in chosen] if OmegaConf.is_list(chosen) else [str(chosen)]
    return [OBJECTIVES[name] for name in objective_names(objective)]


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


# --- the sweeping process ----------------------------------------------------------------------


@dataclass
class Parent:
    logger: MlflowLogger  # writes into the parent run
    sweep_id: str
    spec: SweepSpec
    objective: str  # the objective's name, or several comma-joined
    experiment_id: str
    handed_over: str | None = None  # why another sweeper of the study ends this parent, not this process

    @property
    def run_id(self) -> str:
        assert self.logger.run_id is not None
        return self.logger.run_id

    def log_artifact(self, path: Any, artifact_path: str | None = None) -> None:
        self.logger.log_artifact(path, artifact_path)


_active: Parent | None = None  # the sweep this process is running
_previous_handlers: dict[int, Any] = {}  # the SIGTERM / SIGHUP handlers before the sweep started


def current() -> Parent | None:
    """The parent of the sweep this process runs (None outside a sweep, or with tracking=none)."""
    return _active


def start(cfg: DictConfig) -> Parent | None:
    """Create the sweep's parent run (or, for a resumed study, mark its existing one RUNNING again).
    Called once in the sweeping process, before any job starts. A signal meanwhile is held until
    the parent exists, then stops the sweep (which ends the parent KILLED)."""
    if "uri" not in cfg.tracking:  # tracking=none
        return None
    _stop_on_sigterm()  # first: stop_requests puts these back when it ends, so no moment lacks a handler
    try:
        with ckpt.stop_requests() as signals, ckpt.shielded():
            _start(cfg)
    except BaseException:
        _restore_sigterm()
        raise
    if signals:
        raise SweepStopped(signals[0])
    return _active


def _start(cfg: DictConfig) -> None:
    global _active
    hc = cfg.hydra
    spec, key = sweep_spec(hc), sweep_key(hc)
    objective, ways = ",".join(objective_names(cfg.objective)), directions(cfg.objective, hc)
    t = cfg.tracking
    logger = MlflowLogger(t.uri, t.experiment, t.artifact_location, run_name=None, heartbeat_s=t.heartbeat_s,
                          stale_after_s=t.stale_after_s)
    experiment_id = logger.prepare()  # the store and experiment exist before parallel jobs race to create them
    reused = find(logger, key) if is_study(hc) else None  # a new sweep folder is a new sweep
    if reused is not None:
        logger.attach(reused.info.run_id)
        sweep_id = reused.data.tags["sweep_id"]
        log.info("sweep %s: continuing parent run %s", sweep_id, reused.info.run_id)
    else:
        sweep_id = uuid.uuid4().hex[:8]
        preset = spec.fixed.get("sweep")
        what = preset if preset else "×".join(spec.short.values())
        name = f"sweep {what} {sweep_id}"  # two sweeps of one grid: told apart in the runs table
        params = {**{f"sweep.{k}": v for k, v in spec.swept.items()},
                  **{f"fixed.{k}": v for k, v in spec.fixed.items()},
                  **{f"sweeper.{k}": v for k, v in flatten(hc.sweeper).items() if k != "params"},
                  **{f"launcher.{k}": v for k, v in flatten(hc.launcher).items()},
                  "objective": objective}
        tags = {**git_tags(), "run_type": "sweep", "sweep_id": sweep_id, "sweep_key": key,
                "sweep_dir": os.path.abspath(str(hc.sweep.dir)), "swept": ",".join(spec.swept),
                "objective": objective, "direction": ",".join(ways),
                "sweeper": str(hc.sweeper._target_), "launcher": str(hc.launcher._target_),
                "hydra_overrides": " ".join(hc.overrides.task)}
        logger.start(name, params, tags)
        winner = _one_parent(logger, key) if is_study(hc) else logger.run_id
        if winner != logger.run_id:  # another sweeper of the study created its parent at the same instant
            logger.discard()
            logger.attach(winner)
            sweep_id = logger.client.get_run(winner).data.tags["sweep_id"]
            log.info("sweep %s: another sweeper of the study created parent run %s at the same time; "
                     "continuing it", sweep_id, winner)
        else:
            log.info("sweep %s: parent run %s (%s)", sweep_id, logger.run_id, name)
            # the UI's runs table shows no params until columns are picked: save the sweep's own view
            # (its runs, objective and swept params as columns, parallel coordinates) on the experiment
            params_swept = [k for k in spec.swept if k not in hc.runtime.choices]  # group choices are tags
            logger.set_experiment_tag(*sweep_view_tag(sweep_id, name, params_swept,
                                                      created_ms=int(time.time() * 1000),
                                                      lower_is_better=ways[0] == "minimize",
                                                      objectives=objective_names(cfg.objective)))
    _active = Parent(logger, sweep_id, spec, objective, experiment_id)


CLAIM = "parent_claim"  # a param of a new study's parent: won | lost (MLflow never changes a param)
CLAIM_WAIT_S = 60.0  # how long a sweeper waits for another's parent to be settled


def _one_parent(logger: MlflowLogger, key: str) -> str:
    """The id of the one parent of a new study whose sweepers may each have just created one (this
    process's is `logger.run_id`). Every store gives first-writer-wins params, and of two sweepers
    that created a parent each, at least one sees the other's: the one that sees a smaller run id
    gives way, the smallest marks the others `lost` and itself `won`. No two win (to win, each parent
    seen must be `lost`), and the smallest, or one that won before it, always does."""
    deadline = time.monotonic() + CLAIM_WAIT_S
    while (winner := _settle(logger, key)) is None:
        if time.monotonic() > deadline:
            raise UserError(f"another sweeper of this study is creating its parent run in {logger.uri} and has "
                            f"not finished within {CLAIM_WAIT_S:.0f} s; run the command again")
        time.sleep(0.5)
    return winner


def _settle(logger: MlflowLogger, key: str) -> str | None:
    """One round of `_one_parent`: the winner, or None while it is not known."""
    mine = logger.run_id
    assert mine is not None
    runs = {r.info.run_id: r.data.params.get(CLAIM) for r in
            logger.search(f"tags.sweep_key = '{key}' and tags.run_type = 'sweep'")}
    won = [r for r, claim in runs.items() if claim == "won"]
    if won:
        return won[0]
    if any(r < mine for r in runs):  # a smaller one decides
        logger.claim(CLAIM, "lost", mine)
        return None
    for r in sorted(runs):
        if r != mine and not logger.claim(CLAIM, "lost", r):  # it won meanwhile
            return r
    return mine if logger.claim(CLAIM, "won", mine) else None


def find(logger: MlflowLogger, key: str) -> Any:
    """The newest parent run with this sweep key, or None."""
    runs = logger.search(f"tags.sweep_key = '{key}' and tags.run_type = 'sweep'",
                         order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


class SweepStopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP reached the sweeping process between trials (SIGINT arrives as
    KeyboardInterrupt), or any of them while the sweep was being ended: then `ended` is the status
    its parent `sweep_id` ended with, summary written."""

    def __init__(self, signum: int, ended: str | None = None, sweep_id: str | None = None) -> None:
        self.signum, self.ended, self.sweep_id = signum, ended, sweep_id
        super().__init__(signal.Signals(signum).name)


def _stop_on_sigterm() -> None:
    """SIGTERM (a scheduler, `kill`) or SIGHUP (a closed terminal) would end the process without a
    word; make them an interrupt so the parent is marked KILLED. A training trial in this process
    installs its own handlers meanwhile."""
    if threading.current_thread() is threading.main_thread():
        def handler(signum: int, frame: Any) -> None:
            raise SweepStopped(signum)

        for s in (signal.SIGTERM, signal.SIGHUP):
            _previous_handlers[s] = signal.signal(s, handler)


def _restore_sigterm() -> None:
    if threading.current_thread() is threading.main_thread():
        for s, h in _previous_handlers.items():
            signal.signal(s, h)
    _previous_handlers.clear()


def hand_over(why: str) -> None:
    """Several sweepers share one study: this process leaves the parent run (RUNNING, no summary) to
    the sweeper that ends the study."""
    if _active is not None:
        _active.handed_over = why


def claim_end(key: str, owner: str) -> bool:
    """Whether this sweeper of a shared study ends the parent: the first to claim `key` (one per end
    of the study), so that two sweepers ending at once write the summary once."""
    return _active is None or _active.logger.claim(key, owner)


def trial_runs(numbers: list[int]) -> list[str]:
    """The run ids of these trials (Hydra job numbers) of the active sweep, by their `trial` tag."""
    if _active is None or not numbers:
        return []
    return [r.info.run_id for n in numbers for r in _active.logger.search(
        f"tags.`mlflow.parentRunId` = '{_active.run_id}' and tags.trial = '{n}'", experiment_id=_active.experiment_id)]


def _left_to_another(parent: Parent) -> bool:
    if parent.handed_over is None:
        return False
    log.info("sweep %s: %s; the parent run %s stays RUNNING until the study ends", parent.sweep_id,
             parent.handed_over, parent.run_id)
    return True


def finish(status: str | None = None, reason: str | None = None) -> None:
    """End the active sweep: write its summary and end the parent run — FINISHED when the sweep
    completed (FAILED when every trial failed), or `status` (KILLED on an interrupt). Trials still
    RUNNING when a sweep is killed (parallel workers that died with it) are marked KILLED.

    No signal interrupts this: each is recorded, and once the parent has ended, one received while a
    completed sweep was ended stops the process (SweepStopped, exit 128 + signal); an interrupted or
    failed sweep is on its way out already."""
    global _active
    parent, _active = _active, None
    if status is not None:  # stopped or failed: no SLURM job of this sweep may train on for nobody
        from hydra_plugins.lesson7_optuna_sweeper.slurm import cancel_jobs_in_flight

        with ckpt.stop_requests(), ckpt.shielded():
            cancel_jobs_in_flight()
    if parent is None:
        return
    with ckpt.stop_requests() as signals, ckpt.shielded():
        ended = _finish(parent, status, reason)
    _restore_sigterm()
    if signals and status is None:
        raise SweepStopped(signals[0], ended, parent.sweep_id)


def _finish(parent: Parent, status: str | None, reason: str | None) -> str:
    """finish(), unshielded; the status the parent ended with ("" when another sweeper ends it)."""
    if _left_to_another(parent):
        return ""
    from lesson7_sweeps.sweeps.summary import write_summary  # matplotlib/pandas: only when needed

    def fail(e: Exception) -> bool:  # the store failed (a full disk, a server gone): say so once, at the end
        log.error("sweep %s: could not end its runs: %s: %s", parent.sweep_id, type(e).__name__,
                  (str(e).splitlines() or [""])[0])
        return False

    # a server that failed would make each further request wait out MLflow's retries: stop at its first
    # error; a local store's error is one request's (a run a job ends at the same moment), so go on
    remote = parent.logger.remote
    ended = True
    if status not in (None, "FINISHED"):  # first, so that the summary counts them as they ended
        try:
            trials = _running_trials(parent)
        except Exception as e:
            trials, ended = [], fail(e)
        for run in trials:
            try:
                parent.logger.end_run(run.info.run_id, status, f"the sweep ended {status}")
            except Exception as e:
                ended = fail(e)
                if remote:
                    break
    try:
        summary = write_summary(parent)
    except Exception as e:  # a summary must never keep the parent RUNNING
        log.error("sweep %s: could not write the summary: %s", parent.sweep_id, e)
        summary = None
    if status is None:
        status = "FAILED" if summary is not None and summary.n_trials and not summary.n_ended_well else "FINISHED"
        reason = "every trial failed" if status == "FAILED" else None
        if summary is not None and status == "FAILED":  # the command fails too (Hydra itself would exit 0)
            _fail_command(UserError(f"every one of the {summary.n_trials} trials of sweep {parent.sweep_id} failed; "
                                    f"see their runs' failure_reason tag (lesson7-compare {parent.run_id})"))
    closed = False
    if ended or not remote:  # not once a server failed (as before)
        try:
            closed = parent.logger.close(status, reason)
        except Exception as e:
            fail(e)
    if not (ended and closed):
        _left_running(parent, closed)
    if summary is not None:
        summary.print()
    url = sweep_view_url(parent.logger.uri, parent.experiment_id, parent.sweep_id)
    print(f"compare it in the MLflow UI: {url}" if url else
          f"compare it in the MLflow UI: mlflow ui --backend-store-uri {parent.logger.uri}, experiment "
          f"'{parent.logger.experiment}', Views menu, the view ending in {parent.sweep_id}")
    return status


def _running_trials(parent: Parent) -> list[Any]:
    return parent.logger.search(f"tags.`mlflow.parentRunId` = '{parent.run_id}' and attributes.status = 'RUNNING'")


_unended: UserError | None = None  # why the sweep's command fails once Hydra returns: its runs left RUNNING, ...


def _fail_command(error: UserError) -> None:
    global _unended
    _unended = _unended or error


def _left_running(parent: Parent, closed: bool = False) -> None:
    global _unended
    mine = [] if closed else [parent.run_id]
    try:
        left = [*mine, *(r.info.run_id for r in _running_trials(parent))]
    except Exception:  # the store cannot even be read now
        left = mine
    if not left:  # every run ended after all (a trial's job ended it itself)
        return
    uri = parent.logger.uri
    # --force: this process owned these runs and has stopped; their heartbeats are only recent
    _unended = UserError(f"the MLflow store {uri} failed, so sweep {parent.sweep_id} left {len(left)} run(s) RUNNING "
                         f"(its parent and the trials it could not end); once the store works again, end them with: "
                         f"lesson7-train --mark-failed {' '.join(left)} --tracking-uri {uri} --force")


def pop_unended() -> UserError | None:
    """The one-line error of raise_unended, taken (for a sweep that was interrupted)."""
    global _unended
    error, _unended = _unended, None
    return error


def raise_unended() -> None:
    """After the sweep: the one-line error if its store would not let it end its runs, or every trial failed."""
    error = pop_unended()
    if error is not None:
        raise error


# --- a trial -----------------------------------------------------------------------------------


PRUNED_MARK = " ✂"  # ends a pruned trial's run name: the runs table tells it from a finished one


def mark_pruned(logger: MlflowLogger) -> None:
    """A trial the pruner stopped: tag trial_state=PRUNED (a column of the sweep's view) and mark its name."""
    (run,) = logger.search(f"attributes.run_id = '{logger.run_id}'", all_experiments=True)
    name = run.info.run_name or ""
    logger.set_tags({"trial_state": "PRUNED",
                     **({} if name.endswith(PRUNED_MARK) else {"mlflow.runName": name + PRUNED_MARK})})


def trial_identity(cfg: DictConfig, logger: Logger) -> tuple[str | None, dict[str, str]]:
    """A multirun job's run name (`#3 bptt=16 n_hidden=128`: only what the sweep varies) and its
    tags (mlflow.parentRunId, sweep_id, trial); (None, {}) for a single run or without MLflow."""
    if not is_multirun() or not isinstance(logger, MlflowLogger):
        return None, {}
    hc = HydraConfig.get()
    num = hc.job.num
    parent = find(logger, sweep_key(hc))
    if parent is None:  # launched without the callback (e.g. another config): still a readable name
        log.warning("no parent run for this sweep in %s; the trial is logged on its own", logger.uri)
        return f"#{num}", {"trial": str(num)}
    swept = [k for k in parent.data.tags.get("swept", "").split(",") if k]
    choices = hc.runtime.choices
    values = {k: choices[k] if k in choices else OmegaConf.select(cfg, k) for k in swept}
    name = " ".join([f"#{num}", *(f"{s}={format_value(values[k])}" for k, s in short_names(swept).items())])
    return name, {"mlflow.parentRunId": parent.info.run_id, "sweep_id": parent.data.tags["sweep_id"],
                  "trial": str(num)}
