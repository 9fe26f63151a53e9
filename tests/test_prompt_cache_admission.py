"""The prompt cache's RAM tier counts in memory admission (``residency.py``): its bytes are
part of what a loaded model holds, and a load that does not fit frees RAM tiers before it
evicts a model.

The model manager runs in-process on the default model (llama.cpp) under two names; the
machine's memory is set, for each test, between what the loaded model holds with and without
its RAM tier, plus what the second one needs.
"""

from __future__ import annotations

import pytest

from mlxserve import platform
from mlxserve.runners.base import GenerateRequest, LoadAsk
from mlxserve.runners.loading import MEMORY_HEADROOM
from mlxserve.runners.promptcache import BLOCK_TOKENS
from mlxserve.server.config import Settings
from mlxserve.server.metrics import Metrics
from mlxserve.server.residency import ModelManager
from modelstore.importer import import_path
from modelstore.store import ModelStore

pytestmark = pytest.mark.slow

FIRST, SECOND = "smol-a:latest", "smol-b:latest"
CONTEXT = 2048
PROMPT_TOKENS = 12 * BLOCK_TOKENS
"""About 18 MB of KV in the RAM tier on the default model."""


@pytest.fixture
async def manager(default_gguf, tmp_path):
    store = ModelStore(tmp_path / "home")
    for name in (FIRST, SECOND):
        import_path(store, default_gguf, name)
    settings = Settings(
        max_loaded_models=2,
        num_parallel=1,
        isolate_runners=False,
        prompt_cache_disk_bytes=1 << 30,
    )
    manager = ModelManager(store, settings, Metrics())
    await manager.start()
    yield manager
    await manager.close()


async def load_with_a_cached_prompt(manager: ModelManager) -> int:
    """Load the first model and leave one long prompt in its RAM tier; the tier's bytes."""
    async with manager.use(FIRST, load=LoadAsk(context_length=CONTEXT)) as resident:
        request = GenerateRequest(
            prompt_tokens=[1000 + i for i in range(PROMPT_TOKENS)], max_tokens=2, temperature=0
        )
        async for _ in resident.loaded.generate(request):
            pass
        held = resident.loaded.runner.describe().details["prompt_cache_ram_bytes"]
    assert held > 0
    return held


async def second_needs(manager: ModelManager) -> int:
    _, needed = await manager._checked_options(SECOND, LoadAsk(context_length=CONTEXT))
    return needed


async def test_a_load_that_needs_the_room_frees_the_ram_tier_and_keeps_the_model(
    manager, monkeypatch
):
    ram = await load_with_a_cached_prompt(manager)
    held, needed = manager._held_bytes(), await second_needs(manager)
    machine = (held - ram // 2 + needed) * MEMORY_HEADROOM
    monkeypatch.setattr(platform, "total_memory_bytes", lambda: int(machine))
    await manager.ensure_loaded(SECOND, load=LoadAsk(context_length=CONTEXT))
    assert set(manager.residents) == {FIRST, SECOND}
    runner = manager.residents[FIRST].loaded.runner
    await runner.spill()  # type: ignore[attr-defined]
    first = runner.describe().details
    assert first["prompt_cache_ram_bytes"] == 0
    assert first["prompt_cache"]["disk"]["entries"] >= 1  # what was freed is still on disk


async def test_a_load_that_needs_more_than_the_ram_tier_evicts_the_idle_model(manager, monkeypatch):
    ram = await load_with_a_cached_prompt(manager)
    held, needed = manager._held_bytes(), await second_needs(manager)
    machine = (held - ram + needed) * MEMORY_HEADROOM * 0.9
    assert needed * MEMORY_HEADROOM < machine
    monkeypatch.setattr(platform, "total_memory_bytes", lambda: int(machine))
    await manager.ensure_loaded(SECOND, load=LoadAsk(context_length=CONTEXT))
    assert set(manager.residents) == {SECOND}


async def test_without_pressure_the_ram_tier_stays(manager):
    ram = await load_with_a_cached_prompt(manager)
    await manager.ensure_loaded(SECOND, load=LoadAsk(context_length=CONTEXT))
    details = manager.residents[FIRST].loaded.runner.describe().details
    assert details["prompt_cache_ram_bytes"] == ram
