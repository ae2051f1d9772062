"""Hydra instantiates only plugin classes defined in the `hydra_plugins` namespace: this shim names
`hydra/launcher=submitit_slurm`'s launcher; the code lives in lesson7_sweeps.sweeps.slurm."""

from lesson7_sweeps.sweeps import slurm


class SlurmLauncher(slurm.SlurmLauncher):
    """lesson7_sweeps.sweeps.slurm.SlurmLauncher, under the name Hydra accepts."""
