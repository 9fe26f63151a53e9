"""The private parts of mlx-lm this project leans on, behind one door.

mlx-lm exposes most of what a server needs publicly, but four things we use are private: which
tool parser and which think tokens a chat template implies (``tokenizer_utils._infer_tool_parser``
and ``_infer_thinking``, what mlx-lm's own ``TokenizerWrapper`` runs on load; we run them on
models mlx-lm never loads, GGUF on llama.cpp included), the model classes for a ``config.json``
(``utils._get_classes``, to build a GGUF's MLX skeleton without weights), and the Hugging Face
tokenizer inside mlx-lm's wrapper (``TokenizerWrapper._tokenizer``, for llguidance). A private
helper may change in any release, and a changed signature used to turn tool-call detection off
without a word. So each is reached only through this module, and ``tests/test_mlx_lm_private.py``
checks each one's signature and behaviour against the installed mlx-lm: an upgrade that changes
one fails that test, loudly, instead of degrading the product quietly.
"""

from __future__ import annotations

from typing import Any


def infer_tool_parser(tokenizer: Any) -> str | None:
    """The name of the ``mlx_lm.tool_parsers`` module for a tokenizer-like object (it needs
    ``chat_template`` and ``get_vocab()``), or None."""
    from mlx_lm.tokenizer_utils import _infer_tool_parser

    return _infer_tool_parser(tokenizer)


def infer_think_tokens(tokenizer: Any) -> tuple[str | None, str | None]:
    """The texts that open and close a model's reasoning (``get_vocab()`` and ``encode``)."""
    from mlx_lm.tokenizer_utils import _infer_thinking

    start, end, _, _ = _infer_thinking(tokenizer)
    return start, end


def model_classes(config: dict[str, Any]) -> tuple[type, type]:
    """mlx-lm's ``(Model, ModelArgs)`` classes for a ``config.json``'s ``model_type``."""
    from mlx_lm.utils import _get_classes

    return _get_classes(config)


def hf_tokenizer(wrapper: Any) -> Any:
    """The Hugging Face tokenizer inside mlx-lm's ``TokenizerWrapper``."""
    return wrapper._tokenizer
