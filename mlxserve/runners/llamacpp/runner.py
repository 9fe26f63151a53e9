"""The llama.cpp runner: GGUF files through ``llama-cpp-python``.

The fallback where MLX cannot run well (machines without Apple Silicon), and on a Mac the way
to run GGUF files with Metal offload. One llama.cpp context holds ``max_parallel`` sequence
slots that decode together, one token each per step, on the runner's engine thread
(``slots.py``), so the daemon's scheduler admits that many requests at once. A
follow-up turn lands in the slot whose KV cache holds its prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from mlxserve import platform
from mlxserve.errors import (
    ContextOverflowError,
    InferenceError,
    InvalidRequestError,
    ModelUnloadableError,
    UnsupportedFormatError,
)
from mlxserve.runners import base
from mlxserve.runners.decode import check_token_ids, generation_budget, prompt_and_budget
from mlxserve.runners.engine import Emit, EngineThread
from mlxserve.runners.kvcache import kv_cache_type
from mlxserve.runners.llamacpp.library import import_llama_cpp
from mlxserve.runners.llamacpp.media import text_prefix
from mlxserve.runners.llamacpp.slots import SlotEngine, TokenMask, kv_bytes_per_token, token_piece
from mlxserve.runners.loading import context_length, memory_budget, parallel_slots
from mlxserve.runners.promptcache import open_prompt_cache
from mlxserve.runners.skeleton import RunnerBase
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


TRIAL_CONTEXT = 32
"""Tokens of context in a trial load: enough for one decode, so its KV cache is a few KiB."""


def trial_load(model: LocalModel, *, decode: bool = True) -> None:
    """llama.cpp's load, as cheap as it can be and still find what aborts it (run in a
    throwaway process by ``runners/trial.py``): the weights memory-mapped on the CPU (no copy,
    no GPU buffer), a context of ``TRIAL_CONTEXT`` tokens, and with ``decode`` one token
    decoded on one thread: some lies abort only in a kernel (a NaN norm epsilon asserts in
    ``rms_norm`` at the first decode), and one thread makes that a clean abort where two
    threads asserting at once hang."""
    llama_cpp = import_llama_cpp()
    llama_cpp.llama_log_set(_errors_to_stderr(llama_cpp), None)
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    params.use_mmap = True
    loaded = llama_cpp.llama_model_load_from_file(str(model.weights[0]).encode(), params)
    if not loaded:
        raise ModelUnloadableError("llama.cpp could not load it")
    if not decode:
        return
    context_params = llama_cpp.llama_context_default_params()
    context_params.n_ctx = context_params.n_batch = context_params.n_ubatch = TRIAL_CONTEXT
    context_params.n_seq_max = context_params.n_threads = context_params.n_threads_batch = 1
    context = llama_cpp.llama_init_from_model(loaded, context_params)
    if not context:
        raise ModelUnloadableError("llama.cpp could not make a context for it")
    vocab = llama_cpp.llama_model_get_vocab(loaded)
    token = max(llama_cpp.llama_vocab_bos(vocab), 0)
    tokens = (llama_cpp.llama_token * 1)(token)
    status = llama_cpp.llama_decode(context, llama_cpp.llama_batch_get_one(tokens, 1))
    if status != 0:
        raise ModelUnloadableError(f"llama.cpp could not decode a token with it (status {status})")


GGML_LOG_LEVEL_ERROR = 4
"""ggml's level for errors (llama-cpp-python 0.3.36's own log callback still maps 3 to
errors, an older numbering, and so drops them when it is not verbose)."""
_log_callbacks: list[Any] = []
"""The ctypes callbacks handed to llama.cpp, kept alive for as long as it may call them."""


def _errors_to_stderr(llama_cpp: Any) -> Any:
    """A llama.cpp log callback that writes its errors (why a load failed) to stderr."""

    @llama_cpp.llama_log_callback
    def log(level: int, text: bytes, _: Any) -> None:
        if level == GGML_LOG_LEVEL_ERROR:
            sys.stderr.write(text.decode("utf-8", "replace"))

    _log_callbacks.append(log)
    return log


def trial_load_weights(model: LocalModel) -> None:
    """``trial_load`` without the decode: for embedding models, which encode."""
    trial_load(model, decode=False)


class LlamaCppRunner(RunnerBase):
    """GGUF chat models (and vision ones, with a projector) on llama.cpp's slot engine."""

    name = "llamacpp"

    def __init__(self) -> None:
        super().__init__()
        self._model: Any = None
        self._metadata: dict[str, str] = {}
        self._slots: SlotEngine | None = None
        self._engine: EngineThread | None = None
        self._eog: set[int] = set()
        self._guidance_tokenizer: Any = None
        self._embedder: Any = None
        self._embed_params: tuple[Path, int, int, Path | None] | None = None

    @property
    def max_parallel(self) -> int:
        return len(self._slots.slots) if self._slots is not None else 1

    def _require(self) -> Any:
        return self._loaded(self._model)

    async def _load(self, model: LocalModel, options: base.RunnerOptions) -> dict[str, Any]:
        if model.format != "gguf" or not model.weights:
            raise UnsupportedFormatError(
                f"the llama.cpp runner runs GGUF models; {model.name} is {model.format}",
                runners=["mlx"],
            )
        llama_cpp = import_llama_cpp()
        slot_context = context_length(model, options)
        kv_cache = kv_cache_type(options.kv_cache_type)
        flash_attention = platform.llama_cpp_flash_attention(
            drafts=bool(options.num_draft_tokens), quantized_v=kv_cache.quantized
        )
        engine = EngineThread("llamacpp-engine")
        cache = open_prompt_cache(
            model,
            options,
            {
                "runner": self.name,
                "library": llama_cpp.__version__,
                "kv_cache_type": kv_cache.name,
                "flash_attention": flash_attention,
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
                slots = parallel_slots(
                    model.name,
                    options.max_parallel,
                    loaded.size(),
                    slot_bytes,
                    memory_budget(options),
                )
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
                    flash_attention=flash_attention,
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
        self._model, self._slots, self._engine, self._disk = loaded, slots, engine, cache
        self._metadata = loaded.metadata()
        return {
            "parameter_count": loaded.n_params(),
            "context_length": slots.slot_context,
            "memory_bytes": loaded.size() + kv_bytes,
            "max_parallel": len(slots.slots),
            "details": {
                "kv_cache_bytes": kv_bytes,
                "kv_cache_type": kv_cache.name,
                "flash_attention": flash_attention,
            },
        }

    async def _release(self) -> None:
        engine, slots, model = self._engine, self._slots, self._model
        self._engine = self._slots = self._model = None
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

    def release_prompt_cache(self) -> int:
        """Free the prompt cache's RAM tier (memory admission wants the room); bytes freed."""
        cache = self._disk
        return cache.release_ram() if cache is not None else 0

    def describe(self) -> base.LoadedModelInfo:
        info = super().describe()
        if self._disk is not None:
            info.details["prompt_cache_ram_bytes"] = info.details["prompt_cache"]["ram"]["bytes"]
        return info

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

    @property
    def image_marker(self) -> str | None:
        slots = self._slots
        return slots.media.marker if slots is not None and slots.media is not None else None

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

    def _twin(self) -> Any:
        """The embedding-mode twin context over the same GGUF (``embed.py``; weights
        are memory-mapped, so shared), made on the first request that needs it; called on the
        engine thread."""
        from mlxserve.runners.llamacpp.embed import CHAT_MODEL_POOLING, LlamaCppEmbedder

        slots, params = self._slots, self._embed_params
        assert slots is not None and params is not None
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
        return self._embedder

    async def embed(self, request: base.EmbedRequest) -> base.EmbedResult:
        """Through the twin context: a generating context cannot pool."""
        self._require()
        engine = self._engine
        assert engine is not None
        return await engine.call(lambda: self._twin().embed(request))

    async def score(self, request: base.ScoreRequest) -> base.RerankResult:
        """A causal reranker's prompts through the twin context, switched to logits for the
        pass: several prompts per decode, which the slots' one-prompt generation cannot
        give."""
        self._require()
        engine = self._engine
        assert engine is not None
        return await engine.call(lambda: self._twin().score(request))

    async def generate(self, request: base.GenerateRequest) -> AsyncIterator[base.GenerateChunk]:
        model = self._require()
        slots, engine = self._slots, self._engine
        assert slots is not None and engine is not None
        # Before a ``context`` is read back as text for libmtmd: llama.cpp aborts the process
        # on a token id past its vocabulary.
        check_token_ids(request, model.n_vocab())
        media = None
        if request.images:
            prompt, media, max_tokens = await self._media_prompt(request)
        else:
            prompt, max_tokens = prompt_and_budget(
                request, self.tokenize, [model.token_bos()], slots.slot_context
            )
        mask = None
        if request.response_format:
            mask = await asyncio.to_thread(self._mask, request.response_format)
        hit = None
        if self._disk is not None:
            cache = self._disk
            # A prompt with images is cached up to its first image (``slots.py``).
            head = prompt[: text_prefix(prompt) + 1]
            hit = await asyncio.to_thread(
                lambda: cache.lookup(head, better_than=slots.live_prefix(head))
            )

        def join(emit: Emit) -> None:
            slots.join(request, prompt, max_tokens, emit, mask, media=media, hit=hit)
            engine.arrived(request.arriving)

        async with contextlib.aclosing(engine.stream(join, request.cancel)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _media_prompt(self, request: base.GenerateRequest) -> tuple[list[int], Any, int]:
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
