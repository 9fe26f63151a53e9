"""mlx-lm's private helpers, as this project uses them (``mlxserve/mlx_lm_private.py``).

Each test fails loudly when an mlx-lm release changes what the helper takes or returns, which
would otherwise turn tool-call or thinking detection off without an error anywhere.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from mlxserve import mlx_lm_private

QWEN_LIKE_TEMPLATE = (
    "{% for tool in tools %}{{ tool | tojson }}{% endfor %}"
    "<tool_call>\n{{ tool_call.name }}</tool_call>"
)


class Tokenizer:
    """The two things mlx-lm's inference reads: the template and the vocabulary."""

    def __init__(self, template: str | None, vocabulary: dict[str, int]) -> None:
        self.chat_template = template
        self._vocabulary = vocabulary

    def get_vocab(self) -> dict[str, int]:
        return self._vocabulary

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self._vocabulary[text]]


@pytest.mark.parametrize(
    ("module", "name", "parameters"),
    [
        ("mlx_lm.tokenizer_utils", "_infer_tool_parser", ["tokenizer"]),
        ("mlx_lm.tokenizer_utils", "_infer_thinking", ["tokenizer"]),
        ("mlx_lm.utils", "_get_classes", ["config"]),
    ],
)
def test_private_helpers_keep_their_signatures(module: str, name: str, parameters: list[str]):
    import importlib

    helper = getattr(importlib.import_module(module), name)
    assert list(inspect.signature(helper).parameters) == parameters


def test_a_tool_call_template_names_its_parser():
    tokenizer = Tokenizer(QWEN_LIKE_TEMPLATE, {"<tool_call>": 1, "</tool_call>": 2})
    name = mlx_lm_private.infer_tool_parser(tokenizer)
    assert name == "json_tools"
    import importlib

    parser: Any = importlib.import_module(f"mlx_lm.tool_parsers.{name}")
    assert parser.tool_call_start == "<tool_call>"
    assert callable(parser.parse_tool_call)


def test_a_template_without_tools_has_no_parser():
    assert mlx_lm_private.infer_tool_parser(Tokenizer("{{ messages }}", {"a": 1})) is None


def test_think_tokens_come_from_the_vocabulary():
    thinking = Tokenizer(None, {"<think>": 5, "</think>": 6})
    assert mlx_lm_private.infer_think_tokens(thinking) == ("<think>", "</think>")
    assert mlx_lm_private.infer_think_tokens(Tokenizer(None, {"a": 1})) == (None, None)


def test_model_classes_build_a_llama():
    model_class, args_class = mlx_lm_private.model_classes({"model_type": "llama"})
    assert model_class.__name__ == "Model"
    assert "hidden_size" in inspect.signature(args_class).parameters


def test_the_wrapper_exposes_its_hugging_face_tokenizer():
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import Tokenizer as Vocabulary
    from tokenizers import models
    from transformers import PreTrainedTokenizerFast

    words = models.WordLevel({"hello": 0, "<eos>": 1}, unk_token="hello")
    inner = PreTrainedTokenizerFast(tokenizer_object=Vocabulary(words), eos_token="<eos>")
    assert mlx_lm_private.hf_tokenizer(TokenizerWrapper(inner)) is inner
