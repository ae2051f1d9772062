"""A plain Hydra app (no project keys) for the Optuna sweeper's tests: the published plugin's
sphere, its multi-objective Binh and Korn, and a curve that reports to its trial and can be pruned."""

import hydra
from omegaconf import DictConfig

from hydra_plugins.lesson7_optuna_sweeper import current_trial


@hydra.main(version_base="1.3", config_path="conf", config_name="sphere")
def main(cfg: DictConfig) -> object:
    if cfg.get("error", False):
        raise RuntimeError("cfg.error is True")
    x, y = cfg.x, cfg.y
    if cfg.get("objectives", 1) == 2:  # Binh and Korn
        return 4 * x**2 + 4 * y**2, (x - 5) ** 2 + (y - 5) ** 2
    trial = current_trial()
    value = x**2 + y**2
    if "max_z_difference_from_x" in cfg:  # the custom search space's multi-dimensional sphere
        value += cfg.w**2 + cfg.z**2
    for step in range(cfg.get("steps", 0)):  # a curve that ends at `value`: the pruner compares it
        if trial is not None:
            trial.report(step, value + 10 / (step + 1))
            if trial.should_prune():
                return float("nan")  # ignored: the trial is PRUNED
    if cfg.get("numpy", False):
        import numpy as np

        return np.asarray(value)  # a 0-d array
    return value


def configure(cfg: DictConfig, trial) -> None:
    """custom_search_space: z within max_z_difference_from_x of x, and a new key +w."""
    x = trial.params["x"]
    trial.suggest_float("z", x - cfg.max_z_difference_from_x, x + cfg.max_z_difference_from_x)
    trial.suggest_float("+w", 0.0, 1.0)


if __name__ == "__main__":
    main()
