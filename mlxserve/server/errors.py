"""The one place that turns an error into an HTTP answer: its status and each API's body.

Native routes answer Ollama's shape (``{"error": "..."}``) plus our stable ``code``; ``/v1``
routes answer OpenAI's (``{"error": {"message", "type", "code", "param"}}``), and
``/v1/messages`` Anthropic's (``{"type": "error", "error": {"type", "message"}}``, plus our
``code`` and ``param``: every API carries the stable code). An error that carries its
request's id (``REQUEST_ID`` in its details: a stream's error, an internal error) says it in
the body too, where each API's clients look for it: top-level ``request_id`` natively and on
Anthropic's API (as Anthropic's own error bodies), inside ``error`` on OpenAI's.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Literal

from aiohttp import web

from modelstore.errors import MlxserveError

OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}
RETRY_AFTER_SECONDS = 1
RETRY_STATUSES = frozenset({429, 503})
"""Statuses that are worth retrying: the client is told when (``Retry-After``)."""


REQUEST_ID = "request_id"
"""The detail an error carries its request's id in (``with_request_id``)."""


def with_request_id(error: MlxserveError, request_id: str) -> MlxserveError:
    """``error`` as one request's: for an error sent after a stream began, whose client reads
    events and may never see the stream's headers. A copy, since one error can end several
    requests (a crashed worker's)."""
    kind = type(error)
    stamped = kind.__new__(kind, *error.args)
    stamped.__dict__.update(error.__dict__)
    stamped.args = error.args
    stamped.details = {**error.details, REQUEST_ID: request_id}
    return stamped


def status_for(error: MlxserveError) -> int:
    return error.http_status


ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}
ErrorStyle = Literal["native", "openai", "anthropic"]
OVERFLOW_CODES: dict[ErrorStyle, str] = {"openai": "context_length_exceeded"}
"""The code each service gives an over-long prompt (ours, ``context_overflow``, elsewhere)."""


def style_for_path(path: str) -> ErrorStyle:
    """Which API's error shape a path answers in."""
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/v1/"):
        return "openai"
    return "native"


_private_roots: list[str] = [str(Path(tempfile.gettempdir()).resolve()), tempfile.gettempdir()]


def hide_paths_under(root: Path) -> None:
    """Never name a file under ``root`` (the store) in an error body: clients see file names,
    not where the daemon keeps them. Temporary folders are hidden from the start."""
    for text in (str(root), str(root.resolve())):
        if text not in _private_roots:
            _private_roots.append(text)


def _redacted(text: str) -> str:
    """``text`` with every path under a private root cut to its last component."""
    roots = "|".join(re.escape(root.rstrip("/")) for root in sorted(_private_roots, key=len)[::-1])
    pattern = re.compile(rf"(?:{roots})(?:/[^\s'\"(),:]*)?")
    return pattern.sub(lambda match: Path(match.group(0)).name or "<server path>", text)


def error_body(error: MlxserveError, style: ErrorStyle) -> dict[str, object]:
    """The error as the client sees it (paths on this machine cut to file names)."""
    return json.loads(_redacted(json.dumps(_error_body(error, style), default=str)))


def _overflow_message(style: ErrorStyle, prompt: object, context: object) -> str:
    """An over-long prompt worded as each service words it: agents match these sentences to
    decide to compact the conversation (Claude Code, Codex) instead of retrying it."""
    if style == "anthropic":
        return f"prompt is too long: {prompt} tokens > {context} maximum"
    if style == "openai":
        return (
            f"This model's maximum context length is {context} tokens. However, your messages "
            f"resulted in {prompt} tokens. Please reduce the length of the messages."
        )
    return f"the input length exceeds the context length ({prompt} tokens > {context})"


def _worded(error: MlxserveError, style: ErrorStyle) -> tuple[str, str]:
    """The message and code ``style``'s clients expect for ``error``."""
    if error.code == "context_overflow" and "context_length" in error.details:
        message = _overflow_message(
            style, error.details.get("prompt_tokens"), error.details["context_length"]
        )
        return message, OVERFLOW_CODES.get(style, error.code)
    return error.message, error.code


def _error_body(error: MlxserveError, style: ErrorStyle) -> dict[str, object]:
    status = status_for(error)
    message, code = _worded(error, style)
    request_id = error.details.get(REQUEST_ID)
    tagged = {REQUEST_ID: request_id} if request_id is not None else {}
    if style == "openai":
        return {
            "error": {
                "message": message,
                "type": OPENAI_TYPES.get(status, "server_error"),
                "code": code,
                "param": error.details.get("param"),
                **tagged,
            }
        }
    if style == "anthropic":
        return {
            "type": "error",
            "error": {
                "type": ANTHROPIC_TYPES.get(status, "api_error"),
                "message": message,
                "code": code,
                "param": error.details.get("param"),
            },
            **tagged,
        }
    body: dict[str, object] = {"error": message, "code": code, **tagged}
    details = {key: value for key, value in error.details.items() if key != REQUEST_ID}
    if details:
        body["details"] = details
    return body


def error_response(error: MlxserveError, path: str) -> web.Response:
    status = status_for(error)
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status in RETRY_STATUSES else None
    return web.Response(
        status=status,
        text=json.dumps(error_body(error, style_for_path(path)), default=str),
        content_type="application/json",
        headers=headers,
    )
