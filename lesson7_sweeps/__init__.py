"""fast.ai 2018 lesson 7 as Hydra-configured, MLflow-tracked experiment sweeps."""
