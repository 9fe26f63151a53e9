"""What every runner decides the same way at load time, so the runners cannot drift apart:
which options apply (the caller's, else the ModelSpec's), how long the context is, and whether
the weights and the KV cache for that context fit in this machine's memory.

Context length (``docs/API.md``, "Context length"): a request's ``num_ctx`` above the model's
trained maximum is clamped to it (logged, as Ollama clamps: aider sizes ``num_ctx`` to its
prompt), and one whose KV cache does not fit beside the weights is clamped to the longest that
does (logged); only weights that do not fit at all are an error naming the bound. A ModelSpec's
``context_length`` is the model author's explicit choice and may exceed the trained maximum
(RoPE-scaled models), bounded by memory only (over it: the error). With neither, the default is
the trained maximum, at most ``DEFAULT_CONTEXT_CEILING``, and at most what the memory left after
the weights holds.

The context is planned for the slots the options ask (``max_parallel``), or for one slot when
the runner chooses: its slots are then fitted to that context (``parallel_slots``). Residency
(``server/residency.py``) calls :func:`context_length` with the options it hands the runner, so
both arrive at the same context and a request asking again for a clamped ``num_ctx`` finds the
model loaded as asked instead of reloading it.
"""

from __future__ import annotations

import dataclasses
import logging

from mlxserve import platform
from mlxserve.errors import InvalidRequestError, OutOfMemoryError
from mlxserve.runners.base import RunnerOptions
from mlxserve.runners.kvcache import (
    KvCacheType,
    ggml_bytes_per_token,
    kv_cache_type,
    mlx_bytes_per_token,
)
from modelstore.model import RUNNER_PARAMETERS, LocalModel

log = logging.getLogger("mlxserve.loading")
FALLBACK_TRAINED_CONTEXT = 4096
"""For a model whose files do not say what it was trained for."""
DEFAULT_CONTEXT_CEILING = 32768
"""A default never allocates more than this many positions (llama.cpp allocates the whole KV
cache at load): long enough for coding agents, small enough to load in seconds."""
MIN_DEFAULT_CONTEXT = 2048
MEMORY_HEADROOM = 1.2
"""Refuse a model whose weights and KV cache need more than 1/1.2 of the machine's memory."""
DEFAULT_KV_SHARE = 0.5
"""A default context uses at most half of the memory the weights leave free."""
KV_ELEMENT_BYTES = 2
"""f16 KV cache: llama.cpp's default cache type, and mlx-lm's for f16/bf16 weights."""
F32_KV_ELEMENT_BYTES = 4
CONTEXT_STEP = 256
"""A context clamped to the memory budget is a multiple of this (llama.cpp pads its context to
256 cells): a little under what fits, never over it."""


def load_options(model: LocalModel, options: RunnerOptions) -> RunnerOptions:
    """``options``, with the ModelSpec's load-time parameters where the caller set none."""
    filled = dataclasses.replace(options)
    for key in RUNNER_PARAMETERS:
        if getattr(filled, key) is None and key in model.parameters:
            setattr(filled, key, model.parameters[key])
    return filled


def kv_element_bytes(model: LocalModel) -> int:
    """mlx-lm's cache takes the weights' dtype (F32 for an F32 folder); llama.cpp's is f16."""
    f32 = model.format == "mlx" and (model.quantization or "").upper() == "F32"
    return F32_KV_ELEMENT_BYTES if f32 else KV_ELEMENT_BYTES


def kv_bytes_per_token(model: LocalModel, cache: KvCacheType | None = None) -> int:
    """K and V for one position in every layer, in ``cache``'s type (``kvcache.py``; f16 when
    none), from the metadata kept at import; 0 when the model's files do not say (then only
    the weights are counted)."""
    info, arch = model.model_info, model.architecture or ""
    cache = cache or kv_cache_type(None)

    def get(key: str) -> int:
        value = info.get(f"{arch}.{key}")
        if isinstance(value, list):  # per-layer counts: the largest bounds them all
            value = max(value, default=0)
        return int(value) if isinstance(value, int | float) else 0

    layers, heads = get("block_count"), get("attention.head_count")
    kv_heads = get("attention.head_count_kv") or heads
    head_dim = get("attention.key_length") or (get("embedding_length") // heads if heads else 0)
    if not (layers and kv_heads and head_dim):
        return 0
    if model.format == "gguf":
        return ggml_bytes_per_token(cache, layers, kv_heads * head_dim)
    return mlx_bytes_per_token(cache, layers, kv_heads, head_dim, kv_element_bytes(model))


def memory_needed(
    model: LocalModel, context: int, parallel: int, cache: KvCacheType | None = None
) -> int:
    return model.size_bytes + kv_bytes_per_token(model, cache) * context * max(1, parallel)


def memory_budget(options: RunnerOptions) -> int:
    """The memory a model is planned within: the daemon's ``memory_budget_bytes``, else the
    machine's (0 when unknown: then nothing is bounded)."""
    return options.memory_budget_bytes or platform.total_memory_bytes()


def _default_context(model: LocalModel, parallel: int, cache: KvCacheType, available: int) -> int:
    trained = model.context_length or FALLBACK_TRAINED_CONTEXT
    context = min(trained, DEFAULT_CONTEXT_CEILING)
    per_token = kv_bytes_per_token(model, cache) * max(1, parallel)
    if per_token and available:
        free = available / MEMORY_HEADROOM - model.size_bytes
        fits = int(free * DEFAULT_KV_SHARE // per_token)
        while context > MIN_DEFAULT_CONTEXT and context > fits:
            context //= 2
    return context


def _trained_context(model: LocalModel, requested: int) -> int:
    """A request's ``num_ctx``, at most the model's trained context (a ModelSpec's own
    ``context_length`` is not clamped: the author may go beyond it on purpose)."""
    trained = model.context_length
    if requested == model.parameters.get("context_length") or not trained or requested <= trained:
        return requested
    log.warning(
        "num_ctx %d is larger than %s's trained context of %d tokens: using %d",
        requested,
        model.name,
        trained,
        trained,
    )
    return trained


def _memory_context(
    model: LocalModel, requested: int, parallel: int, cache: KvCacheType, available: int
) -> int:
    """``requested``, or the longest context (a multiple of ``CONTEXT_STEP``) whose KV cache
    for ``parallel`` slots fits in ``available`` beside the weights; ``requested`` unchanged
    when not even ``CONTEXT_STEP`` fits (then :func:`require_memory` refuses it)."""
    per_token = kv_bytes_per_token(model, cache) * max(1, parallel)
    needed = memory_needed(model, requested, parallel, cache)
    if not (per_token and available) or needed * MEMORY_HEADROOM <= available:
        return requested
    free = available / MEMORY_HEADROOM - model.size_bytes
    fits = int(free // per_token) // CONTEXT_STEP * CONTEXT_STEP
    if fits < CONTEXT_STEP:
        return requested
    log.warning(
        "num_ctx %d x %d slot(s) of %s needs about %.1f GB (weights and KV cache); the memory "
        "budget is %.1f GB: using %d",
        requested,
        max(1, parallel),
        model.name,
        needed / 1e9,
        available / 1e9,
        fits,
    )
    return fits


def context_length(model: LocalModel, options: RunnerOptions) -> int:
    """The context to load with (see the module docstring), planned for ``options``'
    ``max_parallel`` slots (one when unset) and checked against the memory budget for their
    KV cache before anything is allocated."""
    requested = options.context_length
    cache = kv_cache_type(options.kv_cache_type)
    parallel = options.max_parallel or 1
    available = memory_budget(options)
    if requested is None:
        context = _default_context(model, parallel, cache, available)
    else:
        context = int(requested)
        if context < 1:
            raise InvalidRequestError("num_ctx must be a positive number", param="num_ctx")
        if context != model.parameters.get("context_length"):
            context = _memory_context(
                model, _trained_context(model, context), parallel, cache, available
            )
    require_memory(
        model.name,
        memory_needed(model, context, parallel, cache),
        available,
        context=context,
        parallel=parallel,
    )
    return context


def require_memory(name: str, needed: int, available: int, **facts: int) -> None:
    """Refuse at once what would swap the machine to a halt (or panic it, on Metal)."""
    if available and needed * MEMORY_HEADROOM > available:
        context = facts.get("context")
        what = (
            f" with a context of {context} tokens x {facts.get('parallel', 1)} slot(s)"
            if context
            else ""
        )
        raise OutOfMemoryError(
            f"{name}{what} needs about {needed / 1e9:.1f} GB (weights and KV cache); "
            f"{available / 1e9:.1f} GB is available to models. Ask for a smaller num_ctx.",
            needed_bytes=needed,
            available_bytes=available,
            **facts,
        )


DEFAULT_PARALLEL = 4
"""Sequence slots a model gets when neither the caller nor its ModelSpec chooses."""
SLOTS_MEMORY_SHARE = 0.5
"""A default choice of slots keeps weights plus KV within this share of the memory budget, so
a second model still fits beside it (``max_loaded_models`` is 2 by default)."""


def parallel_slots(
    name: str, requested: int | None, weights_bytes: int, slot_bytes: int, available: int
) -> int:
    """How many sequences a model serves at once, each with its own KV cache of
    ``slot_bytes``: ``requested`` if set, else ``DEFAULT_PARALLEL`` halved until weights and
    every slot fit in ``SLOTS_MEMORY_SHARE`` of ``available`` (:func:`memory_budget`); refused
    when even that number does not fit at all (memory admission counts the KV cache of every
    slot)."""
    slots = requested or DEFAULT_PARALLEL
    if not requested and available:
        budget = available * SLOTS_MEMORY_SHARE / MEMORY_HEADROOM
        while slots > 1 and weights_bytes + slots * slot_bytes > budget:
            slots //= 2
    require_memory(name, weights_bytes + slots * slot_bytes, available)
    return slots
