"""`hydra/sweeper=optuna`: an ask/tell Optuna sweeper with pruning, failure handling and resume.

    lesson7-train -m hydra/sweeper=optuna hydra/launcher=joblib hydra.sweeper.n_jobs=2 \\
        'data.bptt=choice(8,16,32)' 'model.n_hidden=range(64,513,step=64)' 'optim.lr=tag(log,interval(1e-4,1e-2))'

No batch barrier: `n_jobs` threads each launch one trial at a time through Hydra's launcher, so a
slot frees the moment its trial ends and the sampler's next suggestion starts there. Trial N of the
study runs as Hydra job N (`initial_job_idx`), so job numbers are unique across resumes and across
several sweeping processes sharing one study. Ask and tell stay on the main thread.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import threading
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from lesson7_sweeps.errors import ConfigError, UserError
from lesson7_sweeps.sweeps.optuna_study import build_pruner, direction, storage_url, study_name
from lesson7_sweeps.sweeps.optuna_trial import PRUNED_AT, RUN_ID, SLURM_JOB
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
IN_PROCESS_LAUNCHERS = ("hydra._internal.core_plugins.basic_launcher.BasicLauncher",)
OWNER = "owner"  # trial user attr: host:pid of the sweeping process that launched it


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
            return self._sweep(arguments)
        except UserError as e:  # Hydra would print a traceback and exit 1: one line and exit 2, as the CLI does
            from lesson7_sweeps.train import PROG

            print(f"{PROG}: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    def _sweep(self, arguments: list[str]) -> list[JobReturn]:
        from optuna.exceptions import ExperimentalWarning
        from optuna.trial import TrialState

        from lesson7_sweeps.sweeps import search_space

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
        log.info("Optuna study %s (%s %s): %d of %d trials done; %d at once", study.study_name,
                 study.direction.name.lower(), objective, _count(study), n_trials, s.n_jobs)

        pool = ThreadPoolExecutor(s.n_jobs, thread_name_prefix="trial") if s.n_jobs > 1 else None
        running: dict[Future, optuna.Trial] = {}
        returns: list[JobReturn] = []
        n_failed, stop, n_cancelled = 0, False, 0
        beat = _Heartbeat(study, s.heartbeat_interval)
        try:
            while True:
                _fail_dead(study)  # another sweeper of this study may have died
                while not stop and len(running) < s.n_jobs and _count(study) < n_trials:
                    trial = study.ask(space)
                    trial.set_user_attr(OWNER, f"{socket.gethostname()}:{os.getpid()}")
                    trial.set_user_attr(RUN_ID, None)  # not a retry's copy of the failed trial's: a run of its own
                    overrides = fixed + [search_space.to_override(k, v) for k, v in trial.params.items()]
                    beat.add(trial)  # first: an in-process trial interrupted at its start is ours to fail
                    running[self._start(pool, overrides, trial.number)] = trial
                if not running:
                    break
                done = with_cancelled_together(wait(running, return_when=FIRST_COMPLETED)[0], running)
                every_cancelled = len(done) == len(running) > 1 and all(cancelled(f.result()) for f in done)
                for fut in done:
                    trial = running.pop(fut)
                    beat.remove(trial)
                    ret = fut.result()
                    returns.append(ret)
                    n_failed += self._tell(study, trial, ret) == TrialState.FAIL
                if not stop and every_cancelled:  # scancel of every job in flight (2+): the user stopped the sweep
                    stop, n_cancelled = True, len(done)
                if not stop and n_failed > s.max_failure_rate * n_trials:
                    stop = True
                    log.error("%d trials failed: more than hydra.sweeper.max_failure_rate=%s of %d; waiting for "
                              "the %d running trials, then stopping", n_failed, s.max_failure_rate, n_trials,
                              len(running))
        except BaseException:  # Ctrl-C or a launcher error: no trial of ours stays RUNNING
            for trial in list(beat.trials.values()):
                study.tell(trial, state=TrialState.FAIL)
            raise
        finally:
            beat.stop()
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._report(study, sweep_dir)
        if n_cancelled:
            raise end_cancelled_sweep(n_cancelled)
        if stop:
            raise UserError(f"the sweep stopped: {n_failed} trials failed, more than hydra.sweeper.max_failure_rate="
                            f"{s.max_failure_rate} of n_trials={n_trials}; see the failed runs' failure_reason tag")
        return returns

    def _check(self, space: dict[str, Any]) -> None:
        s = self.settings
        if not space:
            raise ConfigError("hydra/sweeper=optuna needs a search space: e.g. 'optim.lr=tag(log,interval(1e-4,1e-2))' "
                              "on the command line or hydra.sweeper.params (or a sweep=..._optuna preset)")
        if s.n_trials < 1 or s.n_jobs < 1 or not 0 <= s.max_failure_rate <= 1:
            raise ConfigError(f"hydra.sweeper: n_trials={s.n_trials} and n_jobs={s.n_jobs} must be >= 1 and "
                              f"max_failure_rate={s.max_failure_rate} in [0, 1]")
        launcher = self.config.hydra.launcher
        # in-process jobs share HydraConfig (a process global) and the signal handlers: one at a time
        if s.n_jobs > 1 and (launcher._target_ in IN_PROCESS_LAUNCHERS or launcher.get("n_jobs") == 1):
            raise ConfigError(f"hydra.sweeper.n_jobs={s.n_jobs} needs jobs in other processes: add "
                              f"hydra/launcher=joblib (hydra.launcher.n_jobs > 1), submitit_local or submitit_slurm")

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
        study.tell(trial, value, state=state)
        return state

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

    def _dead(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """A trial whose sweeper died (now FAIL in Optuna): FAILED in MLflow too, and retried once."""
        from optuna.storages import RetryFailedTrialCallback

        from lesson7_sweeps.tracking import fail_orphan_run

        cancel_job(trial.user_attrs.get(SLURM_JOB))  # its job would train on for nobody
        if trial.user_attrs.get(RUN_ID) and "uri" in self.config.tracking:
            fail_orphan_run(self.config.tracking.uri, trial.user_attrs[RUN_ID], "its sweeper died")
        RetryFailedTrialCallback(max_retry=1)(study, trial)
        log.warning("trial %d was left RUNNING by a sweeper that died: FAIL, to be retried", trial.number)

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
        raise ConfigError(f"hydra.sweeper.sampler={s.sampler} is invalid: use tpe, random, grid or gp")

    def _report(self, study: optuna.Study, sweep_dir: Path) -> None:
        """Importances and history plots onto the sweep's parent run, when there is one."""
        from lesson7_sweeps.sweeps.optuna_report import write_report
        from lesson7_sweeps.sweeps.parent import current

        parent = current()
        if parent is not None:
            for path in write_report(study, sweep_dir / "optuna"):
                parent.log_artifact(path, "optuna")


def _count(study: optuna.Study) -> int:
    """Trials that count towards n_trials: all of them, but a FAIL that is retried counts once, and
    only when its retry has started (a retry still WAITING must still be asked for)."""
    from optuna.storages import RetryFailedTrialCallback
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    started = [t for t in trials if t.state != TrialState.WAITING]
    return len(started) - len({RetryFailedTrialCallback.retried_trial_number(t) for t in trials} - {None})


def _fail_dead(study: optuna.Study) -> None:
    """Fail the RUNNING trials whose sweeper is gone: on this host a dead pid says so at once; on
    another host Optuna's heartbeat does, two intervals after the last beat."""
    import optuna
    from optuna.trial import TrialState

    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner_host, _, pid = str(t.user_attrs.get(OWNER, "")).partition(":")
        if owner_host == host and pid.isdigit() and not _alive(int(pid)):
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            study._storage.get_heartbeat_stale_trial_callback()(study, study._storage.get_trial(t._trial_id))
    optuna.storages.fail_stale_trials(study)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
                self.study._storage.record_heartbeat(trial_id)

    def stop(self) -> None:
        self.done.set()
