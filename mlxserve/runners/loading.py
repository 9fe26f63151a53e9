"""What every runner decides the same way at load time, so the runners cannot drift apart:
which options apply (the caller's, else the ModelSpec's), how long the context is, and whether
the weights fit in this machine's memory."""

from __future__ import annotations

import dataclasses

from mlxserve import platform
from mlxserve.errors import OutOfMemoryError
from mlxserve.runners.base import RunnerOptions
from modelstore.model import RUNNER_PARAMETERS, LocalModel

DEFAULT_CONTEXT = 4096
"""When neither the caller nor the ModelSpec sets one: at most this, at most the model's own."""
MEMORY_HEADROOM = 1.2
"""Refuse a model whose weights need more than 1/1.2 of the machine's memory."""


def load_options(model: LocalModel, options: RunnerOptions) -> RunnerOptions:
    """``options``, with the ModelSpec's load-time parameters where the caller set none."""
    filled = dataclasses.replace(options)
    for key in RUNNER_PARAMETERS:
        if getattr(filled, key) is None and key in model.parameters:
            setattr(filled, key, model.parameters[key])
    return filled


def context_length(model: LocalModel, options: RunnerOptions) -> int:
    return int(
        options.context_length or min(DEFAULT_CONTEXT, model.context_length or DEFAULT_CONTEXT)
    )


def require_memory(name: str, needed: int) -> None:
    """Refuse at once what would swap the machine to a halt (or panic it, on Metal)."""
    available = platform.total_memory_bytes()
    if available and needed * MEMORY_HEADROOM > available:
        raise OutOfMemoryError(
            f"{name} needs about {needed / 1e9:.1f} GB; this machine has {available / 1e9:.1f} GB",
            needed_bytes=needed,
            available_bytes=available,
        )
