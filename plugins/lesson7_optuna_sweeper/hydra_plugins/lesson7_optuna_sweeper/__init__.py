"""`hydra/sweeper=optuna` for any @hydra.main app: an ask/tell Optuna sweeper with pruning, resume,
parallel trials without a batch barrier, and the published hydra-optuna-sweeper's configuration.

Hydra imports every module of the `hydra_plugins` namespace on each run to find its plugins: the
modules here import Optuna only once a sweep starts. The sweeper's class is
`hydra_plugins.lesson7_optuna_sweeper.optuna_sweeper.OptunaSweeper`; a task reports to its trial
through `hydra_plugins.lesson7_optuna_sweeper.trial`."""

# Hydra's plugin scan executes every module here again, in place, except those named `_*`: the
# classes others subclass or catch live in those, so that they stay one class.
from hydra_plugins.lesson7_optuna_sweeper._callback import OptunaSweepCallback
from hydra_plugins.lesson7_optuna_sweeper._errors import SweeperError
from hydra_plugins.lesson7_optuna_sweeper.trial import Trial, current_trial

__all__ = ["OptunaSweepCallback", "SweeperError", "Trial", "current_trial"]
