"""Quantize on create: mlx-lm's and llama.cpp's own quantizers turn the tiny fixture's float
weights into new weight layers; the same source and recipe give the same manifest digest, and
the quantized model loads and mostly agrees with the float one at temperature 0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlxserve.runners.base import GenerateRequest, RunnerOptions
from modelstore.errors import QuantizeError
from modelstore.importer import import_path
from modelstore.quantize import quantize_draft
from modelstore.runtime import open_model
from modelstore.spec import build_draft, load_spec
from modelstore.store import ModelStore

PROMPTS = ["The capital of France is", "Once upon a time there was", "The cat sat on"]
GENERATED = 16
AGREEMENT = {"Q8": 0.9, "Q4": 0.1, "Q8_0": 0.75, "Q4_K_M": 0.25}
"""Greedy tokens (position by position) that must match the float model's. Measured on the
tiny fixture: Q8 100 %, Q8_0 81 %, Q4_K_M 33 % (llama.cpp falls back to q5_0 for its 64-wide
rows), Q4 12 %. Once one token differs the rest of the answer follows another path, so 4-bit
figures on a 64-wide random model are low; they are floors against a broken quantizer."""


@pytest.fixture(scope="module")
def store(tiny_models, tmp_path_factory) -> ModelStore:
    store = ModelStore(tmp_path_factory.mktemp("quantize"))
    import_path(store, tiny_models.hf_folder, "tiny:mlx")
    import_path(store, tiny_models.gguf_path, "tiny:gguf")
    return store


def create(store: ModelStore, source: str, recipe: str, name: str, folder: Path) -> str:
    spec = folder / "spec.json"
    spec.write_text(json.dumps({"from": f"model://{source}"}))
    work = folder / f"work-{name.replace(':', '-')}"
    work.mkdir()
    draft = quantize_draft(build_draft(load_spec(spec), store), recipe, work)
    return store.commit(draft, name).model.manifest_digest


async def greedy(store: ModelStore, name: str, runner_name: str) -> list[list[int]]:
    from mlxserve.runners.llamacpp.runner import LlamaCppRunner
    from mlxserve.runners.mlx.runner import MlxRunner

    runner = MlxRunner() if runner_name == "mlx" else LlamaCppRunner()
    await runner.load(open_model(store, name), RunnerOptions(max_parallel=1))
    try:
        answers = []
        for prompt in PROMPTS:
            request = GenerateRequest(prompt=prompt, temperature=0.0, max_tokens=GENERATED)
            answers.append([t async for chunk in runner.generate(request) for t in chunk.token_ids])
        return answers
    finally:
        await runner.unload()


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [
        (x, y) for one, other in zip(a, b, strict=True) for x, y in zip(one, other, strict=True)
    ]
    return sum(x == y for x, y in pairs) / len(pairs)


@pytest.mark.parametrize(
    ("source", "runner_name", "recipe"),
    [
        ("tiny:mlx", "mlx", "Q8"),
        ("tiny:mlx", "mlx", "Q4"),
        ("tiny:gguf", "llamacpp", "Q8_0"),
        ("tiny:gguf", "llamacpp", "Q4_K_M"),
    ],
)
async def test_quantized_models_are_deterministic_and_agree_with_the_float_model(
    store, tmp_path, source, runner_name, recipe
):
    first = create(store, source, recipe, f"q-{recipe.lower()}:a", tmp_path)
    second = create(store, source, recipe, f"q-{recipe.lower()}:b", tmp_path)
    assert first == second
    config = store.config(store.resolve(f"q-{recipe.lower()}:a"))
    assert config.quantization == recipe
    assert config.source["quantize_recipe"] == recipe
    source_model = store.resolve(source)
    weights = {
        layer.digest for layer in source_model.manifest.layers if "weights" in layer.media_type
    }
    assert set(config.source["quantized_from"].split(",")) == weights
    quantized = await greedy(store, f"q-{recipe.lower()}:a", runner_name)
    float_answers = await greedy(store, source, runner_name)
    figure = agreement(quantized, float_answers)
    print(f"{recipe}: {figure:.0%} of greedy tokens agree with the float model")
    assert figure >= AGREEMENT[recipe]


def test_an_unknown_recipe_is_refused_with_the_known_ones(store, tmp_path):
    with pytest.raises(QuantizeError, match="Q4_K_M"):
        create(store, "tiny:gguf", "Q3_XYZ", "bad:recipe", tmp_path)


def test_quantized_weights_are_not_quantized_again(store, tmp_path):
    create(store, "tiny:gguf", "Q8_0", "once:q8", tmp_path)
    with pytest.raises(QuantizeError, match="already quantized"):
        create(store, "once:q8", "Q4_K_M", "twice:q4", tmp_path)


async def test_api_create_quantizes_with_ollamas_field(daemon):
    import aiohttp

    body = {"model": "tiny:q8-api", "from": "tiny:gguf", "quantize": "q8_0", "stream": False}
    async with aiohttp.ClientSession() as session:
        created = await session.post(f"{daemon.url}/api/create", json=body)
        assert created.status == 200, await created.text()
        shown = await (
            await session.post(f"{daemon.url}/api/show", json={"model": "tiny:q8-api"})
        ).json()
        assert shown["details"]["quantization_level"] == "Q8_0"
        refused = await session.post(
            f"{daemon.url}/api/create", json={**body, "model": "x:y", "quantize": "Q4"}
        )
        assert refused.status == 400
        assert (await refused.json())["code"] == "quantize_error"


def test_mlxctl_create_quantizes(store_home, tiny_models, tmp_path):
    from tests.cli import mlxctl

    mlxctl("import", str(tiny_models.gguf_path), "--name", "tiny:gguf", home=store_home)
    spec = tmp_path / "q.modelspec.yaml"
    spec.write_text("from: model://tiny:gguf\n")
    mlxctl("create", "tiny:q8", "-f", str(spec), "--quantize", "Q8_0", home=store_home)
    shown = json.loads(mlxctl("show", "tiny:q8", "--json", home=store_home).stdout)
    assert "Q8_0" in json.dumps(shown)


def test_a_packed_spec_with_quantize_is_the_model_create_makes(store, tmp_path):
    from modelstore.ocilayout import pack
    from modelstore.spec import reshape

    spec_path = tmp_path / "q.modelspec.json"
    spec_path.write_text(json.dumps({"from": "model://tiny:gguf", "quantize": "Q8_0"}))
    spec = load_spec(spec_path)
    packed = reshape(spec, build_draft(spec, store), tmp_path / "pack")
    created = create(store, "tiny:gguf", "Q8_0", "q8:created", tmp_path)
    assert pack(packed, "q8:created", tmp_path / "q8.tar").manifest_digest == created
