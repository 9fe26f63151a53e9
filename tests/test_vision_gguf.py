"""A GGUF vision model on llama.cpp: the tiny GGUF text model with a generated random-weight
LLaVA projector (``mmproj``), created from a ModelSpec and imported from an Ollama store with a
``projector`` layer. Images go through libmtmd into a slot of the slot engine; they change the
answer, count as prompt tokens, and reach the model through every API."""

from __future__ import annotations

import json

import pytest

from mlxserve.chat.model import LoadedModel
from mlxserve.errors import InvalidRequestError
from mlxserve.runners.select import choose_runner
from mlxserve.server.describe import show_body
from modelstore import mediatypes
from modelstore.errors import SpecValidationError
from modelstore.importer import import_path
from modelstore.runtime import open_model
from modelstore.spec import build_draft, load_spec
from modelstore.store import ModelStore
from tests.chat_helpers import chat_request
from tests.fixtures.gguf_mmproj import IMAGE_TOKENS, make_tiny_mmproj
from tests.test_vision import APIS, answer, b64, chat, png, reply_text


def create(store: ModelStore, folder, name: str, spec: dict) -> None:
    path = folder / f"{name.replace(':', '-')}.modelspec.json"
    path.write_text(json.dumps(spec))
    store.commit(build_draft(load_spec(path), store), name)


@pytest.fixture(scope="module")
def mmproj(tmp_path_factory):
    return make_tiny_mmproj(tmp_path_factory.mktemp("mmproj") / "mmproj.gguf")


@pytest.fixture(scope="module")
def gguf_vision_store(tiny_models, mmproj, tmp_path_factory) -> ModelStore:
    """``tiny:gguf-vision`` (ModelSpec with a projector), ``tiny:ollama-vision`` (an Ollama
    model with a ``projector`` layer) and, to refuse images, the plain ``tiny:gguf``."""
    from modelstore.ollama import PROJECTOR, find_model, import_ollama
    from tests.fixtures.ollama_store import add_ollama_model

    work = tmp_path_factory.mktemp("gguf-vision")
    store = ModelStore(work / "home")
    import_path(store, tiny_models.gguf_path, "tiny:gguf")
    spec = {"from": str(tiny_models.gguf_path), "projector": str(mmproj)}
    create(store, work, "tiny:gguf-vision", spec)
    root = work / "ollama"
    extra = [(PROJECTOR, mmproj)]
    add_ollama_model(root, "tiny", "llava", tiny_models.gguf_path, extra_layers=extra)
    import_ollama(store, find_model("tiny:llava", root), root, name="tiny:ollama-vision")
    return store


@pytest.fixture(scope="module")
async def gguf_vision(gguf_vision_store):
    loaded = await LoadedModel.load(gguf_vision_store, "tiny:gguf-vision")
    yield loaded
    await loaded.unload()


@pytest.mark.parametrize("name", ["tiny:gguf-vision", "tiny:ollama-vision"])
def test_the_store_knows_the_projector(gguf_vision_store, name):
    stored = gguf_vision_store.resolve(name)
    types = [layer.media_type for layer in stored.manifest.layers]
    assert types.count(mediatypes.PROJECTOR_GGUF) == 1
    assert types.count(mediatypes.WEIGHTS_GGUF) == 1
    assert choose_runner(open_model(gguf_vision_store, name)) == "llamacpp"
    assert gguf_vision_store.config(stored).vision["projector_type"] == "mlp"
    body = show_body(gguf_vision_store, stored)
    assert "vision" in body["capabilities"]
    assert (
        "vision"
        not in show_body(gguf_vision_store, gguf_vision_store.resolve("tiny:gguf"))["capabilities"]
    )


def test_a_projector_that_is_not_one_is_refused_at_create(gguf_vision_store, tiny_models, tmp_path):
    spec = {"from": str(tiny_models.gguf_path), "projector": str(tiny_models.gguf_path)}
    with pytest.raises(SpecValidationError, match="not a vision projector"):
        create(gguf_vision_store, tmp_path, "bad:projector", spec)
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\xff" * 60)
    spec["projector"] = str(tmp_path / "junk.gguf")
    with pytest.raises(SpecValidationError, match="projector"):
        create(gguf_vision_store, tmp_path, "bad:junk", spec)


def test_an_ollama_projector_layer_that_is_not_one_is_refused(tiny_models, tmp_path):
    from modelstore.errors import ImportSourceError
    from modelstore.ollama import PROJECTOR, find_model, import_ollama
    from tests.fixtures.ollama_store import add_ollama_model

    root = tmp_path / "ollama"
    extra = [(PROJECTOR, tiny_models.gguf_path)]  # a text model, not a vision tower
    add_ollama_model(root, "tiny", "bad", tiny_models.gguf_path, extra_layers=extra)
    store = ModelStore(tmp_path / "home")
    with pytest.raises(ImportSourceError, match="not a vision projector"):
        import_ollama(store, find_model("tiny:bad", root), root, name="tiny:bad")


async def test_a_different_image_changes_the_answer_at_temperature_0(gguf_vision):
    red = (await answer(gguf_vision, [png((255, 0, 0))]))[0]
    red_again = (await answer(gguf_vision, [png((255, 0, 0))]))[0]
    blue = (await answer(gguf_vision, [png((0, 0, 255))]))[0]
    assert red == red_again
    assert red != blue


async def test_a_text_turn_after_an_image_turn_is_not_confused_by_its_cache(gguf_vision):
    """The slot keeps the image turn's KV; a text prompt must not reuse it past the image."""
    first = (await answer(gguf_vision, []))[0]
    await answer(gguf_vision, [png((9, 99, 199))])
    assert (await answer(gguf_vision, []))[0] == first


async def test_image_tokens_count_in_the_prompt(gguf_vision):
    with_image = (await answer(gguf_vision, [png((0, 255, 0))]))[1]
    without = (await answer(gguf_vision, []))[1]
    assert with_image - without == IMAGE_TOKENS


async def test_a_text_that_holds_libmtmds_default_marker_keeps_it_as_text(gguf_vision):
    """The projector's marker is the load's own: a message quoting ``<__media__>`` (libmtmd's
    default) beside an image is text, and the image counts once (it failed to pair before)."""
    text = [{"role": "user", "content": "What is <__media__> in llama.cpp?"}]

    async def prompt_count(images: list[bytes]) -> int:
        request = chat_request(gguf_vision, text, {"temperature": 0.0, "max_tokens": 2})
        request.images = images
        chunks = [chunk async for chunk in gguf_vision.generate(request)]
        return chunks[-1].stats.prompt_eval_count

    assert gguf_vision.runner.image_marker != "<__media__>"
    assert await prompt_count([png((5, 6, 7))]) - await prompt_count([]) == IMAGE_TOKENS


@pytest.mark.parametrize(
    "data", [b"not an image", png((1, 2, 3))[:30]], ids=["garbage", "truncated"]
)
async def test_a_bad_image_is_refused(gguf_vision, data):
    with pytest.raises(InvalidRequestError, match="image 0"):
        await answer(gguf_vision, [data])


# -- through the daemon: one table of cases for every API ---------------------------------------


@pytest.fixture(scope="module")
def gguf_vision_daemon(gguf_vision_store):
    from tests.daemon import Daemon

    running = Daemon(gguf_vision_store.root).start()
    yield running
    running.stop()


@pytest.mark.parametrize("model", ["tiny:gguf-vision", "tiny:ollama-vision"])
@pytest.mark.parametrize("api", APIS, ids=lambda api: api.__name__)
def test_each_api_answers_about_the_image(gguf_vision_daemon, api, model):
    status, red = chat(gguf_vision_daemon, api, b64(png((255, 0, 0))), model=model)
    assert status == 200, red
    _, blue = chat(gguf_vision_daemon, api, b64(png((0, 0, 255))), model=model)
    assert reply_text(red) != reply_text(blue)


@pytest.mark.parametrize("api", APIS, ids=lambda api: api.__name__)
def test_base64_wrapped_in_lines_is_the_same_image(gguf_vision_daemon, api):
    """``"$(base64 photo.png)"`` with GNU coreutils wraps at 76 columns, and Ollama takes it."""
    plain = b64(png((255, 0, 0)))
    wrapped = "\n".join(plain[i : i + 76] for i in range(0, len(plain), 76))
    assert "\n" in wrapped
    status, answer = chat(gguf_vision_daemon, api, wrapped, model="tiny:gguf-vision")
    assert status == 200, answer
    _, expected = chat(gguf_vision_daemon, api, plain, model="tiny:gguf-vision")
    assert reply_text(answer) == reply_text(expected)


@pytest.mark.parametrize("api", APIS, ids=lambda api: api.__name__)
def test_the_gguf_without_a_projector_refuses_images(gguf_vision_daemon, api):
    status, body = chat(gguf_vision_daemon, api, b64(png((255, 0, 0))), model="tiny:gguf")
    assert status == 400 and "not a vision model" in json.dumps(body)


def test_the_real_clients_send_images_to_a_gguf_vision_model(gguf_vision_daemon):
    """The ``ollama``, ``openai`` and ``anthropic`` packages, as users call them, each get an
    answer about the image, and each answer changes with the image at temperature 0."""
    import anthropic
    import ollama
    import openai

    url = gguf_vision_daemon.url
    ollama_client = ollama.Client(host=url, timeout=120)
    openai_client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120)
    anthropic_client = anthropic.Anthropic(base_url=url, api_key="unused", timeout=120)

    def by_ollama(image: str) -> str:
        message = {"role": "user", "content": "What is this?", "images": [image]}
        answer = ollama_client.chat(
            model="tiny:gguf-vision",
            messages=[message],
            options={"temperature": 0, "num_predict": 8},
        )
        return answer.message.content

    def by_openai(image: str) -> str:
        content = [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
        ]
        answer = openai_client.chat.completions.create(
            model="tiny:gguf-vision",
            messages=[{"role": "user", "content": content}],
            temperature=0,
            max_tokens=8,
        )
        return answer.choices[0].message.content or ""

    def by_anthropic(image: str) -> str:
        source = {"type": "base64", "media_type": "image/png", "data": image}
        content = [{"type": "image", "source": source}, {"type": "text", "text": "What is this?"}]
        answer = anthropic_client.messages.create(
            model="tiny:gguf-vision",
            messages=[{"role": "user", "content": content}],
            max_tokens=8,
            extra_body={"temperature": 0},  # the client no longer names it; the API takes it
        )
        return "".join(block.text for block in answer.content if block.type == "text")

    red, blue = b64(png((255, 0, 0))), b64(png((0, 0, 255)))
    for ask in (by_ollama, by_openai, by_anthropic):
        assert ask(red) != ask(blue), ask.__name__


async def test_context_ids_outside_the_vocabulary_are_refused_beside_images(gguf_vision):
    """``/api/generate``'s ``context`` with images: the ids are checked before they are read
    back as text for libmtmd (llama.cpp reads past its vocabulary for one out of range)."""
    request = chat_request(gguf_vision, [], {"temperature": 0.0, "max_tokens": 2})
    request.prompt, request.prompt_tokens = None, [10**9]
    request.images = [png((1, 2, 3))]
    with pytest.raises(InvalidRequestError, match="context token ids must be between 0 and"):
        [chunk async for chunk in gguf_vision.generate(request)]
