"""The prompt cache with images, on the real daemon and the GGUF vision fixture (llama.cpp,
libmtmd): the chat core places each image where it sits in the conversation, so the text before
the first image is the same in every later turn and the next turn reuses it, with the answer of
a cold run; an image in a later message lets the whole earlier conversation be reused. One
table of cases for every API: Ollama's message-level ``images`` (before the message's text, as
Ollama puts them, or at its ``[img]`` tags) and the content parts of OpenAI, the Responses API
and Anthropic (where the part sits).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from mlxserve.chat.core import collect, render_prompt, run_chat
from mlxserve.chat.model import LoadedModel
from mlxserve.server import api_anthropic, api_native, api_openai, api_responses, validate
from tests.test_vision import b64, png, vision_store  # noqa: F401
from tests.test_vision_gguf import gguf_vision, gguf_vision_store, mmproj  # noqa: F401

MODEL = "tiny:gguf-vision"
QUESTION = "What is in this picture, and what colour is it?"
FOLLOW_UP = "And what is around it?"
LATER = "Now look at this one."

Messages = list[dict[str, Any]]


def system_text(api: str) -> str:
    """A system prompt of its own per API, so no case finds another's prefix."""
    rules = " ".join(f"Rule {i}: describe place {i} in a few words." for i in range(8))
    return f"{api} session. {rules}"


def text_message(role: str, text: str) -> dict[str, Any]:
    return {"role": role, "content": text}


# -- one builder per API: a user message with an image, a request body, its answer and hit ----


def native_image(text: str, image: str) -> dict[str, Any]:
    return {"role": "user", "content": text, "images": [image]}


def native_body(messages: Messages) -> tuple[str, dict[str, Any]]:
    options = {"temperature": 0, "num_predict": 8}
    return "/api/chat", {"messages": messages, "stream": False, "options": options}


def native_read(body: dict[str, Any]) -> tuple[str, int, int]:
    return body["message"]["content"], body["cached_prompt_tokens"], body["prompt_eval_count"]


def openai_image(text: str, image: str) -> dict[str, Any]:
    url = f"data:image/png;base64,{image}"
    parts = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]
    return {"role": "user", "content": parts}


def openai_body(messages: Messages) -> tuple[str, dict[str, Any]]:
    return "/v1/chat/completions", {"messages": messages, "temperature": 0, "max_tokens": 8}


def openai_read(body: dict[str, Any]) -> tuple[str, int, int]:
    usage = body["usage"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    return body["choices"][0]["message"]["content"], cached, usage["prompt_tokens"]


def responses_image(text: str, image: str) -> dict[str, Any]:
    url = f"data:image/png;base64,{image}"
    parts = [{"type": "input_text", "text": text}, {"type": "input_image", "image_url": url}]
    return {"role": "user", "content": parts}


def responses_body(messages: Messages) -> tuple[str, dict[str, Any]]:
    return "/v1/responses", {"input": messages, "temperature": 0, "max_output_tokens": 8}


def responses_read(body: dict[str, Any]) -> tuple[str, int, int]:
    text = "".join(
        part.get("text", "") for item in body["output"] for part in item.get("content", [])
    )
    usage = body["usage"]
    return text, usage["input_tokens_details"]["cached_tokens"], usage["input_tokens"]


def anthropic_image(text: str, image: str) -> dict[str, Any]:
    source = {"type": "base64", "media_type": "image/png", "data": image}
    parts = [{"type": "text", "text": text}, {"type": "image", "source": source}]
    return {"role": "user", "content": parts}


def anthropic_body(messages: Messages) -> tuple[str, dict[str, Any]]:
    body = {"messages": messages, "temperature": 0, "max_tokens": 8}
    return "/v1/messages", body


def anthropic_read(body: dict[str, Any]) -> tuple[str, int, int]:
    text = "".join(block.get("text", "") for block in body["content"])
    usage = body["usage"]
    cached = usage["cache_read_input_tokens"]
    return text, cached, usage["input_tokens"] + cached


API = tuple[
    str,
    Callable[[str, str], dict[str, Any]],
    Callable[[Messages], tuple[str, dict[str, Any]]],
    Callable[[dict[str, Any]], tuple[str, int, int]],
    Callable[[dict[str, Any]], Any],
]
APIS: list[API] = [
    ("native", native_image, native_body, native_read, api_native.parse_chat),
    ("openai", openai_image, openai_body, openai_read, api_openai.parse_chat),
    ("responses", responses_image, responses_body, responses_read, api_responses.parse),
    ("anthropic", anthropic_image, anthropic_body, anthropic_read, api_anthropic.parse),
]


def post(daemon, api: API, messages: Messages) -> tuple[str, int, int]:
    path, body = api[2](messages)
    request = urllib.request.Request(
        daemon.url + path,
        json.dumps({"model": MODEL, **body}).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return api[3](json.loads(response.read()))


@pytest.fixture(scope="module")
def daemons(gguf_vision_store):  # noqa: F811
    """A daemon that keeps prompts, and a cold one: the model unloaded after every request
    and no disk tier, so nothing is ever reused there."""
    from tests.daemon import Daemon

    warm = Daemon(gguf_vision_store.root).start()
    cold_env = {"MLXSERVE_KEEP_ALIVE": "0", "MLXSERVE_PROMPT_CACHE_DISK_BYTES": "0"}
    cold = Daemon(gguf_vision_store.root, env=cold_env).start()
    yield warm, cold
    cold.stop()
    warm.stop()


def with_system(api: API, messages: Messages) -> Messages:
    """The system prompt where each API takes it (Anthropic's top-level ``system`` is a body
    field; its ``system``-role message, as Claude Code sends it, goes through the same core)."""
    return [text_message("system", system_text(api[0])), *messages]


def tokens_before_first_image(loaded, api: API, messages: Messages) -> int:
    """How many prompt tokens come before the first image once the chat core has placed it:
    the prefix the next turn must reuse."""
    _, body = api[2](messages)
    chat = api[4]({"model": loaded.model.name, **body})
    prompt, _ = render_prompt(loaded, chat)
    marker = loaded.runner.image_marker
    assert marker and prompt.count(marker) == 1
    return len(loaded.runner.tokenize(prompt[: prompt.index(marker)], add_special_tokens=False))


@pytest.mark.parametrize("api", APIS, ids=lambda api: api[0])
async def test_the_next_turn_reuses_the_text_before_the_first_image(daemons, gguf_vision, api):  # noqa: F811
    warm, cold = daemons
    image = b64(png((200, 30, 30)))
    first = with_system(api, [api[1](QUESTION, image)])
    answer, _, _ = post(warm, api, first)
    second = [*first, text_message("assistant", answer), text_message("user", FOLLOW_UP)]
    text, cached, prompt_tokens = post(warm, api, second)
    expected = tokens_before_first_image(gguf_vision, api, second)
    assert expected > 0
    assert cached >= expected - 1  # the boundary token may tokenize otherwise
    assert cached < prompt_tokens
    cold_text, cold_cached, cold_prompt_tokens = post(cold, api, second)
    assert (text, prompt_tokens) == (cold_text, cold_prompt_tokens)
    assert cold_cached == 0


@pytest.mark.parametrize("api", APIS, ids=lambda api: api[0])
def test_an_image_in_a_later_message_reuses_the_whole_earlier_text(daemons, api):
    warm, cold = daemons
    first = with_system(api, [text_message("user", QUESTION)])
    answer, cached, shared = post(warm, api, first)
    second = [
        *first,
        text_message("assistant", answer),
        api[1](LATER, b64(png((20, 40, 220)))),
    ]
    text, cached, prompt_tokens = post(warm, api, second)
    assert cached >= 0.95 * shared
    cold_text, cold_cached, cold_prompt_tokens = post(cold, api, second)
    assert (text, prompt_tokens, cold_cached) == (cold_text, cold_prompt_tokens, 0)


@pytest.mark.parametrize(
    ("content", "images", "text", "order", "offsets"),
    [
        ("What is this?", ["a"], "What is this?", ["a"], [0]),
        ("Compare [img] with [img].", ["a", "b"], "Compare  with .", ["a", "b"], [8, 14]),
        ("Only [img] here.", ["a", "b"], "Only  here.", ["b", "a"], [0, 5]),
        ("No tags, two images.", ["a", "b"], "No tags, two images.", ["a", "b"], [0, 0]),
    ],
    ids=["before-the-text", "at-each-tag", "tags-then-leftovers-first", "no-tags"],
)
def test_ollama_images_go_where_ollama_puts_them(content, images, text, order, offsets):
    """Before the message's text, or at its ``[img]`` tags in order (Ollama's ``chatPrompt``):
    the images come back in the order they then sit in the text."""
    placed = validate.placed_images(content, [image.encode() for image in images])
    assert placed == (text, [image.encode() for image in order], offsets)


# -- MLX: mlx-vlm's vision runner keeps the KV of the text before the first image --------------


async def mlx_turn(loaded, messages: Messages) -> tuple[str, Any]:
    """One turn through the chat core (the image placed where the OpenAI part sits)."""
    body = {"model": "tiny:vision", "messages": messages, "temperature": 0, "max_tokens": 6}
    async with run_chat(loaded, api_openai.parse_chat(body)) as run:
        collected = await collect(run)
    assert collected.done is not None
    return collected.text, collected.done.stats


async def test_mlx_vision_reuses_the_text_before_the_first_image(vision_store):  # noqa: F811
    first = with_system(APIS[1], [openai_image(QUESTION, b64(png((200, 30, 30))))])
    warm = await LoadedModel.load(vision_store, "tiny:vision")
    cold = await LoadedModel.load(vision_store, "tiny:vision")
    try:
        answer, _ = await mlx_turn(warm, first)
        second = [*first, text_message("assistant", answer), text_message("user", FOLLOW_UP)]
        text, stats = await mlx_turn(warm, second)
        cold_text, cold_stats = await mlx_turn(cold, second)
        expected = tokens_before_first_image(warm, APIS[1], second)
    finally:
        await warm.unload()
        await cold.unload()
    assert stats.cached_prompt_tokens >= expected - 1
    assert stats.cached_prompt_tokens < stats.prompt_eval_count
    assert (text, stats.prompt_eval_count) == (cold_text, cold_stats.prompt_eval_count)
    assert cold_stats.cached_prompt_tokens == 0


async def test_after_a_restart_the_text_before_the_first_image_comes_from_the_disk_tier(
    daemons,
    gguf_vision_store,  # noqa: F811
    gguf_vision,  # noqa: F811
):
    """The disk tier holds an image prompt's text before its first image (the slot is cut back
    to it before its state is stored): a daemon started after the first turn's daemon stopped
    reuses it, with the answer of a cold run."""
    from tests.daemon import Daemon

    _, cold = daemons
    api = APIS[0]
    first = [
        text_message("system", system_text("restart")),
        api[1](QUESTION, b64(png((30, 160, 60)))),
    ]
    before = Daemon(gguf_vision_store.root).start()
    try:
        answer, _, _ = post(before, api, first)
    finally:
        before.stop()
    second = [*first, text_message("assistant", answer), text_message("user", FOLLOW_UP)]
    after = Daemon(gguf_vision_store.root).start()
    try:
        text, cached, prompt_tokens = post(after, api, second)
    finally:
        after.stop()
    assert cached >= tokens_before_first_image(gguf_vision, api, second) - 1 > 0
    assert cached < prompt_tokens
    assert (text, prompt_tokens) == post(cold, api, second)[::2]
