"""Hydra's submitit SLURM launcher, with a lost job failing only its trial (for any sweeper, Hydra's
grid one too). Shipped with the Optuna sweeper; it needs hydra-submitit-launcher, which the sweeper
alone does not: without it the class below derives from `object`, which Hydra's plugin scan (it imports
every module here) passes over, and `hydra/launcher=submitit_slurm` is not a known config at all."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from hydra.core.utils import JobReturn, JobStatus

from hydra_plugins.lesson7_optuna_sweeper.slurm import (
    JobLost,
    cancelled,
    end_cancelled_sweep,
    launch_trial,
    with_cancelled_together,
)

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _Launcher
except ImportError:  # the sweeper installed alone
    _Launcher = None

log = logging.getLogger(__name__)


class SlurmLauncher(_Launcher or object):
    """`hydra/launcher=submitit_slurm` for Hydra's grid sweeper too: each trial is a job of its own, one
    whose job is lost fails alone (objective +inf, as a trial that raised) and the sweep goes on; a
    scancel of every job in flight ends the sweep KILLED. (Hydra's launcher waits for the jobs in
    order and raises at the first lost one, which ended the sweep.)"""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
        n = len(job_overrides)
        pool = ThreadPoolExecutor(min(n, self.params["array_parallelism"]), thread_name_prefix="trial")
        running = {pool.submit(launch_trial, self, list(o), initial_job_idx + i): i
                   for i, o in enumerate(job_overrides)}
        returns: list[JobReturn] = [JobReturn()] * n
        try:
            while running:
                done = with_cancelled_together(wait(running, return_when=FIRST_COMPLETED).done, running)
                if len(done) == len(running) > 1 and all(cancelled(f) for f in done):
                    raise end_cancelled_sweep(len(done))
                for fut in done:
                    i, ret = running.pop(fut), fut.result()
                    if isinstance(ret._return_value, JobLost):
                        log.error("trial %d failed, objective +inf: %s", initial_job_idx + i, ret._return_value)
                        ret = JobReturn(overrides=ret.overrides, status=JobStatus.COMPLETED,
                                        _return_value=float("inf"), hydra_cfg=ret.hydra_cfg)
                    returns[i] = ret
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return returns

    def launch_job(self, overrides: list[str], job_num: int) -> JobReturn:
        """One trial as a job of its own, by Hydra's launcher (which raises if the job is lost)."""
        return super().launch([overrides], initial_job_idx=job_num)[0]
