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


DEFAULT_PARALLEL = 4
"""Sequence slots a model gets when neither the caller nor its ModelSpec chooses."""
SLOTS_MEMORY_SHARE = 0.5
"""A default choice of slots keeps weights plus KV within this share of the memory budget, so
a second model still fits beside it (``max_loaded_models`` is 2 by default)."""


def parallel_slots(name: str, requested: int | None, weights_bytes: int, slot_bytes: int) -> int:
    """How many sequences a model serves at once, each with its own KV cache of
    ``slot_bytes``: ``requested`` if set, else ``DEFAULT_PARALLEL`` halved until weights and
    every slot fit in ``SLOTS_MEMORY_SHARE`` of the memory; refused when even that number does
    not fit at all (memory admission counts the KV cache of every slot)."""
    slots = requested or DEFAULT_PARALLEL
    available = platform.total_memory_bytes()
    if not requested and available:
        budget = available * SLOTS_MEMORY_SHARE / MEMORY_HEADROOM
        while slots > 1 and weights_bytes + slots * slot_bytes > budget:
            slots //= 2
    require_memory(name, weights_bytes + slots * slot_bytes)
    return slots
