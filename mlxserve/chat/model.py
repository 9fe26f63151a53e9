"""A model loaded in a runner, as the chat core uses it, plus what turns user input into a
``GenerateRequest``.

Shared by ``mlxctl run`` (in-process) and the daemon: the ModelSpec's defaults, the request's
overrides, and one prompt builder (``prompts.py``) for every runner, so the same messages give
the same prompt string whichever library runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from mlxserve.chat.family import ModelFamily, detect_family, import_detection
from mlxserve.errors import InvalidRequestError
from mlxserve.prompts import CHATML_TEMPLATE
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
from modelstore.parameters import SAMPLING_FIELDS, out_of_range
from modelstore.runtime import open_model
from modelstore.store import ModelStore

REQUEST_FIELDS = (*SAMPLING_FIELDS, "logprobs", "response_format")
"""What a caller may set on a request: the sampling knobs and two output options."""


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
    for name, value in values.items():  # a request's own values were checked at its door
        problem = out_of_range(name, value)
        if problem:
            raise InvalidRequestError(
                f"model {model.name} has a default out of range: {problem}; create it again "
                "from a ModelSpec that sets a value in range",
                param=name,
            )
    values.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(values.get("stop"), str):
        values["stop"] = [values["stop"]]
    request = GenerateRequest(
        prompt=prompt,
        prompt_tokens=prompt_tokens,
        add_special_tokens=add_special_tokens,
        **values,
    )
    check_format(request.response_format)
    return request


@dataclass
class LoadedModel:
    model: LocalModel
    runner: ModelRunner
    info: LoadedModelInfo
    preparing: int = 0
    """Requests for this model being rendered and tokenized now (``chat/core.py``'s
    ``run_chat``): what each request tells the runner is on its way after it."""

    @classmethod
    async def load(
        cls,
        store: ModelStore,
        name: str,
        runner_name: str | None = None,
        options: RunnerOptions | None = None,
        make: Callable[[str], ModelRunner] = make_runner,
    ) -> LoadedModel:
        """``make`` builds the chosen runner by its name: in this process by default, in a
        worker process for the daemon (``runners/isolated.py``)."""
        model = open_model(store, name)
        runner = make(choose_runner(model, runner_name))
        # A chat model's family is detected at its first request, by mlx-lm's code: its
        # import overlaps the load (a worker process, or the library's own threads).
        imported = (
            None if model.embedding else asyncio.create_task(asyncio.to_thread(import_detection))
        )
        try:
            info = await runner.load(model, options or RunnerOptions())
        finally:
            if imported is not None:
                # A failed import fails no load: the first request meets it again, and says why.
                with contextlib.suppress(Exception):
                    await imported
        return cls(model, runner, info)

    @property
    def template(self) -> str:
        return self.model.chat_template or self.runner.chat_template or CHATML_TEMPLATE

    @functools.cached_property
    def family(self) -> ModelFamily:
        """Tool-call format, think and FIM tokens: read once from the template and vocabulary."""
        return detect_family(self.runner, self.template)

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        return self.runner.generate(request)

    async def unload(self) -> None:
        await self.runner.unload()
