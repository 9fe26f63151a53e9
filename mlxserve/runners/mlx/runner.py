"""The MLX runner: HF-style MLX models (and converted GGUFs) through ``mlx-lm``.

Batching, sampling, logits processors, KV caches and the prompt cache are mlx-lm's own
(``BatchGenerator``, ``sample_utils``, ``LRUPromptCache``); this module wires them to the
ModelRunner protocol. Concurrent requests join one ``BatchGenerator`` and advance together, one
token per step, on the runner's engine thread (``engine.py``).

Two things mlx-lm does only one sequence at a time: a quantized KV cache (its batch caches
cannot merge ``QuantizedKVCache``) and speculative decoding with a draft model. A request that
needs one runs "solo", on mlx-lm's own ``generate_step`` / ``speculative_generate_step``,
stepped one yield per engine step beside the batch. mlx-lm's server turns batching off for
both; here a draft is used while one request is active and later ones batch as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import io
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mlxserve import platform
from mlxserve.errors import (
    InferenceError,
    MlxserveError,
    ModelNotLoadedError,
    UnsupportedArchitectureError,
    UnsupportedFeatureError,
)
from mlxserve.mlx_lm_private import hf_tokenizer
from mlxserve.runners.base import (
    EmbedRequest,
    EmbedResult,
    GenerateChunk,
    GenerateRequest,
    LoadedModelInfo,
    RerankResult,
    RunnerOptions,
    ScoreRequest,
    TokenLogprob,
)
from mlxserve.runners.decode import DecodeState, SampledToken, check_token_ids, prompt_and_budget
from mlxserve.runners.engine import END, Emit, EngineThread
from mlxserve.runners.kvcache import KvCacheType, kv_cache_type, mlx_group_size
from mlxserve.runners.loading import (
    DEFAULT_PARALLEL,
    context_length,
    kv_bytes_per_token,
    memory_budget,
    parallel_slots,
)
from mlxserve.runners.mlx.common import MlxRunnerBase, backend_details, import_mlx
from mlxserve.runners.pooling import length_batches, over_limit, padded, pool
from mlxserve.runners.promptcache import Hit, PromptCache, common_prefix, open_prompt_cache
from mlxserve.runners.rerank import budget_batches
from mlxserve.runners.textstream import MlxDetokenizer, TextStream
from modelstore.model import LocalModel
from modelstore.store import default_root


def derived_folder(model: LocalModel, dequantized: bool) -> Path:
    """Where the MLX conversion of a GGUF model is cached, keyed by its weights blob.

    The runtime folder links each file to its blob, so the link target's name is the digest.
    """
    key = model.weights[0].resolve().name[:16]
    mode = "f32" if dequantized else "q"
    return (model.derived_dir or default_root() / "derived") / "gguf-mlx" / f"{key}-{mode}"


log = logging.getLogger("mlxserve.mlx")


def request_sampler(request: GenerateRequest) -> Any:
    """mlx-lm's sampling chain; with a seed, drawing from the request's own key.

    The global MLX RNG is shared by every sequence in a batch, so a seeded request gets a
    private key: same seed, same request, same tokens, whatever else is running. Values arrive
    in range (``modelstore/parameters.py``); ``top_p: 0`` keeps the top token alone, as
    llama.cpp's nucleus does (mlx-lm would read it as "off"); ``top_p: 1`` keeps every token.
    """
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_sampler

    greedy = request.temperature == 0 or request.top_p == 0
    if request.seed is None or greedy:
        return make_sampler(
            temp=0.0 if greedy else request.temperature,
            top_p=request.top_p,
            min_p=request.min_p,
            top_k=request.top_k,
        )
    key = mx.random.key(request.seed)
    inverse_temperature = 1.0 / request.temperature

    def sample(logprobs: Any) -> Any:
        nonlocal key
        if request.top_p < 1:
            logprobs = apply_top_p(logprobs, request.top_p)
        if request.min_p:
            logprobs = apply_min_p(logprobs, request.min_p)
        if request.top_k > 0:
            logprobs = apply_top_k(logprobs, request.top_k)
        key, draw = mx.random.split(key)
        return mx.random.categorical(logprobs * inverse_temperature, key=draw)

    return sample


def request_processors(request: GenerateRequest) -> list[Any]:
    """mlx-lm's logits processors for a request, each knob meaning what it means on llama.cpp
    (and Ollama): the three penalties look back over one window (``repeat_last_n``), and a
    window of 0 turns them off (mlx-lm would read ``tokens[-0:]`` as every token); then the
    request's own processors."""
    from mlx_lm.sample_utils import make_logits_processors

    window = request.repetition_context_size
    on = window > 0
    penalties = make_logits_processors(
        logit_bias=request.logit_bias or None,
        repetition_penalty=request.repetition_penalty
        if on and request.repetition_penalty != 1.0
        else None,
        repetition_context_size=window,
        presence_penalty=request.presence_penalty if on and request.presence_penalty else None,
        presence_context_size=window,
        frequency_penalty=request.frequency_penalty if on and request.frequency_penalty else None,
        frequency_context_size=window,
    )
    return [*penalties, *request.logits_processors]


DEFAULT_NUM_DRAFT_TOKENS = 3
"""Draft tokens per step when the ModelSpec sets none (mlx-lm's server defaults to 3)."""


@dataclass
class _Solo:
    """A request outside the batch, on an mlx-lm generator (see the module docstring)."""

    steps: Iterator[tuple[Any, ...]]
    cache: list[Any]
    tokens: list[int]
    """The prompt and every token generated so far: what ``cache`` holds, for the prompt cache."""
    speculative: bool


@dataclass
class _Active:
    """A request inside the batch, or running solo."""

    state: DecodeState
    emit: Callable[[object], None]
    top_logprobs: int | None
    solo: _Solo | None = field(default=None)
    keep_prefix: bool = False
    """The request's caching hint (``GenerateRequest.keep_prefix``), for its entry."""
    prefilled_chunk: Callable[[], None] = field(default=lambda: None)
    """``GenerateRequest.prefilled_chunk``: called after each step of its prefill."""


def trial_gguf(model: LocalModel) -> None:
    """A GGUF's trial on MLX (run in a throwaway process by ``runners/trial.py``): its
    conversion's plan (``gguf_convert.plan_conversion``: the mlx-lm config from its metadata
    and every tensor matched to its parameter and shape), from the header alone; the
    conversion itself waits for the first load."""
    from mlxserve.runners.mlx.gguf_convert import plan_conversion

    plan_conversion(model.weights[0], dequantize=platform.mlx_dequantize_weights())


class MlxRunner(MlxRunnerBase):
    """MLX folders and convertible GGUFs on mlx-lm's ``BatchGenerator``."""

    name = "mlx"

    def __init__(self, engine: EngineThread | None = None) -> None:
        super().__init__(engine)
        self._tokenizer: Any = None
        self._context = 0
        """Set at load (``loading.context_length``)."""
        self._parallel = DEFAULT_PARALLEL
        self._prompt_cache: Any = None
        self._batch: Any = None
        self._active: dict[int, _Active] = {}
        self._guidance_tokenizer: Any = None
        self._kv_cache: KvCacheType = kv_cache_type(None)
        self._kv_group = 0
        self._draft: Any = None
        self._num_draft = DEFAULT_NUM_DRAFT_TOKENS
        self._solo_uid = -1
        self._remembered: deque[list[int]] = deque()
        """What the LRU was last given, newest last: a hint that the disk holds nothing
        better, read off the engine thread."""

    @property
    def max_parallel(self) -> int:
        return self._parallel

    def _require(self) -> tuple[Any, Any]:
        return self._loaded(self._model), self._tokenizer

    async def _load(self, model: LocalModel, options: RunnerOptions) -> dict[str, Any]:
        mx, _ = import_mlx(self.name, "mlx_lm")
        dequantize = platform.mlx_dequantize_weights()
        self._kv_cache = kv_cache_type(options.kv_cache_type)
        self._num_draft = options.num_draft_tokens or DEFAULT_NUM_DRAFT_TOKENS
        context = context_length(model, options)  # checks memory first
        self._parallel = parallel_slots(
            model.name,
            options.max_parallel,
            model.size_bytes,
            context * kv_bytes_per_token(model, self._kv_cache),
            memory_budget(options),
        )

        def build() -> None:
            from mlx_lm.generate import BatchGenerator
            from mlx_lm.models.cache import LRUPromptCache

            folder = model.path
            if model.format == "gguf":
                from mlxserve.runners.mlx.gguf_convert import convert_gguf

                folder = convert_gguf(
                    model.weights[0], derived_folder(model, dequantize), dequantize=dequantize
                )
            try:
                loaded, tokenizer = self._load_weights(folder)
                if model.adapter is not None:
                    from mlx_lm.utils import load_adapters

                    loaded = load_adapters(loaded, str(model.adapter))
                    loaded.eval()
            except ValueError as exc:
                raise UnsupportedArchitectureError(
                    f"mlx-lm cannot load {model.name}: {exc}"
                ) from exc
            if dequantize:
                from mlx_lm.utils import dequantize_model

                loaded = dequantize_model(loaded)
                mx.eval(loaded.parameters())
            self._draft = self._load_draft(model, tokenizer, dequantize)
            self._model, self._tokenizer = loaded, tokenizer
            self._kv_group = self._kv_group_size()
            self._prompt_cache = LRUPromptCache(
                max_size=options.prompt_cache_entries, max_bytes=options.prompt_cache_bytes
            )
            self._remembered = deque(maxlen=options.prompt_cache_entries)
            if options.prompt_cache_dir:
                self._disk = self._open_disk_tier(model, options, dequantize)
            self._batch = BatchGenerator(
                loaded,
                completion_batch_size=self._parallel,
                prefill_batch_size=self._parallel,
            )
            self._engine.register(self._step)

        await self._engine.call(build)
        from mlx_lm.utils import get_total_parameters

        self._context = context
        kv_bytes = context * self._parallel * kv_bytes_per_token(model, self._kv_cache)
        return {
            "parameter_count": get_total_parameters(self._model),
            "quantization": None if dequantize else model.quantization,
            "context_length": self._context,
            "memory_bytes": int(mx.get_active_memory()) + kv_bytes,
            "max_parallel": self._parallel,
            "details": {
                "dequantized": dequantize,
                **backend_details(),
                "kv_cache_type": self._kv_cache.name,
                "kv_cache_bytes": kv_bytes,
                "draft": model.draft.name if model.draft else None,
            },
        }

    def _load_draft(self, model: LocalModel, tokenizer: Any, dequantize: bool) -> Any:
        """The ModelSpec's draft model, which must share the model's tokenizer (checked again
        here because the store may hold a draft re-created since)."""
        if model.draft is None:
            return None
        import mlx.core as mx
        import mlx_lm

        draft, draft_tokenizer = mlx_lm.load(str(model.draft.path))
        if draft_tokenizer.vocab_size != tokenizer.vocab_size:
            raise UnsupportedFeatureError(
                f"the draft {model.draft.name} does not share {model.name}'s tokenizer"
            )
        if dequantize:
            from mlx_lm.utils import dequantize_model

            draft = dequantize_model(draft)
        mx.eval(draft.parameters())
        return draft

    def _kv_group_size(self) -> int:
        """The quantization group of this model's KV heads (0: an unquantized cache); refuses
        heads ``mx.quantize`` cannot split into whole groups."""
        if not self._kv_cache.quantized:
            return 0
        args = self._model.args
        head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
        return mlx_group_size(self._kv_cache, head_dim)

    def _open_disk_tier(
        self, model: LocalModel, options: RunnerOptions, dequantized: bool
    ) -> PromptCache | None:
        """The disk tier, keyed by what makes this model's KV valid; the RAM tier stays
        mlx-lm's LRU, so the disk tier keeps nothing in memory itself."""
        import mlx.core as mx
        import mlx_lm

        key = {
            "runner": self.name,
            "library": f"mlx-{mx.__version__}/mlx-lm-{mlx_lm.__version__}",
            "kv_cache_type": self._kv_cache.name,
            "dequantized": dequantized,
        }
        return open_prompt_cache(model, replace(options, prompt_cache_bytes=0), key)

    def _load_weights(self, folder: Path) -> tuple[Any, Any]:
        """The model and tokenizer from an MLX folder (a sharded runner loads its part)."""
        import mlx_lm

        return mlx_lm.load(str(folder))

    def _drop(self) -> None:
        """Every request still running ends as cancelled; then the model goes (``mx.clear_cache``
        is a no-op in a distributed group's process: ``platform.hold_mlx_cache``)."""
        for active in self._active.values():
            active.emit(active.state.finish("cancelled"))
            active.emit(END)
        self._active.clear()
        if self._batch is not None:
            self._batch.close()
            self._engine.unregister(self._step)
        self._model = self._tokenizer = self._prompt_cache = self._batch = None
        self._draft = None
        self._guidance_tokenizer = None

    def release_prompt_cache(self) -> int:
        """Empty mlx-lm's LRU, this runner's RAM tier (memory admission wants the room; every
        entry went to the disk tier, if on, when it was made); bytes freed. On the engine
        thread, which owns the LRU."""
        lru = self._prompt_cache
        if lru is None:
            return 0
        held = lru.nbytes

        def release() -> None:
            lru.trim_to(n_sequences=0)
            self._remembered.clear()

        self._engine.submit(release).result()
        return held

    def describe(self) -> LoadedModelInfo:
        info = self._loaded(self._info)
        lru = self._prompt_cache
        ram = lru.nbytes if lru is not None else 0
        info.details["prompt_cache_ram_bytes"] = ram
        if self._disk is not None:
            stats = self._disk.stats()
            stats["ram"].update(bytes=ram, entries=len(lru) if lru is not None else 0)
            info.details["prompt_cache"] = stats
        return info

    @property
    def chat_template(self) -> str | None:
        return getattr(self._require()[1], "chat_template", None)

    @property
    def special_tokens(self) -> dict[str, str]:
        tokenizer = self._require()[1]
        return {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._require()[1].encode(text, add_special_tokens=add_special_tokens))

    def detokenize(self, token_ids: list[int]) -> str:
        return self._require()[1].decode(token_ids)

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """Mean-pooled, normalised final hidden states, in right-padded batches: an embedding
        from any decoder model (embedding models have their own runner, ``mlx/embeddings.py``)."""
        model, tokenizer = self._require()

        def run() -> EmbedResult:
            import mlx.core as mx

            ids = [list(tokenizer.encode(text)) for text in request.inputs]
            for index in over_limit([len(t) for t in ids], self._context, request.truncate):
                ids[index] = ids[index][: self._context]
            vectors: list[list[float]] = [[] for _ in ids]
            for batch in length_batches([len(t) for t in ids]):
                input_ids, mask = padded([ids[i] for i in batch], tokenizer.eos_token_id or 0)
                pooled = pool(model.model(input_ids), mask, "mean", normalize=True)
                mx.eval(pooled)
                for index, vector in zip(batch, pooled.tolist(), strict=True):
                    vectors[index] = vector
            return EmbedResult(vectors, sum(len(t) for t in ids))

        return await self._engine.call(run)

    async def score(self, request: ScoreRequest) -> RerankResult:
        """A causal reranker's prompts in right-padded batches within the token budget: the
        final states at each prompt's last token (right padding leaves them as unpadded, a
        causal token never seeing the pads after it), then only the two answer rows of the
        LM head, so no batch-by-length-by-vocabulary logits are made."""
        model, _ = self._require()
        yes, no = request.answers

        def run() -> RerankResult:
            import mlx.core as mx

            lengths = [len(prompt) for prompt in request.prompts]
            scores = [0.0] * len(lengths)
            for batch in budget_batches(lengths):
                input_ids, mask = padded([request.prompts[i] for i in batch], 0)
                hidden = model.model(input_ids)
                last = mask.sum(axis=1).astype(mx.int32) - 1
                final = mx.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
                head = getattr(model, "lm_head", None)
                logits = (
                    head(final) if head is not None else model.model.embed_tokens.as_linear(final)
                )
                odds = (logits[:, yes] - logits[:, no]).astype(mx.float32)
                probability = mx.sigmoid(odds)
                mx.eval(probability)
                for index, value in zip(batch, probability.tolist(), strict=True):
                    scores[index] = float(value)
            return RerankResult(scores, sum(lengths))

        return await self._engine.call(run)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        model, tokenizer = self._require()
        constraint = None
        if request.response_format:
            constraint = await asyncio.to_thread(self._constraint, request.response_format)
        prompt, max_tokens = prompt_and_budget(
            request, self.tokenize, [tokenizer.bos_token_id or 0], self._context
        )
        vocabulary = getattr(getattr(model, "args", None), "vocab_size", None)
        if isinstance(vocabulary, int):
            check_token_ids(request, vocabulary)
        hit = None
        if self._disk is not None:
            disk = self._disk
            live = max((common_prefix(t, prompt) for t in list(self._remembered)), default=0)
            hit = await asyncio.to_thread(lambda: disk.lookup(prompt, better_than=live))

        def join(emit: Emit) -> None:
            self._join(request, prompt, max_tokens, emit, constraint, hit)
            self._engine.arrived(request.arriving)

        async with contextlib.aclosing(self._engine.stream(join, request.cancel)) as chunks:
            async for chunk in chunks:
                yield chunk

    # -- engine thread -----------------------------------------------------------------------

    def _constraint(self, response_format: dict[str, Any] | None) -> Any:
        """A per-request JSON grammar processor (validated here, before any byte is sent)."""
        if not response_format:
            return None
        from mlxserve.runners.constrained import grammar_for
        from mlxserve.runners.mlx.constraint import JsonConstraint, build_tokenizer

        grammar = grammar_for(response_format)
        if self._guidance_tokenizer is None:
            tokenizer = self._tokenizer
            self._guidance_tokenizer = build_tokenizer(
                hf_tokenizer(tokenizer), sorted(tokenizer.eos_token_ids)
            )
        return JsonConstraint(self._guidance_tokenizer, grammar)

    def _join(
        self,
        request: GenerateRequest,
        prompt: list[int],
        max_tokens: int,
        emit: Any,
        constraint: Any = None,
        hit: Hit | None = None,
    ) -> None:
        """Add a request to the batch, starting from the longest cached prefix of its prompt;
        or run it solo: on the draft model when nothing else is active, or on a quantized KV
        cache (see the module docstring)."""
        try:
            if self._model is None:
                raise ModelNotLoadedError("the model was unloaded")
            processors = request_processors(request)
            if constraint is not None:
                processors.append(constraint)
            speculative = self._draft is not None and not self._active and constraint is None
            if speculative or self._kv_cache.quantized:
                self._join_solo(request, prompt, max_tokens, emit, processors, speculative)
                return
            uid, cached = self._insert(
                prompt, max_tokens, self._sampler(request_sampler(request)), processors, hit
            )
            state = self._decode_state(request, prompt, max_tokens, cached)
            self._active[uid] = _Active(
                state, emit, request.logprobs, None, request.keep_prefix, request.prefilled_chunk
            )
        except BaseException as exc:
            emit(exc)

    def _insert(
        self,
        prompt: list[int],
        max_tokens: int,
        sampler: Any,
        processors: list[Any],
        hit: Hit | None = None,
    ) -> tuple[int, int]:
        """Insert one sequence, reusing the longest cached prefix; its uid and how many prompt
        tokens came from the cache. Deterministic given the same history of inserts and ends,
        which is what lets every rank of a group replay rank 0's batch (``distributed/``)."""
        from mlx_lm.generate import StopSequences

        cache, remaining = self._nearest(prompt)
        cached = len(prompt) - len(remaining)
        restored = self._restore(hit) if hit is not None and hit.tokens > cached else None
        if restored is not None and hit is not None:
            cache, cached, remaining = restored, hit.tokens, prompt[hit.tokens :]
        if self._disk is not None:
            self._disk.record(hit if restored is not None else None, cached)
        (uid,) = self._batch.insert(
            [remaining],
            max_tokens=[max_tokens],
            caches=[cache],
            all_tokens=[prompt[:cached]],
            samplers=[sampler],
            logits_processors=[processors],
            stop_sequences=[StopSequences([[e] for e in self._tokenizer.eos_token_ids])],
        )
        self._batch_changed(
            {"op": "join", "uid": uid, "prompt": prompt, "max_tokens": max_tokens, "cached": cached}
        )
        return uid, cached

    def _nearest(self, prompt: list[int]) -> tuple[list[Any], list[int]]:
        """The RAM tier's cache of the longest prefix of ``prompt`` (a fresh one if none) and
        the tokens still to prefill: at least the last, whose logits start the generation."""
        from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

        model = self._model
        cache, remaining = self._prompt_cache.fetch_nearest_cache(id(model), prompt)
        if cache is None:
            cache, remaining = make_prompt_cache(model), prompt
        if not remaining:
            trim_prompt_cache(cache, 1)
            remaining = prompt[-1:]
        return cache, remaining

    def _restore(self, hit: Hit) -> list[Any] | None:
        """A disk entry as mlx-lm's prompt cache, trimmed to the tokens the prompt shares;
        ``None`` when mlx-lm cannot read it or its cache cannot be trimmed."""
        from mlx_lm.models.cache import can_trim_prompt_cache, load_prompt_cache, trim_prompt_cache

        source = io.BytesIO(hit.payload)
        source.name = "entry.safetensors"  # how mx.load tells the format of a stream
        started = time.perf_counter()
        try:
            cache = load_prompt_cache(source)
        except Exception as exc:  # written by another mlx-lm despite the key: a miss
            log.warning("mlx-lm could not read a cached prompt: %s", exc)
            return None
        if self._disk is not None:
            self._disk.note_restore(len(hit.payload), time.perf_counter() - started)
        excess = hit.entry_tokens - hit.tokens
        if excess:
            if not can_trim_prompt_cache(cache):
                return None
            trim_prompt_cache(cache, excess)
        return cache

    def _sampler(self, sampler: Any) -> Any:
        """Hook: the sampler a sequence uses (a group shares rank 0's choice with all ranks)."""
        return sampler

    def _batch_changed(self, change: dict[str, Any]) -> None:
        """Hook: a sequence joined or left the batch (a group replays this on every rank)."""

    def _next(self) -> Any:
        """Hook: one ``BatchGenerator`` step (a group first sends rank 0's changes)."""
        return self._batch.next()

    def _decode_state(
        self, request: GenerateRequest, prompt: list[int], max_tokens: int, cached: int
    ) -> DecodeState:
        tokenizer = self._tokenizer
        return DecodeState(
            text=TextStream(MlxDetokenizer(copy.copy(tokenizer.detokenizer)), request.stop),
            is_end_of_sequence=tokenizer.eos_token_ids.__contains__,
            max_tokens=max_tokens,
            cancel=request.cancel,
            prompt_tokens=len(prompt),
            cached_prompt_tokens=cached,
        )

    def _join_solo(
        self,
        request: GenerateRequest,
        prompt: list[int],
        max_tokens: int,
        emit: Any,
        processors: list[Any],
        speculative: bool,
    ) -> None:
        """Run a request outside the batch (see the module docstring). A speculative one
        starts from fresh caches for the model and the draft; one on a quantized KV cache from
        the longest cached prefix, as a batched one does."""
        from mlx_lm.models.cache import make_prompt_cache

        if speculative:
            cache = make_prompt_cache(self._model) + make_prompt_cache(self._draft)
            remaining = prompt
        else:
            cache, remaining = self._nearest(prompt)
        state = self._decode_state(request, prompt, max_tokens, len(prompt) - len(remaining))
        steps = self._solo_steps(request, remaining, max_tokens, cache, processors, speculative)
        solo = _Solo(steps, cache, list(prompt), speculative)
        self._active[self._solo_uid] = _Active(
            state, emit, request.logprobs, solo, request.keep_prefix, request.prefilled_chunk
        )
        self._solo_uid -= 1

    def _solo_steps(
        self,
        request: GenerateRequest,
        remaining: list[int],
        max_tokens: int,
        cache: list[Any],
        processors: list[Any],
        speculative: bool,
    ) -> Iterator[tuple[Any, ...]]:
        """mlx-lm's one-sequence generator: ``(token, logprobs[, from_draft])`` per yield."""
        import mlx.core as mx
        from mlx_lm.generate import generate_step, speculative_generate_step

        kv = {}
        if self._kv_cache.quantized:
            kv = {
                "kv_bits": self._kv_cache.mlx_bits,
                "kv_group_size": self._kv_group,
                "quantized_kv_start": 0,
            }
        common = {
            "max_tokens": max_tokens,
            "sampler": request_sampler(request),
            "logits_processors": processors,
            "prompt_cache": cache,
            **kv,
        }
        prompt = mx.array(remaining)
        if speculative:
            return speculative_generate_step(
                prompt, self._model, self._draft, num_draft_tokens=self._num_draft, **common
            )
        progress = request.prefilled_chunk
        return generate_step(
            prompt, self._model, prompt_progress_callback=lambda *_: progress(), **common
        )

    def _advance_solo(self, uid: int, active: _Active) -> None:
        """One yield of a solo request's generator (several tokens' worth of work when a
        draft is accepted, but still one token out)."""
        solo = active.solo
        assert solo is not None
        try:
            token, logprobs, *from_draft = next(solo.steps)
        except StopIteration:
            self._end(uid, "length", None)
            return
        except Exception as exc:  # this request failed; the others go on
            self._active.pop(uid)
            active.emit(InferenceError(f"MLX failed: {exc}"))
            active.emit(END)
            return
        if from_draft and from_draft[0]:
            active.state.draft_tokens += 1
        solo.tokens.append(token)
        chunk = active.state.push(
            SampledToken(token, self._logprob(token, logprobs, active.top_logprobs))
        )
        if chunk is not None:
            active.emit(chunk)
        if active.state.done:
            self._end(uid, active.state.reason, None)

    def _step(self) -> bool:
        """One engine step: a token for every active request (and prefill for new ones)."""
        if not self._active:
            return False
        for uid in [u for u, a in self._active.items() if a.state.cancel.cancelled]:
            self._end(uid, "cancelled", None)
        for uid, active in [(u, a) for u, a in self._active.items() if a.solo is not None]:
            self._advance_solo(uid, active)
        if not any(active.solo is None for active in self._active.values()):
            return bool(self._active)
        try:
            prefills, responses = self._next()
        except Exception as exc:  # the whole batch failed: every request hears why
            error = exc if isinstance(exc, MlxserveError) else InferenceError(f"MLX failed: {exc}")
            for active in self._active.values():
                active.emit(error)
            self._active.clear()
            return False
        for prefill in prefills:
            if prefill.uid in self._active:
                self._active[prefill.uid].prefilled_chunk()
        for response in responses:
            active = self._active.get(response.uid)
            if active is None:
                continue
            sampled = SampledToken(
                response.token,
                self._logprob(response.token, response.logprobs, active.top_logprobs),
            )
            chunk = active.state.push(sampled)
            if chunk is not None:
                active.emit(chunk)
            if response.finish_reason is not None:
                self._end(
                    response.uid,
                    "stop" if response.finish_reason == "stop" else "length",
                    (response.prompt_cache, response.all_tokens),
                )
            elif active.state.done:
                self._end(response.uid, active.state.reason, None)
        return bool(self._active)

    def _end(self, uid: int, reason: Any, cache_and_tokens: tuple[Any, Any] | None) -> None:
        active = self._active.pop(uid)
        if active.solo is not None:
            active.solo.steps.close()
            if not active.solo.speculative:
                cache_and_tokens = (active.solo.cache, active.solo.tokens)
        else:
            self._batch_changed({"op": "end", "uid": uid, "finished": cache_and_tokens is not None})
        if active.solo is None and cache_and_tokens is None:
            cache_and_tokens = self._batch.remove([uid], return_prompt_caches=True).get(uid)
        last = active.state.finish(reason)
        if self._disk is not None and last.stats is not None:
            stats = last.stats
            self._disk.note_prefill(
                stats.prompt_eval_count - stats.cached_prompt_tokens,
                stats.prompt_eval_duration / 1e9,
            )
        if cache_and_tokens is not None:  # after the stats: serialising is not decode time
            self._remember(*cache_and_tokens, keep=active.keep_prefix)
        active.emit(last)
        active.emit(END)

    def _remember(
        self, cache: list[Any] | None, tokens: list[int] | None, keep: bool = False
    ) -> None:
        """Keep a finished sequence's KV cache for follow-ups that extend it (``keep``: the
        request's caching hint)."""
        if not cache or not tokens:
            return
        held = getattr(cache[0], "offset", len(tokens))
        if not isinstance(held, int) or held <= 0:
            return
        held_tokens = list(tokens[:held])
        self._prompt_cache.insert_cache(id(self._model), held_tokens, cache)
        self._remembered.append(held_tokens)
        disk = self._disk
        if disk is not None and disk.wants(held_tokens):
            from mlx_lm.models.cache import save_prompt_cache

            target = io.BytesIO()
            target.name = "entry.safetensors"
            try:
                save_prompt_cache(target, cache)  # type: ignore[arg-type]
            except ValueError:  # a cache class without a serialisable state
                return
            disk.store(held_tokens, target.getvalue(), keep=keep)

    def _logprob(self, token: int, logprobs: Any, top_n: int | None) -> TokenLogprob | None:
        if top_n is None:
            return None
        import mlx.core as mx

        tokenizer = self._tokenizer
        top: list[tuple[int, str, float]] = []
        if top_n > 0:
            best = mx.argpartition(-logprobs, kth=top_n - 1)[:top_n]
            values = logprobs[best].tolist()
            pairs = sorted(zip(best.tolist(), values, strict=True), key=lambda p: -p[1])
            top = [(i, tokenizer.decode([i]), v) for i, v in pairs]
        return TokenLogprob(token, tokenizer.decode([token]), logprobs[token].item(), top)
