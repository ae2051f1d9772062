"""`hydra/sweeper=optuna`: an ask/tell Optuna sweeper with pruning, failure handling and resume.

    lesson7-train -m hydra/sweeper=optuna hydra/launcher=joblib hydra.sweeper.n_jobs=2 \\
        'data.bptt=choice(8,16,32)' 'model.n_hidden=range(64,513,step=64)' 'optim.lr=tag(log,interval(1e-4,1e-2))'

No batch barrier: `n_jobs` threads each launch one trial at a time through Hydra's launcher, so a
slot frees the moment its trial ends and the sampler's next suggestion starts there. Trial N of the
study runs as Hydra job N (`initial_job_idx`), so job numbers are unique across resumes and across
several sweeping processes sharing one study. Ask and tell stay on the main thread.

Several sweepers may share one study (on several machines). Each owns the trials it launched, by an
id of its own (`_Owner`), and ends nothing else: another's trials are failed only when that sweeper
is dead (its lock here, or Optuna's heartbeat elsewhere). A sweeper ends when the study is complete,
waiting for the others' running trials (whose retries may fall to it), and the last one writes the
parent's summary. Optuna's state of a trial is the truth; its MLflow run is made to agree.
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

from lesson7_sweeps.errors import ConfigError, UserError
from lesson7_sweeps.sweeps.optuna_study import (
    SAMPLERS,
    build_pruner,
    check_settings,
    direction,
    storage_url,
    study_name,
)
from lesson7_sweeps.sweeps.optuna_trial import CONTINUE_RUN, PRUNED_AT, RUN_ID, SLURM_JOB
from lesson7_sweeps.sweeps.slurm import (
    cancel_job,
    cancelled,
    end_cancelled_sweep,
    launch_trial,
    with_cancelled_together,
)

if TYPE_CHECKING:  # optuna is imported when a sweep starts: Hydra imports this module on every run
    import optuna
    from optuna.trial import TrialState

log = logging.getLogger(__name__)
OWNER = "owner"  # trial user attr: the id of the sweeping process that launched it (_Owner)
OWNER_HOST = "owner_host"  # trial user attr: its host, for people reading the study
OWNER_ID = re.compile(r"[0-9a-f]{32}")


class OptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.settings = OmegaConf.create(settings)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    # ---- the sweep -------------------------------------------------------------------------------

    def sweep(self, arguments: list[str]) -> list[JobReturn]:
        try:
            try:
                return self._sweep(arguments)
            except _storage_errors() as e:
                raise UserError(self._outage(e)) from None
        except UserError as e:  # Hydra would print a traceback and exit 1: one line and exit 2, as the CLI does
            from lesson7_sweeps.train import PROG

            print(f"{PROG}: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    def _sweep(self, arguments: list[str]) -> list[JobReturn]:
        from optuna.exceptions import ExperimentalWarning
        from optuna.trial import TrialState

        from lesson7_sweeps.sweeps import parent, search_space  # parent: torch, only when a sweep starts

        # heartbeats are ours (not optimize()'s), and fail_stale_trials is stable in practice since v2.9
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")
        warnings.filterwarnings("ignore", category=ExperimentalWarning)
        s = self.settings
        space, fixed = search_space.parse(OmegaConf.to_container(s.params), arguments)
        self._check(space)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        objective = self.hydra_context.config_loader.load_sweep_config(self.config, fixed).objective
        study = self._open_study(space, fixed, direction(s, objective), storage_url(s, str(sweep_dir)))
        n_trials = min(s.n_trials, math.prod(map(len, search_space.grid(space).values()))) if s.sampler == "grid" \
            else s.n_trials
        owner = _Owner()
        _fail_dead(study, owner.id)  # a sweeper of this study that died: its trials, before counting
        self._agree(study)
        complete_before = _count(study) >= n_trials and not _running(study)  # a re-run of an ended study
        log.info("Optuna study %s (%s %s): %d of %d trials done; %d at once", study.study_name,
                 study.direction.name.lower(), objective, _count(study), n_trials, s.n_jobs)

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
                    overrides = fixed + [search_space.to_override(k, v) for k, v in trial.params.items()]
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
            left = self._abandon(study, list(beat.trials.values()), stopped=isinstance(e, KeyboardInterrupt))
            try:
                if not left and _running(study):
                    parent.hand_over(f"other sweepers of study {study.study_name} still run trials")
            except _storage_errors():  # the database is away: nobody else can end the study either
                pass
            raise
        finally:
            beat.stop()
            owner.release(keep=left)
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        # the parent is ended once, by the last sweeper of the study (the claim settles a tie)
        if stop and _running(study):
            parent.hand_over(f"other sweepers of study {study.study_name} still run trials")
        elif complete_before or parent.claim_end(f"ended_by.trials_{len(study.trials)}", owner.id):
            self._report(study, sweep_dir)
        else:
            parent.hand_over(f"another sweeper of study {study.study_name} ends it")
        if n_cancelled:
            raise end_cancelled_sweep(n_cancelled)
        if stop:
            raise UserError(f"the sweep stopped: {n_failed} trials failed, more than hydra.sweeper.max_failure_rate="
                            f"{s.max_failure_rate} of n_trials={n_trials}; see the failed runs' failure_reason tag")
        return returns

    def _ask(self, study: optuna.Study, space: dict[str, Any], owner: _Owner, beat: _Heartbeat) -> optuna.Trial:
        """A new trial of ours, owned and beating before its parameters are drawn: a study record the
        space does not fit (tampered, foreign) fails it at once, in one line, instead of leaving it RUNNING."""
        from optuna.trial import TrialState

        trial = study.ask()  # study.ask(space) would lose the new trial's id if a parameter is refused
        trial.set_user_attr(OWNER, owner.id)
        trial.set_user_attr(OWNER_HOST, socket.gethostname())
        trial.set_user_attr(RUN_ID, None)  # not a retry's copy of the failed trial's: a run of its own
        beat.add(trial)  # first: an in-process trial interrupted at its start is ours to fail
        try:
            for name, distribution in space.items():
                trial._suggest(name, distribution)  # what study.ask(space) does
        except ValueError as e:
            beat.remove(trial)
            study.tell(trial, state=TrialState.FAIL)
            raise UserError(f"study {study.study_name} holds a trial record this sweep's search space does not fit "
                            f"({e}): a tampered or foreign record; start a new study with "
                            f"hydra.sweeper.study_name=NEW") from None
        return trial

    def _outage(self, e: BaseException) -> str:
        """One line for a storage that went away: what failed, and that the study resumes."""
        from sqlalchemy.engine import make_url

        url = storage_url(self.settings, str(self.config.hydra.sweep.dir))
        shown = make_url(url).render_as_string(hide_password=True)
        cause = e.__cause__ or e.__context__ or e
        return (f"the Optuna storage {shown} failed ({str(getattr(cause, 'orig', cause)).strip().splitlines()[0]}): "
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
        """COMPLETE with the job's value, PRUNED when the job stopped on the pruner's word, FAIL
        when it raised or returned a non-finite value (the task returns +inf for a failed trial)."""
        from optuna.trial import TrialState

        if ret.status != JobStatus.COMPLETED:
            log.error("trial %d failed: %s", trial.number, ret._return_value)
            state, value = TrialState.FAIL, None
        elif PRUNED_AT in study._storage.get_trial_user_attrs(trial._trial_id):  # set by the job: not cached
            state, value = TrialState.PRUNED, None
        elif isinstance(ret.return_value, (int, float)) and math.isfinite(ret.return_value):
            state, value = TrialState.COMPLETE, float(ret.return_value)
        else:
            state, value = TrialState.FAIL, None
        told = study.tell(trial, value, state=state, skip_if_finished=True)
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
                    requeue(study, trial)
                else:
                    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            except _storage_errors():
                return True
        return False

    # ---- the study -------------------------------------------------------------------------------

    def _open_study(self, space: dict[str, Any], fixed: list[str], direction: str, url: str) -> optuna.Study:
        """Create the study, or load it (resume) if its stored config hash matches this sweep's.
        Trials left RUNNING by a dead sweeper are failed (and retried once)."""
        import optuna

        from lesson7_sweeps.sweeps import search_space

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
                raise ConfigError(
                    f"study {name} in {url} has another search space or fixed overrides (config hash "
                    f"{stored.user_attrs.get('config_hash')} != {digest}): run the same command to resume it, "
                    f"or start a new study with hydra.sweeper.study_name=NEW or hydra.sweeper.new_study=true")
            log.warning("hydra.sweeper.new_study=true: deleting study %s (%d trials) in %s", name,
                        len(stored.trials), url)
            optuna.delete_study(study_name=name, storage=storage)
            stored = None
        if stored is not None and stored.direction.name.lower() != direction:
            raise ConfigError(f"study {name} {stored.direction.name.lower()}s its objective, this sweep would "
                              f"{direction} it: set hydra.sweeper.direction or use another study_name")
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=build_pruner(s),
                                    direction=direction, load_if_exists=True)
        study.set_user_attr("config_hash", digest)
        study.set_user_attr("search_space", {k: str(d) for k, d in space.items()})
        study.set_user_attr("fixed_overrides", fixed)
        return study

    def _dead(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, why: str = "its sweeper died") -> None:
        """A trial whose process died (now FAIL in Optuna): FAILED in MLflow too, and retried once."""
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        cancel_job(trial.user_attrs.get(SLURM_JOB))  # its job would train on for nobody
        self._agree(study, [trial], why)
        RetryHeartbeatStaleTrialCallback(max_retry=1)(study, trial)
        log.warning("trial %d: %s; FAIL, to be retried once", trial.number, why)

    def _agree(self, study: optuna.Study, trials: list[optuna.trial.FrozenTrial] | None = None,
               why: str = "FAIL in the Optuna study (its result was never told)") -> None:
        """Optuna's state of a trial is the truth: the MLflow runs of FAIL trials (all, or `trials`)
        that are RUNNING or FINISHED (their sweeper died or lost the database before telling) end FAILED."""
        from optuna.trial import TrialState

        from lesson7_sweeps.sweeps import parent
        from lesson7_sweeps.tracking import fail_runs

        if trials is None:
            trials = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        failed = [t for t in trials if t.state == TrialState.FAIL]
        run_ids = [t.user_attrs[RUN_ID] for t in failed if t.user_attrs.get(RUN_ID)]
        # a job killed between starting its run and recording it on the trial: found by its tags
        run_ids += parent.trial_runs([t.number for t in failed if not t.user_attrs.get(RUN_ID)])
        if run_ids and "uri" in self.config.tracking:
            fail_runs(self.config.tracking.uri, run_ids, why)

    def _sampler(self, space: dict[str, Any]) -> optuna.samplers.BaseSampler:
        s = self.settings
        import optuna

        from lesson7_sweeps.sweeps import search_space

        if s.sampler == "tpe":
            return optuna.samplers.TPESampler(seed=s.seed)
        if s.sampler == "random":
            return optuna.samplers.RandomSampler(seed=s.seed)
        if s.sampler == "grid":
            class Grid(optuna.samplers.GridSampler):
                def after_trial(self, *args: Any) -> None:
                    pass  # it would call Study.stop(), for optimize() only; the sweep stops at the grid's size

            return Grid(search_space.grid(space), seed=s.seed)
        if s.sampler == "gp":
            return optuna.samplers.GPSampler(seed=s.seed)
        raise ConfigError(f"hydra.sweeper.sampler={s.sampler} is invalid: use {', '.join(SAMPLERS)}")

    def _report(self, study: optuna.Study, sweep_dir: Path) -> None:
        """Importances and history plots onto the sweep's parent run, when there is one."""
        from lesson7_sweeps.sweeps import parent
        from lesson7_sweeps.sweeps.optuna_report import write_report

        run = parent.current()
        if run is not None:
            for path in write_report(study, sweep_dir / "optuna"):
                run.log_artifact(path, "optuna")


def requeue(study: optuna.Study, trial: optuna.Trial) -> None:
    """A trial the user stopped (Ctrl-C, SIGTERM to the sweep) has not failed: it is FAIL with a
    WAITING copy (its params and reports so far; counted once) that the next run of the command asks
    first. The copy carries the trial's run as CONTINUE_RUN (not RUN_ID, which says whose run a FAIL
    trial failed), so that its job continues the run (optuna_trial.run_to_continue)."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    run = study._storage.get_trial_user_attrs(trial._trial_id).get(RUN_ID)  # set by the job: not the cached copy
    if run:
        trial.set_user_attr(CONTINUE_RUN, run)
        trial.set_user_attr(RUN_ID, None)
    told = study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    if told.state == TrialState.FAIL:  # (not one another sweeper ended meanwhile)
        RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)(study, told)
        log.warning("trial %d stopped: it runs again, from its checkpoint, when the same command is run again",
                    trial.number)


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
    for t in running:
        owner = str(t.user_attrs.get(OWNER, ""))
        unowned = owner == "" and t.datetime_start is not None and time.time() - t.datetime_start.timestamp() > grace
        if owner in dead or unowned:
            try:
                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            except UpdateFinishedTrialError:  # another sweeper failed it first
                continue
            storage.get_heartbeat_stale_trial_callback()(study, storage.get_trial(t._trial_id))
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
        path = Path(tempfile.gettempdir()) / "lesson7-sweepers"
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
