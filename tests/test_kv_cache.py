"""``kv_cache_type``: a quantized KV cache holds fewer bytes, on both runners, measured on the
caches themselves (mlx-lm's ``QuantizedKVCache``, llama.cpp's sequence state), and the memory
estimate used for admission and ``/api/ps`` says so before any token is generated."""

from __future__ import annotations

import json
import urllib.request

import pytest

from mlxserve.errors import InvalidRequestError, UnsupportedFeatureError
from mlxserve.runners.base import GenerateRequest, RunnerOptions
from mlxserve.runners.kvcache import kv_cache_type
from modelstore.importer import import_path
from modelstore.runtime import open_model
from modelstore.store import ModelStore
from tests.fixtures.tiny_models import WIDE_HEADS, make_tiny_variant

PROMPT = "The capital of France is Paris. The capital of Italy is Rome. " * 8
GENERATED = 24
"""With the prompt, just under 256 tokens: mlx-lm's quantized cache grows in steps of 256, and
what it allocates is what it holds."""
LLAMACPP_GENERATED = 8
"""llama.cpp saves only the cells a sequence uses: a short answer measures the same ratio."""


@pytest.fixture(scope="module")
def store(tiny_models, tmp_path_factory) -> ModelStore:
    root = tmp_path_factory.mktemp("kv")
    store = ModelStore(root / "store")
    wide = make_tiny_variant(root / "wide", tiny_models.hf_folder, WIDE_HEADS)
    import_path(store, wide, "wide:mlx")
    import_path(store, tiny_models.hf_folder, "tiny:mlx")
    return store


async def generate(runner, prompt: str = PROMPT, max_tokens: int = GENERATED) -> list[int]:
    request = GenerateRequest(prompt=prompt, temperature=0.0, max_tokens=max_tokens)
    return [token async for chunk in runner.generate(request) for token in chunk.token_ids]


async def mlx_cache_bytes(store: ModelStore, cache_type: str) -> tuple[int, int, list[int]]:
    """(the estimate at load, the bytes the prompt cache holds after one answer, the answer)."""
    from mlxserve.runners.mlx.runner import MlxRunner

    runner = MlxRunner()
    info = await runner.load(
        open_model(store, "wide:mlx"), RunnerOptions(kv_cache_type=cache_type, max_parallel=1)
    )
    try:
        tokens = await generate(runner)
        return info.details["kv_cache_bytes"], runner._prompt_cache.nbytes, tokens
    finally:
        await runner.unload()


async def test_a_quantized_mlx_kv_cache_holds_fewer_bytes(store):
    f16_estimate, f16_bytes, f16_tokens = await mlx_cache_bytes(store, "f16")
    q8_estimate, q8_bytes, q8_tokens = await mlx_cache_bytes(store, "q8_0")
    q4_estimate, q4_bytes, q4_tokens = await mlx_cache_bytes(store, "q4_0")
    assert len(f16_tokens) == len(q8_tokens) == len(q4_tokens) == GENERATED
    assert 0 < q4_bytes < q8_bytes < f16_bytes / 2
    assert q4_estimate < q8_estimate < f16_estimate / 2


async def test_the_mlx_kv_cache_type_comes_from_the_modelspec(store):
    from mlxserve.runners.mlx.runner import MlxRunner

    model = open_model(store, "wide:mlx")
    model.parameters["kv_cache_type"] = "q4_0"
    runner = MlxRunner()
    info = await runner.load(model, RunnerOptions())
    await runner.unload()
    assert info.details["kv_cache_type"] == "q4_0"


async def test_heads_too_narrow_to_quantize_are_refused_at_load(store):
    from mlxserve.runners.mlx.runner import MlxRunner

    runner = MlxRunner()
    with pytest.raises(UnsupportedFeatureError, match="multiple of 32"):
        await runner.load(open_model(store, "tiny:mlx"), RunnerOptions(kv_cache_type="q8_0"))


def test_an_unknown_kv_cache_type_is_the_callers_mistake():
    with pytest.raises(InvalidRequestError, match="q8_0"):
        kv_cache_type("q3_x")


@pytest.fixture(scope="module")
def smol_store(default_gguf, tmp_path_factory) -> ModelStore:
    store = ModelStore(tmp_path_factory.mktemp("kv-smol"))
    import_path(store, default_gguf, "smol:kv")
    return store


async def llamacpp_cache_bytes(store: ModelStore, cache_type: str) -> tuple[int, int, list[int]]:
    """(the estimate at load, the bytes llama.cpp saves for the sequence, the answer)."""
    import llama_cpp

    from mlxserve.runners.llamacpp.runner import LlamaCppRunner

    runner = LlamaCppRunner()
    info = await runner.load(
        open_model(store, "smol:kv"),
        RunnerOptions(kv_cache_type=cache_type, max_parallel=1, context_length=256),
    )
    try:
        tokens = await generate(runner, "The capital of France is", LLAMACPP_GENERATED)
        context = runner._slots._context.ctx
        measured = llama_cpp.llama_state_seq_get_size(context, 0)
        return info.details["kv_cache_bytes"], measured, tokens
    finally:
        await runner.unload()


async def test_a_quantized_llamacpp_kv_cache_holds_fewer_bytes(smol_store):
    f16_estimate, f16_bytes, f16_tokens = await llamacpp_cache_bytes(smol_store, "f16")
    q8_estimate, q8_bytes, q8_tokens = await llamacpp_cache_bytes(smol_store, "q8_0")
    assert len(f16_tokens) == len(q8_tokens) == LLAMACPP_GENERATED
    assert q8_bytes < f16_bytes * 0.6
    assert q8_estimate < f16_estimate * 0.6


async def test_api_ps_shows_the_kv_cache_and_a_type_the_heads_cannot_hold_is_refused(daemon):
    import aiohttp

    async with aiohttp.ClientSession() as session:
        body = {"model": "tiny:gguf", "prompt": "Hi", "stream": False}
        await session.post(
            f"{daemon.url}/api/generate", json={**body, "options": {"num_predict": 2}}
        )
        (entry,) = [
            model
            for model in (await (await session.get(f"{daemon.url}/api/ps")).json())["models"]
            if model["name"] == "tiny:gguf"
        ]
        assert entry["kv_cache_type"] == "f16"
        assert entry["kv_cache_bytes"] > 0
        create = {
            "model": "tiny:q8kv",
            "from": "tiny:gguf",
            "stream": False,
            "parameters": {"kv_cache_type": "q8_0"},
        }
        assert (await session.post(f"{daemon.url}/api/create", json=create)).status == 200
        refused = await session.post(
            f"{daemon.url}/api/generate", json={**body, "model": "tiny:q8kv"}
        )
        assert refused.status == 400
        assert (await refused.json())["code"] == "unsupported_feature"


def test_a_request_chooses_the_kv_cache_type_through_options(smol_store):
    """``options.kv_cache_type`` reloads the model with that cache (as ``num_ctx`` reloads it
    with that context), through the real ``ollama`` client; later requests that do not ask
    keep it; an unknown type is a 400 before anything loads."""
    import ollama

    from tests.daemon import Daemon

    daemon = Daemon(smol_store.root).start()

    def loaded() -> dict:
        with urllib.request.urlopen(f"{daemon.url}/api/ps", timeout=30) as response:
            (entry,) = json.loads(response.read())["models"]
        return entry

    try:
        client = ollama.Client(host=daemon.url, timeout=120)
        options = {"num_predict": 2, "temperature": 0, "num_ctx": 512}
        client.generate(model="smol:kv", prompt="Hi", options=options)
        f16 = loaded()
        client.generate(model="smol:kv", prompt="Hi", options={**options, "kv_cache_type": "q8_0"})
        q8 = loaded()
        client.generate(model="smol:kv", prompt="Hi", options=options)
        kept = loaded()
        with pytest.raises(ollama.ResponseError) as refused:
            client.generate(model="smol:kv", prompt="Hi", options={"kv_cache_type": "q3_x"})
    finally:
        daemon.stop()
    assert (f16["kv_cache_type"], q8["kv_cache_type"], kept["kv_cache_type"]) == (
        "f16",
        "q8_0",
        "q8_0",
    )
    assert q8["context_length"] == f16["context_length"] == 512
    assert q8["kv_cache_bytes"] < f16["kv_cache_bytes"] * 0.6
    assert refused.value.status_code == 400 and "q8_0" in str(refused.value)
