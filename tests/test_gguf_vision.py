"""GGUF vision models: the tiny GGUF text model with a tiny random-weight projector (``mmproj``,
``tests/fixtures/gguf_mmproj.py``), imported from an Ollama store's ``projector`` layer, served
by the llama.cpp runner through libmtmd: images change the answer, count as prompt tokens, and
every API carries them."""

from __future__ import annotations

import pytest

from mlxserve.errors import InvalidRequestError
from mlxserve.inference import LoadedModel
from mlxserve.runners.select import choose_runner
from mlxserve.server.describe import show_body
from modelstore import mediatypes
from modelstore.errors import ImportSourceError
from modelstore.importer import import_path
from modelstore.runtime import open_model
from modelstore.store import ModelStore
from tests.fixtures.gguf_mmproj import IMAGE_TOKENS, make_tiny_mmproj
from tests.test_vision import APIS, b64, chat, png, reply_text

QUESTION = [{"role": "user", "content": "What is in this picture?"}]
MODEL = "tiny:gguf-vision"


@pytest.fixture(scope="module")
def gguf_vision_store(tmp_path_factory, tiny_models) -> ModelStore:
    """``tiny:gguf-vision`` (from an Ollama store with a projector layer) and the plain
    ``tiny:gguf``, which must refuse images."""
    from modelstore.ollama import PROJECTOR, find_model, import_ollama
    from tests.fixtures.ollama_store import add_ollama_model

    work = tmp_path_factory.mktemp("gguf-vision")
    store = ModelStore(work / "home")
    projector = make_tiny_mmproj(work / "mmproj.gguf")
    root = work / "ollama"
    extra = [(PROJECTOR, projector)]
    add_ollama_model(root, "tiny", "vision", tiny_models.gguf_path, extra_layers=extra)
    import_ollama(store, find_model("tiny:vision", root), root, name=MODEL)
    import_path(store, tiny_models.gguf_path, "tiny:gguf")
    return store


@pytest.fixture(scope="module")
async def gguf_vision(gguf_vision_store):
    loaded = await LoadedModel.load(gguf_vision_store, MODEL)
    yield loaded
    await loaded.unload()


async def answer(loaded: LoadedModel, images: list[bytes]) -> tuple[list[int], int]:
    request = loaded.chat_request(QUESTION, {"temperature": 0.0, "max_tokens": 8})
    request.images = images
    chunks = [chunk async for chunk in loaded.generate(request)]
    tokens = [token for chunk in chunks for token in chunk.token_ids]
    return tokens, chunks[-1].stats.prompt_eval_count


def test_the_store_keeps_the_projector_as_its_own_layer(gguf_vision_store):
    stored = gguf_vision_store.resolve(MODEL)
    types = [layer.media_type for layer in stored.manifest.layers]
    assert types.count(mediatypes.PROJECTOR_GGUF) == 1
    config = gguf_vision_store.config(stored)
    assert config.vision["projector_type"] == "mlp"
    model = open_model(gguf_vision_store, MODEL)
    assert model.projector is not None and model.projector.is_file()
    assert choose_runner(model) == "llamacpp"
    capabilities = show_body(gguf_vision_store, stored)["capabilities"]
    assert "completion" in capabilities and "vision" in capabilities
    plain = gguf_vision_store.resolve("tiny:gguf")
    assert "vision" not in show_body(gguf_vision_store, plain)["capabilities"]


def test_a_projector_layer_that_is_not_a_projector_is_refused(tmp_path, tiny_models):
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


async def test_image_tokens_count_in_the_prompt(gguf_vision):
    with_image = (await answer(gguf_vision, [png((0, 255, 0))]))[1]
    without = (await answer(gguf_vision, []))[1]
    assert with_image - without == IMAGE_TOKENS


async def test_a_text_turn_after_an_image_turn_is_not_confused_by_its_cache(gguf_vision):
    """The slot keeps the image turn's KV; a text prompt must not reuse it past the image."""
    first = (await answer(gguf_vision, []))[0]
    await answer(gguf_vision, [png((9, 99, 199))])
    assert (await answer(gguf_vision, []))[0] == first


async def test_a_bad_image_is_refused(gguf_vision):
    with pytest.raises(InvalidRequestError, match="image 0"):
        await answer(gguf_vision, [b"not an image"])


# -- through the daemon ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_vision_daemon(gguf_vision_store):
    from tests.daemon import Daemon

    running = Daemon(gguf_vision_store.root).start()
    yield running
    running.stop()


@pytest.mark.parametrize("api", APIS, ids=lambda api: api.__name__)
def test_each_api_answers_about_the_image(gguf_vision_daemon, api):
    status, red = chat(gguf_vision_daemon, api, b64(png((255, 0, 0))), model=MODEL)
    assert status == 200, red
    _, blue = chat(gguf_vision_daemon, api, b64(png((0, 0, 255))), model=MODEL)
    assert reply_text(red) != reply_text(blue)


def test_a_gguf_without_projector_refuses_images(gguf_vision_daemon):
    status, body = chat(gguf_vision_daemon, APIS[0], b64(png((255, 0, 0))), model="tiny:gguf")
    assert status == 400 and "not a vision model" in str(body)
