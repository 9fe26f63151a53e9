"""Speculative decoding with a ModelSpec's ``draft:``: lossless (greedy tokens identical with
and without the draft), counted (accepted draft tokens in the stats), checked at create time
(the draft must be in the store and share the tokenizer), and batching still works beside it."""

from __future__ import annotations

import asyncio
import json

import pytest

from mlxserve import platform
from mlxserve.runners.base import GenerateChunk, GenerateRequest, RunnerOptions
from modelstore.errors import SpecValidationError
from modelstore.importer import import_path
from modelstore.runtime import open_model
from modelstore.spec import build_draft, load_spec
from modelstore.store import ModelStore
from tests.fixtures.tiny_models import make_tiny_draft

PROMPTS = ["The capital of France is", "Once upon a time there was", "The cat sat on"]
GENERATED = 24


def create(store: ModelStore, folder, name: str, spec: dict) -> None:
    path = folder / f"{name.replace(':', '-')}.modelspec.json"
    path.write_text(json.dumps(spec))
    store.commit(build_draft(load_spec(path), store), name)


@pytest.fixture(scope="module")
def store(tiny_models, tmp_path_factory) -> ModelStore:
    root = tmp_path_factory.mktemp("speculative")
    store = ModelStore(root / "store")
    import_path(store, tiny_models.hf_folder, "tiny:mlx")
    import_path(store, make_tiny_draft(root / "draft", tiny_models.hf_folder), "tiny-draft:mlx")
    spec = {
        "from": "model://tiny:mlx",
        "draft": "tiny-draft:mlx",
        "parameters": {"num_draft_tokens": 3},
    }
    create(store, root, "tiny:drafted", spec)
    return store


@pytest.fixture(scope="module")
async def runners(store):
    from mlxserve.runners.mlx.runner import MlxRunner

    plain, drafted = MlxRunner(), MlxRunner()
    await plain.load(open_model(store, "tiny:mlx"), RunnerOptions())
    await drafted.load(open_model(store, "tiny:drafted"), RunnerOptions())
    yield plain, drafted
    await plain.unload()
    await drafted.unload()


async def answer(runner, prompt: str) -> list[GenerateChunk]:
    request = GenerateRequest(prompt=prompt, temperature=0.0, max_tokens=GENERATED)
    return [chunk async for chunk in runner.generate(request)]


def tokens(chunks: list[GenerateChunk]) -> list[int]:
    return [token for chunk in chunks for token in chunk.token_ids]


async def test_greedy_tokens_are_the_same_with_and_without_the_draft(runners):
    plain, drafted = runners
    accepted = 0
    for prompt in PROMPTS:
        without = await answer(plain, prompt)
        with_draft = await answer(drafted, prompt)
        assert tokens(with_draft) == tokens(without)
        assert without[-1].stats.draft_tokens == 0
        accepted += with_draft[-1].stats.draft_tokens
    assert 0 < accepted < len(PROMPTS) * GENERATED


async def test_concurrent_requests_batch_beside_the_drafted_one(runners):
    plain, drafted = runners
    expected = [tokens(await answer(plain, prompt)) for prompt in PROMPTS]
    together = await asyncio.gather(*(answer(drafted, prompt) for prompt in PROMPTS))
    assert [tokens(chunks) for chunks in together] == expected
    assert together[0][-1].stats.draft_tokens > 0
    assert all(chunks[-1].stats.draft_tokens == 0 for chunks in together[1:])


def test_show_names_the_pinned_draft(store):
    config = store.config(store.resolve("tiny:drafted"))
    draft = store.resolve("tiny-draft:mlx")
    assert config.draft_model == f"{draft.name}@{draft.manifest_digest}"


def test_a_draft_not_in_the_store_is_refused_at_create(store, tmp_path):
    with pytest.raises(SpecValidationError, match="not in the store"):
        create(store, tmp_path, "x:y", {"from": "model://tiny:mlx", "draft": "nothing:here"})


def test_a_draft_with_another_tokenizer_is_refused_at_create(store, tiny_models, tmp_path):
    other = make_tiny_draft(tmp_path / "other", tiny_models.hf_folder)
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["model_max_length"] = 1024
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    import_path(store, other, "other-draft:mlx")
    with pytest.raises(SpecValidationError, match="tokenizer"):
        create(store, tmp_path, "x:y", {"from": "model://tiny:mlx", "draft": "other-draft:mlx"})


LOOKUP_PROMPT = (
    "Copy the list exactly.\nList: red apple, green pear, yellow banana, purple plum, "
    "orange peach.\nCopy: red apple, green pear,"
)


async def llamacpp_answers(store: ModelStore, lookup: int | None) -> list[GenerateChunk]:
    from mlxserve.runners.llamacpp.runner import LlamaCppRunner

    runner = LlamaCppRunner()
    await runner.load(
        open_model(store, "smol:lookup"),
        RunnerOptions(max_parallel=1, context_length=256, num_draft_tokens=lookup),
    )
    try:
        request = GenerateRequest(prompt=LOOKUP_PROMPT, temperature=0.0, max_tokens=GENERATED)
        return [chunk async for chunk in runner.generate(request)]
    finally:
        await runner.unload()


async def test_prompt_lookup_on_llamacpp_is_lossless_and_counted(
    default_gguf, tmp_path, monkeypatch
):
    """Drafts change nothing but the speed: the answer is plain decoding's with the attention
    kernel a model with prompt lookup is loaded with (flash attention: without it a verify
    step's rows round differently from one token at a time, see ``platform.py``)."""
    store = ModelStore(tmp_path / "store")
    import_path(store, default_gguf, "smol:lookup")
    assert platform.llama_cpp_flash_attention(drafts=True)
    monkeypatch.setenv("MLXSERVE_LLAMACPP_FLASH_ATTENTION", "1")
    plain = await llamacpp_answers(store, None)
    monkeypatch.delenv("MLXSERVE_LLAMACPP_FLASH_ATTENTION")
    looked_up = await llamacpp_answers(store, 4)
    assert tokens(looked_up) == tokens(plain)
    assert plain[-1].stats.draft_tokens == 0
    assert looked_up[-1].stats.draft_tokens > 0
