"""JSON-constrained decoding on MLX: an llguidance matcher as an mlx-lm logits processor.

Why llguidance: its Rust core computes a token mask in microseconds, it builds from an HF fast
tokenizer and a JSON Schema directly, and its numpy path needs neither torch nor Metal, so the
same code runs on the CPU here and on a Mac (xgrammar and outlines pull in torch). Each request
gets its own matcher inside its own logits processor, so constrained and free requests share
one ``BatchGenerator`` batch and batching keeps working.

A schema is untrusted input: ``check_format`` validates it (the JSON Schema meta-schema, then
llguidance's grammar compiler, which also finds unsatisfiable schemas such as ``{"enum": []}``)
before any runner sees it, so every runner accepts and refuses the same schemas (llama.cpp's own
schema converter crashes the process on some).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from mlxserve.errors import InvalidFormatError, UnsupportedFeatureError

JSON_MODE_SCHEMA: dict[str, Any] = {"type": "object"}
"""``format: "json"`` / ``json_object``: any JSON object, as OpenAI and Ollama document."""
_BITS = np.arange(32, dtype=np.uint32)
COMPACT: dict[str, Any] = {"whitespace_flexible": False}
"""One space after ``:`` and ``,`` and none elsewhere: a model cannot pad the answer with
whitespace until ``max_tokens`` runs out (a schema's ``x-guidance`` may override it)."""


def check_format(response_format: dict[str, Any] | None) -> None:
    """Raise ``InvalidFormatError`` (HTTP 400, saying why) unless every runner can honour this
    ``format`` / ``response_format``; ``None`` (free text) always passes."""
    if response_format:
        grammar_for(response_format)


def _meta_schema_error(schema: Any) -> str | None:
    from jsonschema import validators
    from jsonschema.exceptions import SchemaError

    if not isinstance(schema, dict):
        return "a JSON Schema must be an object"
    try:
        validators.validator_for(schema, default=validators.Draft202012Validator).check_schema(
            schema
        )
    except SchemaError as exc:
        where = "/".join(str(part) for part in exc.absolute_path)
        return f"{exc.message} (at /{where})" if where else exc.message
    return None


def _free_form_grammar(response_format: dict[str, Any]) -> str:
    """A free-form tool's grammar (``{"type": "grammar", "syntax": "lark" | "regex",
    "definition"}``, Responses ``custom`` tools): llguidance reads both syntaxes."""
    from llguidance import LLMatcher

    definition = response_format.get("definition") or ""
    if response_format.get("syntax") == "regex":
        return LLMatcher.grammar_from_regex(definition)
    return LLMatcher.grammar_from_lark(definition)


def grammar_for(response_format: dict[str, Any]) -> str:
    """The llguidance grammar for a ``format`` (a JSON Schema, or a free-form tool's Lark or
    regex grammar): ``InvalidFormatError`` if it has none."""
    from llguidance import LLMatcher

    if response_format.get("type") == "grammar":
        try:
            grammar = _free_form_grammar(response_format)
            error = LLMatcher.validate_grammar(grammar)
        except (ValueError, TypeError, RecursionError) as exc:
            error = str(exc) or type(exc).__name__
        if error:
            raise InvalidFormatError(f"invalid or unsupported tool grammar: {error}")
        return grammar
    schema = response_format.get("schema") or JSON_MODE_SCHEMA
    try:
        error = _meta_schema_error(schema)
        if error is None:
            grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=COMPACT)
            error = LLMatcher.validate_grammar(grammar)
    except (ValueError, TypeError, RecursionError) as exc:
        error = str(exc) or type(exc).__name__
    if error:
        raise InvalidFormatError(f"invalid or unsupported JSON schema: {error}")
    return grammar


def build_tokenizer(hf_tokenizer: Any, eos_ids: list[int]) -> Any:
    """The llguidance view of the model's tokenizer (about a second: cache it per model)."""
    try:
        import llguidance.hf
    except ImportError as exc:
        raise UnsupportedFeatureError(
            "JSON-constrained output on MLX needs llguidance: pip install llguidance"
        ) from exc
    return llguidance.hf.from_tokenizer(hf_tokenizer, eos_token=eos_ids or None)


class JsonConstraint:
    """``(tokens, logits) -> logits``: only tokens the grammar allows keep their logits.

    Called once per generated token with the sequence so far; from the second call on, the
    last token in ``tokens`` is the one just sampled, which the matcher consumes first.
    """

    def __init__(self, tokenizer: Any, grammar: str) -> None:
        from llguidance import LLMatcher
        from llguidance.numpy import allocate_token_bitmask

        self._matcher = LLMatcher(tokenizer, grammar, log_level=0)
        if self._matcher.is_error():
            raise InvalidFormatError(f"unsupported JSON schema: {self._matcher.get_error()}")
        self._vocab = tokenizer.vocab_size
        self._bitmask = allocate_token_bitmask(1, self._vocab)
        self._started = False

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import mlx.core as mx
        from llguidance.numpy import fill_next_token_bitmask

        if self._started:
            self._matcher.consume_token(int(tokens[-1].item()))
        self._started = True
        fill_next_token_bitmask(self._matcher, self._bitmask)
        words = self._bitmask[0].view(np.uint32)
        allowed = ((words[:, None] >> _BITS) & 1).astype(bool).reshape(-1)[: self._vocab]
        width = logits.shape[-1]
        if width > allowed.size:
            allowed = np.concatenate([allowed, np.zeros(width - allowed.size, dtype=bool)])
        mask = mx.array(allowed[:width])
        return mx.where(mask, logits, mx.array(-float("inf"), dtype=logits.dtype))
