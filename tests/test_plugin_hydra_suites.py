"""Hydra's own launcher and integration test suites (hydra.test_utils), run with our Optuna sweeper
in place of the basic sweeper: a comma sweep is a categorical space, and the grid sampler runs
each combination once. Their task returns 100 (a number), as an objective must be.

Deliberate differences (README, "differences from hydra-optuna-sweeper"): the grid runs in
Optuna's seeded, shuffled order, so the launcher suite's jobs are compared in Hydra's order
(sorted by their overrides); a multirun that sweeps nothing is refused (an empty search space), so
the integration suite sweeps one dummy value, and the launcher suite's no-sweep cases are left out."""

from __future__ import annotations

import pytest
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite
from hydra.test_utils.test_utils import SweepTaskFunction

OPTUNA = ["hydra/sweeper=optuna", "hydra/sweeper/sampler=grid"]


class _InHydrasOrder(SweepTaskFunction):
    def __enter__(self) -> SweepTaskFunction:
        super().__enter__()
        for batch in self.returns or []:
            batch.sort(key=lambda r: r.overrides)
        return self


@pytest.fixture
def hydra_sweep_runner(hydra_sweep_runner):
    def runner(*args, **kwargs) -> SweepTaskFunction:
        sweep = hydra_sweep_runner(*args, **kwargs)
        sweep.__class__ = _InHydrasOrder
        return sweep

    return runner


# chdir: the suite looks for each job's log in its working dir (Hydra's default before version_base 1.2)
@pytest.mark.parametrize(("launcher_name", "overrides"), [("basic", [*OPTUNA, "hydra.job.chdir=True"])])
class TestOptunaSweeperWithHydrasLauncherSuite(LauncherTestSuite):
    # they sweep nothing: refused, see test_plugin_sweeper.test_deliberate_differences
    test_sweep_1_job = test_sweep_1_job_strict = test_sweep_with_custom_resolver = None


# its tasks print and return None, a failed trial for an Optuna sweep: max_failure_rate=1 lets them be
@pytest.mark.parametrize(("task_launcher_cfg", "extra_flags"), [
    ({}, ["-m", *OPTUNA, "+optuna_dummy=choice(0)", "hydra.sweeper.max_failure_rate=1"])])
class TestOptunaSweeperWithHydrasIntegrationSuite(IntegrationTestSuite):
    # a representative subset (each case starts Python twice, ~3 s): the working dir, the original
    # dir and the task name in a multirun. Left out: test_to_absolute_path_multirun runs twice into
    # one sweep dir, where the second run resumes the finished study and runs nothing (on purpose);
    # the override_dirname cases would see the dummy sweep in the dir name.
    test_custom_task_name = test_to_absolute_path_multirun = None

    @pytest.mark.parametrize(("task_config", "overrides", "expected_dir"), [
        ({"hydra": {"sweep": {"dir": "task_cfg", "subdir": "task_cfg_${hydra.job.num}"}}}, [], "task_cfg/task_cfg_0"),
    ])
    def test_custom_sweeper_run_workdir(self, tmpdir, task_config, overrides, expected_dir, task_launcher_cfg,
                                        extra_flags) -> None:
        super().test_custom_sweeper_run_workdir(tmpdir, task_config, overrides, expected_dir, task_launcher_cfg,
                                                extra_flags)
