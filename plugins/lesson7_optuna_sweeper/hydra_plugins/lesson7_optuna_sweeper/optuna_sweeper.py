"""`hydra/sweeper=optuna`: an ask/tell Optuna sweeper with pruning, failure handling and resume.

    python my_app.py -m hydra/sweeper=optuna hydra/launcher=joblib hydra.sweeper.n_jobs=2 \\
        'bptt=choice(8,16,32)' 'n_hidden=range(64,513,step=64)' 'lr=tag(log,interval(1e-4,1e-2))'

No batch barrier: `n_jobs` threads each launch one trial at a time through Hydra's launcher, so a
slot frees the moment its trial ends and the sampler's next suggestion starts there. Trial N of the
study runs as Hydra job N (`initial_job_idx`), so job numbers are unique across resumes and across
several sweeping processes sharing one study. Ask and tell stay on the main thread.

Several sweepers may share one study (on several machines). Each owns the trials it launched, by an
id of its own (`_Owner`), and ends nothing else: another's trials are failed only when that sweeper
is dead (its lock here, or Optuna's heartbeat elsewhere). A sweeper ends when the study is complete,
waiting for the others' running trials (whose retries may fall to it), and the last one ends the
study (optimization_results.yaml). Optuna's state of a trial is the truth: an app's sweep callback
(callback.OptunaSweepCallback, e.g. an experiment tracker's) hears of what it must make agree.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import re
import socket
import sys
import tempfile
import threading
import time
import uuid
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.lesson7_optuna_sweeper import search_space
from hydra_plugins.lesson7_optuna_sweeper._callback import OptunaSweepCallback
from hydra_plugins.lesson7_optuna_sweeper._errors import SweeperError
from hydra_plugins.lesson7_optuna_sweeper.slurm import (
    JobLost,
    cancel_job,
    cancel_jobs_in_flight,
    cancelled,
    end_cancelled_sweep,
    launch_trial,
    with_cancelled_together,
)
from hydra_plugins.lesson7_optuna_sweeper.study import (
    build_pruner,
    check_settings,
    directions,
    exhaustive,
    sampler_config,
    storage_url,
    study_name,
)
from hydra_plugins.lesson7_optuna_sweeper.trial import PRUNED_AT, SLURM_JOB

if TYPE_CHECKING:  # optuna is imported when a sweep starts: Hydra imports this module on every run
    import optuna
    from optuna.trial import TrialState

log = logging.getLogger(__name__)
OWNER = "owner"  # trial user attr: the id of the sweeping process that launched it (_Owner)
OWNER_HOST = "owner_host"  # trial user attr: its host, for people reading the study
STOPPED = "stopped"  # trial user attr: the user stopped the sweep while it ran (its retry continues it)
OWNER_ID = re.compile(r"[0-9a-f]{32}")


class OptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.settings = OmegaConf.create(settings)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)
        # the app's sweep callbacks (hydra.callbacks) that follow the study
        self.hooks = [c for c in hydra_context.callbacks.callbacks if isinstance(c, OptunaSweepCallback)]

    # ---- the sweep -------------------------------------------------------------------------------

    def sweep(self, arguments: list[str]) -> list[JobReturn]:
        try:
            try:
                return self._sweep(arguments)
            except _storage_errors() as e:
                raise SweeperError(self._outage(e)) from None
        except SweeperError as e:  # Hydra would print a traceback and exit 1: one line and exit 2, as argparse does
            print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    def _sweep(self, arguments: list[str]) -> list[JobReturn]:
        from optuna.exceptions import ExperimentalWarning
        from optuna.trial import TrialState

        # heartbeats are ours (not optimize()'s), and fail_stale_trials is stable in practice since v2.9
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")
        warnings.filterwarnings("ignore", category=ExperimentalWarning)
        s = self.settings
        space, fixed = search_space.parse(s.params, arguments)
        self._check(space)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        default = next((d for d in (h.default_direction(self.config) for h in self.hooks) if d), None)
        url = storage_url(s, str(sweep_dir))
        study = self._open_study(space, fixed, directions(s, default), url)
        n_trials = min(s.n_trials, math.prod(map(len, search_space.grid(space).values()))) \
            if exhaustive(sampler_config(s)) else s.n_trials
        owner = _Owner()
        _fail_dead(study, owner.id)  # a sweeper of this study that died: its trials, before counting
        self._agree(study)
        complete_before = _count(study) >= n_trials and not _running(study)  # a re-run of an ended study
        if complete_before:  # says why nothing runs (the summary is written again)
            print(f"{os.path.basename(sys.argv[0])}: study {study.study_name} in {_shown(url)} already has "
                  f"{_count(study)} of n_trials={n_trials} trials done: nothing to run (raise hydra.sweeper.n_trials, "
                  f"or start another study with a new hydra.sweep.dir or hydra.sweeper.study_name)", file=sys.stderr)
        log.info("Optuna study %s (%s): %d of %d trials done; %d at once", study.study_name,
                 ", ".join(d.name.lower() for d in study.directions), _count(study), n_trials, s.n_jobs)

        pool = ThreadPoolExecutor(s.n_jobs, thread_name_prefix="trial") if s.n_jobs > 1 else None
        running: dict[Future, optuna.Trial] = {}
        returns: list[JobReturn] = []
        n_failed, stop, left, n_cancelled = 0, False, False, 0
        beat = _Heartbeat(study, s.heartbeat_interval)
        try:
            while True:
                _fail_dead(study, owner.id)  # another sweeper of this study may have died
                while not stop and len(running) < s.n_jobs and _count(study) < n_trials:
                    trial = self._ask(study, space, owner, beat)
                    overrides = search_space.job_overrides(s.params, arguments, fixed, trial.params)
                    running[self._start(pool, overrides, trial.number)] = trial
                if not running:
                    if stop or not _running(study):
                        break
                    # other sweepers' trials: wait, as their retries may fall to us (a dead sweeper's)
                    time.sleep(s.heartbeat_interval)
                    continue
                done, _ = wait(running, timeout=s.heartbeat_interval, return_when=FIRST_COMPLETED)
                done = with_cancelled_together(done, running)
                every_cancelled = len(done) == len(running) > 1 and all(cancelled(f) for f in done)
                for fut in done:
                    trial = running.pop(fut)
                    try:
                        ret = fut.result()
                    except BrokenProcessPool as e:  # the launcher's worker died (SIGKILL, OOM): not the sweep
                        self._lost(study, trial, e)
                    else:
                        returns.append(ret)
                        n_failed += self._tell(study, trial, ret) == TrialState.FAIL
                    beat.remove(trial)  # once told: until then it is ours to fail on the way out
                if not stop and every_cancelled:  # scancel of every job in flight (2+): the user stopped the sweep
                    stop, n_cancelled = True, len(done)
                if not stop and n_failed > s.max_failure_rate * n_trials:
                    stop = True
                    log.error("%d trials failed: more than hydra.sweeper.max_failure_rate=%s of %d; waiting for "
                              "the %d running trials, then stopping", n_failed, s.max_failure_rate, n_trials,
                              len(running))
        except BaseException as e:  # Ctrl-C, a launcher or storage error: no trial of ours stays RUNNING
            cancel_jobs_in_flight()  # first: their trials end their runs KILLED before we fail the trials
            left = self._abandon(study, list(beat.trials.values()), stopped=isinstance(e, KeyboardInterrupt))
            try:
                if not left and _running(study):
                    self._hand_over(f"other sweepers of study {study.study_name} still run trials")
            except _storage_errors():  # the database is away: nobody else can end the study either
                pass
            raise
        finally:
            beat.stop()
            owner.release(keep=left)
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        # the study is ended once, by the last sweeper of the study (the claim settles a tie)
        key = f"ended_by.trials_{len(study.trials)}"
        if stop and _running(study):
            self._hand_over(f"other sweepers of study {study.study_name} still run trials")
        elif complete_before or all([h.claim_study_end(key, owner.id) for h in self.hooks]):
            self._report(study, sweep_dir)
        else:
            self._hand_over(f"another sweeper of study {study.study_name} ends it")
        if n_cancelled:
            error = end_cancelled_sweep(n_cancelled)
            for h in self.hooks:
                h.on_sweep_cancelled(str(error))
            raise error
        if stop:
            raise SweeperError(f"the sweep stopped: {n_failed} trials failed, more than hydra.sweeper.max_failure_rate="
                               f"{s.max_failure_rate} of n_trials={n_trials}; see each failed trial's log")
        return [returns]  # one batch, as Hydra's sweepers return them (no batch barrier here)

    def _hand_over(self, why: str) -> None:
        for h in self.hooks:
            h.on_hand_over(why)

    def _ask(self, study: optuna.Study, space: dict[str, Any], owner: _Owner, beat: _Heartbeat) -> optuna.Trial:
        """A new trial of ours, owned and beating before its parameters are drawn: a study record the
        space does not fit (tampered, foreign) fails it at once, in one line, instead of leaving it RUNNING."""
        from optuna.trial import TrialState

        trial = study.ask()  # study.ask(space) would lose the new trial's id if a parameter is refused
        trial.set_user_attr(OWNER, owner.id)
        trial.set_user_attr(OWNER_HOST, socket.gethostname())
        # a retry's copy of a failed trial's attrs is not its own (its run, its SLURM job); a stopped
        # trial's retry keeps what on_trial_stopped handed it (e.g. the work to continue)
        stopped = trial.user_attrs.get(STOPPED)
        for key in [k for k in trial.user_attrs if k not in (OWNER, OWNER_HOST)]:
            if not stopped or key in (STOPPED, SLURM_JOB):
                trial.set_user_attr(key, None)
        beat.add(trial)  # first: an in-process trial interrupted at its start is ours to fail
        try:
            for name, distribution in space.items():
                trial._suggest(name, distribution)  # what study.ask(space) does
        except ValueError as e:
            beat.remove(trial)
            study.tell(trial, state=TrialState.FAIL)
            raise SweeperError(f"study {study.study_name} holds a trial record this sweep's search space does not "
                               f"fit ({e}): a tampered or foreign record; start a new study with "
                               f"hydra.sweeper.study_name=NEW") from None
        if self.settings.custom_search_space is not None:
            self._custom(trial, beat, study)
        return trial

    def _custom(self, trial: optuna.Trial, beat: _Heartbeat, study: optuna.Study) -> None:
        """hydra.sweeper.custom_search_space: `f(cfg, trial)` suggests more parameters (named as overrides)."""
        from hydra.utils import get_method
        from optuna.trial import TrialState

        path = str(self.settings.custom_search_space)
        try:
            get_method(path)(self.config, trial)
        except Exception as e:
            beat.remove(trial)
            study.tell(trial, state=TrialState.FAIL)
            raise SweeperError(f"hydra.sweeper.custom_search_space={path} failed: {type(e).__name__}: "
                               f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None

    def _outage(self, e: BaseException) -> str:
        """One line for a storage that went away: what failed, and that the study resumes."""
        url = storage_url(self.settings, str(self.config.hydra.sweep.dir))
        cause = e.__cause__ or e.__context__ or e
        why = str(getattr(cause, "orig", cause)).strip().splitlines()[0]
        return (f"the Optuna storage {_shown(url)} failed ({why}): "
                f"the study keeps every trial it was told; once the database is back, run the same command "
                f"to resume it")

    def _check(self, space: dict[str, Any]) -> None:
        check_settings(self.settings, self.config.hydra.launcher, space)

    def _start(self, pool: ThreadPoolExecutor | None, overrides: list[str], job_num: int) -> Future:
        """Launch one trial as Hydra job `job_num`: on a worker thread, or here when one at a time
        (the basic launcher runs the job in this process, where it must own the main thread)."""
        def launch() -> JobReturn:
            return launch_trial(self.launcher, overrides, job_num)

        if pool is not None:
            return pool.submit(launch)
        fut: Future = Future()
        fut.set_result(launch())
        return fut

    def _tell(self, study: optuna.Study, trial: optuna.Trial, ret: JobReturn) -> TrialState:
        """COMPLETE with the job's value(s), PRUNED when the job stopped on the pruner's word, FAIL
        when it raised or returned no finite number (a task may return +inf for a failed trial)."""
        import optuna
        from optuna.trial import TrialState

        values = None
        if ret.status != JobStatus.COMPLETED and isinstance(ret._return_value, optuna.TrialPruned):
            state = TrialState.PRUNED
        elif ret.status != JobStatus.COMPLETED:
            e = ret._return_value
            # a lost SLURM job's reason is a sentence; an exception of the task's is named
            log.error("trial %d failed: %s", trial.number, e if isinstance(e, JobLost) else f"{type(e).__name__}: {e}")
            state = TrialState.FAIL
        elif study._storage.get_trial_user_attrs(trial._trial_id).get(PRUNED_AT) is not None:  # the job's: not cached
            state = TrialState.PRUNED
        else:
            values = _values(ret.return_value, len(study.directions))
            state = TrialState.FAIL if values is None else TrialState.COMPLETE
            if values is None:
                log.error("trial %d failed: it returned %.200r, not %s", trial.number, ret.return_value,
                          "a finite number" if len(study.directions) == 1 else
                          f"{len(study.directions)} finite numbers (one per direction)")
        told = study.tell(trial, values, state=state, skip_if_finished=True)
        if told.state != state:  # another sweeper ended it (its heartbeat looked stale): that stands
            log.warning("trial %d was already ended %s by another sweeper; its result is dropped", trial.number,
                        told.state.name)
            self._agree(study, [told])
        return told.state

    def _lost(self, study: optuna.Study, trial: optuna.Trial, e: BaseException) -> None:
        """A trial whose launcher worker died (a killed joblib worker; loky then ends every worker of
        its pool, so a trial running beside it is lost too): FAIL and retried once, as a dead
        sweeper's; not counted against max_failure_rate."""
        from optuna.trial import TrialState

        told = study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        if told.state == TrialState.FAIL:
            self._dead(study, told, f"its worker process died ({type(e).__name__})")

    def _abandon(self, study: optuna.Study, trials: list[optuna.Trial], stopped: bool = False) -> bool:
        """Fail our running trials on the way out (`stopped` by the user: each is run again, `requeue`);
        whether some are left RUNNING (a storage that is down), for the next sweeper of the study to
        fail when it finds our lock free."""
        from optuna.trial import TrialState

        for trial in trials:
            try:
                if stopped:
                    requeue(study, trial, self.hooks)
                else:
                    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            except _storage_errors():
                return True
        return False

    # ---- the study -------------------------------------------------------------------------------

    def _open_study(self, space: dict[str, Any], fixed: list[str], direction: list[str], url: str) -> optuna.Study:
        """Create the study, or load it (resume) if its stored config hash matches this sweep's.
        Trials left RUNNING by a dead sweeper are failed (and retried once)."""
        import optuna

        s = self.settings
        name, digest = study_name(s), search_space.config_hash(space, fixed)
        storage = optuna.storages.RDBStorage(
            url, heartbeat_interval=s.heartbeat_interval, grace_period=2 * s.heartbeat_interval,
            heartbeat_stale_trial_callback=self._dead)
        sampler = self._sampler(space)
        try:
            stored = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            stored = None
        if stored is not None and stored.user_attrs.get("config_hash") != digest:
            if not s.new_study:
                raise SweeperError(
                    f"study {name} in {_shown(url)} has another search space or fixed overrides (config hash "
                    f"{stored.user_attrs.get('config_hash')} != {digest}): run the same command to resume it, "
                    f"or start a new study with hydra.sweeper.study_name=NEW or hydra.sweeper.new_study=true")
            log.warning("hydra.sweeper.new_study=true: deleting study %s (%d trials) in %s", name,
                        len(stored.trials), url)
            optuna.delete_study(study_name=name, storage=storage)
            stored = None
        stored_directions = [d.name.lower() for d in stored.directions] if stored is not None else direction
        if stored_directions != direction:
            raise SweeperError(f"study {name} has direction {stored_directions}, this sweep {direction}: set "
                               f"hydra.sweeper.direction to match, or use another study_name")
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=build_pruner(s),
                                    directions=direction, load_if_exists=True)
        study.set_user_attr("config_hash", digest)
        study.set_user_attr("search_space", {k: str(d) for k, d in space.items()})
        study.set_user_attr("fixed_overrides", fixed)
        return study

    def _dead(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, why: str = "its sweeper died") -> None:
        """A trial whose process died (now FAIL in Optuna): the callbacks hear of it; retried once."""
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        cancel_job(trial.user_attrs.get(SLURM_JOB))  # its job would train on for nobody
        self._agree(study, [trial], why)
        RetryHeartbeatStaleTrialCallback(max_retry=1)(study, trial)
        log.warning("trial %d: %s; FAIL, to be retried once", trial.number, why)

    def _agree(self, study: optuna.Study, trials: list[optuna.trial.FrozenTrial] | None = None,
               why: str = "FAIL in the Optuna study (its result was never told)") -> None:
        """Optuna's state of a trial is the truth: the callbacks hear of FAIL trials (all, or those
        of `trials`), whose records elsewhere may say RUNNING or FINISHED (their sweeper died or lost
        the database before telling)."""
        from optuna.trial import TrialState

        if trials is None:
            trials = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        failed = [t for t in trials if t.state == TrialState.FAIL]
        if failed:
            for h in self.hooks:
                h.on_trials_failed(study, failed, why)

    def _sampler(self, space: dict[str, Any]) -> optuna.samplers.BaseSampler:
        """The sampler of hydra/sweeper/sampler=NAME (or the shorthand); grid and brute force are
        told not to stop the study (Study.stop() is for optimize()): the sweep stops at their size."""
        from hydra.errors import InstantiationException
        from hydra.utils import instantiate

        conf = sampler_config(self.settings)
        try:
            return _exhaustive(conf, space) if exhaustive(conf) else instantiate(conf)
        except (TypeError, ValueError, InstantiationException) as e:  # a wrong argument: several lines from Hydra
            cause = e.__cause__ or e
            raise SweeperError(f"hydra.sweeper.sampler ({conf._target_}): {str(cause).strip().splitlines()[-1]}; "
                               f"see the sampler's arguments in Optuna's documentation") from None

    def _report(self, study: optuna.Study, sweep_dir: Path) -> None:
        """The best trial (or the Pareto front) in optimization_results.yaml, as the published plugin
        writes it; then the callbacks' own report."""
        from optuna.trial import TrialState

        if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if len(study.directions) == 1:
                best = study.best_trial
                results = {"name": "optuna", "best_params": best.params, "best_value": best.value}
                log.info("best trial %d: value %s, params %s", best.number, best.value, best.params)
            else:
                results = {"name": "optuna", "solutions": [{"params": t.params, "values": t.values}
                                                           for t in study.best_trials]}
                log.info("%d trials on the Pareto front: %s", len(study.best_trials),
                         ", ".join(str(t.number) for t in study.best_trials))
            OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")
        for h in self.hooks:
            h.on_study_end(study, sweep_dir)


def _values(value: Any, n: int) -> list[float] | None:
    """A job's return value as n finite floats: a number (numpy's too, or a 0-d array) for one
    direction, a sequence of n numbers for several; None if it is not."""
    import numpy as np  # Optuna's dependency

    if isinstance(value, (str, bytes, bool)):
        return None
    try:
        array = np.asarray(value, dtype=float)
    except Exception:  # not numbers
        return None
    if array.shape != (() if n == 1 else (n,)) or not np.isfinite(array).all():
        return None
    return [float(v) for v in array.reshape(-1)]


def _shown(url: str) -> str:
    """A storage URL without its password."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _exhaustive(conf: DictConfig, space: dict[str, Any]) -> Any:
    """Optuna's grid or brute-force sampler, without its Study.stop() when the space is done (for
    optimize() only, an error here): the sweep stops at the space's size."""
    import optuna

    grid = conf._target_.endswith("GridSampler")
    base = optuna.samplers.GridSampler if grid else optuna.samplers.BruteForceSampler

    class Exhaustive(base):  # type: ignore[misc, valid-type]
        def after_trial(self, *args: Any) -> None:
            pass

    args = {k: v for k, v in conf.items() if k not in ("_target_", "_partial_")}
    return Exhaustive(search_space.grid(space), **args) if grid else Exhaustive(**args)


def requeue(study: optuna.Study, trial: optuna.Trial, hooks: list[OptunaSweepCallback]) -> None:
    """A trial the user stopped (Ctrl-C, SIGTERM to the sweep) has not failed: it is FAIL with a
    WAITING copy (its params, user attrs and reports so far; counted once) that the next run of the
    command asks first. The callbacks hear of it first (on_trial_stopped: e.g. so that the copy's job
    continues the stopped one's work from its checkpoint)."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    for h in hooks:
        h.on_trial_stopped(study, trial)
    trial.set_user_attr(STOPPED, True)
    told = study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    if told.state == TrialState.FAIL:  # (not one another sweeper ended meanwhile)
        RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)(study, told)
        log.warning("trial %d stopped: it runs again when the same command is run again", trial.number)


def _count(study: optuna.Study) -> int:
    """Trials that count towards n_trials: all of them but those still WAITING to run, and a FAIL
    that is retried counts once (its retry, when that has run; each retry replaces the one before)."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    started = [t for t in trials if t.state != TrialState.WAITING]
    return len(started) - sum(RetryHeartbeatStaleTrialCallback.retried_trial_number(t) is not None for t in trials)


def _running(study: optuna.Study) -> bool:
    from optuna.trial import TrialState

    return bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def _storage_errors() -> tuple[type[BaseException], ...]:
    """A database that went away: Optuna wraps some of SQLAlchemy's errors, not all."""
    import sqlalchemy.exc
    from optuna.exceptions import StorageInternalError

    return StorageInternalError, sqlalchemy.exc.SQLAlchemyError


def _fail_dead(study: optuna.Study, me: str) -> None:
    """Fail the RUNNING trials whose sweeper is gone: one of this machine says so at once (its lock
    is free), another machine's through Optuna's heartbeat, two intervals after its last beat. A
    trial that no sweeper ever owned (a crash between ask and owning it) is dead after as long."""
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage = study._storage
    grace = 2 * storage.get_heartbeat_interval()
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    owners = {str(t.user_attrs.get(OWNER, "")) for t in running} - {me}
    dead = {o for o in owners if _Owner.dead_here(o)}
    failed = []
    for t in running:
        owner = str(t.user_attrs.get(OWNER, ""))
        unowned = owner == "" and t.datetime_start is not None and time.time() - t.datetime_start.timestamp() > grace
        if owner in dead or unowned:
            try:
                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            except UpdateFinishedTrialError:  # another sweeper failed it first
                continue
            failed.append(t._trial_id)
    # then their jobs are cancelled (the callback), once every one is FAIL: a cancelled job frees its
    # CPUs, and a queued job of a dead trial still RUNNING here would start on them and train
    for trial_id in failed:
        storage.get_heartbeat_stale_trial_callback()(study, storage.get_trial(trial_id))
    for owner in dead:
        _Owner.forget(owner)
    optuna.storages.fail_stale_trials(study)


class _Owner:
    """This sweeping process's id (unique: two machines may share a host name, a pid is reused),
    with a lock held on a file of that name in this machine's temp folder while the process lives:
    a free lock says at once that the sweeper died. Only a lock file here counts, so a forged or
    another machine's owner is left to the heartbeat."""

    def __init__(self) -> None:
        self.id = uuid.uuid4().hex
        self.path = self.folder() / f"{self.id}.lock"
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    @staticmethod
    def folder() -> Path:
        path = Path(tempfile.gettempdir()) / "optuna-sweepers"
        if not path.is_dir():
            path.mkdir(exist_ok=True)
            path.chmod(0o1777)  # every user's sweepers, as in /tmp
        return path

    @classmethod
    def dead_here(cls, owner: str) -> bool:
        if not OWNER_ID.fullmatch(owner):
            return False
        path = cls.folder() / f"{owner}.lock"
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # another machine's sweeper, or one that ended cleanly
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)
        return True

    @classmethod
    def forget(cls, owner: str) -> None:
        """A dead sweeper whose trials are failed now: its lock file goes."""
        (cls.folder() / f"{owner}.lock").unlink(missing_ok=True)

    def release(self, keep: bool) -> None:
        """Free the lock; `keep` its file when trials of ours are left RUNNING: it says we are gone."""
        if not keep:
            self.forget(self.id)
        os.close(self.fd)


class _Heartbeat:
    """Beats for the running trials of this sweeper, so another sweeper of the same study can tell
    a live trial from one whose sweeper died (Optuna's fail_stale_trials)."""

    def __init__(self, study: optuna.Study, interval: int) -> None:
        self.study, self.interval = study, interval
        self.trials: dict[int, optuna.Trial] = {}  # by trial id: launched and not told yet
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="optuna-heartbeat", daemon=True)
        self.thread.start()

    def add(self, trial: optuna.Trial) -> None:
        self.trials[trial._trial_id] = trial
        self.study._storage.record_heartbeat(trial._trial_id)

    def remove(self, trial: optuna.Trial) -> None:
        self.trials.pop(trial._trial_id)

    def _run(self) -> None:
        while not self.done.wait(self.interval):
            for trial_id in list(self.trials):
                try:
                    self.study._storage.record_heartbeat(trial_id)
                except Exception:  # a database outage: the main thread reports it; a late beat is no harm
                    break

    def stop(self) -> None:
        self.done.set()
