"""The MLX runner: HF-style MLX models (and converted GGUFs) through ``mlx-lm``.

Sampling, logits processors, KV caches and the prompt cache are mlx-lm's own
(``make_sampler``, ``make_logits_processors``, ``generate_step``, ``LRUPromptCache``); this
module only wires them to the ModelRunner protocol. All MLX work happens on one worker thread.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from mlxserve import platform
from mlxserve.errors import (
    ContextOverflowError,
    InferenceError,
    ModelNotLoadedError,
    OutOfMemoryError,
    RunnerUnavailableError,
    UnsupportedArchitectureError,
)
from mlxserve.runners.base import (
    GenerateChunk,
    GenerateRequest,
    LoadedModelInfo,
    RunnerOptions,
    TokenLogprob,
)
from mlxserve.runners.decode import DEFAULT_MAX_TOKENS, SampledToken, decode_loop
from mlxserve.runners.textstream import MlxDetokenizer, TextStream
from mlxserve.runners.threads import WorkerThread
from modelstore.model import LocalModel
from modelstore.store import default_root

MEMORY_HEADROOM = 1.2
"""Refuse a model whose weights need more than 1/1.2 of the machine's memory."""
DEFAULT_CONTEXT = 4096


def _import_mlx() -> tuple[Any, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import mlx.core as mx
        import mlx_lm
    except ImportError as exc:
        raise RunnerUnavailableError(
            "the MLX runner needs mlx and mlx-lm: pip install mlx mlx-lm"
        ) from exc
    return mx, mlx_lm


def derived_folder(model: LocalModel, dequantized: bool) -> Path:
    """Where the MLX conversion of a GGUF model is cached, keyed by its weights blob.

    The runtime folder links each file to its blob, so the link target's name is the digest.
    """
    key = model.weights[0].resolve().name[:16]
    mode = "f32" if dequantized else "q"
    return (model.derived_dir or default_root() / "derived") / "gguf-mlx" / f"{key}-{mode}"


class MlxRunner:
    name = "mlx"

    def __init__(self) -> None:
        self._model: Any = None
        self._tokenizer: Any = None
        self._info: LoadedModelInfo | None = None
        self._context = DEFAULT_CONTEXT
        self._worker = WorkerThread("mlx")
        self._prompt_cache: Any = None

    @property
    def max_parallel(self) -> int:
        return 1

    def _require(self) -> tuple[Any, Any]:
        if self._model is None:
            raise ModelNotLoadedError("no model is loaded in the MLX runner")
        return self._model, self._tokenizer

    async def load(self, model: LocalModel, options: RunnerOptions) -> LoadedModelInfo:
        mx, mlx_lm = _import_mlx()
        started = time.perf_counter_ns()
        needed = model.size_bytes
        available = platform.total_memory_bytes()
        if available and needed * MEMORY_HEADROOM > available:
            raise OutOfMemoryError(
                f"{model.name} needs about {needed / 1e9:.1f} GB; this machine has "
                f"{available / 1e9:.1f} GB",
                needed_bytes=needed,
                available_bytes=available,
            )
        dequantize = platform.mlx_dequantize_weights()

        def build() -> tuple[Any, Any]:
            folder = model.path
            if model.format == "gguf":
                from mlxserve.runners.gguf_convert import convert_gguf

                folder = convert_gguf(
                    model.weights[0], derived_folder(model, dequantize), dequantize=dequantize
                )
            try:
                loaded, tokenizer = mlx_lm.load(str(folder))
            except ValueError as exc:
                raise UnsupportedArchitectureError(
                    f"mlx-lm cannot load {model.name}: {exc}"
                ) from exc
            if dequantize:
                from mlx_lm.utils import dequantize_model

                loaded = dequantize_model(loaded)
                mx.eval(loaded.parameters())
            return loaded, tokenizer

        self._model, self._tokenizer = await self._worker.call(build)
        from mlx_lm.models.cache import LRUPromptCache
        from mlx_lm.utils import get_total_parameters

        self._prompt_cache = LRUPromptCache(
            max_size=options.prompt_cache_entries, max_bytes=options.prompt_cache_bytes
        )
        self._context = int(
            options.context_length
            or model.parameters.get("context_length")
            or min(DEFAULT_CONTEXT, model.context_length or DEFAULT_CONTEXT)
        )
        self._info = LoadedModelInfo(
            runner=self.name,
            format=model.format,
            architecture=model.architecture,
            parameter_count=get_total_parameters(self._model),
            quantization=None if dequantize else model.quantization,
            context_length=self._context,
            memory_bytes=int(mx.get_active_memory()),
            max_parallel=self.max_parallel,
            load_duration_ns=time.perf_counter_ns() - started,
            details={"dequantized": dequantize, "metal": platform.is_apple_silicon()},
        )
        return self._info

    async def unload(self) -> None:
        self._model = self._tokenizer = self._prompt_cache = None

        def release() -> None:
            import mlx.core as mx

            mx.clear_cache()

        await self._worker.call(release)
        self._worker.shutdown()
        self._worker = WorkerThread("mlx")

    def describe(self) -> LoadedModelInfo:
        if self._info is None:
            raise ModelNotLoadedError("no model is loaded in the MLX runner")
        return self._info

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

    async def embed(self, texts: list[str]) -> list[list[float]]:
        """Mean-pooled final hidden states: a usable embedding from any decoder model."""
        model, tokenizer = self._require()

        def run() -> list[list[float]]:
            import mlx.core as mx

            vectors = []
            for text in texts:
                ids = mx.array(tokenizer.encode(text))[None]
                hidden = model.model(ids).mean(axis=1)[0]
                hidden = hidden / mx.linalg.norm(hidden)
                vectors.append(hidden.astype(mx.float32).tolist())
            return vectors

        return await self._worker.call(run)

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        tokenizer = self._require()[1]
        prompt = request.prompt_tokens
        if prompt is None:
            prompt = self.tokenize(request.prompt or "", request.add_special_tokens)
        if not prompt:
            prompt = [tokenizer.bos_token_id or 0]
        if len(prompt) >= self._context:
            raise ContextOverflowError(
                f"the prompt has {len(prompt)} tokens; the context holds {self._context}",
                prompt_tokens=len(prompt),
                context_length=self._context,
            )
        max_tokens = min(request.max_tokens or DEFAULT_MAX_TOKENS, self._context - len(prompt))
        return self._worker.stream(
            lambda: self._generate_sync(request, list(prompt), max_tokens), request.cancel
        )

    def _generate_sync(
        self, request: GenerateRequest, prompt: list[int], max_tokens: int
    ) -> Iterator[GenerateChunk]:
        import mlx.core as mx
        from mlx_lm.generate import generate_step
        from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache
        from mlx_lm.sample_utils import make_logits_processors, make_sampler

        model, tokenizer = self._model, self._tokenizer
        cache, remaining = self._prompt_cache.fetch_nearest_cache(id(model), prompt)
        if cache is None:
            cache, remaining = make_prompt_cache(model), prompt
        if not remaining:
            trim_prompt_cache(cache, 1)
            remaining = prompt[-1:]
        cached = len(prompt) - len(remaining)
        if request.seed is not None:
            mx.random.seed(request.seed)
        sampler = make_sampler(
            temp=request.temperature,
            top_p=request.top_p if 0 < request.top_p < 1 else 0.0,
            min_p=request.min_p,
            top_k=request.top_k,
        )
        processors = make_logits_processors(
            logit_bias=request.logit_bias or None,
            repetition_penalty=request.repetition_penalty
            if request.repetition_penalty != 1.0
            else None,
            repetition_context_size=request.repetition_context_size,
            presence_penalty=request.presence_penalty or None,
            frequency_penalty=request.frequency_penalty or None,
        ) + list(request.logits_processors)
        steps = generate_step(
            mx.array(remaining),
            model,
            max_tokens=max_tokens,
            sampler=sampler,
            logits_processors=processors,
            prompt_cache=cache,
        )
        generated: list[int] = []

        def sampled() -> Iterator[SampledToken]:
            try:
                for token, logprobs in steps:
                    generated.append(token)
                    yield SampledToken(token, self._logprob(token, logprobs, request.logprobs))
            finally:
                steps.close()

        text = TextStream(MlxDetokenizer(tokenizer.detokenizer), request.stop)
        try:
            yield from decode_loop(
                sampled(),
                text=text,
                is_end_of_sequence=tokenizer.eos_token_ids.__contains__,
                max_tokens=max_tokens,
                cancel=request.cancel,
                prompt_tokens=len(prompt),
                cached_prompt_tokens=cached,
            )
        except RuntimeError as exc:
            raise InferenceError(f"MLX failed: {exc}") from exc
        finally:
            self._remember(cache, prompt + generated)

    def _remember(self, cache: list[Any], tokens: list[int]) -> None:
        """Keep the KV cache for follow-ups, keyed by exactly the tokens it holds."""
        import mlx.core as mx

        held = getattr(cache[0], "offset", None) if cache else None
        if not isinstance(held, int) or held <= 0:
            return
        mx.eval([c.state for c in cache])
        self._prompt_cache.insert_cache(id(self._model), copy.copy(tokens[:held]), cache)

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
