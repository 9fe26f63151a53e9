"""The MLX vision runner on a generated tiny LLaVA (random weights, real processor config):
images change the answer, count as prompt tokens, and bad ones are refused."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from mlxserve.errors import InvalidRequestError, UnsupportedFeatureError
from mlxserve.inference import LoadedModel
from mlxserve.runners.select import choose_runner
from mlxserve.server.describe import show_body
from modelstore.importer import import_path
from modelstore.runtime import open_model
from modelstore.store import ModelStore
from tests.fixtures.tiny_vision import make_tiny_vision_model

QUESTION = [{"role": "user", "content": "What is in this picture?"}]


def png(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def vision_store(tmp_path_factory) -> ModelStore:
    work = tmp_path_factory.mktemp("vision")
    store = ModelStore(work / "home")
    import_path(store, make_tiny_vision_model(work / "tiny-llava"), "tiny:vision")
    return store


@pytest.fixture(scope="module")
async def vision(vision_store):
    loaded = await LoadedModel.load(vision_store, "tiny:vision")
    yield loaded
    await loaded.unload()


async def answer(loaded: LoadedModel, images: list[bytes]) -> tuple[list[int], int]:
    request = loaded.chat_request(QUESTION, {"temperature": 0.0, "max_tokens": 8})
    request.images = images
    chunks = [chunk async for chunk in loaded.generate(request)]
    tokens = [token for chunk in chunks for token in chunk.token_ids]
    return tokens, chunks[-1].stats.prompt_eval_count


def test_the_store_knows_a_vision_model(vision_store):
    stored = vision_store.resolve("tiny:vision")
    config = vision_store.config(stored)
    assert config.vision["vision_model"] == "clip_vision_model"
    assert config.vision["processor_files"] == ["processor_config.json"]
    assert choose_runner(open_model(vision_store, "tiny:vision")) == "mlx-vlm"
    assert show_body(vision_store, stored, None)["capabilities"] == ["completion", "vision"]


async def test_a_different_image_changes_the_answer_at_temperature_0(vision):
    red = (await answer(vision, [png((255, 0, 0))]))[0]
    red_again = (await answer(vision, [png((255, 0, 0))]))[0]
    blue = (await answer(vision, [png((0, 0, 255))]))[0]
    assert red == red_again
    assert red != blue


async def test_image_tokens_count_in_the_prompt(vision):
    with_image = (await answer(vision, [png((0, 255, 0))]))[1]
    without = (await answer(vision, []))[1]
    assert with_image > without


@pytest.mark.parametrize(
    "data", [b"not an image", png((1, 2, 3))[:30]], ids=["garbage", "truncated"]
)
async def test_a_bad_image_is_refused(vision, data):
    with pytest.raises(InvalidRequestError, match="image 0"):
        await answer(vision, [data])


async def test_json_output_is_refused_not_ignored(vision):
    request = vision.chat_request(QUESTION, {"response_format": {"type": "json"}})
    with pytest.raises(UnsupportedFeatureError):
        [chunk async for chunk in vision.generate(request)]
