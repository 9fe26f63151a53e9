"""Request bodies -> runner overrides: Ollama's ``options`` and OpenAI's fields, validated.

Both APIs name the same knobs differently (``num_predict`` / ``max_tokens``, ``repeat_penalty``
/ ``repetition_penalty``); everything funnels into the ``build_request`` overrides here so the
routes stay thin. Wrong types are a 400 with the field named, never a 500.
"""

from __future__ import annotations

import logging
from typing import Any

from mlxserve.errors import InvalidRequestError
from mlxserve.server.config import ConfigError, parse_duration

UNLIMITED_TOKENS = 1 << 30
"""``num_predict: -1`` (and -2): as many as the context allows; the runner caps it."""

OLLAMA_OPTIONS: dict[str, tuple[str, type]] = {
    "num_predict": ("max_tokens", int),
    "temperature": ("temperature", float),
    "top_k": ("top_k", int),
    "top_p": ("top_p", float),
    "min_p": ("min_p", float),
    "seed": ("seed", int),
    "stop": ("stop", list),
    "repeat_penalty": ("repetition_penalty", float),
    "repeat_last_n": ("repetition_context_size", int),
    "presence_penalty": ("presence_penalty", float),
    "frequency_penalty": ("frequency_penalty", float),
}
LOAD_TIME_OPTIONS = frozenset(
    {"num_ctx", "num_gpu", "num_thread", "num_batch", "use_mmap", "use_mlock", "numa",
     "main_gpu", "low_vram", "vocab_only", "num_keep"}
)
"""Accepted and ignored per request, as Ollama does for options a loaded runner cannot change."""
log = logging.getLogger("mlxserve.options")


_KIND_NAMES = {float: "a number", int: "an integer", list: "a string or a list of strings"}


def _typed(name: str, value: Any, kind: type) -> Any:
    """``value`` as ``kind``, or a 400 naming the field (for both APIs' numeric fields)."""
    if kind is list:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    elif kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    raise InvalidRequestError(
        f"'{name}' must be {_KIND_NAMES[kind]}, not {type(value).__name__}", param=name
    )


def optional_number(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    return None if value is None else _typed(name, value, float)


def optional_integer(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    return None if value is None else _typed(name, value, int)


def ollama_overrides(options: Any) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise InvalidRequestError("'options' must be an object", param="options")
    overrides: dict[str, Any] = {}
    for name, value in options.items():
        if value is None:
            continue
        if name in OLLAMA_OPTIONS:
            target, kind = OLLAMA_OPTIONS[name]
            overrides[target] = _typed(name, value, kind)
        elif name in LOAD_TIME_OPTIONS:
            log.info("option %s is applied at load time only; ignored for this request", name)
        else:
            log.warning("unknown option %s ignored (as Ollama does)", name)
    if overrides.get("max_tokens") is not None and overrides["max_tokens"] < 0:
        overrides["max_tokens"] = UNLIMITED_TOKENS
    if overrides.get("max_tokens") == 0:
        raise InvalidRequestError("num_predict must not be 0", param="num_predict")
    return overrides


def requested_context(options: Any) -> int | None:
    """``options.num_ctx``: the context the model must be loaded with (``residency.use``)."""
    if not isinstance(options, dict) or options.get("num_ctx") is None:
        return None
    return _typed("num_ctx", options["num_ctx"], int)


def ollama_format(value: Any) -> dict[str, Any] | None:
    """``format: "json"`` or a JSON Schema object."""
    if value in (None, ""):
        return None
    if value == "json":
        return {"type": "json"}
    if isinstance(value, dict):
        return {"type": "json_schema", "schema": value}
    raise InvalidRequestError("'format' must be \"json\" or a JSON Schema object", param="format")


def keep_alive_seconds(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ConfigError as exc:
        raise InvalidRequestError(exc.message, param="keep_alive") from None


def require_str(body: dict[str, Any], name: str, *, required: bool = True) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise InvalidRequestError(f"'{name}' is required", param=name)
        return None
    if not isinstance(value, str):
        raise InvalidRequestError(f"'{name}' must be a string", param=name)
    return value


def require_bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequestError(f"'{name}' must be true or false", param=name)
    return value
