"""The one place that maps error codes to HTTP statuses and error bodies.

Native routes answer Ollama's shape (``{"error": "..."}``) plus our stable ``code``; ``/v1``
routes answer OpenAI's (``{"error": {"message", "type", "code", "param"}}``).
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from aiohttp import web

from modelstore.errors import MlxserveError

STATUS_BY_CODE = {
    "invalid_reference": 400,
    "invalid_digest": 400,
    "invalid_request": 400,
    "invalid_json": 400,
    "invalid_modelspec": 400,
    "invalid_import_source": 400,
    "invalid_manifest": 400,
    "context_overflow": 400,
    "unsupported_feature": 400,
    "unsupported_format": 400,
    "unsupported_architecture": 400,
    "template_error": 400,
    "invalid_format": 400,
    "digest_mismatch": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "model_not_found": 404,
    "blob_not_found": 404,
    "not_found": 404,
    "method_not_allowed": 405,
    "request_too_large": 413,
    "queue_full": 429,
    "store_locked": 503,
    "out_of_memory": 507,
    "corrupt_store": 500,
    "runner_unavailable": 501,
    "registry_error": 502,
    "registry_unauthorized": 401,
}
OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}
RETRY_AFTER_SECONDS = 1


def status_for(error: MlxserveError) -> int:
    return STATUS_BY_CODE.get(error.code, 500)


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/")


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


def error_body(error: MlxserveError, openai: bool) -> dict[str, object]:
    """The error as the client sees it (paths on this machine cut to file names)."""
    body = _error_body(error, openai)
    return json.loads(_redacted(json.dumps(body, default=str)))


def _error_body(error: MlxserveError, openai: bool) -> dict[str, object]:
    if openai:
        status = status_for(error)
        return {
            "error": {
                "message": error.message,
                "type": OPENAI_TYPES.get(status, "server_error"),
                "code": error.code,
                "param": error.details.get("param"),
            }
        }
    body: dict[str, object] = {"error": error.message, "code": error.code}
    if error.details:
        body["details"] = error.details
    return body


def error_response(error: MlxserveError, path: str) -> web.Response:
    status = status_for(error)
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 429 else None
    return web.Response(
        status=status,
        text=json.dumps(error_body(error, is_openai_path(path)), default=str),
        content_type="application/json",
        headers=headers,
    )
