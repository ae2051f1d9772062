"""How a sweep names what it varies: short parameter names and short values (run names, columns)."""

from __future__ import annotations

import re
from typing import Any

from omegaconf import OmegaConf

# C0/C1 controls (terminal escape sequences, carriage returns) and the bidi overrides that reorder text
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(value: object) -> str:
    """`value` as text that does nothing to a terminal: each control character shown as its escape
    (an ESC as \\x1b), so a name read back from a store cannot move the cursor or retitle the window."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), str(value))


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
