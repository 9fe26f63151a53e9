"""The MLX vision runner on a generated tiny LLaVA (random weights, real processor config):
images change the answer, count as prompt tokens, and bad ones are refused."""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
import urllib.request

import pytest
from PIL import Image

from mlxserve.chat.model import LoadedModel
from mlxserve.errors import InvalidRequestError, UnsupportedFeatureError
from mlxserve.runners.select import choose_runner
from mlxserve.server.describe import show_body
from modelstore.importer import import_path
from modelstore.runtime import open_model
from modelstore.store import ModelStore
from tests.chat_helpers import chat_request
from tests.fixtures.tiny_vision import make_tiny_vision_model
from tests.test_images import bomb_png

QUESTION = [{"role": "user", "content": "What is in this picture?"}]


def png(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def vision_store(tmp_path_factory, tiny_models) -> ModelStore:
    """``tiny:vision`` and, to be refused images, the tiny text model ``tiny:mlx``."""
    work = tmp_path_factory.mktemp("vision")
    store = ModelStore(work / "home")
    import_path(store, make_tiny_vision_model(work / "tiny-llava"), "tiny:vision")
    import_path(store, tiny_models.hf_folder, "tiny:mlx")
    return store


@pytest.fixture(scope="module")
async def vision(vision_store):
    loaded = await LoadedModel.load(vision_store, "tiny:vision")
    yield loaded
    await loaded.unload()


async def answer(loaded: LoadedModel, images: list[bytes]) -> tuple[list[int], int]:
    request = chat_request(loaded, QUESTION, {"temperature": 0.0, "max_tokens": 8})
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
    capabilities = show_body(vision_store, stored)["capabilities"]
    assert "completion" in capabilities and "vision" in capabilities


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
    request = chat_request(vision, QUESTION, {})
    request.response_format = {"type": "json"}
    with pytest.raises(UnsupportedFeatureError):
        [chunk async for chunk in vision.generate(request)]


# -- through the daemon: one table of cases for every API ---------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def native_body(image: str) -> tuple[str, dict]:
    message = {"role": "user", "content": "What is this?", "images": [image]}
    options = {"temperature": 0, "num_predict": 8}
    return "/api/chat", {"messages": [message], "stream": False, "options": options}


def openai_body(image: str) -> tuple[str, dict]:
    url = image if image.startswith("http") else f"data:image/png;base64,{image}"
    parts = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": url}},
    ]
    messages = [{"role": "user", "content": parts}]
    return "/v1/chat/completions", {"messages": messages, "temperature": 0, "max_tokens": 8}


def anthropic_body(image: str) -> tuple[str, dict]:
    source = {"type": "base64", "media_type": "image/png", "data": image}
    parts = [{"type": "image", "source": source}, {"type": "text", "text": "What is this?"}]
    messages = [{"role": "user", "content": parts}]
    return "/v1/messages", {"messages": messages, "temperature": 0, "max_tokens": 8}


def responses_body(image: str) -> tuple[str, dict]:
    url = image if image.startswith("http") else f"data:image/png;base64,{image}"
    parts = [
        {"type": "input_text", "text": "What is this?"},
        {"type": "input_image", "image_url": url},
    ]
    messages = [{"role": "user", "content": parts}]
    return "/v1/responses", {"input": messages, "temperature": 0, "max_output_tokens": 8}


def reply_text(body: dict) -> str:
    if "message" in body:
        return body["message"]["content"]
    if "choices" in body:
        return body["choices"][0]["message"]["content"]
    if "output" in body:
        return "".join(
            part.get("text", "") for item in body["output"] for part in item.get("content", [])
        )
    return "".join(block.get("text", "") for block in body["content"])


APIS = [native_body, openai_body, anthropic_body, responses_body]


@pytest.fixture(scope="module")
def vision_daemon(vision_store):
    from tests.daemon import Daemon

    running = Daemon(vision_store.root).start()
    yield running
    running.stop()


def chat(daemon, api, image: str, model: str = "tiny:vision") -> tuple[int, dict]:
    path, body = api(image)
    body = {"model": model, **body}
    request = urllib.request.Request(
        daemon.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize("api", APIS, ids=lambda api: api.__name__)
def test_each_api_answers_about_the_image(vision_daemon, api):
    status, red = chat(vision_daemon, api, b64(png((255, 0, 0))))
    assert status == 200, red
    _, blue = chat(vision_daemon, api, b64(png((0, 0, 255))))
    assert reply_text(red) != reply_text(blue)


@pytest.mark.parametrize("api", APIS, ids=lambda api: api.__name__)
@pytest.mark.parametrize(
    "image",
    [b64(b"not an image"), "%%%not-base64", b64(bomb_png(100_000, 100_000))],
    ids=["garbage", "bad-base64", "bomb"],
)
def test_each_api_refuses_bad_images(vision_daemon, api, image):
    status, body = chat(vision_daemon, api, image)
    assert status == 400, body


@pytest.mark.parametrize("api", [openai_body, responses_body], ids=lambda api: api.__name__)
def test_a_remote_image_url_is_refused(vision_daemon, api):
    status, body = chat(vision_daemon, api, "https://example.com/cat.png")
    assert status == 400 and "base64" in json.dumps(body)


@pytest.mark.parametrize("api", APIS, ids=lambda api: api.__name__)
def test_a_text_model_refuses_images_instead_of_ignoring_them(vision_daemon, api):
    status, body = chat(vision_daemon, api, b64(png((255, 0, 0))), model="tiny:mlx")
    assert status == 400 and "not a vision model" in json.dumps(body)


@pytest.mark.parametrize(
    "field, value",
    [("logit_bias", {10**9: 5.0}), ("logit_bias", {-1: 5.0}), ("prompt_tokens", [10**9])],
    ids=["bias past the vocabulary", "negative bias id", "context past the vocabulary"],
)
async def test_token_ids_outside_the_vocabulary_are_refused(vision, field, value):
    """As on the text runners (``decode.check_token_ids``): a 400 naming the field, not a
    crash in the processor or a scatter past the logits."""
    request = chat_request(vision, QUESTION, {"temperature": 0.0, "max_tokens": 2})
    if field == "prompt_tokens":
        request.prompt, request.prompt_tokens = None, value
    else:
        request.logit_bias = value
    with pytest.raises(InvalidRequestError, match="token ids must be between 0 and 400"):
        [chunk async for chunk in vision.generate(request)]


def test_a_text_that_names_the_image_token_is_refused_beside_images(vision_daemon):
    """``<image>`` is one of the tokenizer's own tokens: in a message's text beside an image,
    the processor could not tell which place is the image's (a shape error, a 500, before)."""
    message = {"role": "user", "content": "What does <image> mean here?"}
    with_image = {**message, "images": [b64(png((255, 0, 0)))]}
    status, body = chat(vision_daemon, lambda _: native_body_of(with_image), "")
    assert status == 400, body
    assert body["code"] == "invalid_request"
    assert "image token '<image>' 2 times for 1 image" in body["error"]
    status, body = chat(vision_daemon, lambda _: native_body_of(message), "")
    assert status == 200, body  # without images, the text is the text


def native_body_of(message: dict) -> tuple[str, dict]:
    options = {"temperature": 0, "num_predict": 2}
    return "/api/chat", {"messages": [message], "stream": False, "options": options}


def webp_of_one_colour(side: int) -> bytes:
    """A lossless WebP of ``side`` x ``side`` pixels of one colour: 1.4 KB at 6000 x 6000."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (10, 20, 30)).save(buffer, "WEBP", lossless=True)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "images, limit",
    [
        (lambda: [png((1, 2, 3), (8, 8))] * 101, "100 images"),
        (lambda: [webp_of_one_colour(6000)] * 24, "144,000,000 pixels"),
    ],
    ids=["101 images", "24 images of 36 MP in 34 KB"],
)
def test_a_request_s_images_are_bounded_together(vision_daemon, images, limit):
    """Each image is within its own limits, but a runner decodes a request's images before its
    processor scales them: 24 x 108 MB of RGB (from a 46 KB body) is refused from the headers
    alone, before anything is decoded, and the daemon answers meanwhile."""
    message = {"role": "user", "content": "What is this?", "images": [b64(i) for i in images()]}
    plain = {"role": "user", "content": "Hi"}
    assert chat(vision_daemon, lambda _: native_body_of(plain), "")[0] == 200  # loaded
    started = time.monotonic()
    status, body = chat(vision_daemon, lambda _: native_body_of(message), "")
    assert time.monotonic() - started < 1.0
    assert status == 400, body
    assert body["code"] == "request_limit"
    assert limit in body["error"]
