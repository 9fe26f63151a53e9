"""Embeddings through llama.cpp: a context in embedding mode (``Llama(embedding=True)``).

Two users: the llama.cpp runner, whose chat models embed through a second, embedding-mode
context over the same GGUF (weights are memory-mapped, so they are shared), made on the first
embedding request and closed when the model is unloaded (``runner.py``); and
``LlamaCppEmbeddingRunner``, which serves GGUF embedding models (BERT, nomic-bert,
Qwen3-Embedding, ...) with only that context. llama-cpp-python's ``embed`` packs several
inputs into one decode (one sequence each), so a list is embedded in batches, not one input at
a time. A GGUF reranker (rank pooling: its classification head in the graph) is scored the same
way, pairs packed into one decode through llama.cpp's batch API (llama-cpp-python's ``embed``
reads a vector, not the head's one score), each pair laid out as llama.cpp's server lays it
(``format_prompt_rerank``): the GGUF's ``rerank`` template with ``{query}`` and ``{document}``
filled in where it has one (an LLM reranker, Qwen3-Reranker as ``convert_hf_to_gguf.py``
writes it: its head is the yes/no rows of the LM head and llama.cpp's softmax makes the first
output the probability of "yes"), else ``[BOS] query [EOS] [SEP] document [EOS]`` with each
special where the vocabulary adds it (the EOS after the document falls back to SEP, which is
how BERT's ``[CLS] q [SEP] d [SEP]`` and XLM-RoBERTa's ``<s> q </s></s> d </s>`` both come
out).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mlxserve import platform
from mlxserve.errors import (
    InferenceError,
    UnsupportedArchitectureError,
    UnsupportedFormatError,
)
from mlxserve.runners.base import (
    EmbedRequest,
    EmbedResult,
    RerankRequest,
    RerankResult,
    RunnerOptions,
    ScoreRequest,
)
from mlxserve.runners.engine import EngineThread
from mlxserve.runners.llamacpp.library import import_llama_cpp
from mlxserve.runners.loading import context_length
from mlxserve.runners.pooling import over_limit
from mlxserve.runners.rerank import budget_batches, cut_pair, fit_document
from mlxserve.runners.skeleton import EncoderRunnerBase
from modelstore.metadata import EMBEDDING_ARCHITECTURES, RANK_POOLING
from modelstore.model import LocalModel

POOLING_TYPES = {
    "mean": "LLAMA_POOLING_TYPE_MEAN",
    "cls": "LLAMA_POOLING_TYPE_CLS",
    "last": "LLAMA_POOLING_TYPE_LAST",
    RANK_POOLING: "LLAMA_POOLING_TYPE_RANK",
}
"""The store's pooling names (``modelstore/sources.py``) as llama.cpp's constants."""
CAUSAL_UBATCH = 512
"""Tokens per compute pass for a chat model's embedding context: a causal model may split an
input across passes, so its compute buffers need not be sized for the whole context."""
CHAT_MODEL_POOLING = "mean"
"""A chat model declares no pooling; mean over its final states, as the MLX runner does."""
RERANK_TEMPLATE = b"rerank"
"""The named chat template an LLM reranker's GGUF carries (``tokenizer.chat_template.rerank``)."""
CPU_RANK_PACK_TOKENS = 64
"""Tokens of cross-encoder pairs packed into one reranking decode on the CPU. ggml's attention
(without flash attention) multiplies every query of a decode with every key of it, other pairs'
included, and masks only after the product, so a pass's attention grows with the square of its
packed tokens, while a CPU's matrix products are already efficient at one pair's rows. Measured
on the bench's MiniLM-L6 cross-encoder (18-token pairs; docs/PERFORMANCE.md, "Reranking ...
issue 24"): 64 tokens was the fastest per document, 512 (the context) cost twice as much, one
pair per decode about what 64 cost. Flash attention skips the masked keys, but it casts keys and
values to 16-bit floats and moved a batched score 3e-3 from the same pair's alone. With layers
on a GPU the products are cheap and parallel, so there a decode packs up to the context. An LLM
reranker's prompts (a rerank template) pack up to the context too: on the one such model
measured (the tests' tiny Qwen3-Reranker GGUF) fewer, larger decodes were faster."""


class LlamaCppEmbedder:
    """One embedding-mode context; every call must come from its owner's worker thread."""

    def __init__(
        self,
        path: Path,
        pooling: str,
        limit: int,
        n_threads: int,
        n_gpu_layers: int,
        normalize: bool = True,
        causal: bool = False,
        adapter: Path | None = None,
    ) -> None:
        llama_cpp = import_llama_cpp()
        self.limit = limit
        self.normalize = normalize
        self.ranks = pooling == RANK_POOLING
        self.encoder_pack_tokens = min(limit, CPU_RANK_PACK_TOKENS) if n_gpu_layers == 0 else limit
        try:
            # n_batch = the context: llama-cpp-python packs inputs up to n_batch tokens per
            # decode. An encoder must also see a whole input in one ubatch.
            self.llama = llama_cpp.Llama(
                model_path=str(path),
                embedding=True,
                pooling_type=getattr(llama_cpp, POOLING_TYPES[pooling]),
                n_ctx=limit,
                n_batch=limit,
                n_ubatch=min(limit, CAUSAL_UBATCH) if causal else limit,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                n_gpu_layers=n_gpu_layers,
                lora_path=str(adapter) if adapter else None,
                verbose=False,
            )
        except ValueError as exc:
            raise InferenceError(
                f"llama.cpp could not load {path.name} for embedding: {exc}"
            ) from exc

    def tokenize(self, text: str) -> list[int]:
        """As ``Llama.embed`` tokenizes (BOS/CLS added, special-token text kept literal)."""
        return self.llama.tokenize(text.encode())

    def embed(self, request: EmbedRequest) -> EmbedResult:
        over_limit(
            [len(self.tokenize(text)) for text in request.inputs], self.limit, request.truncate
        )
        try:
            vectors, count = self.llama.embed(
                request.inputs, normalize=self.normalize, truncate=True, return_count=True
            )
        except (ValueError, RuntimeError) as exc:
            raise InferenceError(f"llama.cpp embedding failed: {exc}") from exc
        return EmbedResult([list(map(float, vector)) for vector in vectors], count)

    def rerank_template(self) -> str | None:
        llama_cpp = import_llama_cpp()
        template = llama_cpp.llama_model_chat_template(self.llama._model.model, RERANK_TEMPLATE)
        return template.decode("utf-8", "replace") if template else None

    def _pair_specials(self) -> tuple[list[int], list[int], list[int]]:
        """The specials before the query, between the texts and after the document."""
        llama_cpp = import_llama_cpp()
        vocab = self.llama._model.vocab
        eos = llama_cpp.llama_vocab_eos(vocab)
        sep = llama_cpp.llama_vocab_sep(vocab)
        eos = eos if eos >= 0 else sep
        adds_eos = llama_cpp.llama_vocab_get_add_eos(vocab) and eos >= 0
        adds_sep = llama_cpp.llama_vocab_get_add_sep(vocab) and sep >= 0
        middle = ([eos] if adds_eos else []) + ([sep] if adds_sep else [])
        end = [eos] if adds_eos else [sep] if adds_sep else []
        bos = llama_cpp.llama_vocab_bos(vocab)
        start = [bos] if llama_cpp.llama_vocab_get_add_bos(vocab) and bos >= 0 else []
        return start, middle, end

    def _encoder_pairs(self, request: RerankRequest) -> list[list[int]]:
        start, middle, end = self._pair_specials()
        special = len(start) + len(middle) + len(end)
        query = self.llama.tokenize(request.query.encode(), add_bos=False, special=False)
        pairs = []
        for index, document in enumerate(request.documents):
            tokens = self.llama.tokenize(document.encode(), add_bos=False, special=False)
            q, d = cut_pair(query, tokens, special, self.limit, request.truncate, index)
            pairs.append(start + q + middle + d + end)
        return pairs

    def _template_pairs(self, template: str, request: RerankRequest) -> list[list[int]]:
        """Each pair as the template's text, tokenized with its special tokens parsed, as
        llama.cpp's server does; a long document cut from its end until the prompt fits."""
        llama = self.llama

        def prompt(document: str) -> list[int]:
            text = template.replace("{query}", request.query).replace("{document}", document)
            return llama.tokenize(text.encode(), add_bos=False, special=True)

        return [
            fit_document(
                document,
                index,
                self.limit,
                request.truncate,
                prompt=prompt,
                tokenize=lambda text: llama.tokenize(text.encode(), add_bos=False, special=False),
                detokenize=lambda tokens: llama.detokenize(tokens).decode("utf-8", "ignore"),
            )
            for index, document in enumerate(request.documents)
        ]

    def rank(self, request: RerankRequest) -> RerankResult:
        """One score per document: pairs packed unpadded into decodes of at most
        ``encoder_pack_tokens`` (a cross-encoder's) or the context's tokens (a longer pair
        alone) and the context's sequences, the head's output read per sequence."""
        llama_cpp = import_llama_cpp()
        template = self.rerank_template()
        if template is None:
            pairs = self._encoder_pairs(request)
            pack = self.encoder_pack_tokens
        else:
            pairs = self._template_pairs(template, request)
            pack = self.limit
        scores: list[float] = [0.0] * len(pairs)
        llama = self.llama
        n_seq_max = llama.context_params.n_seq_max
        for batch in budget_batches([len(p) for p in pairs], pack, padded=False):
            for chunk in range(0, len(batch), n_seq_max):
                group = batch[chunk : chunk + n_seq_max]
                llama._batch.reset()
                for seq, index in enumerate(group):
                    llama._batch.add_sequence(pairs[index], seq, True)
                llama._ctx.kv_cache_clear()
                try:
                    llama._ctx.decode(llama._batch)
                except RuntimeError as exc:
                    raise InferenceError(f"llama.cpp reranking failed: {exc}") from exc
                for seq, index in enumerate(group):
                    scores[index] = float(
                        llama_cpp.llama_get_embeddings_seq(llama._ctx.ctx, seq)[0]
                    )
        llama._batch.reset()
        llama._ctx.kv_cache_clear()
        return RerankResult(scores, sum(len(p) for p in pairs))

    def score(self, request: ScoreRequest) -> RerankResult:
        """A causal reranker's prompts (a chat model's twin context, ``llamacpp.py``): packed
        unpadded into decodes of at most the context's tokens, the context switched to logits
        for the pass (``llama_set_embeddings``) and each prompt's last-token logits read for
        the two answers."""
        llama_cpp = import_llama_cpp()
        llama = self.llama
        ctx = llama._ctx.ctx
        yes, no = request.answers
        lengths = [len(prompt) for prompt in request.prompts]
        scores = [0.0] * len(lengths)
        n_seq_max = llama.context_params.n_seq_max
        llama_cpp.llama_set_embeddings(ctx, False)
        try:
            for batch in budget_batches(lengths, self.limit, padded=False):
                for chunk in range(0, len(batch), n_seq_max):
                    group = batch[chunk : chunk + n_seq_max]
                    llama._batch.reset()
                    for seq, index in enumerate(group):
                        llama._batch.add_sequence(request.prompts[index], seq, False)
                    llama._ctx.kv_cache_clear()
                    try:
                        llama._ctx.decode(llama._batch)
                    except RuntimeError as exc:
                        raise InferenceError(f"llama.cpp reranking failed: {exc}") from exc
                    end = -1
                    for index in group:
                        end += lengths[index]
                        logits = llama_cpp.llama_get_logits_ith(ctx, end)
                        scores[index] = 1.0 / (1.0 + math.exp(logits[no] - logits[yes]))
        finally:
            llama._batch.reset()
            llama._ctx.kv_cache_clear()
            llama_cpp.llama_set_embeddings(ctx, True)
        return RerankResult(scores, sum(lengths))

    def close(self) -> None:
        self.llama.close()


class LlamaCppEmbeddingRunner(EncoderRunnerBase):
    """GGUF embedding models (the store recorded a pooling type), on llama.cpp."""

    name = "llamacpp-embeddings"

    def __init__(self) -> None:
        super().__init__()
        self._embedder: LlamaCppEmbedder | None = None
        self._engine = EngineThread(self.name)

    def _require(self) -> LlamaCppEmbedder:
        return self._loaded(self._embedder)

    @property
    def _ranks(self) -> bool:
        return self._embedder is not None and self._embedder.ranks

    async def _load(self, model: LocalModel, options: RunnerOptions) -> dict[str, Any]:
        if model.format != "gguf" or not model.weights or model.embedding is None:
            raise UnsupportedFormatError(
                f"the {self.name} runner runs GGUF embedding models; {model.name} is not one"
            )
        record = model.embedding
        limit = context_length(model, options)
        limit = min(limit, record.get("max_tokens") or limit)

        def build() -> LlamaCppEmbedder:
            return LlamaCppEmbedder(
                model.weights[0],
                record.get("pooling", "mean"),
                limit,
                options.n_threads or platform.default_threads(),
                options.n_gpu_layers
                if options.n_gpu_layers is not None
                else platform.default_gpu_layers(),
                normalize=bool(record.get("normalize", True)),
            )

        self._embedder = await self._engine.call(build)
        if (
            self._embedder.ranks
            and model.architecture not in EMBEDDING_ARCHITECTURES
            and self._embedder.rerank_template() is None
        ):
            await self.unload()
            raise UnsupportedArchitectureError(
                f"{model.name} is a {model.architecture} GGUF with rank pooling but no rerank "
                "template (tokenizer.chat_template.rerank): an encoder's pair layout would give "
                "it wrong scores; import the model's HF folder instead (it runs as a causal "
                "reranker)"
            )
        self._model_name = model.name
        llama = self._embedder.llama
        return {
            "parameter_count": llama._model.n_params(),
            "context_length": limit,
            "memory_bytes": llama._model.size(),
            "details": {"pooling": record.get("pooling")},
        }

    async def _release(self) -> None:
        """The context goes, and the thread with it; a later load gets a fresh one."""
        embedder, self._embedder = self._embedder, None
        engine, self._engine = self._engine, EngineThread(self.name)
        try:
            if embedder is not None:
                await engine.call(embedder.close)
        finally:
            engine.close()

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._require().llama.tokenize(text.encode(), add_bos=add_special_tokens)

    def detokenize(self, token_ids: list[int]) -> str:
        return self._require().llama.detokenize(token_ids).decode("utf-8", "replace")

    async def _embed(self, request: EmbedRequest) -> EmbedResult:
        embedder = self._require()
        return await self._engine.call(lambda: embedder.embed(request))

    async def _rank(self, request: RerankRequest) -> RerankResult:
        embedder = self._require()
        return await self._engine.call(lambda: embedder.rank(request))
