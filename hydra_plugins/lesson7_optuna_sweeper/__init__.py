"""Hydra discovers sweepers only in the `hydra_plugins` namespace and instantiates only classes
defined there: this shim registers `hydra/sweeper=optuna`; the code lives in lesson7_sweeps.sweeps."""

from lesson7_sweeps.sweeps import optuna_sweeper


class OptunaSweeper(optuna_sweeper.OptunaSweeper):
    """lesson7_sweeps.sweeps.optuna_sweeper.OptunaSweeper, under the name Hydra accepts."""


