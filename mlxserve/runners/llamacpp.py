"""The llama.cpp runner: GGUF files through ``llama-cpp-python``.

The fallback where MLX cannot run well (machines without Apple Silicon), and on a Mac the way
to run GGUF files with Metal offload. One llama.cpp context holds ``max_parallel`` sequence
slots that decode together, one token each per step, on the runner's engine thread
(``llamacpp_slots.py``), so the daemon's scheduler admits that many requests at once. A
follow-up turn lands in the slot whose KV cache holds its prefix.
"""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import AsyncIterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from mlxserve import platform
from mlxserve.errors import (
    ContextOverflowError,
    InferenceError,
    InvalidRequestError,
    ModelNotLoadedError,
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
from mlxserve.runners.decode import check_token_ids, generation_budget, prompt_and_budget
from mlxserve.runners.engine import EngineThread
from mlxserve.runners.kvcache import kv_cache_type
from mlxserve.runners.llama_library import import_llama_cpp
from mlxserve.runners.llamacpp_slots import SlotEngine, TokenMask, kv_bytes_per_token, token_piece
from mlxserve.runners.loading import context_length, load_options, parallel_slots
from mlxserve.runners.promptcache import PromptCache, open_prompt_cache
from mlxserve.runners.threads import drain
from modelstore.model import LocalModel

ALL_LAYERS = 0x7FFFFFFF
"""``n_gpu_layers`` for "every layer" in llama.cpp's model params (what ``-1`` means to us)."""


def load_lora(llama_cpp: Any, model: Any, adapter: Path | None) -> Any:
    """The model's GGUF LoRA (checked against the base when the model was created,
    ``modelstore/adapters.py``), loaded for the slot engine's context; freed with the model."""
    if adapter is None:
        return None
    lora = llama_cpp.llama_adapter_lora_init(model.model, str(adapter).encode())
    if not lora:
        raise InferenceError(f"llama.cpp could not load the adapter {adapter.name}")
    return lora


class LlamaCppRunner:
    name = "llamacpp"

    def __init__(self) -> None:
        self._model: Any = None
        self._metadata: dict[str, str] = {}
        self._slots: SlotEngine | None = None
        self._engine: EngineThread | None = None
        self._info: LoadedModelInfo | None = None
        self._eog: set[int] = set()
        self._guidance_tokenizer: Any = None
        self._embedder: Any = None
        self._embed_params: tuple[Path, int, int, Path | None] | None = None
        self._cache: PromptCache | None = None

    @property
    def max_parallel(self) -> int:
        return len(self._slots.slots) if self._slots is not None else 1

    def _require(self) -> Any:
        if self._model is None:
            raise ModelNotLoadedError("no model is loaded in the llama.cpp runner")
        return self._model

    async def load(self, model: LocalModel, options: RunnerOptions) -> LoadedModelInfo:
        if model.format != "gguf" or not model.weights:
            raise UnsupportedFormatError(
                f"the llama.cpp runner runs GGUF models; {model.name} is {model.format}",
                runners=["mlx"],
            )
        llama_cpp = import_llama_cpp()
        started = time.perf_counter_ns()
        options = load_options(model, options)
        slot_context = context_length(model, options)
        kv_cache = kv_cache_type(options.kv_cache_type)
        engine = EngineThread("llamacpp-engine")
        cache = open_prompt_cache(
            model,
            options,
            {
                "runner": self.name,
                "library": llama_cpp.__version__,
                "kv_cache_type": kv_cache.name,
                "flash_attention": platform.llama_cpp_flash_attention(),
                "n_gpu_layers": options.n_gpu_layers,
            },
        )

        def build() -> tuple[Any, SlotEngine, int]:
            from llama_cpp import _internals, _logger

            _logger.set_verbose(False)
            params = _internals.LlamaModel.default_params()
            layers = (
                options.n_gpu_layers
                if options.n_gpu_layers is not None
                else platform.default_gpu_layers()
            )
            params.n_gpu_layers = ALL_LAYERS if layers == -1 else layers
            self._embed_params = (
                Path(model.weights[0]),
                options.n_threads or platform.default_threads(),
                layers,
                model.adapter,
            )
            loaded = _internals.LlamaModel(
                path_model=str(model.weights[0]), params=params, verbose=False
            )
            try:
                lora = load_lora(llama_cpp, loaded, model.adapter)
                slot_bytes = slot_context * kv_bytes_per_token(llama_cpp, loaded, kv_cache)
                slots = parallel_slots(model.name, options.max_parallel, loaded.size(), slot_bytes)
                eog = {
                    token
                    for token in range(loaded.n_vocab())
                    if llama_cpp.llama_vocab_is_eog(loaded.vocab, token)
                }
                engine_slots = SlotEngine(
                    llama_cpp,
                    loaded,
                    slots=slots,
                    slot_context=slot_context,
                    n_threads=options.n_threads or platform.default_threads(),
                    eog=eog,
                    kv_cache=kv_cache,
                    lookup_tokens=options.num_draft_tokens or 0,
                    lora=lora,
                    projector=model.projector,
                    cache=cache,
                )
            except BaseException:
                loaded.close()
                raise
            self._eog = eog
            engine.register(engine_slots.step)
            return loaded, engine_slots, slots * slot_bytes

        try:
            loaded, slots, kv_bytes = await engine.call(build)
        except ValueError as exc:
            engine.close()
            if cache is not None:
                cache.close()
            raise InferenceError(f"llama.cpp could not load {model.name}: {exc}") from exc
        except BaseException:
            engine.close()
            if cache is not None:
                cache.close()
            raise
        self._model, self._slots, self._engine, self._cache = loaded, slots, engine, cache
        self._metadata = loaded.metadata()
        self._info = LoadedModelInfo(
            runner=self.name,
            format="gguf",
            architecture=model.architecture,
            parameter_count=loaded.n_params(),
            quantization=model.quantization,
            context_length=slots.slot_context,
            memory_bytes=loaded.size() + kv_bytes,
            max_parallel=len(slots.slots),
            load_duration_ns=time.perf_counter_ns() - started,
            details={"kv_cache_bytes": kv_bytes, "kv_cache_type": kv_cache.name},
        )
        return self._info

    async def unload(self) -> None:
        engine, slots, model, cache = self._engine, self._slots, self._model, self._cache
        self._engine = self._slots = self._model = self._cache = None
        self._guidance_tokenizer = None
        if engine is None:
            return

        embedder, self._embedder = self._embedder, None

        def release() -> None:
            if embedder is not None:
                embedder.close()
            if slots is not None:
                engine.unregister(slots.step)
                slots.close()
            if model is not None:
                model.close()

        try:
            await engine.call(release)
        finally:
            engine.close()
            if cache is not None:
                await asyncio.to_thread(cache.close)  # the spill: hot prompts go to disk

    async def spill(self) -> None:
        """Wait until every cached prompt is on disk (the model may be unloaded next)."""
        if self._cache is not None:
            await asyncio.to_thread(self._cache.spill)

    def release_prompt_cache(self) -> int:
        """Free the prompt cache's RAM tier (memory admission wants the room); bytes freed."""
        cache = self._cache
        return cache.release_ram() if cache is not None else 0

    def describe(self) -> LoadedModelInfo:
        if self._info is None:
            raise ModelNotLoadedError("no model is loaded in the llama.cpp runner")
        if self._cache is not None:
            stats = self._cache.stats()
            self._info.details["prompt_cache"] = stats
            self._info.details["prompt_cache_ram_bytes"] = stats["ram"]["bytes"]
        return self._info

    @property
    def chat_template(self) -> str | None:
        self._require()
        return self._metadata.get("tokenizer.chat_template")

    @property
    def special_tokens(self) -> dict[str, str]:
        model = self._require()
        return {
            "bos_token": self._piece(model.token_bos()),
            "eos_token": self._piece(model.token_eos()),
        }

    def _piece(self, token: int) -> str:
        if token < 0:
            return ""
        vocab = self._require().vocab
        return token_piece(import_llama_cpp(), vocab, token).decode("utf-8", "replace")

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._require().tokenize(text.encode(), add_bos=add_special_tokens, special=True)

    def detokenize(self, token_ids: list[int]) -> str:
        vocab = self._require().vocab
        pieces = b"".join(token_piece(import_llama_cpp(), vocab, t) for t in token_ids)
        return pieces.decode("utf-8", "replace")

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """Through an embedding-mode twin context over the same GGUF (``llamacpp_embed.py``),
        made on the first request: a generating context cannot pool."""
        from mlxserve.runners.llamacpp_embed import CHAT_MODEL_POOLING, LlamaCppEmbedder

        self._require()
        engine, slots, params = self._engine, self._slots, self._embed_params
        assert engine is not None and slots is not None and params is not None

        def run() -> EmbedResult:
            if self._embedder is None:
                path, n_threads, n_gpu_layers, adapter = params
                self._embedder = LlamaCppEmbedder(
                    path,
                    CHAT_MODEL_POOLING,
                    slots.slot_context,
                    n_threads,
                    n_gpu_layers,
                    causal=True,
                    adapter=adapter,
                )
            return self._embedder.embed(request)

        return await engine.call(run)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        model = self._require()
        slots, engine = self._slots, self._engine
        assert slots is not None and engine is not None
        media = None
        if request.images:
            prompt, media, max_tokens = await self._media_prompt(request)
        else:
            prompt, max_tokens = prompt_and_budget(
                request, self.tokenize, [model.token_bos()], slots.slot_context
            )
        check_token_ids(request, model.n_vocab())
        mask = None
        if request.response_format:
            mask = await asyncio.to_thread(self._mask, request.response_format)
        hit = None
        if self._cache is not None and media is None:
            cache = self._cache
            hit = await asyncio.to_thread(
                lambda: cache.lookup(prompt, better_than=slots.live_prefix(prompt))
            )
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[object] = asyncio.Queue()

        def emit(item: object) -> None:
            loop.call_soon_threadsafe(chunks.put_nowait, item)

        def report(joined: Future[None]) -> None:
            """A join that never ran (the model was unloaded meanwhile) ends the stream."""
            if joined.exception() is not None:
                emit(joined.exception())

        joined = engine.submit(
            lambda: slots.join(request, prompt, max_tokens, emit, mask, media=media, hit=hit)
        )
        joined.add_done_callback(report)
        try:
            async for item in drain(chunks):
                yield item
        finally:
            request.cancel.cancel()

    async def _media_prompt(self, request: GenerateRequest) -> tuple[list[int], Any, int]:
        """A prompt with images: libmtmd's chunks (tokenized on the engine thread, which owns
        the projector), its token list with the image positions, and the generation budget."""
        slots, engine = self._slots, self._engine
        assert slots is not None and engine is not None
        if slots.media is None:
            raise InvalidRequestError(
                "this model has no vision projector: it cannot read images",
                param="images",
            )
        projector = slots.media
        text = request.prompt
        if text is None:
            text = self.detokenize(request.prompt_tokens or [])
        prompt, media = await engine.call(
            lambda: projector.tokenize(text, request.add_special_tokens, request.images)
        )
        try:
            budget = generation_budget(
                request, len(prompt), slots.slot_context, "the prompt (images included)"
            )
        except ContextOverflowError:
            await engine.call(lambda: projector.free(media))
            raise
        return prompt, media, budget

    def _mask(self, response_format: dict[str, Any]) -> TokenMask:
        """The request's JSON grammar (validated before any byte is sent) over this GGUF's
        vocabulary; llguidance's view of the vocabulary is built once per model (~1 s)."""
        from mlxserve.runners.constrained import grammar_for

        grammar = grammar_for(response_format)
        if self._guidance_tokenizer is None:
            from llguidance.llamacpp import lltokenizer_from_vocab

            model = self._require()
            with warnings.catch_warnings():  # it calls a C function deprecated in 0.3.x, per token
                warnings.simplefilter("ignore", DeprecationWarning)
                self._guidance_tokenizer = lltokenizer_from_vocab(
                    model.vocab, eos_token=sorted(self._eog)
                )
        return TokenMask(self._guidance_tokenizer, grammar)
