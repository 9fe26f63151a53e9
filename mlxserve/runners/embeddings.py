"""The MLX embedding runner: sentence-transformers / BERT-family folders through
``mlx-embeddings``' model code (BERT, XLM-RoBERTa, ModernBERT, Qwen3, Gemma 3 text, ...).

Only the architecture classes are used (``mlx_embeddings.utils.load_model`` on the store's
folder): its ``load`` would reach for the hub, and its models pool by mean only, while a model
declares its own pooling and normalisation (``modules.json``, ``1_Pooling/config.json``), which
the store records at import (``modelstore/sources.py``) and ``pooling.pool`` applies. Tokenizing
is the HF tokenizer's own, with its truncation (it keeps ``[SEP]`` when it cuts).
An embedding model cannot generate: ``generate`` refuses with a 400.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from typing import Any

from mlxserve.errors import (
    InferenceError,
    ModelNotLoadedError,
    RunnerUnavailableError,
    UnsupportedArchitectureError,
    UnsupportedFormatError,
)
from mlxserve.runners.base import (
    EmbedRequest,
    EmbedResult,
    GenerateChunk,
    GenerateRequest,
    LoadedModelInfo,
    RunnerOptions,
)
from mlxserve.runners.engine import shared_engine
from mlxserve.runners.loading import context_length, load_options
from mlxserve.runners.pooling import (
    length_batches,
    over_limit,
    padded,
    pool,
    refuse_generation,
)
from modelstore.model import LocalModel


class MlxEmbeddingRunner:
    name = "mlx-embeddings"

    def __init__(self) -> None:
        self._model: Any = None
        self._tokenizer: Any = None
        self._record: dict[str, Any] = {}
        self._limit = 0
        self._model_name = ""
        self._info: LoadedModelInfo | None = None
        self._engine = shared_engine()

    @property
    def max_parallel(self) -> int:
        return 1

    def _require(self) -> tuple[Any, Any]:
        if self._model is None:
            raise ModelNotLoadedError("no model is loaded in the MLX embedding runner")
        return self._model, self._tokenizer

    async def load(self, model: LocalModel, options: RunnerOptions) -> LoadedModelInfo:
        if model.format != "mlx" or model.embedding is None:
            raise UnsupportedFormatError(
                f"the {self.name} runner runs HF-folder embedding models; {model.name} is not one"
            )
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import mlx.core as mx
            from mlx_embeddings.utils import load_model
            from transformers import AutoTokenizer
        except ImportError as exc:
            raise RunnerUnavailableError(
                f"the {self.name} runner is not installed: pip install 'mlxserve[embeddings]'"
            ) from exc
        started = time.perf_counter_ns()
        options = load_options(model, options)

        def build() -> None:
            try:
                loaded = load_model(model.path)
            except (ValueError, FileNotFoundError) as exc:
                raise UnsupportedArchitectureError(
                    f"mlx-embeddings cannot load {model.name}: {exc}"
                ) from exc
            mx.eval(loaded.parameters())
            self._model = loaded
            self._tokenizer = AutoTokenizer.from_pretrained(str(model.path))

        await self._engine.call(build)
        from mlx.utils import tree_flatten

        self._record = model.embedding or {}
        self._limit = min(
            context_length(model, options),
            self._record.get("max_tokens") or context_length(model, options),
        )
        self._model_name = model.name
        self._info = LoadedModelInfo(
            runner=self.name,
            format=model.format,
            architecture=model.architecture,
            parameter_count=sum(v.size for _, v in tree_flatten(self._model.parameters())),
            quantization=model.quantization,
            context_length=self._limit,
            memory_bytes=int(mx.get_active_memory()),
            max_parallel=1,
            load_duration_ns=time.perf_counter_ns() - started,
            details={
                "pooling": self._record.get("pooling"),
                "normalize": self._record.get("normalize"),
            },
        )
        return self._info

    async def unload(self) -> None:
        def release() -> None:
            import mlx.core as mx

            self._model = self._tokenizer = None
            mx.clear_cache()

        await self._engine.call(release)

    def describe(self) -> LoadedModelInfo:
        if self._info is None:
            raise ModelNotLoadedError("no model is loaded in the MLX embedding runner")
        return self._info

    @property
    def chat_template(self) -> str | None:
        return None

    @property
    def special_tokens(self) -> dict[str, str]:
        return {"bos_token": "", "eos_token": ""}

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._require()[1].encode(text, add_special_tokens=add_special_tokens))

    def detokenize(self, token_ids: list[int]) -> str:
        return self._require()[1].decode(token_ids)

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        model, tokenizer = self._require()
        mode = self._record.get("pooling", "mean")
        normalize = bool(self._record.get("normalize", True))

        def run() -> EmbedResult:
            import mlx.core as mx

            ids = tokenizer(request.inputs)["input_ids"]
            over = over_limit([len(t) for t in ids], self._limit, request.truncate)
            if over:
                cut = tokenizer(
                    [request.inputs[i] for i in over], truncation=True, max_length=self._limit
                )["input_ids"]
                for index, tokens in zip(over, cut, strict=True):
                    ids[index] = tokens
            vectors: list[list[float]] = [[] for _ in ids]
            pad = tokenizer.pad_token_id or 0
            for batch in length_batches([len(t) for t in ids]):
                input_ids, mask = padded([ids[i] for i in batch], pad)
                try:
                    hidden = model(input_ids, attention_mask=mask).last_hidden_state
                except (ValueError, RuntimeError) as exc:
                    raise InferenceError(f"mlx-embeddings failed: {exc}") from exc
                pooled = pool(hidden, mask, mode, normalize)
                mx.eval(pooled)
                for index, vector in zip(batch, pooled.tolist(), strict=True):
                    vectors[index] = vector
            return EmbedResult(vectors, sum(len(t) for t in ids))

        return await self._engine.call(run)

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        raise refuse_generation(self._model_name)
