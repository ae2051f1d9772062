"""Layer groups -> optimizer param groups, each with its own lr and weight decay.

The lesson's LayerOptimizer: a model lists its natural stages (`layer_groups()`); `optim.lr` and
`optim.weight_decay` are either one value for every group or a list with one value per group
(differential learning rates). Each group remembers its `base_lr`; the schedule scales it per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.optim import Optimizer

from lesson7_sweeps.errors import ConfigError


def per_group(value: Any, n_groups: int, key: str) -> list[float]:
    """Broadcast one value to n_groups, or check that a list has exactly one value per group."""
    if isinstance(value, Sequence) and not isinstance(value, str):  # a list, ListConfig included
        if len(value) != n_groups:
            raise ConfigError(f"{key} has {len(value)} values but the model has {n_groups} layer groups; "
                              f"give one value or a list of {n_groups}")
        return [float(v) for v in value]
    return [float(value)] * n_groups


def param_groups(groups: list[nn.Module], lr: Any, weight_decay: Any) -> list[dict[str, Any]]:
    lrs = per_group(lr, len(groups), "optim.lr")
    wds = per_group(weight_decay, len(groups), "optim.weight_decay")
    return [{"params": [p for p in g.parameters() if p.requires_grad], "lr": lr_, "base_lr": lr_,
             "weight_decay": wd} for g, lr_, wd in zip(groups, lrs, wds)]


def build_optimizer(cfg: DictConfig, model: nn.Module, fused: bool = False) -> Optimizer:
    """`cfg` is the optim group: a partial optimizer `_target_` plus lr / weight_decay per group.
    `fused`: torch's fused implementation (one kernel for every parameter; CUDA and CPU)."""
    groups = param_groups(model.layer_groups(), cfg.lr, cfg.weight_decay)
    grouped = sum(len(g["params"]) for g in groups)
    if grouped != sum(1 for p in model.parameters() if p.requires_grad):
        raise ValueError(f"{type(model).__name__}.layer_groups() does not cover every parameter once")
    kwargs = OmegaConf.to_container(cfg, resolve=True)
    del kwargs["lr"], kwargs["weight_decay"]  # given per group above
    return instantiate(kwargs)(groups, **({"fused": True} if fused else {}))
