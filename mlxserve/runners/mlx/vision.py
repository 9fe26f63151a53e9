"""The MLX vision runner: vision-language models (HF folders mlx-vlm supports) through
``mlx-vlm``, with the images a ``GenerateRequest`` carries.

mlx-vlm loads the model and its processor (``mlx_vlm.load``) and samples tokens
(``generate_step``); the request's images are checked and decoded by ``images.open_image`` and
turned into pixel values by the model's own HF processor, which also expands each image token
into the model's image-patch tokens (so ``prompt_eval_count`` counts them). The processor is
called here rather than through ``mlx_vlm.prepare_inputs``, which passes text-only arguments
(``padding``) that transformers 5's image processors refuse. Generation runs on the one MLX
engine thread, one token per engine step, like the text runner's batches (``engine.py``).

The KV of the last prompt's text before its first image is kept (``_kept``), and a prompt that
starts with the same tokens (the next turn of the conversation: the chat core places each image
where it sits) prefills only the rest: mlx-vlm's ``generate_step`` takes a filled
``prompt_cache`` and embeds the suffix with its images (``get_input_embeddings``), as its own
prefix cache does. Not for language models whose positions come from the whole prompt (M-RoPE:
Qwen2-VL and kin), whose suffix would get the wrong positions.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

from mlxserve.errors import (
    InferenceError,
    InvalidRequestError,
    UnsupportedFeatureError,
    UnsupportedFormatError,
)
from mlxserve.images import open_image
from mlxserve.runners.base import (
    GenerateChunk,
    GenerateRequest,
    RunnerOptions,
)
from mlxserve.runners.decode import (
    DecodeState,
    SampledToken,
    check_token_ids,
    decode_loop,
    generation_budget,
)
from mlxserve.runners.engine import END, Emit
from mlxserve.runners.loading import context_length
from mlxserve.runners.mlx.common import MlxRunnerBase, backend_details, import_mlx
from mlxserve.runners.mlx.runner import request_processors, request_sampler
from mlxserve.runners.promptcache import common_prefix
from mlxserve.runners.textstream import MlxDetokenizer, TextStream
from modelstore.model import LocalModel

DEFAULT_IMAGE_TOKEN = "<image>"


class MlxVisionRunner(MlxRunnerBase):
    """Vision-language HF folders on mlx-vlm, one request at a time, stepped on the MLX engine
    thread beside the text runner's batches."""

    name = "mlx-vlm"

    def __init__(self) -> None:
        super().__init__()
        self._processor: Any = None
        self._wrapper: Any = None
        self._image_token = DEFAULT_IMAGE_TOKEN
        self._image_token_id: int | None = None
        self._context = 0
        self._kept: tuple[list[int], list[Any]] | None = None
        """The last prompt's tokens before its first image, and mlx-vlm's KV cache of them."""

    def _require(self) -> tuple[Any, Any]:
        return self._loaded(self._model), self._processor

    async def _load(self, model: LocalModel, options: RunnerOptions) -> dict[str, Any]:
        if model.format != "mlx" or model.vision is None:
            raise UnsupportedFormatError(
                f"the {self.name} runner runs HF-folder vision models; {model.name} is not one"
            )
        _, mlx_vlm, tokenizer_utils = import_mlx(self.name, "mlx_vlm", "mlx_lm.tokenizer_utils")

        def build() -> None:
            loaded, processor = mlx_vlm.load(str(model.path))
            self._model, self._processor = loaded, processor
            self._wrapper = tokenizer_utils.TokenizerWrapper(processor.tokenizer)

        await self._build(model, build)
        self._image_token = getattr(self._processor, "image_token", None) or DEFAULT_IMAGE_TOKEN
        self._image_token_id = self._processor.tokenizer.convert_tokens_to_ids(self._image_token)
        self._context = context_length(model, options)
        details = {"vision_model": model.vision.get("vision_model"), **backend_details()}
        return {**self._measured(), "context_length": self._context, "details": details}

    def _vocabulary(self) -> int:
        """The language model's vocabulary (its logits' width), which the tokenizer's length
        stands in for where the config does not say."""
        model, processor = self._require()
        text_config = getattr(getattr(model, "config", None), "text_config", None)
        size = getattr(text_config, "vocab_size", None)
        return size if isinstance(size, int) else len(processor.tokenizer)

    def _drop(self) -> None:
        self._model = self._processor = self._wrapper = self._kept = None

    @property
    def chat_template(self) -> str | None:
        processor = self._require()[1]
        return getattr(processor, "chat_template", None) or getattr(
            processor.tokenizer, "chat_template", None
        )

    @property
    def special_tokens(self) -> dict[str, str]:
        tokenizer = self._require()[1].tokenizer
        return {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}

    @property
    def image_marker(self) -> str | None:
        return self._image_token

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        tokenizer = self._require()[1].tokenizer
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def detokenize(self, token_ids: list[int]) -> str:
        return self._require()[1].tokenizer.decode(token_ids)

    def _prompt(self, request: GenerateRequest) -> str:
        """The rendered prompt, with one image token per image: a chat template that does not
        place them (or a raw prompt) gets the missing ones in front, as mlx-vlm does."""
        prompt = request.prompt
        if prompt is None:
            prompt = self.detokenize(request.prompt_tokens or [])
        missing = len(request.images) - prompt.count(self._image_token)
        if missing < 0 and request.images:
            # The image token is one of the tokenizer's own, which a message's text can name:
            # the processor would then pair images with the wrong places (or fail).
            raise InvalidRequestError(
                f"the prompt holds the model's image token {self._image_token!r} "
                f"{prompt.count(self._image_token)} times for {len(request.images)} image(s): "
                "the text names it itself; remove it from the text",
                param="messages",
            )
        return self._image_token * max(missing, 0) + prompt

    def _inputs(self, request: GenerateRequest) -> tuple[Any, Any, Any]:
        """Token ids (image tokens expanded), pixel values and mask from the HF processor."""
        import mlx.core as mx

        processor = self._processor
        images = [open_image(data, index) for index, data in enumerate(request.images)]
        try:
            inputs = processor(
                text=[self._prompt(request)], images=images or None, return_tensors="np"
            )
        except (ValueError, TypeError) as exc:
            raise InferenceError(f"the model's processor failed: {exc}") from exc
        pixels = inputs.get("pixel_values")
        return (
            mx.array(inputs["input_ids"]),
            None if pixels is None else mx.array(pixels),
            mx.array(inputs["attention_mask"]),
        )

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        self._require()
        if request.response_format or request.logprobs is not None:
            raise UnsupportedFeatureError(
                f"the {self.name} runner does not support JSON output or logprobs"
            )
        check_token_ids(request, self._vocabulary())

        def start(emit: Emit) -> None:
            steps = self._decode(request)

            def step() -> bool:
                try:
                    chunk = next(steps)
                except BaseException as exc:  # handed to the consumer, raised there
                    emit(exc)
                    chunk = None
                if chunk is not None:
                    emit(chunk)
                if chunk is None or chunk.done:
                    emit(END)
                    self._engine.unregister(step)
                    return False
                return True

            self._engine.register(step)

        async with contextlib.aclosing(self._engine.stream(start, request.cancel)) as chunks:
            async for chunk in chunks:
                yield chunk

    def _decode(self, request: GenerateRequest) -> Iterator[GenerateChunk]:
        """Runs on the engine thread: the prompt's inputs, then one chunk per ``next``."""
        from mlx_vlm.generate.ar import generate_step

        input_ids, pixels, mask = self._inputs(request)
        ids = [int(token) for token in input_ids[0].tolist()]
        prompt_tokens = len(ids)
        budget = generation_budget(
            request, prompt_tokens, self._context, "the prompt (images included)"
        )
        text = ids.index(self._image_token_id) if self._image_token_id in ids else len(ids)
        cache, cached = self._reuse(ids, text)
        tokens = generate_step(
            input_ids[:, cached:],
            self._model,
            pixels,
            mask[:, cached:],
            max_tokens=budget,
            sampler=request_sampler(request),
            logits_processors=_primed(request_processors(request), ids[:cached]),
            prompt_cache=cache,
        )
        wrapper = self._wrapper
        state = DecodeState(
            text=TextStream(MlxDetokenizer(wrapper.detokenizer), request.stop),
            is_end_of_sequence=wrapper.eos_token_ids.__contains__,
            max_tokens=budget,
            cancel=request.cancel,
            prompt_tokens=prompt_tokens,
            cached_prompt_tokens=cached,
        )
        sampled = (SampledToken(int(token)) for token, _ in tokens)
        try:
            for chunk in decode_loop(sampled, state):
                if chunk.done:  # the engine asks for nothing after the last chunk
                    self._keep(cache, ids[:text])
                yield chunk
        finally:
            tokens.close()

    def _reuse(self, ids: list[int], text: int) -> tuple[list[Any], int]:
        """A KV cache for the prompt ``ids`` (whose first ``text`` tokens come before any
        image) and how many of its tokens it holds already: the kept one, trimmed to what it
        shares with them, or a new one."""
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache
        from mlx_vlm.models.cache import make_prompt_cache

        kept, self._kept = self._kept, None
        if kept is not None:
            held, cache = kept
            shared = min(common_prefix(held, ids), text, len(ids) - 1)
            if shared > 0 and can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, len(held) - shared)
                return cache, shared
        return make_prompt_cache(self._model.language_model), 0

    def _keep(self, cache: list[Any], prefix: list[int]) -> None:
        """Keep the KV of ``prefix`` (a finished prompt's text before its first image) for the
        next prompt, unless the model's positions forbid reusing it."""
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        language = self._model.language_model
        if not prefix or hasattr(language, "_rope_deltas") or not can_trim_prompt_cache(cache):
            return
        held = cache[0].offset
        if held < len(prefix):
            return
        trim_prompt_cache(cache, held - len(prefix))
        self._kept = (prefix, cache)


def _primed(processors: list[Any], prefix: list[int]) -> list[Any]:
    """``processors`` (repetition penalties) seeing the reused prefix before the tokens
    mlx-vlm hands them (the suffix it prefilled, then the output), as in a cold run."""
    if not prefix:
        return processors
    import mlx.core as mx

    head = mx.array(prefix)

    def primed(processor: Any) -> Any:
        return lambda tokens, logits: processor(mx.concatenate([head, tokens]), logits)

    return [primed(processor) for processor in processors]
