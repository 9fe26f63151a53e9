"""The daemon side of a group: rank 0 serves HTTP with the group's model pinned; every other
rank runs only the engine, following rank 0 until it stops or the group breaks."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxserve.distributed.group import DEFAULT_RING_PORT, Group, start_group
from mlxserve.distributed.runner import Follower, GroupRunner, verify_model
from mlxserve.errors import DistributedError
from mlxserve.platform import exit_process
from mlxserve.runners.base import LoadedModelInfo, RunnerOptions
from mlxserve.server.config import Settings
from modelstore.store import ModelStore

log = logging.getLogger("mlxserve.distributed")


@dataclass(frozen=True)
class DistributedOptions:
    """``--distributed HOSTFILE`` and the flags that go with it."""

    hostfile: Path
    model: str | None
    backend: str | None = None
    rank: int | None = None
    pipeline: bool = False
    ring_port: int = DEFAULT_RING_PORT


async def _start_model(
    runner: GroupRunner | Follower, settings: Settings, name: str | None
) -> tuple[Any, LoadedModelInfo]:
    """Agree on the model (same digest, verified blobs on every rank), then load the shards.
    The memory check counts this rank's share of the weights, not the whole model."""
    store = ModelStore(settings.home)
    options = RunnerOptions(
        max_parallel=settings.num_parallel,
        prompt_cache_bytes=settings.prompt_cache_bytes,
        memory_budget_bytes=settings.memory_budget_bytes,
    )
    model, options = await runner.run(lambda: verify_model(runner.group, store, name, options))
    share = dataclasses.replace(model, size_bytes=model.size_bytes // runner.group.size)
    info = await runner.load_group(share, options)
    return model, info


def join(settings: Settings, options: DistributedOptions) -> Group:
    group = start_group(options.hostfile, options.backend, options.rank, options.ring_port)
    log.info("rank %d of %d (%s backend) joined", group.rank, group.size, group.plan.backend)
    return group


def follow(group: Group, settings: Settings, options: DistributedOptions) -> None:
    """A rank > 0: load its shard and follow rank 0 until told to stop."""

    async def run() -> None:
        runner = Follower(group, options.pipeline)
        await _start_model(runner, settings, None)
        log.info("rank %d: following rank 0", group.rank)
        try:
            await runner.run(runner.follow)
        except RuntimeError as exc:  # mlx's word for a broken ring: rank 0 went away
            raise DistributedError(f"rank {group.rank}: the group broke: {exc}") from None

    asyncio.run(run())


def group_context(
    group: Group, settings: Settings, options: DistributedOptions
) -> Callable[[Any], AsyncIterator[None]]:
    """An aiohttp ``cleanup_ctx`` for rank 0: the group's model is verified and loaded before
    the daemon accepts a request, and unloaded (the followers told to stop) when it stops."""
    from mlxserve.chat.model import LoadedModel
    from mlxserve.server.state import MANAGER

    async def lifetime(app: Any) -> AsyncIterator[None]:
        runner = GroupRunner(group, options.pipeline, settings.group_step_timeout_s)
        model, info = await _start_model(runner, settings, options.model)
        app[MANAGER].pin(LoadedModel(model, runner, info))
        log.info("serving %s over %d ranks", model.name, group.size)
        yield
        if runner.broken:  # its engine thread may be stuck in a collective mlx cannot cancel
            log.error("the group broke earlier; exiting without unloading")
            exit_process(0)

    return lifetime
