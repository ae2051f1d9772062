"""Will the model fit? Counted on the meta device before anything is allocated, so that a size typo
(`model.n_hidden=10000000`) is one line naming the size, not an allocator traceback or a machine
that swaps itself to death."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lesson7_sweeps.errors import ConfigError

# weights + gradients + up to two optimizer moments (Adam), all the parameters' size
COPIES = 4


def free_bytes(device: torch.device) -> int:
    """Memory a new allocation can get: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):  # not Linux: all physical memory is the best bound we have
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(build: Callable[[], nn.Module], device: torch.device) -> None:
    """Build the model on the meta device (no memory) and refuse it if it cannot fit on `device`."""
    with torch.device("meta"):
        model = build()
    n_params = sum(p.numel() for p in model.parameters())
    need = COPIES * sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    free = free_bytes(device)
    if need > free:
        raise ConfigError(f"the model does not fit: its {n_params:,} parameters need about {need / 2**30:,.1f} GiB "
                          f"(weights, gradients, optimizer state) but {device} has {free / 2**30:,.1f} GiB free; "
                          f"make it smaller (model.n_hidden, model.n_layers or model.layers)")
