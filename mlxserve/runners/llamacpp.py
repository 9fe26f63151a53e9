"""The llama.cpp runner: GGUF files through ``llama-cpp-python``.

The fallback where MLX cannot run well (machines without Apple Silicon), and on a Mac the way
to run GGUF files with Metal offload. One llama.cpp context holds one sequence, so this runner
serves one request at a time (``max_parallel == 1``) and the daemon's scheduler queues the rest.
llama.cpp itself keeps the previous prompt's KV cache and reuses its longest common prefix.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np

from mlxserve import platform
from mlxserve.errors import (
    InferenceError,
    InvalidRequestError,
    ModelNotLoadedError,
    RunnerUnavailableError,
    UnsupportedFeatureError,
    UnsupportedFormatError,
)
from mlxserve.runners.base import (
    GenerateChunk,
    GenerateRequest,
    LoadedModelInfo,
    RunnerOptions,
    TokenLogprob,
)
from mlxserve.runners.decode import DecodeState, SampledToken, decode_loop, prompt_and_budget
from mlxserve.runners.loading import context_length, load_options
from mlxserve.runners.textstream import ByteDetokenizer, TextStream
from mlxserve.runners.threads import WorkerThread
from modelstore.model import LocalModel

RANDOM_SEED = 0xFFFFFFFF
"""llama.cpp's LLAMA_DEFAULT_SEED: pick a fresh random seed for each request."""


def _import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise RunnerUnavailableError(
            "the llama.cpp runner is not installed: pip install 'mlxserve[llamacpp]'"
        ) from exc
    return llama_cpp


class LlamaCppRunner:
    name = "llamacpp"

    def __init__(self) -> None:
        self._llama: Any = None
        self._info: LoadedModelInfo | None = None
        self._worker = WorkerThread("llamacpp")
        self._eog: set[int] = set()

    @property
    def max_parallel(self) -> int:
        return 1

    def _require(self) -> Any:
        if self._llama is None:
            raise ModelNotLoadedError("no model is loaded in the llama.cpp runner")
        return self._llama

    async def load(self, model: LocalModel, options: RunnerOptions) -> LoadedModelInfo:
        if model.format != "gguf" or not model.weights:
            raise UnsupportedFormatError(
                f"the llama.cpp runner runs GGUF models; {model.name} is {model.format}",
                runners=["mlx"],
            )
        llama_cpp = _import_llama_cpp()
        started = time.perf_counter_ns()
        options = load_options(model, options)

        def build() -> Any:
            return llama_cpp.Llama(
                model_path=str(model.weights[0]),
                n_ctx=context_length(model, options),
                n_gpu_layers=options.n_gpu_layers
                if options.n_gpu_layers is not None
                else platform.default_gpu_layers(),
                n_threads=options.n_threads or platform.default_threads(),
                seed=RANDOM_SEED,
                verbose=False,
            )

        try:
            llama = await self._worker.call(build)
        except ValueError as exc:
            raise InferenceError(f"llama.cpp could not load {model.name}: {exc}") from exc
        self._llama = llama
        vocab = llama._model.vocab
        self._eog = {
            token for token in range(llama.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, token)
        }
        self._info = LoadedModelInfo(
            runner=self.name,
            format="gguf",
            architecture=model.architecture,
            parameter_count=llama._model.n_params(),
            quantization=model.quantization,
            context_length=llama.n_ctx(),
            memory_bytes=llama._model.size(),
            max_parallel=1,
            load_duration_ns=time.perf_counter_ns() - started,
        )
        return self._info

    async def unload(self) -> None:
        llama, self._llama = self._llama, None
        if llama is not None:
            await self._worker.call(llama.close)
        self._worker.shutdown()
        self._worker = WorkerThread("llamacpp")

    def describe(self) -> LoadedModelInfo:
        if self._info is None:
            raise ModelNotLoadedError("no model is loaded in the llama.cpp runner")
        return self._info

    @property
    def chat_template(self) -> str | None:
        return self._require().metadata.get("tokenizer.chat_template")

    @property
    def special_tokens(self) -> dict[str, str]:
        llama = self._require()
        return {
            "bos_token": self._piece(llama.token_bos()),
            "eos_token": self._piece(llama.token_eos()),
        }

    def _piece(self, token: int) -> str:
        if token < 0:
            return ""
        return self._require().detokenize([token], special=True).decode("utf-8", "replace")

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._require().tokenize(text.encode(), add_bos=add_special_tokens, special=True)

    def detokenize(self, token_ids: list[int]) -> str:
        return self._require().detokenize(token_ids).decode("utf-8", "replace")

    async def embed(self, texts: list[str]) -> list[list[float]]:
        raise UnsupportedFeatureError(
            "embeddings are served by the MLX runner; this model runs on llama.cpp"
        )

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        llama = self._require()
        prompt, max_tokens = prompt_and_budget(
            request, self.tokenize, [llama.token_bos()], llama.n_ctx()
        )
        grammar = self._grammar(request.response_format)
        return self._worker.stream(
            lambda: self._generate_sync(request, prompt, max_tokens, grammar), request.cancel
        )

    def _generate_sync(
        self, request: GenerateRequest, prompt: list[int], max_tokens: int, grammar: Any
    ) -> Iterator[GenerateChunk]:
        llama = self._llama
        cached = 0
        for old, new in zip(llama._input_ids[: llama.n_tokens], prompt, strict=False):
            if old != new:
                break
            cached += 1
        cached = min(cached, len(prompt) - 1)
        llama.set_seed(RANDOM_SEED if request.seed is None else request.seed)
        captured: dict[str, np.ndarray] = {}
        processors = self._logits_processors(request, captured)
        tokens = llama.generate(
            prompt,
            top_k=request.top_k,
            top_p=request.top_p,
            min_p=request.min_p,
            temp=request.temperature,
            repeat_penalty=request.repetition_penalty,
            frequency_penalty=request.frequency_penalty,
            presence_penalty=request.presence_penalty,
            logits_processor=processors or None,
            grammar=grammar,
        )
        stream = TextStream(ByteDetokenizer(lambda ids: llama.detokenize(ids)), request.stop)

        def sampled() -> Iterator[SampledToken]:
            try:
                for token in tokens:
                    yield SampledToken(token, self._logprob(token, captured, request.logprobs))
            finally:
                tokens.close()

        state = DecodeState(
            text=stream,
            is_end_of_sequence=self._eog.__contains__,
            max_tokens=max_tokens,
            cancel=request.cancel,
            prompt_tokens=len(prompt),
            cached_prompt_tokens=cached,
        )
        try:
            yield from decode_loop(sampled(), state)
        except RuntimeError as exc:
            raise InferenceError(f"llama.cpp failed: {exc}") from exc

    @staticmethod
    def _grammar(response_format: dict[str, Any] | None) -> Any:
        """JSON output through llama.cpp's own grammar sampler (GBNF from a JSON Schema)."""
        if not response_format:
            return None
        from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

        schema = response_format.get("schema")
        try:
            if schema:
                return LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
            return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise InvalidRequestError(
                f"cannot build a grammar from this JSON schema: {exc}"
            ) from exc

    def _logits_processors(
        self, request: GenerateRequest, captured: dict[str, np.ndarray]
    ) -> list[Any]:
        """Logit bias, caller processors, and (for logprobs) a tap on the raw logits.

        llama.cpp only keeps logits when built with ``logits_all``, which costs memory for
        every request; a processor sees them anyway, so logprobs come from a copy taken here.
        """
        processors: list[Any] = []
        if request.logit_bias:
            ids = np.array(list(request.logit_bias), dtype=np.int64)
            bias = np.array(list(request.logit_bias.values()), dtype=np.float32)

            def apply_bias(_input_ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
                logits[ids] += bias
                return logits

            processors.append(apply_bias)
        processors.extend(request.logits_processors)
        if request.logprobs is not None:

            def tap(_input_ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
                captured["logits"] = logits.copy()
                return logits

            processors.append(tap)
        return processors

    def _logprob(
        self, token: int, captured: dict[str, np.ndarray], top_n: int | None
    ) -> TokenLogprob | None:
        logits = captured.get("logits")
        if top_n is None or logits is None:
            return None
        shifted = logits - logits.max()
        logprobs = shifted - np.log(np.exp(shifted).sum())
        top: list[tuple[int, str, float]] = []
        if top_n > 0:
            best = np.argpartition(-logprobs, top_n)[:top_n]
            best = best[np.argsort(-logprobs[best])]
            top = [(int(i), self._piece(int(i)), float(logprobs[i])) for i in best]
        return TokenLogprob(token, self._piece(token), float(logprobs[token]), top)
