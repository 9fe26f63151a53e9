"""Constrained decoding's grammars, the same for every runner: a ``format`` (a JSON Schema, JSON
mode, or a free-form tool's Lark or regex grammar) as an llguidance grammar, checked.

Why llguidance: its Rust core computes a token mask in microseconds, it builds from an HF fast
tokenizer (MLX) or a GGUF's vocabulary (llama.cpp) and a JSON Schema directly, and its numpy
path needs neither torch nor Metal, so the same code runs on the CPU here and on a Mac
(xgrammar and outlines pull in torch). Each runner applies the grammar its own way: MLX as an
mlx-lm logits processor (``mlx/constraint.py``), llama.cpp as a mask on the slot's logits
(``llamacpp/slots.py``).

A schema is untrusted input: ``check_format`` validates it (the JSON Schema meta-schema, then
llguidance's grammar compiler, which also finds unsatisfiable schemas such as ``{"enum": []}``)
before any runner sees it, so every runner accepts and refuses the same schemas (llama.cpp's own
schema converter crashes the process on some).
"""

from __future__ import annotations

import json
from typing import Any

from mlxserve.errors import InvalidFormatError

JSON_MODE_SCHEMA: dict[str, Any] = {"type": "object"}
"""``format: "json"`` / ``json_object``: any JSON object, as OpenAI and Ollama document."""
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


def _json_schema_grammar(response_format: dict[str, Any]) -> str:
    """A JSON Schema's grammar (any JSON object for JSON mode), once the schema passes the
    meta-schema; a schema that does not raises ``ValueError`` saying why."""
    from llguidance import LLMatcher

    schema = response_format.get("schema") or JSON_MODE_SCHEMA
    error = _meta_schema_error(schema)
    if error is not None:
        raise ValueError(error)
    return LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=COMPACT)


def grammar_for(response_format: dict[str, Any]) -> str:
    """The llguidance grammar for a ``format`` (a JSON Schema, or a free-form tool's Lark or
    regex grammar): ``InvalidFormatError`` if it has none."""
    from llguidance import LLMatcher

    free_form = response_format.get("type") == "grammar"
    try:
        if free_form:
            grammar = _free_form_grammar(response_format)
        else:
            grammar = _json_schema_grammar(response_format)
        error = LLMatcher.validate_grammar(grammar)
    except (ValueError, TypeError, RecursionError) as exc:
        error = str(exc) or type(exc).__name__
    if error:
        what = "tool grammar" if free_form else "JSON schema"
        raise InvalidFormatError(f"invalid or unsupported {what}: {error}")
    return grammar
