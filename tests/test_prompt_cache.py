"""The prompt cache's tiers on the llama.cpp runner, on the real default model (SmolLM2-135M).

Prompts are given as token ids, so block boundaries are exact. Each "reload" is a fresh runner
over the same disk tier: nothing of the first one's slots or RAM survives it, as after an
unload or a daemon restart. Every cached answer is compared with a cold run's tokens.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest

from mlxserve.runners import promptcache
from mlxserve.runners.base import GenerateChunk, GenerateRequest, RunnerOptions
from mlxserve.runners.llamacpp.runner import LlamaCppRunner
from mlxserve.runners.promptcache import BLOCK_TOKENS, PromptCache
from modelstore.runtime import open_model
from modelstore.store import ModelStore

pytestmark = pytest.mark.slow

CONTEXT = 1024
ANSWER_TOKENS = 8
FIRST_WORD_ID = 1000
"""Token ids from here on are ordinary words in SmolLM2's vocabulary (no special tokens)."""
LAST_WORD_ID = 40000


def words(count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(FIRST_WORD_ID, LAST_WORD_ID) for _ in range(count)]


@pytest.fixture(scope="module")
def store(default_gguf, tmp_path_factory) -> ModelStore:
    from modelstore.importer import import_path

    store = ModelStore(tmp_path_factory.mktemp("prompt-cache") / "home")
    import_path(store, default_gguf, "smol:cache")
    return store


def options(store: ModelStore, **overrides) -> RunnerOptions:
    settings = {
        "max_parallel": 2,
        "context_length": CONTEXT,
        "prompt_cache_dir": str(store.prompt_cache_dir),
        "prompt_cache_disk_bytes": 1 << 30,
        **overrides,
    }
    return RunnerOptions(**settings)


async def loaded(store: ModelStore, **overrides) -> LlamaCppRunner:
    runner = LlamaCppRunner()
    await runner.load(open_model(store, "smol:cache"), options(store, **overrides))
    return runner


async def answer(
    runner: LlamaCppRunner, prompt: list[int], max_tokens: int = ANSWER_TOKENS
) -> tuple[list[int], int]:
    """The greedy tokens and how many prompt tokens came from a cache."""
    tokens: list[int] = []
    last = GenerateChunk()
    request = GenerateRequest(prompt_tokens=prompt, temperature=0.0, max_tokens=max_tokens)
    async for chunk in runner.generate(request):
        tokens += chunk.token_ids
        last = chunk
    assert last.done and last.stats is not None
    return tokens, last.stats.cached_prompt_tokens


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    return words(5 * BLOCK_TOKENS + 20, seed=1)


@pytest.fixture(scope="module")
async def cold(store, prompt) -> list[int]:
    """The prompt's answer with nothing cached, leaving its entry on disk."""
    shutil.rmtree(store.prompt_cache_dir, ignore_errors=True)
    runner = await loaded(store)
    tokens, cached = await answer(runner, prompt)
    await runner.unload()
    assert cached == 0
    return tokens


def entry_files(store: ModelStore) -> list[Path]:
    return sorted(store.prompt_cache_dir.glob("*/*/*.kv"))


def entry_of(store: ModelStore, prompt: list[int]) -> Path:
    """The file holding ``prompt``'s state, the others removed (entries of prompts that share
    a prefix with it would be found next)."""
    found = []
    for path in entry_files(store):
        if header_of(path)["tokens"][: len(prompt)] == prompt:
            found.append(path)
        else:
            path.unlink()
    [path] = found
    return path


async def test_a_reloaded_model_reuses_the_prompt_from_disk_with_the_same_answer(
    store, prompt, cold
):
    runner = await loaded(store)
    try:
        tokens, cached = await answer(runner, prompt)
        stats = runner.describe().details["prompt_cache"]
    finally:
        await runner.unload()
    assert tokens == cold
    assert cached == len(prompt) - 1
    assert stats["disk"]["hits"] == 1 and stats["disk"]["tokens"] == cached


FOLLOW_UP_TOKENS = 45
"""An agent's next turn: a tool result and the template's framing after the cached history."""


async def test_a_follow_up_prefilled_after_a_cached_prefix_answers_as_a_cold_prompt(
    store, tmp_path
):
    """The follow-up's 45 tokens prefilled alone, after a prefix restored from disk or kept
    in the slot, give the tokens the whole prompt prefilled cold gives (which crosses a
    chunk boundary): whatever attention kernel the model was loaded with (flash attention is
    off on the CPU for models that verify no drafts), a row's result does not depend on how
    the prompt was cut into ``llama_decode`` calls."""
    history = words(9 * BLOCK_TOKENS, seed=11)
    follow_up = history + words(FOLLOW_UP_TOKENS, seed=12)
    runner = await loaded(store, prompt_cache_dir=str(tmp_path / "cold"))
    try:
        cold, cached = await answer(runner, follow_up, max_tokens=24)
    finally:
        await runner.unload()
    assert cached == 0
    runner = await loaded(store, prompt_cache_dir=str(tmp_path / "live"))
    try:
        await answer(runner, history)
        live, live_cached = await answer(runner, follow_up, max_tokens=24)
    finally:
        await runner.unload()
    runner = await loaded(store, prompt_cache_dir=str(tmp_path / "disk"))
    try:
        await answer(runner, history)
    finally:
        await runner.unload()
    runner = await loaded(store, prompt_cache_dir=str(tmp_path / "disk"))
    try:
        restored, restored_cached = await answer(runner, follow_up, max_tokens=24)
    finally:
        await runner.unload()
    assert (live_cached, restored_cached) == (len(history), len(history))
    assert live == cold
    assert restored == cold


async def test_the_cache_measures_disk_reads_restores_and_prefill(store, prompt, cold):
    runner = await loaded(store)
    try:
        await answer(runner, prompt)  # from disk
        await answer(runner, words(3 * BLOCK_TOKENS, seed=7))  # a cold prefill
        stats = runner.describe().details["prompt_cache"]
    finally:
        await runner.unload()
    assert stats["disk"]["read_bytes_per_s"] > 0
    assert stats["disk"]["restore_bytes_per_s"] > 0
    assert stats["prefill_tokens_per_s"] > 0


async def test_a_disk_entry_estimated_slower_than_recomputing_it_is_not_read(store, prompt, cold):
    """A disk that reads at 1 MB/s against a model that prefills 100k tokens/s: recomputing the
    prompt is faster, so the entry stays unread and the answer is a cold run's."""
    runner = await loaded(store)
    cache = runner._disk
    assert cache is not None
    cache.read.note(1_000_000, 1.0)
    cache.restore.note(1_000_000_000, 1.0)
    cache.prefill.note(100_000, 1.0)
    try:
        tokens, cached = await answer(runner, prompt)
        stats = runner.describe().details["prompt_cache"]
    finally:
        await runner.unload()
    assert (tokens, cached) == (cold, 0)
    assert stats["disk"]["skipped_slower"] == 1
    assert stats["disk"]["hits"] == 0


def test_a_disk_judged_slower_is_still_read_now_and_then(tmp_path):
    """Once in ``PROBE_EVERY`` refusals the entry is read anyway, so a disk that got faster
    (a warm page cache, a load that passed) is measured again."""
    cache = PromptCache({"runner": "t"}, weights="w", ram_bytes=0, root=tmp_path, disk_bytes=1)
    try:
        cache.read.note(1, 1.0)
        cache.restore.note(1, 1.0)
        cache.prefill.note(1_000_000, 1.0)
        verdicts = [cache._worth_reading(1_000, 100) for _ in range(promptcache.PROBE_EVERY)]
    finally:
        cache.close()
    assert verdicts == [False] * (promptcache.PROBE_EVERY - 1) + [True]


async def test_entries_are_private_to_their_owner(store, cold):
    files = entry_files(store)
    assert files
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o600
        assert path.parent.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("block", [1, 3])
async def test_a_prompt_diverging_inside_block_n_reuses_n_minus_1_blocks_or_more(
    store, prompt, cold, block
):
    changed = list(prompt)
    position = (block - 1) * BLOCK_TOKENS + 10
    changed[position] = FIRST_WORD_ID - 1 if changed[position] != FIRST_WORD_ID - 1 else 999
    runner = await loaded(store)
    try:
        _, cached = await answer(runner, changed)
    finally:
        await runner.unload()
    assert (block - 1) * BLOCK_TOKENS <= cached <= block * BLOCK_TOKENS
    assert cached == (position if block > 1 else 0)  # the whole blocks, then up to the change


def header_of(path: Path) -> dict:
    with path.open("rb") as handle:
        return promptcache.read_header(handle, path.stat().st_size)


def rewrite(path: Path, header_change: dict) -> None:
    """Change an entry's header and seal it again with a right digest (a file another version
    or model wrote, not a corrupt one)."""
    header = header_of(path)
    payload = path.read_bytes()[header.pop("offset") : -promptcache.DIGEST_BYTES]
    encoded = json.dumps({**header, **header_change}).encode()
    body = promptcache.MAGIC + promptcache.HEADER_LENGTH.pack(len(encoded)) + encoded + payload
    path.write_bytes(body + hashlib.sha256(body).digest())


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) * 3 // 4] ^= 0x10
    path.write_bytes(bytes(data))


def garbage(path: Path) -> None:
    path.write_bytes(b"not a cache entry" * 100)


def old_version(path: Path) -> None:
    rewrite(path, {"format": promptcache.FORMAT_VERSION - 1})


def other_model(path: Path) -> None:
    rewrite(path, {"key": {**header_of(path)["key"], "weights": "0" * 64}})


@pytest.mark.parametrize(
    "damage", [truncate, flip_a_bit, garbage, old_version, other_model], ids=lambda f: f.__name__
)
async def test_a_damaged_or_foreign_entry_is_a_miss_that_is_removed(store, prompt, cold, damage):
    runner = await loaded(store)
    await answer(runner, prompt)  # the entry is on disk again (the last test may have removed it)
    await runner.unload()
    path = entry_of(store, prompt)
    damage(path)
    runner = await loaded(store)
    try:
        tokens, cached = await answer(runner, prompt)
        stats = runner.describe().details["prompt_cache"]
    finally:
        await runner.unload()
    assert (tokens, cached) == (cold, 0)
    assert stats["rejected"] == 1


async def test_an_entry_of_another_kv_type_is_a_miss(store, prompt, cold):
    """A q8_0 cache never reads an f16 entry, even one copied into its own folder."""
    f16_entry = entry_of(store, prompt)
    runner = await loaded(store, kv_cache_type="q8_0")
    try:
        folder = Path(store.prompt_cache_dir) / f16_entry.parent.parent.name
        q8_folder = folder / runner._disk.folder.name  # type: ignore[union-attr]
        q8_folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(f16_entry, q8_folder / f16_entry.name)
        _, cached = await answer(runner, prompt)
        stats = runner.describe().details["prompt_cache"]
    finally:
        await runner.unload()
    shutil.rmtree(q8_folder)  # its own entry, which the later tests do not expect
    assert cached == 0
    assert stats["rejected"] == 1


async def test_a_partial_write_left_by_a_killed_process_is_never_read(store, prompt, cold):
    entry = entry_of(store, prompt)
    temp = store.prompt_cache_dir / "tmp" / f"{entry.stem}.999999.1"
    temp.write_bytes(entry.read_bytes()[:1000])
    entry.unlink()
    runner = await loaded(store)
    try:
        tokens, cached = await answer(runner, prompt)
    finally:
        await runner.unload()
    assert (tokens, cached) == (cold, 0)


async def test_eight_concurrent_clients_sharing_a_prefix_all_reuse_it(store):
    shared = words(4 * BLOCK_TOKENS, seed=2)
    runner = await loaded(store, max_parallel=8, context_length=512)
    try:
        await answer(runner, shared + words(5, seed=3))
        results = await asyncio.gather(
            *(answer(runner, shared + words(5, seed=10 + i)) for i in range(8))
        )
    finally:
        await runner.unload()
    assert all(cached >= len(shared) for _, cached in results), [c for _, c in results]


async def test_a_flood_of_distinct_prompts_keeps_each_tier_within_its_budget(store, tmp_path):
    entry_bytes = 2_500_000  # a 72-token SmolLM2 state is about 1.7 MB
    runner = await loaded(
        store,
        prompt_cache_dir=str(tmp_path / "prompts"),
        prompt_cache_bytes=2 * entry_bytes,
        prompt_cache_disk_bytes=3 * entry_bytes,
    )
    try:
        for seed in range(4):
            await answer(runner, words(BLOCK_TOKENS + 8, seed=100 + seed))
            await runner.spill()
            stats = runner.describe().details["prompt_cache"]
            on_disk = sum(p.stat().st_size for p in (tmp_path / "prompts").glob("*/*/*.kv"))
            assert stats["ram"]["bytes"] <= 2 * entry_bytes
            assert on_disk <= 3 * entry_bytes
        assert stats["ram"]["entries"] == 2
        assert stats["disk"]["entries"] >= 2
    finally:
        await runner.unload()


def test_block_hashes_chain_so_a_block_names_everything_before_it():
    key = promptcache.key_digest({"runner": "test"})
    tokens = words(3 * BLOCK_TOKENS, seed=5)
    changed = [tokens[0] + 1, *tokens[1:]]
    first, other = promptcache.block_hashes(key, tokens), promptcache.block_hashes(key, changed)
    assert len(first) == 3
    assert all(a != b for a, b in zip(first, other, strict=True))
    assert promptcache.block_hashes(promptcache.key_digest({"runner": "x"}), tokens)[0] != first[0]


def test_a_cache_reads_nothing_before_its_first_lookup(tmp_path):
    cache = PromptCache({"runner": "t"}, weights="w", ram_bytes=0, root=tmp_path, disk_bytes=1)
    try:
        assert cache.folder is not None
        cache.folder.mkdir(parents=True)
        (cache.folder / "junk.kv").write_bytes(b"junk")
        assert cache.stats()["rejected"] == 0
        assert cache.lookup(words(2 * BLOCK_TOKENS, seed=6)) is None
        assert cache.stats()["rejected"] == 1
        assert not (cache.folder / "junk.kv").exists()
    finally:
        cache.close()
