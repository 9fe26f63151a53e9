"""A model loaded in a runner, plus what turns user input into a ``GenerateRequest``.

Shared by ``mlxctl run`` (in-process) and the daemon: the ModelSpec's defaults, the request's
overrides, and one prompt builder (``prompts.py``) for every runner, so the same messages give
the same prompt string whichever library runs them.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from mlxserve.errors import InvalidRequestError
from mlxserve.prompts import CHATML_TEMPLATE, build_messages, render_chat
from mlxserve.runners.base import (
    GenerateChunk,
    GenerateRequest,
    LoadedModelInfo,
    ModelRunner,
    RunnerOptions,
)
from mlxserve.runners.constrained import check_format
from mlxserve.runners.select import choose_runner, make_runner
from modelstore.model import GENERATION_PARAMETERS, LocalModel
from modelstore.runtime import open_model
from modelstore.store import ModelStore

REQUEST_FIELDS = (
    *GENERATION_PARAMETERS,
    "logprobs",
    "logit_bias",
    "repetition_context_size",
    "response_format",
)

MAX_SEED = 2**32 - 1
"""llama.cpp seeds are 32-bit; MLX keys refuse negative ones."""
PARAMETER_RANGES: tuple[tuple[str, float, float], ...] = (
    ("temperature", 0.0, math.inf),
    ("min_p", 0.0, 1.0),
    ("repetition_penalty", 0.0, math.inf),
    ("seed", 0, MAX_SEED),
)
"""Sampling values the samplers refuse (mlx-lm raises deep inside a batch): a 400 here."""


def build_request(
    model: LocalModel,
    overrides: dict[str, Any],
    *,
    prompt: str | None = None,
    prompt_tokens: list[int] | None = None,
    add_special_tokens: bool = True,
) -> GenerateRequest:
    """The ModelSpec's defaults, then the caller's overrides (``None`` means "not given")."""
    unknown = set(overrides) - set(REQUEST_FIELDS)
    if unknown:
        raise InvalidRequestError(f"unknown option(s): {', '.join(sorted(unknown))}")
    values = {k: v for k, v in model.parameters.items() if k in GENERATION_PARAMETERS}
    values.update({k: v for k, v in overrides.items() if v is not None})
    stop = values.pop("stop", None) or []
    if isinstance(stop, str):
        stop = [stop]
    request = GenerateRequest(
        prompt=prompt,
        prompt_tokens=prompt_tokens,
        stop=list(stop),
        add_special_tokens=add_special_tokens,
    )
    for key, value in values.items():
        setattr(request, key, value)
    if request.logit_bias:
        request.logit_bias = {int(k): float(v) for k, v in request.logit_bias.items()}
    for key, low, high in PARAMETER_RANGES:
        value = getattr(request, key)
        if isinstance(value, int | float) and not low <= value <= high:
            bound = f"at least {low:g}" if high == math.inf else f"between {low:g} and {high:g}"
            raise InvalidRequestError(f"'{key}' must be {bound}, not {value}", param=key)
    check_format(request.response_format)
    return request


@dataclass
class LoadedModel:
    model: LocalModel
    runner: ModelRunner
    info: LoadedModelInfo
    loaded_at: float = field(default_factory=time.time)
    load_reported: bool = False
    """Ollama reports ``load_duration`` on the request that paid for the load, then 0."""

    @classmethod
    async def load(
        cls,
        store: ModelStore,
        name: str,
        runner_name: str | None = None,
        options: RunnerOptions | None = None,
    ) -> LoadedModel:
        model = open_model(store, name)
        runner = make_runner(choose_runner(model, runner_name))
        info = await runner.load(model, options or RunnerOptions())
        return cls(model, runner, info)

    @property
    def template(self) -> str:
        return self.model.chat_template or self.runner.chat_template or CHATML_TEMPLATE

    def chat_prompt(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> str:
        return render_chat(
            self.template,
            build_messages(messages, self.model.system),
            add_generation_prompt=True,
            tools=tools,
            **self.runner.special_tokens,
        )

    def chat_request(
        self,
        messages: list[dict[str, Any]],
        overrides: dict[str, Any],
        tools: list[dict[str, Any]] | None = None,
    ) -> GenerateRequest:
        prompt = self.chat_prompt(messages, tools)
        tokens = self.runner.tokenize(prompt, add_special_tokens=False)
        return build_request(self.model, overrides, prompt=prompt, prompt_tokens=tokens)

    def raw_request(self, prompt: str, overrides: dict[str, Any]) -> GenerateRequest:
        return build_request(self.model, overrides, prompt=prompt, add_special_tokens=True)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        async with contextlib.aclosing(self.runner.generate(request)) as chunks:
            async for chunk in chunks:
                if chunk.done and chunk.stats and not self.load_reported:
                    self.load_reported = True
                    chunk.stats.load_duration = self.info.load_duration_ns
                    chunk.stats.total_duration += self.info.load_duration_ns
                yield chunk

    async def unload(self) -> None:
        await self.runner.unload()
