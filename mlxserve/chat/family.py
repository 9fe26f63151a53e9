"""What a model family writes differently: its tool-call format, its think tokens, its FIM tokens.

This comes from the model's own files (chat template and vocabulary), through mlx-lm's own
detection (``mlx_lm.tokenizer_utils``: the template selects one of ``mlx_lm.tool_parsers``; the
vocabulary's think tokens mark a reasoning model), for every runner: the llama.cpp runner has the
same template and vocabulary, so it gets the same parser. mlx-lm keeps that detection in two
private helpers of ``tokenizer_utils``; they are called with a small view of our runner's
tokenizer so that one detection serves both runners.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlxserve.mlx_lm_private import infer_think_tokens, infer_tool_parser
from mlxserve.prompts import template_variables
from mlxserve.runners.base import ModelRunner

log = logging.getLogger("mlxserve.chat")

FIM_TOKEN_SETS = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
    ("<PRE>", "<SUF>", "<MID>"),
)
"""Prefix/suffix/middle tokens of the FIM-trained families (Qwen coder, StarCoder, DeepSeek
coder, Code Llama); each is laid out prefix-suffix-middle."""


class _Vocabulary:
    """Just enough of ``get_vocab()`` for mlx-lm's detection: is a string one token, and which."""

    def __init__(self, runner: ModelRunner) -> None:
        self._runner = runner
        self._seen: dict[str, int | None] = {}

    def get(self, text: str) -> int | None:
        if text not in self._seen:
            ids = self._runner.tokenize(text, add_special_tokens=False)
            self._seen[text] = ids[0] if len(ids) == 1 else None
        return self._seen[text]

    def __contains__(self, text: object) -> bool:
        return isinstance(text, str) and self.get(text) is not None

    def __getitem__(self, text: str) -> int:
        token = self.get(text)
        if token is None:
            raise KeyError(text)
        return token


class _TokenizerView:
    """What mlx-lm's tool-parser and think-token inference read from a tokenizer."""

    def __init__(self, runner: ModelRunner, template: str | None) -> None:
        self.chat_template = template
        self._runner = runner
        self._vocabulary = _Vocabulary(runner)

    def get_vocab(self) -> _Vocabulary:
        return self._vocabulary

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._runner.tokenize(text, add_special_tokens=add_special_tokens)


ToolParser = Callable[[str, Any], Any]


@dataclass(frozen=True)
class ModelFamily:
    tool_parser: ToolParser | None = None
    tool_call_start: str | None = None
    tool_call_end: str | None = None
    think_start: str | None = None
    think_end: str | None = None
    template_variables: frozenset[str] = frozenset()
    fim: tuple[str, str, str] | None = None

    @property
    def thinks(self) -> bool:
        return self.think_start is not None

    @property
    def template_shows_tools(self) -> bool:
        return "tools" in self.template_variables


def import_detection() -> None:
    """Import what ``detect_family`` runs: mlx-lm's tokenizer utilities and tool parsers. The
    first import of any ``mlx_lm`` module imports mlx-lm's package, mlx and transformers with
    it (about 3 s of CPU on this project's 2-core machines); ``LoadedModel.load`` runs this
    beside the runner's load, so a daemon's first chat after a start does not wait for it."""
    importlib.import_module("mlx_lm.tokenizer_utils")
    importlib.import_module("mlx_lm.tool_parsers")


def detect_family(runner: ModelRunner, template: str | None) -> ModelFamily:
    """The family of the model loaded in ``runner`` whose chat template is ``template``."""
    view = _TokenizerView(runner, template)
    parser = start = end = None
    parser_name = infer_tool_parser(view)
    if parser_name is not None:
        module = importlib.import_module(f"mlx_lm.tool_parsers.{parser_name}")
        parser = module.parse_tool_call
        start, end = module.tool_call_start, module.tool_call_end or None
        log.debug("tool parser %s", parser_name)
    think_start, think_end = infer_think_tokens(view)
    vocabulary = view.get_vocab()
    fim = next((tokens for tokens in FIM_TOKEN_SETS if all(t in vocabulary for t in tokens)), None)
    return ModelFamily(
        tool_parser=parser,
        tool_call_start=start,
        tool_call_end=end,
        think_start=think_start,
        think_end=think_end,
        template_variables=template_variables(template) if template else frozenset(),
        fim=fim,
    )
