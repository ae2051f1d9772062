"""How a sweep names what it varies: short parameter names and short values (run names, columns)."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf


def short_names(keys: list[str]) -> dict[str, str]:
    """data.bptt -> bptt, model.n_hidden -> n_hidden; the full key where two would look alike."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: s if last.count(s) == 1 else k for k, s in zip(keys, last)}


def format_value(value: Any) -> str:
    """Short, readable values for run names: 0.001, [16,32], gru."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value)
