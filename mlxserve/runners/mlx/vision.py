"""The MLX vision runner: vision-language models (HF folders mlx-vlm supports) through
``mlx-vlm``, with the images a ``GenerateRequest`` carries.

mlx-vlm loads the model and its processor (``mlx_vlm.load``) and samples tokens
(``generate_step``); the request's images are checked and decoded by ``images.open_image`` and
turned into pixel values by the model's own HF processor, which also expands each image token
into the model's image-patch tokens (so ``prompt_eval_count`` counts them). The processor is
called here rather than through ``mlx_vlm.prepare_inputs``, which passes text-only arguments
(``padding``) that transformers 5's image processors refuse. Generation runs on the one MLX
engine thread, one token per engine step, like the text runner's batches (``engine.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

from mlxserve.errors import InferenceError, UnsupportedFeatureError, UnsupportedFormatError
from mlxserve.images import open_image
from mlxserve.runners.base import (
    GenerateChunk,
    GenerateRequest,
    RunnerOptions,
)
from mlxserve.runners.decode import DecodeState, SampledToken, decode_loop, generation_budget
from mlxserve.runners.engine import END, Emit
from mlxserve.runners.loading import context_length
from mlxserve.runners.mlx.common import MlxRunnerBase, import_mlx
from mlxserve.runners.mlx.runner import request_processors, request_sampler
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
        self._context = 0

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
        self._context = context_length(model, options)
        details = {"vision_model": model.vision.get("vision_model")}
        return {**self._measured(), "context_length": self._context, "details": details}

    def _drop(self) -> None:
        self._model = self._processor = self._wrapper = None

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
        prompt_tokens = int(input_ids.shape[1])
        budget = generation_budget(
            request, prompt_tokens, self._context, "the prompt (images included)"
        )
        tokens = generate_step(
            input_ids,
            self._model,
            pixels,
            mask,
            max_tokens=budget,
            sampler=request_sampler(request),
            logits_processors=request_processors(request),
        )
        wrapper = self._wrapper
        state = DecodeState(
            text=TextStream(MlxDetokenizer(wrapper.detokenizer), request.stop),
            is_end_of_sequence=wrapper.eos_token_ids.__contains__,
            max_tokens=budget,
            cancel=request.cancel,
            prompt_tokens=prompt_tokens,
        )
        sampled = (SampledToken(int(token)) for token, _ in tokens)
        try:
            yield from decode_loop(sampled, state)
        finally:
            tokens.close()
