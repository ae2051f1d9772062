"""What the Optuna sweeper needs on top of Hydra's submitit launcher to survive SLURM.

Hydra's submitit launcher waits for a job's result file; a job that ends without one (scancel, a
node failure, its time limit hit more often than `max_num_timeout`) makes `launch` raise, which
would end the whole sweep. Here it is that trial's failure, in one line; a scancel of every job in
flight ends the sweep KILLED; and the jobs of a sweeper that died are cancelled by the one that
resumes its study. (Preemption and time limits need nothing here: the job checkpoints on the
signal, SLURM or submitit requeues it, and the task resumes its own run.)
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import Future, wait

from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher

from hydra_plugins.lesson7_optuna_sweeper._errors import JobLost, SweeperError  # noqa: F401 (JobLost: re-exported)

log = logging.getLogger(__name__)
SETTLE_S = 3.0  # after a fresh status poll, the other jobs of one `scancel` end within it (1 s polls)


def launch_trial(launcher: Launcher, overrides: list[str], job_num: int) -> JobReturn:
    """Launch one trial as Hydra job `job_num`; a lost submitit job is a FAILED JobReturn."""
    try:
        if hasattr(launcher, "launch_job"):  # the project's SLURM launcher: one job per trial
            return launcher.launch_job(overrides, job_num)
        return launcher.launch([overrides], initial_job_idx=job_num)[0]
    except Exception as e:
        lost = _lost(e)
        if lost is None:
            raise
        return JobReturn(overrides=overrides, status=JobStatus.FAILED, _return_value=lost)


def _lost(e: Exception) -> JobLost | None:
    from submitit.core.utils import FailedJobError, UncompletedJobError

    text = str(e)
    if isinstance(e, FailedJobError):  # submitit gave up inside the job: its last line says why
        last = [line for line in text.splitlines() if line.strip() and not line.startswith("---")][-1]
        return JobLost(f"its SLURM job stopped: {last.strip()}", cancelled=False)
    if not isinstance(e, UncompletedJobError):
        return None
    job = re.search(r"Job (\S+)", text)
    state = re.search(r"\(state: ([^)]*)\)", text)
    state_text = state.group(1) if state else "unknown state"
    return JobLost(f"its SLURM job {job.group(1) if job else '?'} ended without a result ({state_text})",
                   cancelled=state_text.startswith("CANCELLED"))


def cancelled(fut: Future) -> bool:
    """Whether a finished trial's job was cancelled (a launcher whose worker died raised instead)."""
    if fut.exception() is not None:
        return False
    lost = fut.result()._return_value
    return isinstance(lost, JobLost) and lost.cancelled


def with_cancelled_together(done: set[Future], running: dict[Future, object]) -> set[Future]:
    """`done`, plus the trials that end within SETTLE_S when one of `done` was cancelled: a scancel of
    every job is then seen as one event (the sweep was cancelled), not as trials to replace one by one."""
    if not any(cancelled(f) for f in done):
        return done
    from submitit.slurm.slurm import SlurmJob

    time.sleep(1)  # sacct shows the jobs of one scancel CANCELLED up to about a second apart
    SlurmJob.watcher.update()  # at once, not at submitit's next poll (its interval grows to minutes)
    return done | wait([f for f in running if f not in done], timeout=SETTLE_S).done


def end_cancelled_sweep(n_trials: int) -> SweeperError:
    """The one line that ends a sweep whose running trials' jobs were all cancelled."""
    return SweeperError(f"the sweep was cancelled: the SLURM jobs of its {n_trials} running trials were cancelled "
                        f"(scancel)")


def cancel_jobs_in_flight() -> list[str]:
    """scancel the SLURM jobs this process submitted that have not ended: a sweep that stops (Ctrl-C,
    SIGTERM, an error) must not leave them training for nobody. Each trial saves a checkpoint on the
    SIGTERM and ends its run KILLED; a queued one never starts. Jobs of other sweepers are not ours."""
    if "submitit" not in sys.modules:  # nothing was ever submitted from here
        return []
    from submitit.slurm.slurm import SlurmJob

    watcher = SlurmJob.watcher  # submitit's per-process record of the jobs it submitted (no public accessor)
    if watcher._registered - watcher._finished:
        watcher.update()  # their states now (sacct), not at submitit's last poll
    jobs = sorted(watcher._registered - watcher._finished)
    if jobs and shutil.which("scancel"):
        subprocess.run(["scancel", *jobs], capture_output=True, timeout=60)
        log.warning("cancelled the sweep's SLURM jobs still in flight: %s", " ".join(jobs))
        deadline = time.monotonic() + SETTLE_S * 3
        while not all(watcher.is_done(j, mode="cache") for j in jobs) and time.monotonic() < deadline:
            time.sleep(1)  # accounting shows them ended: the threads waiting for them return, and the process exits
            watcher.update()
    return jobs


def cancel_job(job_id: str | None) -> None:
    """scancel the job of a trial whose sweeper died: nobody waits for its result any more. Gone
    already, or no SLURM here: nothing to do."""
    if job_id and shutil.which("scancel"):
        subprocess.run(["scancel", job_id], capture_output=True, timeout=60)
